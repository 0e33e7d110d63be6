//! Turn-level advantage estimators over ragged batches.
//!
//! A batch holds B trajectories. Turn rewards of all trajectories are
//! concatenated in one flat array and `turn_offsets` (length B + 1) marks where
//! each trajectory's turns start, as in a CSR matrix. `group` assigns every
//! trajectory to the group of rollouts sampled for the same task; groups may
//! come in any order. Advantages come back in the layout of `turn_rewards`.
//!
//! Estimators work on one group at a time ([`GroupView`]), so the driver can
//! run groups in parallel and each estimator stays a short, plain function.
//! Adding an estimator is one function and one line in [`ESTIMATORS`].

use crate::error::{Error, Result};
use rayon::prelude::*;

/// How a set of values is normalised within its group (GN in DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Subtract the mean, divide by the sample standard deviation (ddof = 1) + eps.
    Std,
    /// Subtract the mean only.
    Mean,
    /// Leave values as they are.
    None,
    /// Subtract the mean of the set's other values (a leave-one-out
    /// baseline, RLOO): `v_i - mean_{j != i} v_j = n / (n - 1) * (v_i - mean)`.
    Rloo,
    /// Subtract the group's mean, divide by the sample standard deviation
    /// (ddof = 1) + eps of the same kind of value over the whole batch: the
    /// outcomes of every trajectory, the values at turn k of every trajectory
    /// (`TurnNorm::Position`) or every turn value (`TurnNorm::Pooled`). The
    /// std is of the raw values, as TRL's `scale_rewards="batch"` takes it.
    Batch,
}

impl Norm {
    pub const NAMES: [&'static str; 5] = ["std", "mean", "none", "rloo", "batch"];

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "std" => Ok(Norm::Std),
            "mean" => Ok(Norm::Mean),
            "none" => Ok(Norm::None),
            "rloo" => Ok(Norm::Rloo),
            "batch" => Ok(Norm::Batch),
            _ => Err(unknown("norm", name, &Self::NAMES)),
        }
    }
}

/// Which turns are normalised together for the turn-level term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnNorm {
    /// Turn k of a trajectory against turn k of the group's other trajectories
    /// that have a turn k (MT-GRPO).
    Position,
    /// All turns of the group together. Unbiased when the policy decides how
    /// many turns it takes (verl RFC #7244).
    Pooled,
}

impl TurnNorm {
    pub const NAMES: [&'static str; 2] = ["position", "pooled"];

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "position" => Ok(TurnNorm::Position),
            "pooled" => Ok(TurnNorm::Pooled),
            _ => Err(unknown("turn_norm", name, &Self::NAMES)),
        }
    }
}

fn unknown(what: &'static str, name: &str, valid: &[&str]) -> Error {
    Error::UnknownName {
        what,
        name: name.to_string(),
        valid: valid.iter().map(|s| s.to_string()).collect(),
    }
}

/// Estimator parameters. `gamma` and `lam` left as `None` take the
/// estimator's own default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub norm: Norm,
    pub eps: f64,
    pub gamma: Option<f64>,
    pub lam: Option<f64>,
    pub turn_norm: TurnNorm,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            norm: Norm::Std,
            eps: 1e-6,
            gamma: None,
            lam: None,
            turn_norm: TurnNorm::Position,
        }
    }
}

impl Params {
    fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::invalid(format!(
                "eps must be finite and >= 0, got {}",
                self.eps
            )));
        }
        for (name, value) in [("gamma", self.gamma), ("lam", self.lam)] {
            if let Some(v) = value {
                if !v.is_finite() {
                    return Err(Error::invalid(format!("{name} must be finite, got {v}")));
                }
            }
        }
        // A weight beyond MAX_REWARD can overflow: lam = 1e308 times an
        // advantage of 1 or more is inf. Within it, lam times a normalised
        // value (or a return of rewards up to MAX_REWARD) stays finite.
        if let Some(lam) = self.lam.filter(|l| l.abs() > MAX_REWARD) {
            return Err(Error::invalid(format!(
                "lam must be at most {MAX_REWARD:e} in size (larger weights overflow the \
                 advantages to inf), got {lam:e}"
            )));
        }
        // A discount factor: beyond 1 the returns grow with the horizon
        // (and overflow to NaN for large values).
        if let Some(gamma) = self.gamma.filter(|g| !(0.0..=1.0).contains(g)) {
            return Err(Error::invalid(format!(
                "gamma is a discount factor and must lie in [0, 1], got {gamma}"
            )));
        }
        Ok(())
    }
}

/// A ragged batch, borrowed from the caller (numpy arrays in the bindings).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub outcome: &'a [f64],
    pub group: &'a [i64],
    pub turn_rewards: &'a [f64],
    pub turn_offsets: &'a [i64],
}

impl<'a> Batch<'a> {
    pub fn len(&self) -> usize {
        self.outcome.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcome.is_empty()
    }

    /// Checks every contract of the layout; the error names the trajectory.
    pub fn validate(&self) -> Result<()> {
        let b = self.outcome.len();
        if self.group.len() != b {
            return Err(Error::invalid(format!(
                "group has length {} but outcome has length {b}: one group id per trajectory",
                self.group.len()
            )));
        }
        validate_offsets(self.turn_offsets, b, self.turn_rewards.len())?;
        validate_outcome(self.outcome)?;
        if let Some(j) = first_unusable(self.turn_rewards) {
            let traj = trajectory_of_turn(self.turn_offsets, j);
            let turn = j as i64 - self.turn_offsets[traj];
            return Err(Error::invalid(format!(
                "turn_rewards[{j}] is {:?} (trajectory {traj}, turn {turn}); rewards must be finite \
                 and at most {MAX_REWARD:e} in size",
                self.turn_rewards[j]
            )));
        }
        Ok(())
    }

    fn turns(&self, traj: usize) -> std::ops::Range<usize> {
        self.turn_offsets[traj] as usize..self.turn_offsets[traj + 1] as usize
    }
}

