//! `cargo bench --bench advantages`: every estimator at 1k, 64k and 1M turns,
//! groups of 8, 1 to 40 turns per trajectory (the shapes of issue 2).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use turnrl_core::advantages::{compute_advantages, Batch, Params, ESTIMATORS};

struct Owned {
    outcome: Vec<f64>,
    group: Vec<i64>,
    turn_rewards: Vec<f64>,
    turn_offsets: Vec<i64>,
}

/// A deterministic batch of about `turns` turns (xorshift, no rand crate).
fn make_batch(turns: usize) -> Owned {
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut b = Owned {
        outcome: vec![],
        group: vec![],
        turn_rewards: vec![],
        turn_offsets: vec![0],
    };
    while b.turn_rewards.len() < turns {
        let traj = b.outcome.len();
        let k = 1 + (next() % 40) as usize;
        b.outcome.push((next() % 2) as f64);
        b.group.push((traj / 8) as i64);
        for _ in 0..k {
            b.turn_rewards
                .push([0.0, 0.3, -0.1, 1.0][(next() % 4) as usize]);
        }
        b.turn_offsets.push(b.turn_rewards.len() as i64);
    }
    b
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("advantages");
    for turns in [1_000usize, 64_000, 1_000_000] {
        let data = make_batch(turns);
        let batch = Batch {
            outcome: &data.outcome,
            group: &data.group,
            turn_rewards: &data.turn_rewards,
            turn_offsets: &data.turn_offsets,
        };
        g.throughput(Throughput::Elements(data.turn_rewards.len() as u64));
        for est in ESTIMATORS {
            g.bench_with_input(
                BenchmarkId::new(est.name, turns),
                &batch,
                |bencher, batch| {
                    bencher
                        .iter(|| compute_advantages(est.name, black_box(batch), &Params::default()))
                },
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
