//! `cargo bench --bench args`: normalisation, comparison and tier labelling on
//! tau-bench-shaped airline arguments (a booking with flights, passengers and
//! payments; a reservation record), built in code so no data file is needed.

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::hint::black_box;
use turnrl_core::args::{compare, label_tiers, normalize, Policy, ToolKind};

fn booking() -> Value {
    json!({
        "user_id": "mia_li_3668", "origin": "JFK", "destination": "SEA",
        "flight_type": "one_way", "cabin": "economy",
        "flights": [{"flight_number": "HAT136", "date": "2024-05-20"},
                    {"flight_number": "HAT039", "date": "2024-05-20"}],
        "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
        "payment_methods": [{"payment_id": "certificate_7504069", "amount": 250},
                            {"payment_id": "credit_card_4421486", "amount": 5}],
        "total_baggages": 3, "nonfree_baggages": 0, "insurance": "no"
    })
}

/// The same booking as a model might write it: other key order, numbers as
/// strings, padding, one wrong date of birth.
fn booking_pred() -> Value {
    json!({
        "insurance": "no", "nonfree_baggages": "0", "total_baggages": 3.0,
        "payment_methods": [{"amount": "250", "payment_id": "certificate_7504069"},
                            {"amount": 5, "payment_id": " credit_card_4421486 "}],
        "passengers": [{"dob": "1990-04-06", "last_name": "Li", "first_name": "Mia"}],
        "flights": [{"date": "2024-05-20", "flight_number": "HAT136"},
                    {"date": "2024-05-20", "flight_number": "HAT039"}],
        "cabin": "economy", "flight_type": "one_way", "destination": "SEA",
        "origin": "JFK", "user_id": "mia_li_3668"
    })
}

fn bench(c: &mut Criterion) {
    let policy = Policy::default();
    let gold = booking();
    let pred = booking_pred();
    c.bench_function("normalize/booking", |b| {
        b.iter(|| normalize(black_box(&pred), &policy))
    });
    c.bench_function("compare/booking_soft", |b| {
        b.iter(|| compare(black_box(&pred), black_box(&gold), &policy))
    });
    c.bench_function("compare/booking_exact", |b| {
        b.iter(|| compare(black_box(&gold), black_box(&gold), &policy))
    });

    let kinds: HashMap<String, ToolKind> = [
        ("get_user_details", ToolKind::Read),
        ("search_direct_flight", ToolKind::Read),
        ("book_reservation", ToolKind::Write),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let gold_actions = vec![json!({"name": "book_reservation", "arguments": gold})];
    let mut turns = vec![json!({"role": "user", "content": "I want to fly to Seattle."})];
    for _ in 0..10 {
        turns.push(json!({"role": "assistant", "content": "", "tool_calls": [
            {"name": "search_direct_flight",
             "arguments": {"origin": "JFK", "destination": "SEA", "date": "2024-05-20"}}]}));
        turns.push(json!({"role": "tool", "content": "[]"}));
    }
    turns.push(json!({"role": "assistant", "content": "",
                      "tool_calls": [{"name": "book_reservation", "arguments": pred}]}));
    turns.push(json!({"role": "tool", "content": "{}"}));
    c.bench_function("label_tiers/22_turns", |b| {
        b.iter(|| label_tiers(black_box(&turns), &gold_actions, &kinds, &policy))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