/// Checks that every outcome is finite and at most [`MAX_REWARD`] in size;
/// the error names the trajectory.
pub fn validate_outcome(outcome: &[f64]) -> Result<()> {
    match first_unusable(outcome) {
        Some(i) => Err(Error::invalid(format!(
            "outcome[{i}] is {:?} (trajectory {i}); outcomes must be finite and at most \
             {MAX_REWARD:e} in size",
            outcome[i]
        ))),
        None => Ok(()),
    }
}

/// Checks CSR offsets: length `trajectories + 1`, starting at 0, monotone,
/// ending at `turns`.
pub fn validate_offsets(turn_offsets: &[i64], trajectories: usize, turns: usize) -> Result<()> {
    if turn_offsets.len() != trajectories + 1 {
        return Err(Error::invalid(format!(
            "turn_offsets has length {} but must have length len(outcome) + 1 = {}",
            turn_offsets.len(),
            trajectories + 1
        )));
    }
    if turn_offsets[0] != 0 {
        return Err(Error::invalid(format!(
            "turn_offsets[0] must be 0, got {}",
            turn_offsets[0]
        )));
    }
    for i in 0..trajectories {
        if turn_offsets[i + 1] < turn_offsets[i] {
            return Err(Error::invalid(format!(
                "turn_offsets is not monotone at trajectory {i}: turn_offsets[{i}] = {} > turn_offsets[{}] = {}",
                turn_offsets[i],
                i + 1,
                turn_offsets[i + 1]
            )));
        }
    }
    let last = turn_offsets[trajectories];
    if last != turns as i64 {
        return Err(Error::invalid(format!(
            "turn_offsets[-1] = {last} but len(turn_rewards) = {turns}; the last offset must equal the number of turns"
        )));
    }
    Ok(())
}

/// Index of the first NaN or infinity. Scans in blocks with a branch-free
/// reduction (which vectorises) and searches a block only when it has one.
/// Rewards and outcomes beyond this size overflow the sums of squares of
/// the normalisation (and would come out as NaN or 0).
pub const MAX_REWARD: f64 = 1e100;

/// The first value that is not finite or exceeds [`MAX_REWARD`] in size.
fn first_unusable(values: &[f64]) -> Option<usize> {
    const BLOCK: usize = 1024;
    let unusable = |v: &f64| v.is_nan() || v.abs() > MAX_REWARD;
    let check = |(b, block): (usize, &[f64])| {
        let bad = block.iter().fold(false, |acc, v| acc | unusable(v));
        if bad {
            block.iter().position(unusable).map(|i| b * BLOCK + i)
        } else {
            None
        }
    };
    if values.len() >= PARALLEL_MIN_TURNS {
        values.par_chunks(BLOCK).enumerate().find_map_first(check)
    } else {
        values.chunks(BLOCK).enumerate().find_map(check)
    }
}

fn trajectory_of_turn(turn_offsets: &[i64], turn: usize) -> usize {
    // The last trajectory whose start is <= turn; empty trajectories share
    // starts, so take the last of equal ones.
    turn_offsets.partition_point(|&o| o <= turn as i64) - 1
}

/// Reusable buffers, one set per worker thread.
#[derive(Default)]
pub struct Scratch {
    outcome_adv: Vec<f64>,
    positions: PositionStats,
    /// What [`Pass::Gather`] has gathered so far.
    moments: BatchMoments,
}

/// What running an estimator over a group does. [`Norm::Batch`] takes two
/// runs: one gathers every group's statistics, the next writes advantages.
#[derive(Clone, Copy)]
enum Pass<'b> {
    /// Write the advantages; `Norm::Batch` divides by these batch scales.
    Advantages(&'b BatchScales),
    /// Only add the group's values to `Scratch::moments` (`out` is left
    /// holding anything).
    Gather,
}

/// One group's trajectories, as an estimator sees them. `out[m]` is where the
/// advantages of member m's turns go; it has the length of `rewards[m]`.
pub struct GroupView<'g, 'r, 'o> {
    pub outcome: &'g [f64],
    pub rewards: &'g [&'r [f64]],
    pub out: &'g mut [&'o mut [f64]],
    pub scratch: &'g mut Scratch,
    pass: Pass<'g>,
}

/// Count, mean and sum of squared deviations from the mean (M2) of a set of
/// values; two sets' moments merge into those of their union (Chan, Golub
/// and LeVeque's parallel formula), exactly up to rounding.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Moments {
    count: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// The moments of `values`, in two passes (the mean, then M2).
    fn of(values: impl Iterator<Item = f64> + Clone) -> Moments {
        let (count, sum) = values
            .clone()
            .fold((0.0, 0.0), |(n, s), v| (n + 1.0, s + v));
        if count == 0.0 {
            return Moments::default();
        }
        let mean = sum / count;
        let m2 = values.map(|v| (v - mean) * (v - mean)).sum();
        Moments { count, mean, m2 }
    }

    fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * (other.count / count),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / count),
        }
    }

    /// The sample std (ddof = 1) + eps to divide by, or 0 where the values
    /// normalise to 0: fewer than two, or a std so small (0 with eps = 0 when
    /// the squared deviations underflow) that its reciprocal is infinite.
    fn scale(&self, eps: f64) -> f64 {
        let scale = (self.m2 / (self.count - 1.0)).sqrt() + eps;
        if self.count > 1.0 && 1.0 / scale < f64::INFINITY {
            scale
        } else {
            0.0
        }
    }
}

/// The batch-wide moments `Norm::Batch` divides by, gathered group by group:
/// of the outcomes, of all turn values, and of the values at each turn index.
#[derive(Debug, Clone, Default)]
struct BatchMoments {
    outcome: Moments,
    pooled: Moments,
    position: Vec<Moments>,
}

impl BatchMoments {
    fn merge(mut self, other: BatchMoments) -> BatchMoments {
        self.outcome = self.outcome.merge(other.outcome);
        self.pooled = self.pooled.merge(other.pooled);
        if self.position.len() < other.position.len() {
            self.position
                .resize(other.position.len(), Moments::default());
        }
        for (mine, theirs) in self.position.iter_mut().zip(other.position) {
            *mine = mine.merge(theirs);
        }
        self
    }

