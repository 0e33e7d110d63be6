//! Statistics of Iterative Reward Calibration (IRC).
//!
//! For every reward tier, two per-trajectory variables are related to task
//! success: presence (1 when the trajectory has a turn of that tier) and count
//! (how many turns of that tier it has). Their point-biserial correlations
//! with success come from integer sums, so shards of a buffer reduce
//! separately and merge exactly: the same code serves one file, many files
//! across cores, or many machines.

use crate::advantages::{validate_offsets, validate_outcome};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// A turn with no tier (not labelled).
pub const NO_TIER: i64 = -1;

/// Additive sums per tier. Presence is 0/1, so its sum of squares is its sum.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TierSums {
    pub trajectories: u64,
    pub successes: u64,
    /// Trajectories with at least one turn of the tier (sum of x).
    pub present: Vec<u64>,
    /// Successful trajectories with the tier (sum of x * y).
    pub present_success: Vec<u64>,
    /// Turns of the tier (sum of c).
    pub turns: Vec<u64>,
    /// Sum of squared per-trajectory counts (sum of c^2).
    pub turns_sq: Vec<u64>,
    /// Turns of the tier in successful trajectories (sum of c * y).
    pub turns_success: Vec<u64>,
}

impl TierSums {
    pub fn new(tiers: usize) -> Self {
        TierSums {
            trajectories: 0,
            successes: 0,
            present: vec![0; tiers],
            present_success: vec![0; tiers],
            turns: vec![0; tiers],
            turns_sq: vec![0; tiers],
            turns_success: vec![0; tiers],
        }
    }

    pub fn tiers(&self) -> usize {
        self.present.len()
    }

