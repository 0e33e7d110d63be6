//! No input may panic or hang the tool-call parser: arbitrary bytes and
//! strings, and valid messages mutated (truncated, bytes flipped, tags
//! inserted), checked against invariants that hold for any input. The span
//! form (what the Python bindings call) must give the same message once its
//! spans are decoded.

use proptest::prelude::*;
use turnrl_core::parse::{
    parse_tool_call_spans, parse_tool_calls, Arguments, Format, ParamType, ToolSchemas,
};

const TAGS: &[&str] = &[
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<function=",
    "</function>",
    "<parameter=",
    "</parameter>",
    "```json\n",
    "{",
    "}",
    "\"",
    ">",
];

const FORMATS: [Format; 3] = [Format::Auto, Format::Hermes, Format::Qwen3Coder];

fn schemas() -> ToolSchemas {
    let mut s = ToolSchemas::new();
    s.set_param("f", "n", vec![ParamType::Integer]);
    s.set_param("f", "b", vec![ParamType::Boolean, ParamType::Null]);
    s.set_param("f", "o", vec![ParamType::Object]);
    s.set_param("f", "s", vec![ParamType::String]);
    s
}

const HERMES: &str = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"n\": 1, \"o\": {\"k\": [1, 2.5, null]}, \"s\": \"é\"}}\n</tool_call>";
const STRING_ARGS: &str =
    "<tool_call>{\"name\": \"g\", \"arguments\": \"{\\\"a\\\": true}\"}</tool_call>";
const FENCED: &str = "<tool_call>```json\n{\"name\": \"h\"}\n```</tool_call>";
const XML: &str = "<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>\n<parameter=o>\n{\"a\": 1}\n</parameter>\n</function>\n</tool_call>";
const BARE: &str = "<function=f><parameter=b>true</parameter></function>";
// Reasoning tags in argument values are text.
const HERMES_THINK: &str =
    "<tool_call>{\"name\": \"f\", \"arguments\": {\"s\": \"a </think> <think> b\"}}</tool_call>";
const XML_THINK: &str = "<tool_call>\n<function=f>\n<parameter=s>\na </think> b\n</parameter>\n</function>\n</tool_call>";
const BARE_THINK: &str = "<function=f><parameter=s></think> <think></parameter></function>";
const CALLS: [&str; 8] = [
    HERMES,
    STRING_ARGS,
    FENCED,
    XML,
    BARE,
    HERMES_THINK,
    XML_THINK,
    BARE_THINK,
];

/// Reasoning in a `<think>` block (`Some(true)`), begun in the prompt
/// (`Some(false)`: only its `</think>` is written) or none, then calls
/// among prose.
fn valid_message() -> impl Strategy<Value = String> {
    valid_message_and_reasoning().prop_map(|(m, _)| m)
}

