//! The deterministic generator of the benchmarks' inputs (xorshift64, no
//! rand crate), shared so that every generated input draws the same stream.

/// A xorshift64 stream from a fixed seed.
pub fn xorshift() -> impl FnMut() -> u64 {
    let mut state = 0x9E3779B97F4A7C15u64;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