    /// Adds another shard's sums; both must count the same tiers.
    pub fn merge(&mut self, other: &TierSums) -> Result<()> {
        if other.tiers() != self.tiers() {
            return Err(Error::invalid(format!(
                "cannot merge statistics of {} tiers into statistics of {} tiers",
                other.tiers(),
                self.tiers()
            )));
        }
        self.trajectories += other.trajectories;
        self.successes += other.successes;
        for (mine, theirs) in [
            (&mut self.present, &other.present),
            (&mut self.present_success, &other.present_success),
            (&mut self.turns, &other.turns),
            (&mut self.turns_sq, &other.turns_sq),
            (&mut self.turns_success, &other.turns_success),
        ] {
            mine.iter_mut().zip(theirs).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Accumulates a ragged batch: `turn_tiers` holds one tier code per turn
    /// (0..tiers, or -1 for an unlabelled turn). A trajectory succeeds when
    /// its outcome is at least `success_threshold`.
    pub fn accumulate(
        &mut self,
        outcome: &[f64],
        turn_offsets: &[i64],
        turn_tiers: &[i64],
        success_threshold: f64,
    ) -> Result<()> {
        let tiers = self.tiers();
        validate_offsets(turn_offsets, outcome.len(), turn_tiers.len())?;
        validate_outcome(outcome)?;
        if let Some(j) = turn_tiers
            .iter()
            .position(|&t| t < NO_TIER || t >= tiers as i64)
        {
            return Err(Error::invalid(format!(
                "turn_tiers[{j}] = {} but tier codes run from 0 to {} (-1: no tier)",
                turn_tiers[j],
                tiers as i64 - 1
            )));
        }
        let chunk = |range: std::ops::Range<usize>| -> TierSums {
            let mut sums = TierSums::new(tiers);
            let mut counts = vec![0u64; tiers];
            for traj in range {
                let success = outcome[traj] >= success_threshold;
                counts.fill(0);
                let turns = turn_offsets[traj] as usize..turn_offsets[traj + 1] as usize;
                for &t in &turn_tiers[turns] {
                    if t >= 0 {
                        counts[t as usize] += 1;
                    }
                }
                sums.trajectories += 1;
                sums.successes += success as u64;
                for (tier, &c) in counts.iter().enumerate() {
                    let present = (c > 0) as u64;
                    sums.present[tier] += present;
                    sums.present_success[tier] += present * success as u64;
                    sums.turns[tier] += c;
                    sums.turns_sq[tier] += c * c;
                    sums.turns_success[tier] += c * success as u64;
                }
            }
            sums
        };
        const CHUNK: usize = 4096;
        let shards: Vec<TierSums> = (0..outcome.len().div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| chunk(c * CHUNK..((c + 1) * CHUNK).min(outcome.len())))
            .collect();
        for shard in &shards {
            self.merge(shard)?;
        }
        Ok(())
    }

    /// Point-biserial correlation of a tier's presence (or count) with success.
    /// An undefined one (a constant variable: the tier in no trajectory or
    /// in all, the same count everywhere, no success or no failure) is
    /// reported as r = 0, p = 1 and the interval [-1, 1], rather than NaN.
    pub fn correlation(&self, tier: usize, variable: Variable, confidence: f64) -> Correlation {
        let n = self.trajectories as i128;
        let sy = self.successes as i128;
        let (sx, sxx, sxy) = match variable {
            Variable::Presence => (
                self.present[tier] as i128,
                self.present[tier] as i128,
                self.present_success[tier] as i128,
            ),
            Variable::Count => (
                self.turns[tier] as i128,
                self.turns_sq[tier] as i128,
                self.turns_success[tier] as i128,
            ),
        };
        // Integer numerator and variances: exact whatever the sharding.
        let cov = n * sxy - sx * sy;
        let var_x = n * sxx - sx * sx;
        let var_y = n * sy - sy * sy;
        if var_x <= 0 || var_y <= 0 {
            // Undefined (a constant variable): reported as r = 0, p = 1, and
            // an interval that rules nothing out, not the one of an r of 0
            // measured on n pairs (+-0.196 at n = 100 claimed a relation
            // near 0 when no trajectory succeeded, say).
            return Correlation {
                ci_low: -1.0,
                ci_high: 1.0,
                ..Correlation::new(0.0, self.trajectories, self.present[tier], confidence)
            };
        }
        let r = if perfect(cov, var_x, var_y) {
            // Rounding in the square roots would give 0.9999999999999998 and
            // a tiny but non-zero p-value; a perfect relation is exact here.
            cov.signum() as f64
        } else {
            // One square root of the exact product, then one division: an r
            // that is a ratio of integers comes out correctly rounded (2/20
            // is 0.1, not 0.09999999999999998 as 2/(sqrt(20)*sqrt(20)) is),
            // so a tie with --min-abs-r (0.1) is decided as scipy decides it.
            let scale = match var_x.checked_mul(var_y) {
                Some(product) => (product as f64).sqrt(),
                None => (var_x as f64).sqrt() * (var_y as f64).sqrt(),
            };
            (cov as f64 / scale).clamp(-1.0, 1.0)
        };
        Correlation::new(r, self.trajectories, self.present[tier], confidence)
    }
}

/// Whether cov^2 = var_x * var_y exactly (Cauchy-Schwarz equality: x is an
/// exact linear function of y, so |r| = 1); false when a product overflows.
fn perfect(cov: i128, var_x: i128, var_y: i128) -> bool {
    match (cov.checked_mul(cov), var_x.checked_mul(var_y)) {
        (Some(lhs), Some(rhs)) => lhs == rhs,
        _ => false,
    }
}

/// Which per-trajectory variable is correlated with success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variable {
    Presence,
    Count,
}

impl Variable {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "presence" => Ok(Variable::Presence),
            "count" => Ok(Variable::Count),
            _ => Err(Error::UnknownName {
                what: "variable",
                name: name.to_string(),
                valid: vec!["presence".into(), "count".into()],
            }),
        }
    }
}

/// A correlation with its two-sided p-value and Fisher-z confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Correlation {
    pub r: f64,
    pub p_value: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n: u64,
    /// Trajectories in which the tier occurs.
    pub support: u64,
}

