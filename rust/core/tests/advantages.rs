//! Properties of the estimators that hold for any ragged batch.

use proptest::prelude::*;
use turnrl_core::advantages::{
    compute_advantages, Batch, Norm, Params, TurnNorm, ESTIMATORS, PARALLEL_MIN_TURNS,
};

#[derive(Debug, Clone)]
struct Owned {
    outcome: Vec<f64>,
    group: Vec<i64>,
    rewards: Vec<Vec<f64>>,
}

impl Owned {
    fn flat(&self) -> (Vec<f64>, Vec<i64>) {
        let mut offsets = vec![0i64];
        let mut flat = vec![];
        for r in &self.rewards {
            flat.extend_from_slice(r);
            offsets.push(flat.len() as i64);
        }
        (flat, offsets)
    }

    fn run(&self, estimator: &str, params: &Params) -> Vec<Vec<f64>> {
        let (flat, offsets) = self.flat();
        let batch = Batch {
            outcome: &self.outcome,
            group: &self.group,
            turn_rewards: &flat,
            turn_offsets: &offsets,
        };
        let adv = compute_advantages(estimator, &batch, params).expect("valid batch");
        offsets
            .windows(2)
            .map(|w| adv[w[0] as usize..w[1] as usize].to_vec())
            .collect()
    }

    /// The members of one group, as a batch of its own.
    fn only_group(&self, id: i64) -> (Owned, Vec<usize>) {
        let members: Vec<usize> = (0..self.group.len())
            .filter(|&i| self.group[i] == id)
            .collect();
        let sub = Owned {
            outcome: members.iter().map(|&i| self.outcome[i]).collect(),
            group: members.iter().map(|_| id).collect(),
            rewards: members.iter().map(|&i| self.rewards[i].clone()).collect(),
        };
        (sub, members)
    }
}

fn batches(max_traj: usize, max_turns: usize) -> impl Strategy<Value = Owned> {
    prop::collection::vec(
        (
            0i64..6,
            prop::sample::select(vec![0.0, 1.0, 0.5]),
            prop::collection::vec(
                prop_oneof![
                    prop::sample::select(vec![0.0, 0.3, -0.1, 1.0]),
                    -3.0f64..3.0
                ],
                0..max_turns,
            ),
        ),
        0..max_traj,
    )
    .prop_map(|rows| Owned {
        group: rows.iter().map(|r| r.0).collect(),
        outcome: rows.iter().map(|r| r.1).collect(),
        rewards: rows.into_iter().map(|r| r.2).collect(),
    })
}

/// Every norm under which each group's advantages depend on that group alone.
const GROUP_NORMS: [Norm; 4] = [Norm::Std, Norm::Mean, Norm::None, Norm::Rloo];

fn params() -> impl Strategy<Value = Params> {
    params_of(GROUP_NORMS.to_vec())
}

fn any_params() -> impl Strategy<Value = Params> {
    let mut norms = GROUP_NORMS.to_vec();
    norms.push(Norm::Batch);
    params_of(norms)
}

fn params_of(norms: Vec<Norm>) -> impl Strategy<Value = Params> {
    (
        prop::sample::select(norms),
        prop::sample::select(vec![TurnNorm::Position, TurnNorm::Pooled]),
        prop::option::of(0.0f64..1.0),
        prop::option::of(-1.0f64..2.0),
    )
        .prop_map(|(norm, turn_norm, gamma, lam)| Params {
            norm,
            turn_norm,
            gamma,
            lam,
            ..Params::default()
        })
}

