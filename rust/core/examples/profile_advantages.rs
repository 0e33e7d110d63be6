//! Runs one estimator over a generated batch many times; for profilers
//! (`valgrind --tool=callgrind`, `perf`):
//! `cargo run --release --example profile_advantages -- gtpo_hybrid 1000000 20`
use turnrl_core::advantages::{compute_advantages, Batch, Params};

#[path = "../benches/support/batch.rs"]
mod batch;
#[path = "../benches/support/xorshift.rs"]
mod xorshift;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let estimator = args.get(1).map(String::as_str).unwrap_or("gtpo_hybrid");
    let turns: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let repeat: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    let data = batch::make_batch(turns);
    let batch = Batch {
        outcome: &data.outcome,
        group: &data.group,
        turn_rewards: &data.turn_rewards,
        turn_offsets: &data.turn_offsets,
    };
    let start = std::time::Instant::now();
    let mut checksum = 0.0;
    for _ in 0..repeat {
        let adv = compute_advantages(estimator, &batch, &Params::default()).expect("valid batch");
        checksum += adv[adv.len() / 2];
    }
    let per_run = start.elapsed().as_secs_f64() / repeat as f64;
    let n = data.turn_rewards.len();
    println!(
        "{estimator}: {n} turns, {:.3} ms per run, {:.2} ns/turn (checksum {checksum})",
        per_run * 1e3,
        per_run / n as f64 * 1e9
    );
}