    /// Adds one group's per-position moments, as [`Accumulators::gather`]
    /// leaves them in `positions`, at turn indices 0..max_turns.
    fn add_positions(&mut self, positions: &PositionStats, max_turns: usize) {
        if self.position.len() < max_turns {
            self.position.resize(max_turns, Moments::default());
        }
        let group = positions
            .count
            .iter()
            .zip(&positions.mean)
            .zip(&positions.squares);
        for (batch, ((&count, &mean), &m2)) in self.position.iter_mut().zip(group.take(max_turns)) {
            *batch = batch.merge(Moments { count, mean, m2 });
        }
    }

    fn scales(&self, eps: f64) -> BatchScales {
        BatchScales {
            outcome: self.outcome.scale(eps),
            pooled: self.pooled.scale(eps),
            position: self.position.iter().map(|m| m.scale(eps)).collect(),
        }
    }
}

/// The divisors of `Norm::Batch` (see [`Moments::scale`]; 0 where the
/// values normalise to 0).
#[derive(Debug, Clone, Default)]
struct BatchScales {
    outcome: f64,
    pooled: f64,
    position: Vec<f64>,
}

/// How a normalised turn value combines with its member's outcome advantage:
/// `turn * GN_k(value) + outcome * GN(R)`.
#[derive(Clone, Copy)]
struct Weights {
    turn: f64,
    outcome: f64,
}

impl GroupView<'_, '_, '_> {
    /// GN(R): the group-normalised outcome of each member, left in
    /// `scratch.outcome_adv`.
    fn normalize_outcome(&mut self, params: &Params) {
        let Scratch {
            outcome_adv: adv,
            moments,
            ..
        } = &mut *self.scratch;
        adv.clear();
        adv.extend_from_slice(self.outcome);
        match self.pass {
            Pass::Advantages(batch) => {
                normalize_in_place(adv, params.norm, params.eps, batch.outcome)
            }
            Pass::Gather => {
                moments.outcome = moments.outcome.merge(Moments::of(adv.iter().copied()))
            }
        }
    }

    /// Writes `w.turn * GN_k(value[m, k]) + w.outcome * GN(R[m])` for every
    /// turn, where `value[m, k] = r[m, k] + gamma * value[m, k + 1]` from the
    /// last turn down, starting from `init(m)` (a discounted return; with
    /// `gamma = 0` the reward itself).
    fn turn_advantages(
        &mut self,
        params: &Params,
        weights: Weights,
        init: impl Fn(usize) -> f64,
        gamma: f64,
    ) {
        self.normalize_outcome(params);
        let Scratch {
            outcome_adv,
            positions,
            moments,
        } = &mut *self.scratch;
        // Member-major passes over contiguous slices cut to each member's
        // length: no bounds checks, and all of a group's data sits in L1.
        let (mean, inv_scale) = match params.turn_norm {
            TurnNorm::Position => {
                let max_turns = self.rewards.iter().map(|r| r.len()).max().unwrap_or(0);
                let mut acc = positions.reset(max_turns);
                // Only the sums ride along with the recurrence: every store
                // in this scalar loop costs, while counts come from the
                // lengths and the extremes from a vectorised pass later.
                // A discounted return is a chain of dependent multiplies and
                // adds; taken two turns at a time, `v[k-2] = (r[k-2] + g
                // r[k-1]) + g^2 v[k]` does not wait for `v[k-1]`, which halves
                // the chain (results differ from one step at a time by
                // rounding only).
                let gamma2 = gamma * gamma;
                for (m, (turns, rewards)) in self.out.iter_mut().zip(self.rewards).enumerate() {
                    let len = turns.len().min(rewards.len());
                    let (turns, rewards) = (&mut turns[..len], &rewards[..len]);
                    let sum = &mut acc.mean[..len];
                    let mut carried = init(m);
                    let mut k = len;
                    if k % 2 == 1 {
                        k -= 1;
                        carried = rewards[k] + gamma * carried;
                        turns[k] = carried;
                        sum[k] += carried;
                    }
                    while k >= 2 {
                        let (r1, r2) = (rewards[k - 1], rewards[k - 2]);
                        let first = r1 + gamma * carried;
                        let second = (r2 + gamma * r1) + gamma2 * carried;
                        turns[k - 1] = first;
                        turns[k - 2] = second;
                        sum[k - 1] += first;
                        sum[k - 2] += second;
                        carried = second;
                        k -= 2;
                    }
                }
                acc.count_members(self.out.iter().map(|turns| turns.len()));
                match self.pass {
                    Pass::Advantages(batch) => {
                        let batch =
                            (params.norm == Norm::Batch).then(|| &batch.position[..max_turns]);
                        acc.finish(self.out, params, batch)
                    }
                    Pass::Gather => {
                        acc.gather(self.out);
                        moments.add_positions(positions, max_turns);
                        return;
                    }
                }
            }
            TurnNorm::Pooled => {
                for (m, (turns, rewards)) in self.out.iter_mut().zip(self.rewards).enumerate() {
                    let mut carried = init(m);
                    for (v, &r) in turns.iter_mut().zip(rewards.iter()).rev() {
                        carried = r + gamma * carried;
                        *v = carried;
                    }
                }
                let all = self.out.iter().flat_map(|turns| turns.iter().copied());
                let batch = match self.pass {
                    Pass::Advantages(batch) => batch.pooled,
                    Pass::Gather => {
                        moments.pooled = moments.pooled.merge(Moments::of(all));
                        return;
                    }
                };
                let (mean, inv_scale) = match stats(all, params.norm, params.eps, batch) {
                    Some((mean, scale)) => (mean, 1.0 / scale),
                    None => (0.0, 0.0),
                };
                let max_turns = self.out.iter().map(|t| t.len()).max().unwrap_or(0);
                positions.mean.clear();
                positions.mean.resize(max_turns, mean);
                positions.inv_scale.clear();
                positions.inv_scale.resize(max_turns, inv_scale);
                (&positions.mean[..], &positions.inv_scale[..])
            }
        };
        for (turns, &adv) in self.out.iter_mut().zip(outcome_adv.iter()) {
            let outcome_term = weights.outcome * adv;
            for ((v, &mu), &inv) in turns.iter_mut().zip(mean).zip(inv_scale) {
                *v = weights.turn * ((*v - mu) * inv) + outcome_term;
            }
        }
    }
}

