//! `cargo bench --bench parsing`: generated assistant messages of 200 B to
//! 8 KB (prose, a <think> block, 0 to 3 Hermes calls with nested arguments),
//! parsed one at a time and as a rayon batch; plus Qwen3-Coder XML messages.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use turnrl_core::parse::{parse_tool_call_spans, parse_tool_calls, parse_tool_calls_batch, Format};

const WORDS: &[&str] = &[
    "the",
    "reservation",
    "flight",
    "passenger",
    "baggage",
    "policy",
    "refund",
    "cabin",
    "economy",
    "user",
    "wants",
    "to",
    "change",
    "cancel",
    "book",
    "status",
    "I",
    "will",
    "first",
    "look",
    "up",
    "your",
    "details",
    "and",
    "confirm",
    "with",
    "you",
    ",",
    ".",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn prose(rng: &mut Rng, bytes: usize, out: &mut String) {
    let start = out.len();
    while out.len() - start < bytes {
        out.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        out.push(' ');
    }
}

fn hermes_call(rng: &mut Rng) -> String {
    let flights: Vec<String> = (0..1 + rng.below(3))
        .map(|i| {
            format!(
                "{{\"flight_number\": \"HAT{:03}\", \"date\": \"2024-05-1{i}\"}}",
                rng.below(1000)
            )
        })
        .collect();
    format!(
        "<tool_call>\n{{\"name\": \"update_reservation_flights\", \"arguments\": {{\"reservation_id\": \"ZFA04Y\", \"cabin\": \"economy\", \"flights\": [{}], \"passengers\": [{{\"first_name\": \"Mei\", \"dob\": \"1980-01-05\"}}], \"total_baggages\": {}, \"price\": {}.5}}}}\n</tool_call>",
        flights.join(", "),
        rng.below(4),
        rng.below(900)
    )
}

fn xml_call(rng: &mut Rng) -> String {
    format!(
        "<tool_call>\n<function=book_reservation>\n<parameter=user_id>\nuser_{}\n</parameter>\n<parameter=total_baggages>\n{}\n</parameter>\n<parameter=flights>\n[{{\"flight_number\": \"HAT001\"}}]\n</parameter>\n</function>\n</tool_call>",
        rng.below(1_000_000),
        rng.below(4)
    )
}

fn messages(n: usize, xml: bool) -> Vec<String> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            let target = 200 + rng.below(8000) as usize;
            let calls: Vec<String> = (0..rng.below(4))
                .map(|_| {
                    if xml {
                        xml_call(&mut rng)
                    } else {
                        hermes_call(&mut rng)
                    }
                })
                .collect();
            let budget = target
                .saturating_sub(calls.iter().map(String::len).sum())
                .max(40);
            let mut m = String::from("<think>\n");
            prose(&mut rng, budget * 2 / 3, &mut m);
            m.push_str("\n</think>\n\n");
            prose(&mut rng, budget / 3, &mut m);
            for c in &calls {
                m.push('\n');
                m.push_str(c);
            }
            m
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for (label, xml) in [("hermes", false), ("qwen3_coder", true)] {
        let texts = messages(1000, xml);
        let bytes: usize = texts.iter().map(String::len).sum();
        let mut group = c.benchmark_group(format!("parse_{label}"));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("single_thread", |b| {
            b.iter(|| {
                for t in &texts {
                    black_box(parse_tool_calls(black_box(t), Format::Auto, None));
                }
            })
        });
        // JSON arguments checked and left as spans (what the Python
        // bindings call; they decode a span when `.tool_calls` is read).
        group.bench_function("spans_single_thread", |b| {
            b.iter(|| {
                for t in &texts {
                    black_box(parse_tool_call_spans(black_box(t), Format::Auto, None));
                }
            })
        });
        group.bench_function("batch_rayon", |b| {
            b.iter(|| {
                black_box(parse_tool_calls_batch(
                    black_box(&texts),
                    Format::Auto,
                    None,
                ))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
