//! `cargo bench --bench buffer`: columnar reading of a ~20 MB rollout buffer
//! (2 to 30 assistant turns, each followed by a multi-KB tool result, and a
//! `meta` shaped as `run_episode` writes it: counters, `stop_reason`, then
//! the nested `reward_info`), plain and zstd, on one thread and on all cores.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::path::PathBuf;
use turnrl_core::buffer::{read_columns_with_workers, Compression, RolloutWriter};

#[path = "support/xorshift.rs"]
mod xorshift;

fn make_buffer(dir: &std::path::Path, target_bytes: usize) -> (PathBuf, PathBuf, u64) {
    let mut next = xorshift::xorshift();
    let plain = dir.join("bench.jsonl");
    let packed = dir.join("bench.jsonl.zst");
    let mut wp = RolloutWriter::create(&plain, Compression::None).expect("create");
    let mut wz = RolloutWriter::create(&packed, Compression::Zstd(3)).expect("create");
    let filler: String = "lorem ipsum \\\"dolor\\\" sit amet, consectetur; ".repeat(120);
    let mut bytes = 0usize;
    let mut i = 0u64;
    while bytes < target_bytes {
        let k = 2 + (next() % 29) as usize;
        let mut turns =
            vec![r#"{"role":"user","content":"I want to change my flight."}"#.to_string()];
        for t in 0..k {
            turns.push(format!(
                r#"{{"role":"assistant","content":"Let me check.","tool_calls":[{{"name":"get_reservation_details","arguments":{{"reservation_id":"R{t}X{i}"}}}}],"tier":"{}","reward":{}}}"#,
                ["read", "gold", "write", "error"][(next() % 4) as usize],
                (next() % 3) as f64 * 0.1
            ));
            let cut = 1000 + (next() % 3000) as usize;
            turns.push(format!(
                r#"{{"role":"tool","name":"get_reservation_details","content":"{}"}}"#,
                &filler[..cut - cut % 2].trim_end_matches('\\')
            ));
        }
        let outcome = next() % 2;
        let stop = ["user_stop", "max_steps", "transfer", "context_length"][(next() % 4) as usize];
        let meta = format!(
            r#"{{"domain":"airline","steps":{k},"tool_errors":{},"dropped_calls":0,"stop_reason":"{stop}","reward_info":{{"reward":{outcome}.0,"info":{{"r_actions":{},"r_outputs":null,"outputs":{{"1000":true}},"gt_data_hash":"9f3a6c1e0b2d4f5a7c8e9d0b1a2c3e4f"}},"actions":[{{"name":"get_reservation_details","kwargs":{{"reservation_id":"R0X{i}"}}}}]}}}}"#,
            next() % 3,
            outcome == 1,
        );
        let line = format!(
            r#"{{"schema":"turnrl.rollout/1","task_id":"airline/train/{}","group":"step-1/airline/train/{}","sample":{},"outcome":{},"turns":[{}],"meta":{meta}}}"#,
            i / 8,
            i / 8,
            i % 8,
            outcome,
            turns.join(",")
        );
        bytes += line.len() + 1;
        wp.write_line(&line).expect("valid line");
        wz.write_line(&line).expect("valid line");
        i += 1;
    }
    wp.finish().expect("finish");
    wz.finish().expect("finish");
    (plain, packed, bytes as u64)
}

fn bench_read(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("turnrl-bench-buffer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (plain, packed, bytes) = make_buffer(&dir, 20 << 20);
    let mut group = c.benchmark_group("read_columns");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    for (name, path) in [("plain", &plain), ("zstd", &packed)] {
        for (label, workers) in [("1thread", Some(1)), ("all", None)] {
            group.bench_function(format!("{name}/{label}"), |b| {
                b.iter(|| black_box(read_columns_with_workers(&[path], workers).expect("read")))
            });
        }
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_read);
criterion_main!(benches);
