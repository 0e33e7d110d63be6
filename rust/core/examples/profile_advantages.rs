//! Runs one estimator over a generated batch many times; for profilers
//! (`valgrind --tool=callgrind`, `perf`):
//! `cargo run --release --example profile_advantages -- gtpo_hybrid 1000000 20`
use turnrl_core::advantages::{compute_advantages, Batch, Params};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let estimator = args.get(1).map(String::as_str).unwrap_or("gtpo_hybrid");
    let turns: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let repeat: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut outcome, mut group, mut rewards, mut offsets) = (vec![], vec![], vec![], vec![0i64]);
    while rewards.len() < turns {
        let k = 1 + (next() % 40) as usize;
        group.push((outcome.len() / 8) as i64);
        outcome.push((next() % 2) as f64);
        rewards.extend((0..k).map(|_| [0.0, 0.3, -0.1, 1.0][(next() % 4) as usize]));
        offsets.push(rewards.len() as i64);
    }
    let batch = Batch {
        outcome: &outcome,
        group: &group,
        turn_rewards: &rewards,
        turn_offsets: &offsets,
    };
    let start = std::time::Instant::now();
    let mut checksum = 0.0;
    for _ in 0..repeat {
        let adv = compute_advantages(estimator, &batch, &Params::default()).expect("valid batch");
        checksum += adv[adv.len() / 2];
    }
    let per_run = start.elapsed().as_secs_f64() / repeat as f64;
    println!(
        "{estimator}: {} turns, {:.3} ms per run, {:.2} ns/turn (checksum {checksum})",
        rewards.len(),
        per_run * 1e3,
        per_run / rewards.len() as f64 * 1e9
    );
}