/// [`valid_message`] and the reasoning it holds.
fn valid_message_and_reasoning() -> impl Strategy<Value = (String, Option<String>)> {
    let call = prop::sample::select(CALLS.to_vec());
    let prose = "[a-z .,\\n漢]{0,20}";
    (
        prop::option::of((prose, any::<bool>())),
        prose,
        prop::collection::vec((call, prose), 0..4),
    )
        .prop_map(|(think, lead, calls)| {
            let mut m = String::new();
            if let Some((t, block)) = &think {
                if *block {
                    m.push_str("<think>");
                }
                m.push_str(t);
                m.push_str("</think>");
            }
            m.push_str(&lead);
            for (c, p) in calls {
                m.push_str(c);
                m.push_str(&p);
            }
            let reasoning = think.map(|(t, _)| {
                t.trim_matches(|c: char| c.is_ascii_whitespace())
                    .to_string()
            });
            (m, reasoning)
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    FlipByte(usize, u8),
    InsertTag(usize, usize),
    DeleteRange(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::FlipByte(a, b)),
        (any::<usize>(), 0..TAGS.len()).prop_map(|(a, t)| Mutation::InsertTag(a, t)),
        (any::<usize>(), 0usize..16).prop_map(|(a, n)| Mutation::DeleteRange(a, n)),
    ]
}

/// Applies mutations to the bytes and reads them back lossily, so flips that
/// break UTF-8 still give a string.
fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for m in mutations {
        let n = bytes.len();
        match *m {
            Mutation::Truncate(a) => bytes.truncate(a % (n + 1)),
            Mutation::FlipByte(a, b) if n > 0 => bytes[a % n] ^= b,
            Mutation::FlipByte(..) => {}
            Mutation::InsertTag(a, t) => {
                let at = a % (n + 1);
                bytes.splice(at..at, TAGS[t].bytes());
            }
            Mutation::DeleteRange(a, len) => {
                let at = a % (n + 1);
                bytes.drain(at..(at + len).min(n));
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn starts_a_call(rest: &str) -> bool {
    rest.starts_with("<tool_call>") || rest.starts_with("<function=")
}

fn check_invariants(text: &str) {
    let schemas = schemas();
    for fmt in FORMATS {
        for s in [None, Some(&schemas)] {
            let m = parse_tool_calls(text, fmt, s);
            let spans = parse_tool_call_spans(text, fmt, s);
            for c in &spans.tool_calls {
                if let Arguments::Json(span) = &c.arguments {
                    let json = text.get(span.clone()).expect("span inside the text");
                    assert!(json.starts_with('{') && json.ends_with('}'), "{json:?}");
                }
            }
            assert_eq!(spans.into_message(text), m, "{text:?}");
            assert!(m.content.len() <= text.len());
            let mut last = None;
            for e in &m.errors {
                assert!(
                    e.offset < text.len(),
                    "offset {} past {}",
                    e.offset,
                    text.len()
                );
                assert!(text.is_char_boundary(e.offset));
                assert!(starts_a_call(&text[e.offset..]));
                assert!(last.is_none_or(|l| l < e.offset), "errors out of order");
                last = Some(e.offset);
            }
            for c in &m.tool_calls {
                assert!(!c.name.is_empty());
                assert!(starts_a_call(&text[c.offset..]));
                // A call that was read is gone from the content, tags and body.
                let rest = &text[c.offset..];
                if let Some(end) = rest.find("</tool_call>") {
                    let span = &rest[..end + "</tool_call>".len()];
                    assert!(!m.content.contains(span), "content kept call {span:?}");
                }
            }
            if let Some(r) = &m.reasoning {
                assert!(r.len() <= text.len());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_invariants(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_strings_never_panic(text in "\\PC{0,300}") {
        check_invariants(&text);
    }

    #[test]
    fn tag_soup_never_panics(parts in prop::collection::vec((0..TAGS.len(), "[a-z0-9 \\n]{0,4}"), 0..40)) {
        let text: String = parts.iter().map(|(t, s)| format!("{}{}", TAGS[*t], s)).collect();
        check_invariants(&text);
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        text in valid_message(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        check_invariants(&mutate(&text, &mutations));
    }

    #[test]
    fn valid_messages_parse_every_call((text, reasoning) in valid_message_and_reasoning()) {
        let m = parse_tool_calls(&text, Format::Auto, Some(&schemas()));
        prop_assert!(m.errors.is_empty(), "{:?}", m.errors);
        let expected: usize = CALLS.iter().map(|c| text.matches(c).count()).sum();
        prop_assert_eq!(m.tool_calls.len(), expected);
        prop_assert!(!m.content.contains("<tool_call>"));
        prop_assert!(!m.content.contains("think>"), "{:?}", m.content);
        // `</think>` in a call's arguments never ends reasoning.
        prop_assert_eq!(m.reasoning, reasoning);
    }
}

/// Inputs built to make a naive scanner quadratic: many openers, none closed.
#[test]
fn adversarial_inputs_stay_linear() {
    let n = 200_000;
    let cases = [
        "<tool_call>".repeat(n / 11),
        "<function=".repeat(n / 10),
        "<tool_call><function=f>".to_string() + &"<parameter=a>".repeat(n / 13),
        "<function=f>".to_string() + &"<parameter=a>x".repeat(n / 14),
        "<think>".repeat(n / 7),
        "<".repeat(n),
        "<tool_call>{\"name\": \"f\", \"arguments\": ".to_string() + &"[".repeat(n),
        // Reasoning that must look past calls for its `</think>`.
        "<tool_call>x".repeat(n / 12) + "</think>",
        "<function=x".repeat(n / 11) + "</think>",
        "<tool_call></tool_call>".repeat(n / 23) + "</think>",
        "<function=f></function>".repeat(n / 23) + "</think>",
        "<think>".to_string() + &"<tool_call><function=".repeat(n / 21),
        "<function=f>".to_string() + &"<think>".repeat(n / 7),
    ];
    for text in &cases {
        let start = std::time::Instant::now();
        for fmt in FORMATS {
            let _ = parse_tool_calls(text, fmt, None);
        }
        // Linear scans take milliseconds here; a quadratic one takes minutes.
        assert!(start.elapsed().as_secs() < 20, "slow on {:?}", &text[..20]);
    }
}
