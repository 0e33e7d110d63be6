//! `cargo bench --bench advantages`: every estimator at 1k, 64k and 1M turns,
//! groups of 8, 1 to 40 turns per trajectory (the shapes of issue 2).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use turnrl_core::advantages::{compute_advantages, Batch, Params, ESTIMATORS};

#[path = "support/batch.rs"]
mod batch;
#[path = "support/xorshift.rs"]
mod xorshift;
use batch::make_batch;

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