/// Per-position statistics of one group (GN_k): mean and reciprocal scale at
/// each turn index; a zero reciprocal scale marks a set that normalises to 0.
#[derive(Default)]
struct PositionStats {
    count: Vec<f64>,
    mean: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
    squares: Vec<f64>,
    inv_scale: Vec<f64>,
}

/// The accumulators of [`PositionStats`], cut to one group's longest turn count.
struct Accumulators<'s> {
    count: &'s mut [f64],
    mean: &'s mut [f64],
    min: &'s mut [f64],
    max: &'s mut [f64],
    squares: &'s mut [f64],
    inv_scale: &'s mut [f64],
}

impl PositionStats {
    /// Zeroed accumulators for positions 0..max_turns. Buffers only grow.
    fn reset(&mut self, max_turns: usize) -> Accumulators<'_> {
        fn prefix(buf: &mut Vec<f64>, len: usize, init: f64) -> &mut [f64] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            let head = &mut buf[..len];
            head.fill(init);
            head
        }
        Accumulators {
            count: prefix(&mut self.count, max_turns, 0.0),
            mean: prefix(&mut self.mean, max_turns, 0.0),
            min: prefix(&mut self.min, max_turns, f64::INFINITY),
            max: prefix(&mut self.max, max_turns, f64::NEG_INFINITY),
            squares: prefix(&mut self.squares, max_turns, 0.0),
            inv_scale: prefix(&mut self.inv_scale, max_turns, 1.0),
        }
    }
}

impl<'s> Accumulators<'s> {
    /// Each position's count: the members whose turn counts (`lengths`)
    /// reach past it, from one tally per member and a suffix sum.
    fn count_members(&mut self, lengths: impl Iterator<Item = usize>) {
        for len in lengths {
            if let Some(last) = len.checked_sub(1) {
                self.count[last] += 1.0;
            }
        }
        let mut members = 0.0;
        for n in self.count.iter_mut().rev() {
            members += *n;
            *n = members;
        }
    }

    /// Turns the sums gathered over `values` into each position's mean and
    /// reciprocal scale (0 where the set normalises to 0). `batch` holds the
    /// divisors of `Norm::Batch` at each position (and only under it).
    fn finish(
        self,
        values: &[&mut [f64]],
        params: &Params,
        batch: Option<&[f64]>,
    ) -> (&'s [f64], &'s [f64]) {
        // The divisions and square roots here are a large part of an
        // estimator's time, and four lanes do them in half the instructions
        // of the two that x86-64's baseline allows. The operations and their
        // order are the same, so the results are identical either way.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2<'s>(
                acc: Accumulators<'s>,
                values: &[&mut [f64]],
                params: &Params,
                batch: Option<&[f64]>,
            ) -> (&'s [f64], &'s [f64]) {
                acc.finish_lanes(values, params, batch)
            }
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(self, values, params, batch) };
        }
        self.finish_lanes(values, params, batch)
    }

    /// Turns the sums gathered over `values` into each position's mean and
    /// sum of squared deviations (M2), left in `mean` and `squares`.
    fn gather(mut self, values: &[&mut [f64]]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2(acc: &mut Accumulators<'_>, values: &[&mut [f64]]) {
                acc.moments_lanes(values)
            }
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { avx2(&mut self, values) };
        }
        self.moments_lanes(values)
    }

    #[inline(always)]
    fn finish_lanes(
        mut self,
        values: &[&mut [f64]],
        params: &Params,
        batch: Option<&[f64]>,
    ) -> (&'s [f64], &'s [f64]) {
        if params.norm == Norm::None {
            self.mean.fill(0.0);
            return (self.mean, self.inv_scale);
        }
        self.moments_lanes(values);
        let Accumulators {
            count,
            mean,
            min,
            max,
            squares,
            inv_scale,
        } = self;
        // One loop per norm: a select among several norms' scales inside
        // the loop computed every one of them in each lane.
        let eps = params.eps;
        let lanes = [&*squares, &*count, &*min, &*max];
        match params.norm {
            Norm::Std => reciprocal_scales(inv_scale, lanes, |sq, n| {
                1.0 / ((sq / (n - 1.0)).sqrt() + eps)
            }),
            Norm::Rloo => reciprocal_scales(inv_scale, lanes, |_, n| n / (n - 1.0)),
            _ => reciprocal_scales(inv_scale, lanes, |_, _| 1.0),
        }
        if let Some(batch) = batch {
            // The batch's divisor where the group's set does not normalise
            // to 0 (an `inv` of 1 above); a divisor of 0 gives 0.
            for (inv, &divisor) in inv_scale.iter_mut().zip(batch) {
                let scale = 1.0 / divisor;
                let usable = scale < f64::INFINITY;
                *inv = if (*inv == 0.0) | !usable { 0.0 } else { scale };
            }
        }
        (mean, inv_scale)
    }

    /// Each position's mean (from the sums in `mean`), the sum of squared
    /// deviations from it and the extremes.
    #[inline(always)]
    fn moments_lanes(&mut self, values: &[&mut [f64]]) {
        let Accumulators {
            count,
            mean,
            min,
            max,
            squares,
            ..
        } = self;
        // Zipped slices and branch-free selects, so these loops vectorise:
        // which positions normalise to 0 is data-dependent, and as branches
        // they were mispredicted often enough to cost more than the divisions.
        for (mu, &n) in mean.iter_mut().zip(count.iter()) {
            *mu /= n;
        }
        for turns in values {
            let columns = min.iter_mut().zip(max.iter_mut()).zip(squares.iter_mut());
            for ((&v, &mu), ((lo, hi), sq)) in turns.iter().zip(mean.iter()).zip(columns) {
                let d = v - mu;
                *sq += d * d;
                *lo = if v < *lo { v } else { *lo };
                *hi = if v > *hi { v } else { *hi };
            }
        }
    }
}