impl Correlation {
    /// r from n pairs: the t-test p-value (n - 2 degrees of freedom, as
    /// scipy.stats.pearsonr) and the Fisher-z interval (needs n > 3; [-1, 1]
    /// otherwise).
    pub fn new(r: f64, n: u64, support: u64, confidence: f64) -> Self {
        let p_value = if n < 3 {
            1.0
        } else if r.abs() >= 1.0 {
            0.0
        } else {
            let df = (n - 2) as f64;
            let t2 = r * r * df / (1.0 - r * r);
            regularized_incomplete_beta(df / (df + t2), df / 2.0, 0.5).clamp(0.0, 1.0)
        };
        let (ci_low, ci_high) = if n <= 3 {
            (-1.0, 1.0)
        } else if r.abs() >= 1.0 {
            // A perfect relation: z is infinite and the interval degenerate.
            // (Clamping r below 1 gave an interval that excluded r itself.)
            (r, r)
        } else {
            let z = r.atanh();
            let half = normal_quantile(0.5 + confidence / 2.0) / ((n - 3) as f64).sqrt();
            ((z - half).tanh(), (z + half).tanh())
        };
        Correlation {
            r,
            p_value,
            ci_low,
            ci_high,
            n,
            support,
        }
    }
}

/// Per tier: how many turns, how many have an advantage of the wrong sign,
/// the sum of their advantages and their mean. The first three are additive
/// across shards whose groups do not straddle shards.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Direction {
    pub turns: Vec<u64>,
    pub misaligned: Vec<u64>,
    pub advantage_sum: Vec<f64>,
    /// The mean advantage over the tier's turns, 0 when it lies within
    /// [`ZERO_ADVANTAGE`] of the batch's largest |advantage| from 0 (or the
    /// tier has no turns): a mean that is 0 in exact arithmetic comes out of
    /// the sum as about ±1e-16 with a sign set by the order of the turns.
    pub mean_advantage: Vec<f64>,
}

/// Advantages within this fraction of the batch's largest magnitude count as
/// 0 in [`direction_check`]: a turn whose return equals its group's mean has
/// an advantage of 0 in exact arithmetic, but of about ±1e-15 after rounding,
/// with a sign that depends on the order of the group's members (and so of
/// the input files).
pub const ZERO_ADVANTAGE: f64 = 1e-9;

/// Counts the turns whose advantage has the opposite sign of their tier's
/// correlation. `signs[t]` is -1, 0 or +1; a tier with sign 0 (a zero reward,
/// or no correlation) has no misaligned turns. An advantage of 0, or within
/// [`ZERO_ADVANTAGE`] of the largest |advantage| from it, is not misaligned,
/// and a tier's mean advantage within that tolerance is reported as 0.
pub fn direction_check(advantages: &[f64], turn_tiers: &[i64], signs: &[i8]) -> Result<Direction> {
    if advantages.len() != turn_tiers.len() {
        return Err(Error::invalid(format!(
            "advantages has {} turns but turn_tiers has {}",
            advantages.len(),
            turn_tiers.len()
        )));
    }
    let tiers = signs.len();
    let mut out = Direction {
        turns: vec![0; tiers],
        misaligned: vec![0; tiers],
        advantage_sum: vec![0.0; tiers],
        mean_advantage: vec![0.0; tiers],
    };
    let largest = advantages
        .iter()
        .filter(|a| a.is_finite())
        .fold(0.0_f64, |m, a| m.max(a.abs()));
    let zero = ZERO_ADVANTAGE * largest;
    for (j, (&adv, &tier)) in advantages.iter().zip(turn_tiers).enumerate() {
        if tier == NO_TIER {
            continue;
        }
        if tier < 0 || tier >= tiers as i64 {
            return Err(Error::invalid(format!(
                "turn_tiers[{j}] = {tier} but tier codes run from 0 to {} (-1: no tier)",
                tiers as i64 - 1
            )));
        }
        let t = tier as usize;
        out.turns[t] += 1;
        out.advantage_sum[t] += adv;
        let sign = signs[t] as f64;
        if sign * adv < -zero {
            out.misaligned[t] += 1;
        }
    }
    for ((mean, &sum), &turns) in out
        .mean_advantage
        .iter_mut()
        .zip(&out.advantage_sum)
        .zip(&out.turns)
    {
        let m = if turns == 0 { 0.0 } else { sum / turns as f64 };
        *mean = if m.abs() <= zero { 0.0 } else { m };
    }
    Ok(out)
}