proptest! {
    #[test]
    fn finite_and_shaped_like_the_input(b in batches(40, 30), p in any_params()) {
        for est in ESTIMATORS {
            let adv = b.run(est.name, &p);
            for (turns, rewards) in adv.iter().zip(&b.rewards) {
                prop_assert_eq!(turns.len(), rewards.len());
                prop_assert!(turns.iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn groups_are_independent(b in batches(40, 30), p in params()) {
        // Each group alone gives the same advantages as inside the batch.
        for est in ESTIMATORS {
            let whole = b.run(est.name, &p);
            for id in 0..6 {
                let (sub, members) = b.only_group(id);
                for (alone, &i) in sub.run(est.name, &p).iter().zip(&members) {
                    prop_assert_eq!(alone, &whole[i]);
                }
            }
        }
    }
}

/// A batch of twice the parallel threshold's turns from a fixed generator
/// (`seed`): trajectories of `min_turns` to `min_turns + 39` turns in `groups`
/// interleaved groups, their outcomes and rewards made from draws.
fn large_batch(
    seed: u64,
    min_turns: usize,
    groups: u64,
    outcome: impl Fn(u64) -> f64,
    reward: impl Fn(u64) -> f64,
) -> Owned {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut b = Owned {
        outcome: vec![],
        group: vec![],
        rewards: vec![],
    };
    let mut turns = 0;
    while turns < 2 * PARALLEL_MIN_TURNS {
        let k = min_turns + (next() % 40) as usize;
        b.group.push((next() % groups) as i64);
        b.outcome.push(outcome(next()));
        b.rewards.push((0..k).map(|_| reward(next())).collect());
        turns += k;
    }
    b
}

#[test]
fn parallel_path_equals_group_by_group() {
    // A batch above the parallel threshold, groups interleaved.
    let b = large_batch(
        7,
        1,
        500,
        |draw| (draw % 2) as f64,
        |draw| (draw % 7) as f64 / 10.0,
    );
    for est in ESTIMATORS {
        let whole = b.run(est.name, &Params::default());
        for id in [0, 17, 499] {
            let (sub, members) = b.only_group(id);
            for (alone, &i) in sub.run(est.name, &Params::default()).iter().zip(&members) {
                assert_eq!(alone, &whole[i], "{} group {id}", est.name);
            }
        }
    }
}

fn all_params(eps: f64, lam: Option<f64>) -> Vec<Params> {
    let mut out = vec![];
    for norm in [Norm::Std, Norm::Mean, Norm::None, Norm::Rloo, Norm::Batch] {
        for turn_norm in [TurnNorm::Position, TurnNorm::Pooled] {
            out.push(Params {
                norm,
                turn_norm,
                eps,
                lam,
                ..Params::default()
            });
        }
    }
    out
}

#[test]
fn eps_zero_with_underflowing_deviations_normalises_to_zero() {
    // Distinct values 1e-170 apart: their squared deviations underflow, so
    // the std is 0. With eps = 0 that was a division by 0: [-inf, NaN, inf].
    let tiny = [0.0, 1e-170, 2e-170];
    let outcome_varies = Owned {
        outcome: tiny.to_vec(),
        group: vec![0; 3],
        rewards: vec![vec![0.0]; 3],
    };
    let turns_vary = Owned {
        outcome: vec![1.0; 3],
        group: vec![0; 3],
        rewards: tiny.iter().map(|&r| vec![r]).collect(),
    };
    for b in [&outcome_varies, &turns_vary] {
        for turn_norm in [TurnNorm::Position, TurnNorm::Pooled] {
            let p = Params {
                eps: 0.0,
                turn_norm,
                ..Params::default()
            };
            for est in ESTIMATORS {
                let adv = b.run(est.name, &p);
                assert_eq!(adv, vec![vec![0.0]; 3], "{} {turn_norm:?}", est.name);
            }
        }
    }
}

proptest! {
    #[test]
    fn eps_zero_gives_finite_advantages_at_any_scale(
        b in batches(12, 6),
        exponent in prop::sample::select(vec![-320i32, -300, -200, -170, -160, -100, 0]),
        p in any_params(),
    ) {
        // The same batches scaled down until squares underflow, eps = 0.
        let scale = 10f64.powi(exponent);
        let b = Owned {
            outcome: b.outcome.iter().map(|v| v * scale).collect(),
            group: b.group,
            rewards: b.rewards.iter().map(|r| r.iter().map(|v| v * scale).collect()).collect(),
        };
        let p = Params { eps: 0.0, ..p };
        for est in ESTIMATORS {
            for turns in b.run(est.name, &p) {
                prop_assert!(turns.iter().all(|v| v.is_finite()), "{}: {:?}", est.name, turns);
            }
        }
    }
}

#[test]
fn lam_is_bounded_so_advantages_stay_finite() {
    // Rewards and outcomes at the largest accepted size, lam at its bound:
    // every estimator, norm and turn_norm gives finite advantages.
    let big = turnrl_core::advantages::MAX_REWARD;
    let b = Owned {
        outcome: vec![big, -big, 0.0, big],
        group: vec![0, 0, 0, 1],
        rewards: vec![vec![big, -big, big], vec![-big], vec![], vec![big; 4]],
    };
    for lam in [big, -big] {
        for p in all_params(0.0, Some(lam)) {
            for est in ESTIMATORS {
                for turns in b.run(est.name, &p) {
                    assert!(
                        turns.iter().all(|v| v.is_finite()),
                        "{} {p:?}: {turns:?}",
                        est.name
                    );
                }
            }
        }
    }
    // Beyond it (1e308 gave inf): an error naming lam.
    let (flat, offsets) = b.flat();
    let batch = Batch {
        outcome: &b.outcome,
        group: &b.group,
        turn_rewards: &flat,
        turn_offsets: &offsets,
    };
    for lam in [1e101, -1e308, f64::MAX] {
        let p = Params {
            lam: Some(lam),
            ..Params::default()
        };
        for est in ESTIMATORS {
            let err = compute_advantages(est.name, &batch, &p).unwrap_err();
            assert!(
                err.to_string().contains("lam must be at most 1e100"),
                "{err}"
            );
        }
    }
}

/// Sample std (ddof = 1) + eps of a set, or `None` where it normalises to 0.
fn naive_scale(values: &[f64], eps: f64) -> Option<f64> {
    let n = values.len() as f64;
    if values.len() < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    let scale = var.sqrt() + eps;
    (1.0 / scale < f64::INFINITY).then_some(scale)
}

/// GN of one set, written from the definitions; `batch` is the set of the
/// same kind of values over the whole batch (`Norm::Batch` only).
fn naive_normalize(set: &[f64], batch: &[f64], norm: Norm, eps: f64) -> Vec<f64> {
    let n = set.len();
    if norm == Norm::None {
        return set.to_vec();
    }
    if n <= 1 || set.iter().all(|&v| v == set[0]) {
        return vec![0.0; n];
    }
    let mean = set.iter().sum::<f64>() / n as f64;
    match norm {
        Norm::Mean => set.iter().map(|v| v - mean).collect(),
        Norm::Std => match naive_scale(set, eps) {
            Some(scale) => set.iter().map(|v| (v - mean) / scale).collect(),
            None => vec![0.0; n],
        },
        // Leave one out, literally: the mean of the other n - 1 values.
        Norm::Rloo => (0..n)
            .map(|i| {
                let others: f64 = (0..n).filter(|&j| j != i).map(|j| set[j]).sum();
                set[i] - others / (n - 1) as f64
            })
            .collect(),
        Norm::Batch => match naive_scale(batch, eps) {
            Some(scale) => set.iter().map(|v| (v - mean) / scale).collect(),
            None => vec![0.0; n],
        },
        Norm::None => unreachable!(),
    }
}

/// Every estimator over every group, one set at a time, from the definitions.
fn naive(b: &Owned, estimator: &str, p: &Params) -> Vec<Vec<f64>> {
    let gamma = p.gamma.unwrap_or(0.9);
    let values: Vec<Vec<f64>> = match estimator {
        "mt_grpo" => b.rewards.clone(),
        _ => (0..b.rewards.len())
            .map(|i| {
                let r = &b.rewards[i];
                let k_i = r.len();
                (0..k_i)
                    .map(|k| {
                        (k..k_i)
                            .map(|l| gamma.powi((l - k) as i32) * r[l])
                            .sum::<f64>()
                            + gamma.powi((k_i - k) as i32) * b.outcome[i]
                    })
                    .collect()
            })
            .collect(),
    };
    let mut ids = b.group.clone();
    ids.sort();
    ids.dedup();
    let mut outcome_adv = vec![0.0; b.outcome.len()];
    let mut turn_adv: Vec<Vec<f64>> = values.iter().map(|v| vec![0.0; v.len()]).collect();
    let all_turns: Vec<f64> = values.iter().flatten().copied().collect();
    for id in ids {
        let members: Vec<usize> = (0..b.group.len()).filter(|&i| b.group[i] == id).collect();
        let set: Vec<f64> = members.iter().map(|&i| b.outcome[i]).collect();
        for (&i, v) in members
            .iter()
            .zip(naive_normalize(&set, &b.outcome, p.norm, p.eps))
        {
            outcome_adv[i] = v;
        }
        match p.turn_norm {
            TurnNorm::Pooled => {
                let set: Vec<f64> = members.iter().flat_map(|&i| values[i].clone()).collect();
                let mut normed = naive_normalize(&set, &all_turns, p.norm, p.eps).into_iter();
                for &i in &members {
                    for slot in turn_adv[i].iter_mut() {
                        *slot = normed.next().unwrap();
                    }
                }
            }
            TurnNorm::Position => {
                let longest = members.iter().map(|&i| values[i].len()).max().unwrap_or(0);
                for k in 0..longest {
                    let having: Vec<usize> = members
                        .iter()
                        .copied()
                        .filter(|&i| values[i].len() > k)
                        .collect();
                    let set: Vec<f64> = having.iter().map(|&i| values[i][k]).collect();
                    let batch: Vec<f64> = values
                        .iter()
                        .filter(|v| v.len() > k)
                        .map(|v| v[k])
                        .collect();
                    for (&i, v) in having
                        .iter()
                        .zip(naive_normalize(&set, &batch, p.norm, p.eps))
                    {
                        turn_adv[i][k] = v;
                    }
                }
            }
        }
    }
    (0..b.rewards.len())
        .map(|i| {
            let turns = turn_adv[i].iter();
            match estimator {
                "grpo" => vec![outcome_adv[i]; b.rewards[i].len()],
                "mt_grpo" => turns
                    .map(|t| outcome_adv[i] + p.lam.unwrap_or(1.0) * t)
                    .collect(),
                _ => turns
                    .map(|t| t + p.lam.unwrap_or(0.3) * outcome_adv[i])
                    .collect(),
            }
        })
        .collect()
}

fn assert_close(got: &[Vec<f64>], want: &[Vec<f64>], what: &str) -> Result<(), TestCaseError> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        prop_assert_eq!(g.len(), w.len());
        for (k, (a, b)) in g.iter().zip(w).enumerate() {
            prop_assert!(
                (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                "{} trajectory {} turn {}: {} vs {}",
                what,
                i,
                k,
                a,
                b
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_norm_matches_the_definitions(b in batches(40, 12), p in any_params()) {
        for est in ESTIMATORS {
            let got = b.run(est.name, &p);
            assert_close(&got, &naive(&b, est.name, &p), &format!("{} {:?}", est.name, p))?;
        }
    }
}

#[test]
fn batch_norm_divides_by_the_batch_std_of_raw_values() {
    // Two groups whose outcomes differ in spread: under std each group gets
    // +-0.707, under batch both are divided by the one std of all outcomes.
    let b = Owned {
        outcome: vec![1.0, 0.0, 10.0, 0.0, 5.0],
        group: vec![3, 3, 1, 1, 8],
        rewards: vec![vec![0.0]; 5],
    };
    let p = Params {
        norm: Norm::Batch,
        eps: 0.0,
        ..Params::default()
    };
    let adv = b.run("grpo", &p);
    let outcome = &b.outcome;
    let mean = outcome.iter().sum::<f64>() / 5.0;
    let std = (outcome.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
    let want = [0.5 / std, -0.5 / std, 5.0 / std, -5.0 / std, 0.0];
    for (got, want) in adv.iter().zip(want) {
        assert!((got[0] - want).abs() < 1e-12, "{adv:?} vs {want}");
    }
    // RLOO: v_i minus the mean of the others; a group of one is 0.
    let p = Params {
        norm: Norm::Rloo,
        ..Params::default()
    };
    let adv = b.run("grpo", &p);
    assert_eq!(
        adv.iter().map(|a| a[0]).collect::<Vec<_>>(),
        [1.0, -1.0, 10.0, -10.0, 0.0]
    );
}

#[test]
fn batch_norm_is_the_same_on_any_number_of_threads() {
    // Above the parallel threshold, groups interleaved; the batch statistics
    // merge in a fixed order, so results are identical bit for bit.
    let b = large_batch(
        11,
        0,
        700,
        |draw| (draw % 3) as f64 / 2.0,
        |draw| (draw % 7) as f64 / 10.0 - 0.2,
    );
    for turn_norm in [TurnNorm::Position, TurnNorm::Pooled] {
        let p = Params {
            norm: Norm::Batch,
            turn_norm,
            ..Params::default()
        };
        for est in ESTIMATORS {
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| b.run(est.name, &p))
            };
            let one = on(1);
            assert_eq!(one, on(3), "{} {turn_norm:?}", est.name);
            assert_close(&one, &naive(&b, est.name, &p), est.name).unwrap();
        }
    }
}