/// Each position's reciprocal scale, `scale(M2, n)`, or 0 where its set
/// normalises to 0.
#[inline(always)]
fn reciprocal_scales(
    inv_scale: &mut [f64],
    [squares, count, min, max]: [&[f64]; 4],
    scale: impl Fn(f64, f64) -> f64,
) {
    let extremes = min.iter().zip(max.iter());
    for (((inv, &sq), &n), (&lo, &hi)) in inv_scale
        .iter_mut()
        .zip(squares.iter())
        .zip(count.iter())
        .zip(extremes)
    {
        // One value, or all values equal: exactly 0, whatever the
        // rounding of the mean. (The scale is NaN where n is 1; the
        // select drops it.) So is a set whose squared deviations all
        // underflow (values of 1e-170 with eps = 0): its std is 0 and
        // the reciprocal infinite, which would give inf and NaN.
        let scale = scale(sq, n);
        let usable = scale < f64::INFINITY;
        *inv = if (n <= 1.0) | (hi <= lo) | !usable {
            0.0
        } else {
            scale
        };
    }
}

/// Mean and the factor to divide deviations by; `None` when the set
/// normalises to 0 (one value, or all values equal, under any norm but
/// none). `batch` is the divisor of `Norm::Batch` (0: normalise to 0).
fn stats(
    values: impl Iterator<Item = f64> + Clone,
    norm: Norm,
    eps: f64,
    batch: f64,
) -> Option<(f64, f64)> {
    let mut n = 0usize;
    let mut sum = 0.0;
    let mut first = f64::NAN;
    let mut constant = true;
    for v in values.clone() {
        if n == 0 {
            first = v;
        } else if v != first {
            constant = false;
        }
        n += 1;
        sum += v;
    }
    match norm {
        Norm::None => Some((0.0, 1.0)),
        _ if n <= 1 || constant => None,
        Norm::Mean => Some((sum / n as f64, 1.0)),
        Norm::Rloo => Some((sum / n as f64, (n - 1) as f64 / n as f64)),
        Norm::Batch => (batch > 0.0).then_some((sum / n as f64, batch)),
        Norm::Std => {
            let mean = sum / n as f64;
            let ss: f64 = values.map(|v| (v - mean) * (v - mean)).sum();
            let scale = (ss / (n - 1) as f64).sqrt() + eps;
            // Distinct values whose squared deviations all underflow (1e-170
            // apart, eps = 0) have a std of 0: normalise them to 0, as a set
            // of equal values, rather than divide by it.
            (scale > 0.0).then_some((mean, scale))
        }
    }
}

/// Normalises one set of values in place (`batch`: as in [`stats`]).
fn normalize_in_place(values: &mut [f64], norm: Norm, eps: f64, batch: f64) {
    match stats(values.iter().copied(), norm, eps, batch) {
        None => values.fill(0.0),
        Some((mean, scale)) => values.iter_mut().for_each(|v| *v = (*v - mean) / scale),
    }
}

/// An estimator computes the advantages of one group in place.
pub type EstimatorFn = fn(&mut GroupView, &Params);

/// A registered estimator.
pub struct Estimator {
    pub name: &'static str,
    pub run: EstimatorFn,
    pub summary: &'static str,
}

/// The registry of built-in estimators, selected by name.
pub const ESTIMATORS: &[Estimator] = &[
    Estimator {
        name: "grpo",
        run: grpo,
        summary: "GN(R[i]) on every turn: outcome-only GRPO",
    },
    Estimator {
        name: "mt_grpo",
        run: mt_grpo,
        summary: "GN(R[i]) + lam * GN_k(r[i,k]); lam = 1.0",
    },
    Estimator {
        name: "gtpo_hybrid",
        run: gtpo_hybrid,
        summary: "GN_k(sum_l gamma^(l-k) r[i,l] + gamma^(K_i-k) R[i]) + lam * GN(R[i]); gamma = 0.9, lam = 0.3",
    },
];

/// Looks an estimator up by name; the error lists the valid names.
pub fn estimator(name: &str) -> Result<&'static Estimator> {
    ESTIMATORS.iter().find(|e| e.name == name).ok_or_else(|| {
        unknown(
            "estimator",
            name,
            &ESTIMATORS.iter().map(|e| e.name).collect::<Vec<_>>(),
        )
    })
}

fn grpo(g: &mut GroupView, params: &Params) {
    g.normalize_outcome(params);
    for (turns, &adv) in g.out.iter_mut().zip(&g.scratch.outcome_adv) {
        turns.fill(adv);
    }
}

fn mt_grpo(g: &mut GroupView, params: &Params) {
    let weights = Weights {
        turn: params.lam.unwrap_or(1.0),
        outcome: 1.0,
    };
    // gamma = 0: each turn's value is its own reward.
    g.turn_advantages(params, weights, |_| 0.0, 0.0);
}

fn gtpo_hybrid(g: &mut GroupView, params: &Params) {
    let gamma = params.gamma.unwrap_or(0.9);
    let weights = Weights {
        turn: 1.0,
        outcome: params.lam.unwrap_or(0.3),
    };
    // Discounted return with the outcome one step past the last turn:
    // G[K] = R, G[k] = r[k] + gamma * G[k + 1].
    let outcome = g.outcome;
    g.turn_advantages(params, weights, |m| outcome[m], gamma);
}

/// Batches with fewer turns than this run on the calling thread: below it,
/// spawning work costs more than it saves.
pub const PARALLEL_MIN_TURNS: usize = 32 * 1024;

/// Trajectory indices ordered so that each group's members are contiguous,
/// members in their original order, plus each group's range in that order.
fn group_members(group: &[i64]) -> (Vec<usize>, Vec<std::ops::Range<usize>>) {
    let mut order: Vec<usize> = (0..group.len()).collect();
    // Groups usually arrive contiguous already (one task's samples together):
    // then there is nothing to sort.
    if !group.windows(2).all(|w| w[0] <= w[1]) {
        order.sort_by_key(|&i| group[i]);
    }
    let mut ranges = Vec::new();
    let mut start = 0;
    for pos in 1..=order.len() {
        if pos == order.len() || group[order[pos]] != group[order[start]] {
            ranges.push(start..pos);
            start = pos;
        }
    }
    (order, ranges)
}

