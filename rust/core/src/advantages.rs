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
}

impl Norm {
    pub const NAMES: [&'static str; 3] = ["std", "mean", "none"];

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "std" => Ok(Norm::Std),
            "mean" => Ok(Norm::Mean),
            "none" => Ok(Norm::None),
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
        if let Some(i) = self.outcome.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "outcome[{i}] is {} (trajectory {i}); outcomes must be finite",
                self.outcome[i]
            )));
        }
        if let Some(j) = self.turn_rewards.iter().position(|v| !v.is_finite()) {
            let traj = trajectory_of_turn(self.turn_offsets, j);
            let turn = j as i64 - self.turn_offsets[traj];
            return Err(Error::invalid(format!(
                "turn_rewards[{j}] is {} (trajectory {traj}, turn {turn}); rewards must be finite",
                self.turn_rewards[j]
            )));
        }
        Ok(())
    }

    fn turns(&self, traj: usize) -> std::ops::Range<usize> {
        self.turn_offsets[traj] as usize..self.turn_offsets[traj + 1] as usize
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

fn trajectory_of_turn(turn_offsets: &[i64], turn: usize) -> usize {
    // The last trajectory whose start is <= turn; empty trajectories share
    // starts, so take the last of equal ones.
    turn_offsets.partition_point(|&o| o <= turn as i64) - 1
}

/// Reusable buffers, one set per worker thread.
#[derive(Default)]
pub struct Scratch {
    outcome_adv: Vec<f64>,
    count: Vec<usize>,
    mean: Vec<f64>,
    scale: Vec<f64>,
    squares: Vec<f64>,
}

/// One group's trajectories, as an estimator sees them. `out[m]` is where the
/// advantages of member m's turns go; it has the length of `rewards[m]`.
pub struct GroupView<'g, 'r, 'o> {
    pub outcome: &'g [f64],
    pub rewards: &'g [&'r [f64]],
    pub out: &'g mut [&'o mut [f64]],
    pub scratch: &'g mut Scratch,
}

impl GroupView<'_, '_, '_> {
    /// GN(R): the group-normalised outcome of each member, left in
    /// `scratch.outcome_adv`.
    fn normalize_outcome(&mut self, params: &Params) {
        let adv = &mut self.scratch.outcome_adv;
        adv.clear();
        adv.extend_from_slice(self.outcome);
        normalize_in_place(adv, params.norm, params.eps);
    }

    /// GN_k over the values already written to `out`, in place.
    fn normalize_turns(&mut self, params: &Params) {
        match params.turn_norm {
            TurnNorm::Pooled => normalize_pooled(self.out, params.norm, params.eps),
            TurnNorm::Position => {
                normalize_by_position(self.out, params.norm, params.eps, self.scratch)
            }
        }
    }
}

/// Mean and the factor to divide deviations by; `None` when the set
/// normalises to 0 (one value, or all values equal, under std or mean).
fn stats(values: impl Iterator<Item = f64> + Clone, norm: Norm, eps: f64) -> Option<(f64, f64)> {
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
        Norm::Std => {
            let mean = sum / n as f64;
            let ss: f64 = values.map(|v| (v - mean) * (v - mean)).sum();
            Some((mean, (ss / (n - 1) as f64).sqrt() + eps))
        }
    }
}

/// Normalises one set of values in place.
pub fn normalize_in_place(values: &mut [f64], norm: Norm, eps: f64) {
    match stats(values.iter().copied(), norm, eps) {
        None => values.fill(0.0),
        Some((mean, scale)) => values.iter_mut().for_each(|v| *v = (*v - mean) / scale),
    }
}

fn normalize_pooled(out: &mut [&mut [f64]], norm: Norm, eps: f64) {
    let all = out.iter().flat_map(|turns| turns.iter().copied());
    match stats(all, norm, eps) {
        None => out.iter_mut().for_each(|turns| turns.fill(0.0)),
        Some((mean, scale)) => out
            .iter_mut()
            .flat_map(|turns| turns.iter_mut())
            .for_each(|v| *v = (*v - mean) / scale),
    }
}

