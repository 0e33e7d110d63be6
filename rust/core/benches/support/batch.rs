//! The generated batch shared by `benches/advantages.rs` and
//! `examples/profile_advantages.rs`: groups of 8, 1 to 40 turns per
//! trajectory, tier-like rewards, binary outcomes.

pub struct Owned {
    pub outcome: Vec<f64>,
    pub group: Vec<i64>,
    pub turn_rewards: Vec<f64>,
    pub turn_offsets: Vec<i64>,
}

/// A deterministic batch of about `turns` turns (xorshift, no rand crate).
pub fn make_batch(turns: usize) -> Owned {
    let mut next = crate::xorshift::xorshift();
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