/// Runs the named estimator over a batch. The result has one advantage per
/// turn, in the layout of `batch.turn_rewards`.
pub fn compute_advantages(name: &str, batch: &Batch, params: &Params) -> Result<Vec<f64>> {
    let est = estimator(name)?;
    params.validate()?;
    batch.validate()?;
    let mut out = zeroed(batch.turn_rewards.len());
    run_estimator(est.run, batch, params, &mut out);
    Ok(out)
}

/// A zeroed output buffer; large ones are zeroed by all threads (the buffer
/// is written once per call and zeroing it serially cost as much as GRPO).
fn zeroed(len: usize) -> Vec<f64> {
    if len < PARALLEL_MIN_TURNS * 8 {
        return vec![0.0; len];
    }
    let mut out: Vec<f64> = Vec::with_capacity(len);
    advise_huge_pages(&out);
    out.par_extend(rayon::iter::repeat_n(0.0, len));
    out
}

/// A fresh multi-megabyte buffer costs a page fault per 4 KiB on first touch;
/// asking for transparent huge pages turns 512 of them into one.
#[cfg(target_os = "linux")]
fn advise_huge_pages(buf: &Vec<f64>) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_ptr() as usize;
    let end = start + buf.capacity() * std::mem::size_of::<f64>();
    let aligned = start.next_multiple_of(HUGE);
    if end > aligned + HUGE {
        let len = (end - aligned) / HUGE * HUGE;
        // SAFETY: the range lies inside this Vec's allocation; MADV_HUGEPAGE
        // is advice only and never changes its contents.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_buf: &Vec<f64>) {}

/// The driver behind [`compute_advantages`] for an already validated batch:
/// gathers each group and runs `run` on it, in parallel for large batches.
pub fn run_estimator(run: EstimatorFn, batch: &Batch, params: &Params, out: &mut [f64]) {
    let (order, ranges) = group_members(batch.group);

    // Every trajectory owns a disjoint window of `out`; hand those windows to
    // the groups in member order.
    let mut windows: Vec<Option<&mut [f64]>> = Vec::with_capacity(batch.len());
    let mut rest = out;
    for traj in 0..batch.len() {
        let (head, tail) = rest.split_at_mut(batch.turns(traj).len());
        windows.push(Some(head));
        rest = tail;
    }
    let mut member_out: Vec<&mut [f64]> = order
        .iter()
        .map(|&i| windows[i].take().unwrap_or_default())
        .collect();
    let member_outcome: Vec<f64> = order.iter().map(|&i| batch.outcome[i]).collect();
    let member_rewards: Vec<&[f64]> = order
        .iter()
        .map(|&i| &batch.turn_rewards[batch.turns(i)])
        .collect();

    let mut chunks: Vec<(std::ops::Range<usize>, &mut [&mut [f64]])> =
        Vec::with_capacity(ranges.len());
    let mut rest: &mut [&mut [f64]] = &mut member_out;
    for range in ranges {
        let (head, tail) = rest.split_at_mut(range.len());
        chunks.push((range, head));
        rest = tail;
    }

    let parallel = batch.turn_rewards.len() >= PARALLEL_MIN_TURNS;
    let run_group =
        |scratch: &mut Scratch,
         pass: Pass,
         (range, out): (&std::ops::Range<usize>, &mut [&mut [f64]])| {
            let mut view = GroupView {
                outcome: &member_outcome[range.clone()],
                rewards: &member_rewards[range.clone()],
                out,
                scratch,
                pass,
            };
            run(&mut view, params);
        };

    // Norm::Batch divides by statistics of the whole batch, so a first run
    // over every group gathers them. Blocks of groups gather on their own and
    // merge in block order, so the result does not depend on the threads.
    let scales = if params.norm == Norm::Batch {
        const BLOCK: usize = 64;
        let gather_block = |block: &mut [(std::ops::Range<usize>, &mut [&mut [f64]])]| {
            let mut scratch = Scratch::default();
            for (range, out) in block.iter_mut() {
                run_group(&mut scratch, Pass::Gather, (range, out));
            }
            scratch.moments
        };
        let blocks: Vec<BatchMoments> = if parallel {
            chunks.par_chunks_mut(BLOCK).map(gather_block).collect()
        } else {
            chunks.chunks_mut(BLOCK).map(gather_block).collect()
        };
        let moments = blocks.into_iter().reduce(BatchMoments::merge);
        moments.unwrap_or_default().scales(params.eps)
    } else {
        BatchScales::default()
    };

    let write = |scratch: &mut Scratch,
                 (range, out): (std::ops::Range<usize>, &mut [&mut [f64]])| {
        run_group(scratch, Pass::Advantages(&scales), (&range, out))
    };
    if parallel {
        chunks
            .into_par_iter()
            .with_min_len(64)
            .for_each_init(Scratch::default, write);
    } else {
        let mut scratch = Scratch::default();
        chunks
            .into_iter()
            .for_each(|chunk| write(&mut scratch, chunk));
    }
}

/// Spreads per-turn advantages onto a row-major [B, T] token grid of `rows`
/// rows of `tokens_per_row` tokens. `token_turn[b * T + t]` is the turn that
/// generated token t of trajectory b, or -1 for tokens the model did not
/// generate (prompt, tool output, padding), which get 0. The grid must have
/// one row per trajectory, whatever T (0 included).
pub fn broadcast_to_tokens(
    turn_adv: &[f64],
    turn_offsets: &[i64],
    token_turn: &[i64],
    rows: usize,
    tokens_per_row: usize,
) -> Result<Vec<f64>> {
    let trajectories = turn_offsets.len().saturating_sub(1);
    if turn_offsets.is_empty() {
        return Err(Error::invalid(
            "turn_offsets must have length B + 1 >= 1, got an empty array",
        ));
    }
    validate_offsets(turn_offsets, trajectories, turn_adv.len())?;
    if rows != trajectories {
        return Err(Error::invalid(format!(
            "token_turn has {rows} rows but turn_offsets describes {trajectories} trajectories"
        )));
    }
    if rows.checked_mul(tokens_per_row) != Some(token_turn.len()) {
        return Err(Error::invalid(format!(
            "token_turn has {} values, not {rows} rows of {tokens_per_row}",
            token_turn.len()
        )));
    }
    let mut out = vec![0.0; token_turn.len()];
    if tokens_per_row == 0 {
        return Ok(out);
    }
    let fill_row = |(row, (dst, src)): (usize, (&mut [f64], &[i64]))| -> Result<()> {
        let start = turn_offsets[row];
        let turns = turn_offsets[row + 1] - start;
        for (col, (d, &k)) in dst.iter_mut().zip(src).enumerate() {
            if k >= 0 {
                if k >= turns {
                    return Err(Error::invalid(format!(
                        "token_turn[{row}, {col}] = {k} but trajectory {row} has {turns} turns"
                    )));
                }
                *d = turn_adv[(start + k) as usize];
            } else if k != -1 {
                return Err(Error::invalid(format!(
                    "token_turn[{row}, {col}] = {k}; use -1 for tokens without a turn"
                )));
            }
        }
        Ok(())
    };
    let rows = out
        .chunks_mut(tokens_per_row)
        .zip(token_turn.chunks(tokens_per_row));
    if token_turn.len() >= PARALLEL_MIN_TURNS * 8 {
        rows.collect::<Vec<_>>()
            .into_par_iter()
            .enumerate()
            .try_for_each(fill_row)?;
    } else {
        rows.enumerate().try_for_each(fill_row)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch<'a>(
        outcome: &'a [f64],
        group: &'a [i64],
        rewards: &'a [f64],
        offsets: &'a [i64],
    ) -> Batch<'a> {
        Batch {
            outcome,
            group,
            turn_rewards: rewards,
            turn_offsets: offsets,
        }
    }

    #[test]
    fn grpo_normalises_outcome_within_group() {
        let b = batch(&[1.0, 0.0], &[7, 7], &[0.0, 0.0, 0.0], &[0, 2, 3]);
        let adv = compute_advantages("grpo", &b, &Params::default()).unwrap();
        let z = 0.5 / (0.5f64.sqrt() + 1e-6);
        assert!((adv[0] - z).abs() < 1e-12 && (adv[1] - z).abs() < 1e-12);
        assert!((adv[2] + z).abs() < 1e-12);
    }

    #[test]
    fn gamma_must_be_a_discount_factor() {
        let b = batch(&[1.0], &[0], &[0.5, 0.25], &[0, 2]);
        for gamma in [-0.1, 1.5, 1e200] {
            let params = Params {
                gamma: Some(gamma),
                ..Params::default()
            };
            let err = compute_advantages("gtpo_hybrid", &b, &params).unwrap_err();
            assert!(err.to_string().contains("must lie in [0, 1]"), "{err}");
        }
        for gamma in [0.0, 1.0] {
            let params = Params {
                gamma: Some(gamma),
                ..Params::default()
            };
            assert!(compute_advantages("gtpo_hybrid", &b, &params).is_ok());
        }
    }

    #[test]
    fn rewards_too_large_to_normalise_are_refused() {
        // The sum of 1e308, 1e308 and -1e308 overflows: the mean was inf and
        // every advantage NaN.
        let b = batch(
            &[1e308, 1e308, -1e308],
            &[0, 0, 0],
            &[0.0; 3],
            &[0, 1, 2, 3],
        );
        let err = compute_advantages("grpo", &b, &Params::default()).unwrap_err();
        assert!(err.to_string().contains("outcome[0] is 1e308"), "{err}");
        let b = batch(&[1.0, 0.0], &[0, 0], &[0.0, -1e101], &[0, 1, 2]);
        let err = compute_advantages("gtpo_hybrid", &b, &Params::default()).unwrap_err();
        assert!(err.to_string().contains("turn_rewards[1]"), "{err}");
        let b = batch(&[MAX_REWARD, -MAX_REWARD], &[0, 0], &[0.0, 0.0], &[0, 1, 2]);
        let adv = compute_advantages("grpo", &b, &Params::default()).unwrap();
        assert!(
            adv.iter().all(|a| a.is_finite() && a.abs() > 0.5),
            "{adv:?}"
        );
    }

    #[test]
    fn single_member_and_constant_groups_are_zero() {
        // Group 2 is constant: same outcome, same turn count, same rewards.
        let b = batch(&[1.0, 0.3, 0.3], &[1, 2, 2], &[0.1; 5], &[0, 1, 3, 5]);
        for est in ESTIMATORS {
            let adv = compute_advantages(est.name, &b, &Params::default()).unwrap();
            assert!(adv.iter().all(|&a| a == 0.0), "{}: {adv:?}", est.name);
        }
    }

    #[test]
    fn gtpo_returns_discount_outcome_past_last_turn() {
        // Norm::None exposes the raw returns: G[1] = r1 + g*R, G[0] = r0 + g*G[1].
        let params = Params {
            norm: Norm::None,
            lam: Some(0.0),
            ..Params::default()
        };
        let b = batch(&[1.0], &[0], &[0.5, 0.25], &[0, 2]);
        let adv = compute_advantages("gtpo_hybrid", &b, &params).unwrap();
        let g1 = 0.25 + 0.9;
        assert!((adv[1] - g1).abs() < 1e-12);
        assert!((adv[0] - (0.5 + 0.9 * g1)).abs() < 1e-12);
    }

    proptest::proptest! {
        #[test]
        fn gtpo_returns_match_one_step_at_a_time(
            rewards in proptest::collection::vec(-1.0f64..1.0, 0..41),
            outcome in -1.0f64..1.0,
            gamma in proptest::sample::select(vec![0.0, 0.5, 0.9, 1.0]),
        ) {
            // Norm::None and lam = 0 expose the raw discounted returns.
            let params = Params { norm: Norm::None, lam: Some(0.0), gamma: Some(gamma), ..Params::default() };
            let offsets = [0, rewards.len() as i64];
            let adv = compute_advantages("gtpo_hybrid", &batch(&[outcome], &[0], &rewards, &offsets), &params).unwrap();
            let mut carried = outcome;
            for k in (0..rewards.len()).rev() {
                carried = rewards[k] + gamma * carried;
                proptest::prop_assert!((adv[k] - carried).abs() <= 1e-12 * (1.0 + carried.abs()), "turn {}: {} vs {}", k, adv[k], carried);
            }
        }
    }

    #[test]
    fn errors_name_the_trajectory() {
        let b = batch(&[1.0, 0.0], &[0, 0], &[0.0, f64::NAN, 0.0], &[0, 1, 3]);
        let err = compute_advantages("grpo", &b, &Params::default()).unwrap_err();
        assert!(err.to_string().contains("trajectory 1, turn 0"), "{err}");
        let b = batch(&[1.0, 0.0], &[0, 0], &[0.0; 3], &[0, 2, 1]);
        let err = compute_advantages("grpo", &b, &Params::default()).unwrap_err();
        assert!(
            err.to_string().contains("not monotone at trajectory 1"),
            "{err}"
        );
        let err = compute_advantages("nope", &b, &Params::default()).unwrap_err();
        assert!(err.to_string().contains("gtpo_hybrid"), "{err}");
    }

    #[test]
    fn groups_in_any_order_match_sorted() {
        let outcome = [1.0, 0.0, 0.0, 1.0, 1.0];
        let rewards = [0.1, 0.3, -0.1, 0.2, 0.0, 0.4, 0.5];
        let offsets = [0, 2, 3, 5, 6, 7];
        let shuffled = compute_advantages(
            "gtpo_hybrid",
            &batch(&outcome, &[3, 1, 3, 1, 3], &rewards, &offsets),
            &Params::default(),
        )
        .unwrap();
        // Same groups, relabelled so ids are sorted in this order.
        let relabelled = compute_advantages(
            "gtpo_hybrid",
            &batch(&outcome, &[5, 9, 5, 9, 5], &rewards, &offsets),
            &Params::default(),
        )
        .unwrap();
        assert_eq!(shuffled, relabelled);
    }

    /// The statistics of ragged member values, as `turn_advantages` gathers
    /// them, finished through `finish` (AVX2 where the CPU has it) and through
    /// the same code compiled for the baseline target.
    fn finish_both(
        values: &mut [Vec<f64>],
        params: &Params,
        batch: Option<&[f64]>,
    ) -> [(Vec<f64>, Vec<f64>); 2] {
        let max_turns = values.iter().map(Vec::len).max().unwrap_or(0);
        let views: Vec<&mut [f64]> = values.iter_mut().map(|v| &mut v[..]).collect();
        [false, true].map(|baseline| {
            let mut stats = PositionStats::default();
            let mut acc = stats.reset(max_turns);
            for turns in views.iter() {
                for (sum, &v) in acc.mean.iter_mut().zip(turns.iter()) {
                    *sum += v;
                }
            }
            acc.count_members(views.iter().map(|turns| turns.len()));
            let batch = batch.map(|b| &b[..max_turns]);
            let (mean, inv) = if baseline {
                acc.finish_lanes(&views, params, batch)
            } else {
                acc.finish(&views, params, batch)
            };
            (mean.to_vec(), inv.to_vec())
        })
    }

    proptest::proptest! {
        #[test]
        fn vectorised_finish_matches_baseline_bit_for_bit(
            values in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![-5.0f64..5.0, proptest::sample::select(vec![0.0, 0.3, -0.1, 1.0])],
                    0..40,
                ),
                1..12,
            ),
            norm in proptest::sample::select(vec![Norm::Std, Norm::Mean, Norm::None, Norm::Rloo, Norm::Batch]),
            divisors in proptest::collection::vec(
                proptest::prop_oneof![0.0f64..3.0, proptest::sample::select(vec![0.0, 1e-320])],
                40,
            ),
        ) {
            let mut values = values;
            let params = Params { norm, ..Params::default() };
            let batch = (norm == Norm::Batch).then_some(&divisors[..]);
            let [dispatched, baseline] = finish_both(&mut values, &params, batch);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            proptest::prop_assert_eq!(bits(&dispatched.0), bits(&baseline.0));
            proptest::prop_assert_eq!(bits(&dispatched.1), bits(&baseline.1));
        }
    }

    #[test]
    fn broadcast_checks_turn_range() {
        let adv = [1.0, 2.0, 3.0];
        let out = broadcast_to_tokens(&adv, &[0, 2, 3], &[-1, 0, 1, 0, 0, -1], 2, 3).unwrap();
        assert_eq!(out, vec![0.0, 1.0, 2.0, 3.0, 3.0, 0.0]);
        let err = broadcast_to_tokens(&adv, &[0, 2, 3], &[-1, 0, 1, 1, 0, -1], 2, 3).unwrap_err();
        assert!(err.to_string().contains("token_turn[1, 0]"), "{err}");
    }

    #[test]
    fn broadcast_checks_rows_whatever_the_columns() {
        // Two trajectories: a grid of 5 rows is refused with 6 columns and
        // with none (its flat length, 0, says nothing about its rows).
        let adv = [1.0, 2.0, 3.0, 4.0];
        for cols in [6, 0] {
            let grid = vec![-1; 5 * cols];
            let err = broadcast_to_tokens(&adv, &[0, 3, 4], &grid, 5, cols).unwrap_err();
            assert!(
                err.to_string()
                    .contains("token_turn has 5 rows but turn_offsets describes 2 trajectories"),
                "{err}"
            );
        }
        assert_eq!(
            broadcast_to_tokens(&adv, &[0, 3, 4], &[], 2, 0).unwrap(),
            Vec::<f64>::new()
        );
        let err = broadcast_to_tokens(&adv, &[0, 3, 4], &[-1; 5], 2, 3).unwrap_err();
        assert!(err.to_string().contains("not 2 rows of 3"), "{err}");
    }
}