/// ln Gamma(x) for x > 0 (Lanczos, g = 7, nine terms; about 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, &c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta function I_x(a, b), by its continued
/// fraction (modified Lentz), using the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
/// where the fraction converges slowly.
pub fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a);
    }
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut fraction = d;
    for m in 1..500 {
        let m = m as f64;
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        for coef in [even, odd] {
            d = 1.0 + coef * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + coef / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            fraction *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    ln_front.exp() * fraction / a
}

/// The standard normal CDF from erfc: a Taylor series of erf below 3 and
/// the Laplace continued fraction of erfc above (absolute error about 1e-13).
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 3.0 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        return 1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum;
    }
    // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))),
    // evaluated from the tail.
    let mut tail = x;
    for k in (1..60).rev() {
        tail = x + (k as f64 / 2.0) / tail;
    }
    (-x * x).exp() / std::f64::consts::PI.sqrt() / tail
}

/// The standard normal quantile, by Newton's method on `normal_cdf`.
pub fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let mut x: f64 = 0.0;
    for _ in 0..100 {
        let density = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let step = (normal_cdf(x) - p) / density.max(1e-300);
        x -= step.clamp(-2.0, 2.0);
        if step.abs() < 1e-14 {
            break;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_functions_match_known_values() {
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-10);
        assert!((normal_cdf(-1.0) - 0.158_655_253_931_457_05).abs() < 1e-12);
        assert!((normal_cdf(4.0) - 0.999_968_328_758_166_9).abs() < 1e-12);
        // I_x(1, 1) = x; I_x(a, 1) = x^a.
        assert!((regularized_incomplete_beta(0.3, 1.0, 1.0) - 0.3).abs() < 1e-12);
        assert!((regularized_incomplete_beta(0.6, 3.0, 1.0) - 0.216).abs() < 1e-12);
    }

    #[test]
    fn sharded_sums_equal_one_pass() {
        let outcome = [1.0, 0.0, 1.0, 0.0, 1.0];
        let offsets = [0, 2, 3, 3, 6, 7];
        let tiers = [0, 1, 1, 0, 0, 2, -1];
        let mut whole = TierSums::new(3);
        whole.accumulate(&outcome, &offsets, &tiers, 1.0).unwrap();
        let mut left = TierSums::new(3);
        left.accumulate(&outcome[..2], &offsets[..3], &tiers[..3], 1.0)
            .unwrap();
        let mut right = TierSums::new(3);
        let shifted: Vec<i64> = offsets[2..].iter().map(|o| o - 3).collect();
        right
            .accumulate(&outcome[2..], &shifted, &tiers[3..], 1.0)
            .unwrap();
        left.merge(&right).unwrap();
        assert_eq!(left, whole);
        assert_eq!(whole.present, vec![2, 2, 1]);
        assert_eq!(whole.turns_sq, vec![1 + 4, 1 + 1, 1]);
    }

    #[test]
    fn perfect_correlations_are_exact() {
        // Presence equal to success (n = 3), its complement, and a count that
        // is twice success: |r| = 1 and p = 0 exactly, as scipy gives.
        let mut sums = TierSums::new(3);
        sums.accumulate(&[1.0, 1.0, 0.0], &[0, 3, 6, 6], &[0, 2, 2, 0, 2, 2], 1.0)
            .unwrap();
        let presence = sums.correlation(0, Variable::Presence, 0.95);
        assert_eq!((presence.r, presence.p_value), (1.0, 0.0));
        let count = sums.correlation(2, Variable::Count, 0.95);
        assert_eq!((count.r, count.p_value), (1.0, 0.0));
        let mut complement = TierSums::new(1);
        complement
            .accumulate(&[1.0, 0.0, 0.0], &[0, 0, 1, 2], &[0, 0], 1.0)
            .unwrap();
        let c = complement.correlation(0, Variable::Presence, 0.95);
        assert_eq!((c.r, c.p_value), (-1.0, 0.0));
        assert!(!perfect(i128::MAX, 1, 1));
    }

    #[test]
    fn intervals_contain_r_even_when_perfect() {
        // n > 3 with |r| = 1: the interval is [r, r]; it used to be
        // [0.9999999999999981, 0.9999999999999994], which excludes r = 1.
        for r in [1.0, -1.0] {
            let c = Correlation::new(r, 40, 20, 0.95);
            assert_eq!((c.ci_low, c.ci_high), (r, r));
        }
        let mut sums = TierSums::new(1);
        let outcome: Vec<f64> = (0..40).map(|i| (i % 2) as f64).collect();
        let offsets: Vec<i64> = (0..=40).collect();
        let tiers: Vec<i64> = (0..40).map(|i| if i % 2 == 1 { 0 } else { -1 }).collect();
        sums.accumulate(&outcome, &offsets, &tiers, 1.0).unwrap();
        let c = sums.correlation(0, Variable::Presence, 0.95);
        assert_eq!((c.r, c.ci_low, c.ci_high), (1.0, 1.0, 1.0));
        // Everywhere else the interval holds r, and close to 1 it tightens
        // towards it.
        for r in [-0.999_999_999, -0.5, 0.0, 0.3, 0.999_999_999_999] {
            for n in [4, 5, 40, 100_000] {
                let c = Correlation::new(r, n, 1, 0.95);
                assert!(c.ci_low <= r && r <= c.ci_high, "{r} {n}: {c:?}");
            }
        }
    }

    #[test]
    fn an_undefined_correlation_has_the_whole_interval() {
        // 100 trajectories, none succeeded (or all did): tier 0 in 40 of
        // them, tier 1 in every one, once (a constant count too), tier 2 in
        // none. Every correlation is undefined: r = 0, p = 1 and an interval
        // of [-1, 1]; it was [-0.196, 0.196], the interval of r = 0 measured.
        for outcome in [0.0, 1.0] {
            let outcome = vec![outcome; 100];
            let offsets: Vec<i64> = (0..=100).map(|i| i * 2).collect();
            let tiers: Vec<i64> = (0..100)
                .flat_map(|i| [if i < 40 { 0 } else { -1 }, 1])
                .collect();
            let mut sums = TierSums::new(3);
            sums.accumulate(&outcome, &offsets, &tiers, 1.0).unwrap();
            for tier in 0..3 {
                for variable in [Variable::Presence, Variable::Count] {
                    let c = sums.correlation(tier, variable, 0.95);
                    assert_eq!((c.r, c.p_value, c.ci_low, c.ci_high), (0.0, 1.0, -1.0, 1.0));
                    assert_eq!((c.n, c.support), (100, [40, 100, 0][tier]));
                }
            }
        }
        // Mixed outcomes, tier 1 in every trajectory: presence is constant,
        // its count need not be.
        let mut sums = TierSums::new(2);
        sums.accumulate(
            &[1.0, 0.0, 1.0, 0.0, 1.0],
            &[0, 2, 3, 4, 6, 7],
            &[1, 1, 1, 1, 1, 1, 1],
            1.0,
        )
        .unwrap();
        let presence = sums.correlation(1, Variable::Presence, 0.95);
        assert_eq!(
            (presence.r, presence.ci_low, presence.ci_high),
            (0.0, -1.0, 1.0)
        );
        let count = sums.correlation(1, Variable::Count, 0.95);
        assert!(
            count.r < 0.0 && count.ci_low > -1.0 && count.ci_high < 1.0,
            "{count:?}"
        );
    }

    #[test]
    fn a_rational_r_is_correctly_rounded() {
        // Presence 0,0,0,1,1,0,1,0,1 against success 0,0,0,0,0,1,1,1,1:
        // cov 2, both variances 20, r = 1/10 exactly. Two square roots gave
        // 0.09999999999999998, below a min_abs_r of 0.1.
        let mut sums = TierSums::new(1);
        let outcome = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let offsets = [0, 0, 0, 0, 1, 2, 2, 3, 3, 4];
        sums.accumulate(&outcome, &offsets, &[0, 0, 0, 0], 1.0)
            .unwrap();
        assert_eq!(sums.correlation(0, Variable::Presence, 0.95).r, 0.1);
        // Every r = cov / var with equal variances (sx = sy) is the double
        // nearest the fraction.
        for n in 4..40i64 {
            for sx in 1..n {
                let var = n * sx - sx * sx;
                for sxy in 0.max(2 * sx - n)..=sx {
                    let cov = n * sxy - sx * sx;
                    let sums = TierSums {
                        trajectories: n as u64,
                        successes: sx as u64,
                        present: vec![sx as u64],
                        present_success: vec![sxy as u64],
                        ..TierSums::new(1)
                    };
                    let r = sums.correlation(0, Variable::Presence, 0.95).r;
                    assert_eq!(r, cov as f64 / var as f64, "n {n} sx {sx} sxy {sxy}");
                }
            }
        }
    }

    #[test]
    fn bad_tier_codes_name_the_turn() {
        let err = TierSums::new(2)
            .accumulate(&[1.0], &[0, 2], &[0, 5], 1.0)
            .unwrap_err();
        assert!(err.to_string().contains("turn_tiers[1] = 5"), "{err}");
    }

    #[test]
    fn direction_counts_wrong_signs_only_for_signed_tiers() {
        let d = direction_check(&[0.5, -0.2, -0.1, 0.0, 0.3], &[0, 0, 1, 0, -1], &[1, 0]).unwrap();
        assert_eq!(d.turns, vec![3, 1]);
        assert_eq!(d.misaligned, vec![1, 0]);
    }

    #[test]
    fn rounding_noise_around_zero_is_not_misaligned() {
        // -2e-15 next to advantages of order 1 is a zero that rounding signed.
        let d = direction_check(&[1.0, -2e-15, -1e-8, -1.0], &[-1, 0, 0, -1], &[1]).unwrap();
        assert_eq!(d.turns, vec![2]);
        assert_eq!(d.misaligned, vec![1]);
        // The tolerance follows the batch's scale: alone, -2e-15 is a sign.
        let d = direction_check(&[-2e-15, 1e-15], &[0, -1], &[1]).unwrap();
        assert_eq!(d.misaligned, vec![1]);
    }

    #[test]
    fn a_mean_advantage_of_rounding_noise_is_zero_in_any_order() {
        // 0.2, 0.3, 0.4 and -0.9 sum to 0, +1.1e-16 or -1.1e-16 depending
        // on their order: a mean of 0 whose sign was set by the order.
        let orders = [
            [0.2, 0.3, 0.4, -0.9],
            [0.2, 0.4, 0.3, -0.9],
            [0.3, 0.4, 0.2, -0.9],
        ];
        let mut signs = vec![];
        for order in orders {
            let adv: Vec<f64> = order.iter().copied().chain([1.0]).collect();
            let d = direction_check(&adv, &[0, 0, 0, 0, -1], &[1]).unwrap();
            signs.push(d.advantage_sum[0].partial_cmp(&0.0));
            assert_eq!(d.mean_advantage, vec![0.0], "{order:?}");
        }
        use std::cmp::Ordering::*;
        assert_eq!(signs, vec![Some(Equal), Some(Greater), Some(Less)]);
        // A mean beyond the tolerance keeps its value; no turns, 0.
        let d = direction_check(&[1e-8, 1.0], &[0, -1], &[1, -1]).unwrap();
        assert_eq!(d.mean_advantage, vec![1e-8, 0.0]);
    }
}