fn normalize_by_position(out: &mut [&mut [f64]], norm: Norm, eps: f64, scratch: &mut Scratch) {
    if norm == Norm::None {
        return;
    }
    let max_turns = out.iter().map(|t| t.len()).max().unwrap_or(0);
    let Scratch {
        count,
        mean,
        scale,
        squares,
        ..
    } = scratch;
    count.clear();
    count.resize(max_turns, 0);
    mean.clear();
    mean.resize(max_turns, 0.0);
    scale.clear();
    scale.resize(max_turns, 0.0);
    // `scale` first holds each position's first value, to detect constant sets.
    for turns in out.iter() {
        for (k, &v) in turns.iter().enumerate() {
            if count[k] == 0 {
                scale[k] = v;
            } else if scale[k] != v {
                scale[k] = f64::NAN;
            }
            count[k] += 1;
            mean[k] += v;
        }
    }
    for k in 0..max_turns {
        let constant = !scale[k].is_nan();
        mean[k] /= count[k] as f64;
        // A zero scale marks "normalises to 0".
        scale[k] = if count[k] <= 1 || constant { 0.0 } else { 1.0 };
    }
    if norm == Norm::Std {
        squares.clear();
        squares.resize(max_turns, 0.0);
        for turns in out.iter() {
            for (k, &v) in turns.iter().enumerate() {
                squares[k] += (v - mean[k]) * (v - mean[k]);
            }
        }
        for k in 0..max_turns {
            if scale[k] != 0.0 {
                scale[k] = (squares[k] / (count[k] - 1) as f64).sqrt() + eps;
            }
        }
    }
    for turns in out.iter_mut() {
        for (k, v) in turns.iter_mut().enumerate() {
            *v = if scale[k] == 0.0 {
                0.0
            } else {
                (*v - mean[k]) / scale[k]
            };
        }
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
    let lam = params.lam.unwrap_or(1.0);
    g.normalize_outcome(params);
    for (turns, rewards) in g.out.iter_mut().zip(g.rewards) {
        turns.copy_from_slice(rewards);
    }
    g.normalize_turns(params);
    for (turns, &adv) in g.out.iter_mut().zip(&g.scratch.outcome_adv) {
        turns.iter_mut().for_each(|v| *v = adv + lam * *v);
    }
}

fn gtpo_hybrid(g: &mut GroupView, params: &Params) {
    let gamma = params.gamma.unwrap_or(0.9);
    let lam = params.lam.unwrap_or(0.3);
    g.normalize_outcome(params);
    for ((turns, rewards), &outcome) in g.out.iter_mut().zip(g.rewards).zip(g.outcome) {
        // Discounted return with the outcome one step past the last turn:
        // G[K] = R, G[k] = r[k] + gamma * G[k + 1].
        let mut ret = outcome;
        for (v, &r) in turns.iter_mut().zip(rewards.iter()).rev() {
            ret = r + gamma * ret;
            *v = ret;
        }
    }
    g.normalize_turns(params);
    for (turns, &adv) in g.out.iter_mut().zip(&g.scratch.outcome_adv) {
        turns.iter_mut().for_each(|v| *v += lam * adv);
    }
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
    let mut out = vec![0.0; batch.turn_rewards.len()];
    run_estimator(est.run, batch, params, &mut out);
    Ok(out)
}

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

    let run_group =
        |scratch: &mut Scratch, (range, out): (std::ops::Range<usize>, &mut [&mut [f64]])| {
            let mut view = GroupView {
                outcome: &member_outcome[range.clone()],
                rewards: &member_rewards[range],
                out,
                scratch,
            };
            run(&mut view, params);
        };
    if batch.turn_rewards.len() >= PARALLEL_MIN_TURNS {
        chunks
            .into_par_iter()
            .with_min_len(64)
            .for_each_init(Scratch::default, run_group);
    } else {
        let mut scratch = Scratch::default();
        chunks
            .into_iter()
            .for_each(|chunk| run_group(&mut scratch, chunk));
    }
}

/// Spreads per-turn advantages onto a row-major [B, T] token grid.
/// `token_turn[b * T + t]` is the turn that generated token t of trajectory b,
/// or -1 for tokens the model did not generate (prompt, tool output, padding),
/// which get 0.
pub fn broadcast_to_tokens(
    turn_adv: &[f64],
    turn_offsets: &[i64],
    token_turn: &[i64],
    tokens_per_row: usize,
) -> Result<Vec<f64>> {
    let trajectories = turn_offsets.len().saturating_sub(1);
    if turn_offsets.is_empty() {
        return Err(Error::invalid(
            "turn_offsets must have length B + 1 >= 1, got an empty array",
        ));
    }
    validate_offsets(turn_offsets, trajectories, turn_adv.len())?;
    if token_turn.len() != trajectories * tokens_per_row {
        return Err(Error::invalid(format!(
            "token_turn has {} rows but turn_offsets describes {trajectories} trajectories",
            token_turn.len().checked_div(tokens_per_row).unwrap_or(0)
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

    #[test]
    fn broadcast_checks_turn_range() {
        let adv = [1.0, 2.0, 3.0];
        let out = broadcast_to_tokens(&adv, &[0, 2, 3], &[-1, 0, 1, 0, 0, -1], 3).unwrap();
        assert_eq!(out, vec![0.0, 1.0, 2.0, 3.0, 3.0, 0.0]);
        let err = broadcast_to_tokens(&adv, &[0, 2, 3], &[-1, 0, 1, 1, 0, -1], 3).unwrap_err();
        assert!(err.to_string().contains("token_turn[1, 0]"), "{err}");
    }
}
