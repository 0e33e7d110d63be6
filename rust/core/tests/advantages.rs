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

fn params() -> impl Strategy<Value = Params> {
    (
        prop::sample::select(vec![Norm::Std, Norm::Mean, Norm::None]),
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
    fn finite_and_shaped_like_the_input(b in batches(40, 30), p in params()) {
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

#[test]
fn parallel_path_equals_group_by_group() {
    // A batch above the parallel threshold, groups interleaved.
    let mut state = 7u64;
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
        let k = 1 + (next() % 40) as usize;
        b.group.push((next() % 500) as i64);
        b.outcome.push((next() % 2) as f64);
        b.rewards
            .push((0..k).map(|_| (next() % 7) as f64 / 10.0).collect());
        turns += k;
    }
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
    for norm in [Norm::Std, Norm::Mean, Norm::None] {
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
        p in params(),
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
