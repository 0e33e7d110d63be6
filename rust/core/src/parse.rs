//! Parsing tool calls out of an assistant message.
//!
//! One left-to-right scan over the bytes finds the tags that matter
//! (`<think>`, `<tool_call>` and, for Qwen3-Coder, `<function=`); every other
//! byte is prose. Each tag search resumes where the previous one stopped, so
//! the whole parse is linear in the input, whatever the input holds.
//!
//! # Rules
//!
//! * **Reasoning.** `<think>…</think>` blocks are reasoning; a block without
//!   `</think>` runs to the end of the text (cut off while thinking). When the
//!   first `</think>` has no `<think>` before it (chat templates that put
//!   `<think>` in the prompt), everything before it is reasoning. Reasoning
//!   blocks are joined with `"\n"` and trimmed; tags inside reasoning are text,
//!   so a call inside reasoning is never a call. `None` when there is no block.
//!   A `</think>` (or `<think>`) inside a call is text of the call, not a
//!   reasoning tag: reasoning ends at the first `</think>` outside calls. A
//!   call here is a `<tool_call>` closed by `</tool_call>`, or one never
//!   closed that runs to the end of the text (cut off) and starts as a call
//!   (a JSON object, a code fence or `<function=`; "no `<tool_call>`
//!   needed" in reasoning is prose); with `fmt` = `auto`
//!   or `qwen3_coder`, also a bare `<function=` block that `</function>`
//!   closes or that is cut off, as read below. So a call written in reasoning
//!   stays reasoning when its `</think>` follows it, and a call with
//!   `</think>` in its arguments is read as a call when no reasoning comes
//!   before it. A `<tool_call>` or bare block whose closer never comes but
//!   which a later `<tool_call>` or `<function=` ends (likely prose naming
//!   the tag) holds no call here: a `</think>` in it ends reasoning.
//! * **Calls.** `<tool_call>` opens a call; its body ends at the next
//!   `</tool_call>`, or at the next `<tool_call>` or the end of the text when
//!   the call was never closed (cut off at the end of generation). With
//!   `fmt` = `auto` or `qwen3_coder`, a bare `<function=NAME>…</function>` block
//!   outside `<tool_call>` is a call too. A bare block that `</function>`
//!   does not close ends at the next `<function=` (a forgotten closer) or
//!   the end of the text (cut off), read as the XML body rules say. But no
//!   call runs over a `<tool_call>`, nor a block left open over a `<think>`:
//!   a bare block that meets one before its `</function>` (or, for
//!   `<think>`, with none) ends there and is an error (prose naming the
//!   tag, or a forgotten closer before another call), and the call or
//!   reasoning after it is read as usual. A closed block keeps a `<think>`
//!   in a value as text.
//! * **Content** is the text outside reasoning and calls, joined and trimmed
//!   (trimming removes ASCII whitespace: space, `\t`, `\n`, `\r`, `\x0b`, `\x0c`).
//! * **Hermes JSON body** (trimmed; an optional ```` ``` ```` / ```` ```json ````
//!   fence around it is removed) must be exactly one JSON object: `name` a
//!   non-empty string; `arguments` (or its alias `parameters`) an object, a
//!   JSON-encoded string holding an object, or missing / null / blank string
//!   (all `{}`); other keys are ignored. Trailing text after the object is an
//!   error, like `json.loads`.
//! * **Qwen3-Coder XML body**: one or more `<function=NAME>` blocks, each
//!   ending at `</function>`, the next `<function=` or the end of the body.
//!   `<parameter=KEY>value</parameter>`; a value also ends at the next
//!   `<parameter=` or `</function>` (a forgotten closer), but a value that runs
//!   into the end of an unclosed block was cut off and makes the call an error.
//!   One leading and one trailing `\n` of a value are removed (the template
//!   puts the value on its own lines). Values are typed by [`ToolSchemas`],
//!   see [`type_xml_value`].
//! * `fmt` = `auto` decides per call: an XML body starts with `<function=`.
//! * **Errors.** A call that cannot be read becomes one [`CallError`] holding
//!   the byte offset of its opening tag; the other calls are kept.
//! * **Numbers** in [`ToolCall::arguments`] are serde_json's: an integer
//!   beyond 64 bits becomes a float. [`parse_tool_call_spans`] leaves JSON
//!   arguments as text, so a caller can read them exactly (the Python
//!   bindings keep such integers as ints).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use memchr::{memchr, memchr2_iter};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::{Error, Result};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const FUNCTION_OPEN: &str = "<function=";
const FUNCTION_CLOSE: &str = "</function>";
const PARAMETER_OPEN: &str = "<parameter=";
const PARAMETER_CLOSE: &str = "</parameter>";

/// The tool-call syntax to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Decide per call (`<function=` starts an XML body, anything else is JSON).
    Auto,
    /// Hermes / Qwen2.5 / Qwen3: JSON inside `<tool_call>` tags.
    Hermes,
    /// Qwen3-Coder: `<function=NAME><parameter=KEY>value</parameter></function>`.
    Qwen3Coder,
}

impl Format {
    pub const NAMES: [&'static str; 3] = ["auto", "hermes", "qwen3_coder"];

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Format::Auto),
            "hermes" => Ok(Format::Hermes),
            "qwen3_coder" => Ok(Format::Qwen3Coder),
            _ => Err(Error::UnknownName {
                what: "tool-call format",
                name: name.to_string(),
                valid: Self::NAMES.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    fn accepts_xml(self) -> bool {
        matches!(self, Format::Auto | Format::Qwen3Coder)
    }
}

/// One parsed call, its arguments as `A`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call<A> {
    pub name: String,
    pub arguments: A,
    /// Byte offset of the call's opening tag in the input.
    pub offset: usize,
}

/// One parsed call.
pub type ToolCall = Call<Map<String, Value>>;

/// A call that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// Byte offset of the call's opening tag in the input.
    pub offset: usize,
    pub reason: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tool call at byte {}: {}", self.offset, self.reason)
    }
}

/// The parts of one assistant message, with calls of type `C` and text of
/// type `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<C, T = String> {
    pub content: T,
    pub reasoning: Option<T>,
    pub tool_calls: Vec<C>,
    pub errors: Vec<CallError>,
}

// Not derived: a derive would ask `C: Default`.
impl<C, T: Default> Default for Message<C, T> {
    fn default() -> Self {
        Message {
            content: T::default(),
            reasoning: None,
            tool_calls: Vec::new(),
            errors: Vec::new(),
        }
    }
}

/// Content or reasoning as [`parse_tool_call_spans`] leaves it: usually one
/// piece of the input, kept as its byte range; built only when it joins
/// several pieces (text between calls, several `<think>` blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    Span(Range<usize>),
    Owned(String),
}

impl Default for Text {
    fn default() -> Self {
        Text::Span(0..0)
    }
}

impl Text {
    /// The text; `input` is the parsed input (`None` if the span is not in
    /// it).
    pub fn get<'t>(&'t self, input: &'t str) -> Option<&'t str> {
        match self {
            Text::Span(range) => input.get(range.clone()),
            Text::Owned(text) => Some(text),
        }
    }

    fn into_string(self, input: &str) -> String {
        match self {
            Text::Span(range) => input.get(range).unwrap_or_default().to_string(),
            Text::Owned(text) => text,
        }
    }
}

/// The parts of one assistant message.
pub type ParsedMessage = Message<ToolCall>;

/// A call's arguments as [`parse_tool_call_spans`] leaves them.
#[derive(Debug, Clone, PartialEq)]
pub enum Arguments {
    /// A JSON object written in the message, at this byte range of the
    /// input. It is known to decode into a `Map` exactly as written.
    Json(Range<usize>),
    /// The JSON text of an object, known to decode into a `Map` like
    /// [`Arguments::Json`]: one given as a JSON-encoded string (decoded,
    /// trimmed), or Qwen3-Coder parameters written as an object, each
    /// value read as JSON kept as written.
    Encoded(String),
    /// Arguments the parser built as values: none given (empty), or
    /// Qwen3-Coder parameters when [`parse_tool_calls`] decodes everything.
    Built(Map<String, Value>),
}

impl Arguments {
    /// The arguments as a map; `text` is the parsed input.
    pub fn to_map(&self, text: &str) -> std::result::Result<Map<String, Value>, String> {
        match self {
            Arguments::Built(map) => Ok(map.clone()),
            Arguments::Json(range) => decode_span(text, range),
            Arguments::Encoded(json) => decode_object(json),
        }
    }

    /// [`Arguments::to_map`] that moves a built map instead of copying it.
    pub fn into_map(self, text: &str) -> std::result::Result<Map<String, Value>, String> {
        match self {
            Arguments::Built(map) => Ok(map),
            Arguments::Json(range) => decode_span(text, &range),
            Arguments::Encoded(json) => decode_object(&json),
        }
    }
}

fn decode_span(
    text: &str,
    range: &Range<usize>,
) -> std::result::Result<Map<String, Value>, String> {
    let json = text
        .get(range.clone())
        .ok_or_else(|| format!("arguments span {range:?} is outside the text"))?;
    decode_object(json)
}

fn decode_object(json: &str) -> std::result::Result<Map<String, Value>, String> {
    crate::json::map_from_str(json).map_err(|e| e.to_string())
}

impl Arguments {}

/// One parsed call whose JSON arguments are still text.
pub type SpannedCall = Call<Arguments>;

/// [`ParsedMessage`] with each call's JSON arguments, its content and its
/// reasoning left as spans of the input where they can be (see
/// [`parse_tool_call_spans`]).
pub type SpannedMessage = Message<SpannedCall, Text>;

impl SpannedMessage {
    /// Decodes every call's arguments; `text` is the parsed input.
    pub fn into_message(self, text: &str) -> ParsedMessage {
        let mut errors = self.errors;
        let errors_before = errors.len();
        let mut tool_calls = Vec::with_capacity(self.tool_calls.len());
        for call in self.tool_calls {
            match call.arguments.into_map(text) {
                Ok(arguments) => tool_calls.push(ToolCall {
                    name: call.name,
                    arguments,
                    offset: call.offset,
                }),
                // Not reachable for spans this parser returned (they were
                // checked to decode); kept as an error rather than a panic.
                Err(reason) => errors.push(CallError {
                    offset: call.offset,
                    reason,
                }),
            }
        }
        if errors.len() > errors_before {
            errors.sort_by_key(|e| e.offset);
        }
        ParsedMessage {
            content: self.content.into_string(text),
            reasoning: self.reasoning.map(|r| r.into_string(text)),
            tool_calls,
            errors,
        }
    }
}

/// A JSON-schema type a Qwen3-Coder parameter value can be read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
    Null,
    /// A union branch whose types are not known (a `$ref`, a branch with
    /// no `type`): an object or an array read as JSON. Not a scalar: the
    /// `$ref` may be a string enum, whose "5" must stay a string.
    Any,
}

/// How deep [`types_of_spec`] reads union branches nested in branches;
/// deeper ones count as unknown ([`ParamType::Any`]).
const SPEC_MAX_DEPTH: usize = 32;

/// The types a property's JSON schema allows: its `type` (a name or a
/// list), else the union of its `anyOf`/`oneOf` branches' types, each
/// branch read by these rules (pydantic writes `Optional[str]` as
/// `{"anyOf": [{"type": "string"}, {"type": "null"}]}`), else the kinds of
/// its `enum` or `const` values. A branch these rules say nothing of (a
/// `$ref`: pydantic's `Optional[Model]` is `{"anyOf": [{"$ref": ...},
/// {"type": "null"}]}`) allows a JSON object or array in its place
/// ([`ParamType::Any`]).
/// Empty when none says (the value is then typed as a JSON literal).
pub fn types_of_spec(spec: &Value) -> Vec<ParamType> {
    types_of_spec_within(spec, 0)
}

fn types_of_spec_within(spec: &Value, depth: usize) -> Vec<ParamType> {
    let mut types = Vec::new();
    let mut add = |t: ParamType| {
        if !types.contains(&t) {
            types.push(t);
        }
    };
    match spec.get("type") {
        Some(Value::String(t)) => return vec![ParamType::from_schema_name(t)],
        Some(Value::Array(ts)) => {
            return ts
                .iter()
                .filter_map(Value::as_str)
                .map(ParamType::from_schema_name)
                .collect()
        }
        _ => {}
    }
    for union in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = spec.get(union) {
            for branch in branches {
                let known = if depth < SPEC_MAX_DEPTH {
                    types_of_spec_within(branch, depth + 1)
                } else {
                    Vec::new()
                };
                if known.is_empty() {
                    add(ParamType::Any);
                }
                known.into_iter().for_each(&mut add);
            }
        }
    }
    let values = match (spec.get("enum"), spec.get("const")) {
        (Some(Value::Array(values)), _) => values.as_slice(),
        (_, Some(value)) => std::slice::from_ref(value),
        _ => &[],
    };
    for value in values {
        add(match value {
            Value::String(_) => ParamType::String,
            Value::Bool(_) => ParamType::Boolean,
            Value::Number(n) if n.is_f64() => ParamType::Number,
            Value::Number(_) => ParamType::Integer,
            Value::Null => ParamType::Null,
            Value::Array(_) => ParamType::Array,
            Value::Object(_) => ParamType::Object,
        });
    }
    types
}

impl ParamType {
    /// The schema's type name; names outside JSON Schema's set read as strings.
    pub fn from_schema_name(name: &str) -> Self {
        match name {
            "integer" => ParamType::Integer,
            "number" => ParamType::Number,
            "boolean" => ParamType::Boolean,
            "object" => ParamType::Object,
            "array" => ParamType::Array,
            "null" => ParamType::Null,
            _ => ParamType::String,
        }
    }
}

/// Parameter types per tool and parameter name, from OpenAI function schemas.
#[derive(Debug, Clone, Default)]
pub struct ToolSchemas {
    tools: HashMap<String, HashMap<String, Vec<ParamType>>>,
}

impl ToolSchemas {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a tool (so it is known even with no typed parameters).
    pub fn add_tool(&mut self, tool: &str) {
        self.tools.entry(tool.to_string()).or_default();
    }

    /// Sets the accepted types of one parameter, in the schema's order.
    pub fn set_param(&mut self, tool: &str, param: &str, types: Vec<ParamType>) {
        self.tools
            .entry(tool.to_string())
            .or_default()
            .insert(param.to_string(), types);
    }

    /// Reads `{"type": "function", "function": {...}}` or the inner
    /// `{"name", "parameters": {"properties": {...}}}` dict.
    pub fn add_openai_tool(&mut self, tool: &Value) -> Result<()> {
        let function = tool.get("function").unwrap_or(tool);
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid("tool schema has no string \"name\""))?;
        self.add_tool(name);
        let properties = function
            .get("parameters")
            .and_then(|p| p.get("properties"))
            .and_then(Value::as_object);
        for (key, spec) in properties.into_iter().flatten() {
            self.set_param(name, key, types_of_spec(spec));
        }
        Ok(())
    }

    fn param_types(&self, tool: &str, param: &str) -> Option<&[ParamType]> {
        let types = self.tools.get(tool)?.get(param)?;
        (!types.is_empty()).then_some(types.as_slice())
    }
}

fn is_trim_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Trims ASCII whitespace (the same set as the Python reference).
pub fn trim_ascii_ws(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii() && is_trim_byte(c as u8))
}

/// Trims without a second allocation.
fn trim_in_place(mut s: String) -> String {
    let trimmed = trim_ascii_ws(&s);
    let (start, len) = (
        trimmed.as_ptr() as usize - s.as_ptr() as usize,
        trimmed.len(),
    );
    s.truncate(start + len);
    s.drain(..start);
    s
}

/// The first tag from `tags` at or after `from` and before `to`, as
/// (position, index into `tags`). One memchr pass over `<` bytes.
fn find_first_tag(text: &str, from: usize, to: usize, tags: &[&str]) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut at = from;
    while at < to {
        let rel = memchr(b'<', &bytes[at..to])?;
        let pos = at + rel;
        let rest = &bytes[pos..to];
        for (i, tag) in tags.iter().enumerate() {
            if rest.starts_with(tag.as_bytes()) {
                return Some((pos, i));
            }
        }
        at = pos + 1;
    }
    None
}

/// Parses one assistant message. Never panics; linear in `text`.
pub fn parse_tool_calls(text: &str, fmt: Format, schemas: Option<&ToolSchemas>) -> ParsedMessage {
    let options = Options {
        fmt,
        schemas,
        json_spans: false,
    };
    parse_message(text, options).into_message(text)
}

/// [`parse_tool_calls`] without decoding JSON arguments: each is checked
/// and left as a span of `text`, for callers that build their own values
/// from it (or never look at it).
pub fn parse_tool_call_spans(
    text: &str,
    fmt: Format,
    schemas: Option<&ToolSchemas>,
) -> SpannedMessage {
    let options = Options {
        fmt,
        schemas,
        json_spans: true,
    };
    parse_message(text, options)
}

#[derive(Clone, Copy)]
struct Options<'s> {
    fmt: Format,
    schemas: Option<&'s ToolSchemas>,
    /// Leave JSON arguments as spans (else decode them while parsing, in
    /// one pass, for callers that want `Value`s).
    json_spans: bool,
}

fn parse_message(text: &str, options: Options<'_>) -> SpannedMessage {
    let Options { fmt, .. } = options;
    let mut out = SpannedMessage::default();
    // Pieces of the input that make up the content and the reasoning; most
    // messages have one non-blank piece of each, kept as a span.
    let mut content: Vec<Range<usize>> = Vec::new();
    let mut reasoning: Option<Vec<Range<usize>>> = None;
    let mut pos = 0usize;

    // A leading `</think>` with no `<think>` before it closes reasoning that
    // began in the prompt.
    if let Some(close) = reasoning_end(text, 0, fmt, true) {
        reasoning.get_or_insert_with(Vec::new).push(0..close);
        pos = close + THINK_CLOSE.len();
    }

    let tags: &[&str] = if fmt.accepts_xml() {
        &[THINK_OPEN, CALL_OPEN, FUNCTION_OPEN]
    } else {
        &[THINK_OPEN, CALL_OPEN]
    };
    while let Some((at, which)) = find_first_tag(text, pos, text.len(), tags) {
        if at > pos {
            content.push(pos..at);
        }
        match which {
            0 => {
                let start = at + THINK_OPEN.len();
                let (end, next) = match reasoning_end(text, start, fmt, false) {
                    Some(p) => (p, p + THINK_CLOSE.len()),
                    None => (text.len(), text.len()),
                };
                reasoning.get_or_insert_with(Vec::new).push(start..end);
                pos = next;
            }
            1 => {
                let start = at + CALL_OPEN.len();
                let (end, next) =
                    match find_first_tag(text, start, text.len(), &[CALL_CLOSE, CALL_OPEN]) {
                        Some((p, 0)) => (p, p + CALL_CLOSE.len()),
                        Some((p, _)) => (p, p),
                        None => (text.len(), text.len()),
                    };
                parse_call_body(text, at, start, end, options, &mut out);
                pos = next;
            }
            _ => {
                pos = match bare_function_block(text, at) {
                    Ok(block) => {
                        push_xml_call(text, &block, options, &mut out);
                        block.next
                    }
                    Err((next, tag)) => {
                        out.errors.push(CallError {
                            offset: at,
                            reason: format!("{FUNCTION_OPEN} block not closed before {tag}"),
                        });
                        next
                    }
                };
            }
        }
    }
    if pos < text.len() {
        content.push(pos..text.len());
    }
    out.content = gather(text, &content, "");
    out.reasoning = reasoning.map(|pieces| gather(text, &pieces, "\n"));
    out
}

/// Whether the text after a `<tool_call>` begins as a call body does: a JSON
/// object, a code fence or a Qwen3-Coder `<function=` block (or nothing yet).
fn starts_like_a_call(body: &str) -> bool {
    let body = body.trim_start_matches(|c: char| c.is_ascii() && is_trim_byte(c as u8));
    body.is_empty()
        || body.starts_with('{')
        || body.starts_with("```")
        || body.starts_with(FUNCTION_OPEN)
}

/// Where reasoning that runs from `from` ends: at the first `</think>` that
/// lies in no call. `None` when there is none, or (with `leading`, for
/// reasoning begun in the prompt) when a `<think>` outside calls comes
/// first, so that no reasoning was begun in the prompt.
///
/// A call here is a `<tool_call>` closed by its `</tool_call>`, or one that
/// `</tool_call>` never closes and no later `<tool_call>` ends (cut off at
/// the end of generation, so the reasoning can end only after it); with an
/// XML format, also a bare `<function=` block that [`bare_function_block`]
/// reads as closed or cut off. Tags inside a call are its text. A call
/// whose closer was forgotten (a `<tool_call>` that the next one ends, a
/// bare block that the next `<function=` ends, or one that is an error) is
/// no call here: more likely prose in the reasoning naming the tag, its
/// tags are read as usual. Each byte is scanned at most three times.
fn reasoning_end(text: &str, from: usize, fmt: Format, leading: bool) -> Option<usize> {
    let think: &[&str] = if leading {
        &[THINK_CLOSE, THINK_OPEN]
    } else {
        &[THINK_CLOSE]
    };
    let tags: &[&str] = match (leading, fmt.accepts_xml()) {
        (true, true) => &[THINK_CLOSE, THINK_OPEN, CALL_OPEN, FUNCTION_OPEN],
        (true, false) => &[THINK_CLOSE, THINK_OPEN, CALL_OPEN],
        (false, true) => &[THINK_CLOSE, CALL_OPEN, FUNCTION_OPEN],
        (false, false) => &[THINK_CLOSE, CALL_OPEN],
    };
    let close = |(at, which): (usize, usize)| (which == 0).then_some(at);
    let (mut at, mut which) = find_first_tag(text, from, text.len(), tags)?;
    if tags[which] != THINK_CLOSE && tags[which] != THINK_OPEN {
        // Most messages with calls before any reasoning tag have no
        // `</think>` at all: one search answers for them.
        memchr::memmem::find(&text.as_bytes()[at..], THINK_CLOSE.as_bytes())?;
    }
    loop {
        let (body, unclosed_end) = match tags[which] {
            CALL_OPEN => {
                let start = at + CALL_OPEN.len();
                match find_first_tag(text, start, text.len(), &[CALL_CLOSE, CALL_OPEN]) {
                    Some((p, 0)) => (p + CALL_CLOSE.len(), None),
                    Some((p, _)) => (start, Some(p)),
                    // Cut off at the end: a call if it starts as one, else a
                    // tag named in prose ("no <tool_call> needed</think>").
                    None if starts_like_a_call(&text[start..]) => return None,
                    None => (start, Some(text.len())),
                }
            }
            FUNCTION_OPEN => match bare_function_block(text, at) {
                Ok(block) if block.closed => (block.next, None),
                Ok(block) if block.next == text.len() => return None,
                Ok(block) => (at + FUNCTION_OPEN.len(), Some(block.next)),
                Err((p, _)) => (at + FUNCTION_OPEN.len(), Some(p)),
            },
            _ => return close((at, which)),
        };
        let pos = match unclosed_end {
            // Not a call: its reasoning tags count, its call tags are text.
            Some(end) => match find_first_tag(text, body, end, think) {
                Some(hit) => return close(hit),
                None => end,
            },
            // A call: skip it.
            None => body,
        };
        (at, which) = find_first_tag(text, pos, text.len(), tags)?;
    }
}

/// The pieces joined (with `separator` after each non-empty prefix, as the
/// reasoning of several `<think>` blocks is), then trimmed. The separators
/// are whitespace, so with at most one non-blank piece the result is that
/// piece trimmed: a span of the input.
fn gather(text: &str, pieces: &[Range<usize>], separator: &str) -> Text {
    let piece = |range: &Range<usize>| text.get(range.clone()).unwrap_or_default();
    let mut nonblank = pieces
        .iter()
        .map(|range| trim_ascii_ws(piece(range)))
        .filter(|trimmed| !trimmed.is_empty());
    match (nonblank.next(), nonblank.next()) {
        (None, _) => Text::default(),
        (Some(trimmed), None) => {
            let start = trimmed.as_ptr() as usize - text.as_ptr() as usize;
            Text::Span(start..start + trimmed.len())
        }
        _ => {
            let mut joined = String::new();
            for range in pieces {
                if !joined.is_empty() {
                    joined.push_str(separator);
                }
                joined.push_str(piece(range));
            }
            Text::Owned(trim_in_place(joined))
        }
    }
}

/// Parses many messages in parallel (rayon).
pub fn parse_tool_calls_batch<S: AsRef<str> + Sync>(
    texts: &[S],
    fmt: Format,
    schemas: Option<&ToolSchemas>,
) -> Vec<ParsedMessage> {
    in_parallel(texts, |t| parse_tool_calls(t, fmt, schemas))
}

/// [`parse_tool_call_spans`] of many messages in parallel (rayon).
pub fn parse_tool_call_spans_batch<S: AsRef<str> + Sync>(
    texts: &[S],
    fmt: Format,
    schemas: Option<&ToolSchemas>,
) -> Vec<SpannedMessage> {
    in_parallel(texts, |t| parse_tool_call_spans(t, fmt, schemas))
}

fn in_parallel<S: AsRef<str> + Sync, T: Send>(
    texts: &[S],
    parse: impl Fn(&str) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    // Messages are small: a task per message would cost more than it parses.
    texts
        .par_iter()
        .with_min_len(16)
        .map(|t| parse(t.as_ref()))
        .collect()
}

fn parse_call_body(
    text: &str,
    tag_at: usize,
    start: usize,
    end: usize,
    options: Options<'_>,
    out: &mut SpannedMessage,
) {
    let Options { fmt, .. } = options;
    let body = trim_ascii_ws(&text[start..end]);
    let fail = |out: &mut SpannedMessage, reason: String| {
        out.errors.push(CallError {
            offset: tag_at,
            reason,
        })
    };
    if body.is_empty() {
        return fail(out, "empty tool call".to_string());
    }
    let xml = match fmt {
        Format::Hermes => false,
        Format::Qwen3Coder => true,
        Format::Auto => body.starts_with(FUNCTION_OPEN),
    };
    if !xml {
        return match parse_json_call(text, body, options.json_spans) {
            Ok((name, arguments)) => out.tool_calls.push(SpannedCall {
                name,
                arguments,
                offset: tag_at,
            }),
            Err(reason) => fail(out, reason),
        };
    }
    if !body.starts_with(FUNCTION_OPEN) {
        return fail(out, "expected <function=NAME> in tool call".to_string());
    }
    // The body's first `<function=` lies where the trimmed body starts.
    let raw = &text[start..end];
    let mut at = start
        + (raw.len()
            - raw
                .trim_start_matches(|c: char| c.is_ascii() && is_trim_byte(c as u8))
                .len());
    let mut first = true;
    while at < end {
        let block = function_block(text, at, end);
        let before = out.tool_calls.len() + out.errors.len();
        push_xml_call(text, &block, options, out);
        if first {
            // Errors of the first block carry the `<tool_call>` offset, so one
            // malformed call reports where the call starts.
            if out.tool_calls.len() + out.errors.len() > before {
                if let Some(e) = out.errors.last_mut().filter(|e| e.offset == block.open) {
                    e.offset = tag_at;
                }
                if let Some(c) = out.tool_calls.last_mut().filter(|c| c.offset == block.open) {
                    c.offset = tag_at;
                }
            }
            first = false;
        }
        match find_first_tag(text, block.next, end, &[FUNCTION_OPEN]) {
            Some((p, _)) => at = p,
            None => break,
        }
    }
}

/// Removes a ```` ``` ```` or ```` ```lang ```` fence around a JSON body.
fn strip_fence(body: &str) -> &str {
    let Some(rest) = body.strip_prefix("```") else {
        return body;
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    let rest = rest.strip_suffix("```").unwrap_or(rest);
    trim_ascii_ws(rest)
}

/// Reads a Hermes JSON body (`body` lies inside `text`). With `json_spans`
/// the usual body is checked in one pass that builds nothing and leaves the
/// arguments as a span; anything else (and every error) goes through
/// [`decode_json_call`], whose messages and results the fast path must equal
/// where it answers.
fn parse_json_call(
    text: &str,
    body: &str,
    json_spans: bool,
) -> std::result::Result<(String, Arguments), String> {
    let body = strip_fence(body);
    if json_spans {
        if let Some(call) = checked_json_call(text, body) {
            return Ok(call);
        }
    }
    decode_json_call(body).map(|(name, map)| (name, Arguments::Built(map)))
}

/// The fast path of [`parse_json_call`]: `None` when it cannot answer.
fn checked_json_call(text: &str, body: &str) -> Option<(String, Arguments)> {
    if !body.starts_with('{') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(body);
    let fields = CallFields::deserialize(&mut de).ok()?;
    de.end().ok()?;
    let name = match fields.name {
        Some(raw) if raw.get().starts_with('"') => {
            serde_json::from_str::<String>(raw.get()).ok()?
        }
        _ => return None,
    };
    if name.is_empty() {
        return None;
    }
    let arguments = match fields.arguments.or(fields.parameters) {
        None => Arguments::Built(Map::new()),
        Some(raw) => match raw.get().as_bytes().first() {
            Some(b'n') => Arguments::Built(Map::new()),
            Some(b'{') => {
                let from = raw.get().as_ptr() as usize - text.as_ptr() as usize;
                Arguments::Json(from..from + raw.get().len())
            }
            Some(b'"') => {
                let encoded = serde_json::from_str::<Cow<'_, str>>(raw.get()).ok()?;
                let inner = trim_ascii_ws(&encoded);
                if inner.is_empty() {
                    Arguments::Built(Map::new())
                } else if inner.starts_with('{') && Checked::ANY.decodes(inner).is_ok() {
                    Arguments::Encoded(inner.to_string())
                } else {
                    return None;
                }
            }
            _ => return None,
        },
    };
    Some((name, arguments))
}

/// The fields of a call object that matter, each left as JSON text; every
/// value (the ignored ones too) is checked to decode, as reading the whole
/// body into a `Value` would. A repeated key keeps its last value.
struct CallFields<'a> {
    name: Option<&'a RawValue>,
    arguments: Option<&'a RawValue>,
    parameters: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for CallFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct CallVisitor;
        impl<'de> Visitor<'de> for CallVisitor {
            type Value = CallFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a tool call object")
            }
            fn visit_map<M: MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Self::Value, M::Error> {
                let mut fields = CallFields {
                    name: None,
                    arguments: None,
                    parameters: None,
                };
                while let Some(key) = map.next_key::<CallKey>()? {
                    let slot = match key {
                        CallKey::Name => &mut fields.name,
                        CallKey::Arguments => &mut fields.arguments,
                        CallKey::Parameters => &mut fields.parameters,
                        CallKey::Other => {
                            let raw: &'de RawValue = map.next_value()?;
                            check_skipped(raw).map_err(de::Error::custom)?;
                            continue;
                        }
                    };
                    let raw: &'de RawValue = map.next_value()?;
                    check_skipped(raw).map_err(de::Error::custom)?;
                    *slot = Some(raw);
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(CallVisitor)
    }
}

/// Checks that a value serde_json skipped (to capture it as a `RawValue`)
/// also decodes as part of the call object. Skipping accepts a little more
/// than decoding: lone surrogate escapes, numbers beyond the range of
/// `f64`, and nesting deeper than serde_json's limit. Text with no
/// backslash, no exponent after a digit, no long digit run and fewer
/// brackets than the limit can hold none of these, so only the rare other
/// text is decoded a second time.
fn check_skipped(raw: &RawValue) -> serde_json::Result<()> {
    // The integer part of a finite f64 has at most 309 digits.
    const LONGEST_SAFE_DIGIT_RUN: usize = 300;
    let text = raw.get().as_bytes();
    let escaped = memchr(b'\\', text).is_some();
    let exponent = || memchr2_iter(b'e', b'E', text).any(|i| i > 0 && text[i - 1].is_ascii_digit());
    let long_digit_run = || {
        text.iter().filter(|b| b.is_ascii_digit()).count() > LONGEST_SAFE_DIGIT_RUN
            && text
                .split(|b| !b.is_ascii_digit())
                .any(|run| run.len() > LONGEST_SAFE_DIGIT_RUN)
    };
    let deep = || text.iter().filter(|&&b| b == b'[' || b == b'{').count() >= MEMBER_LEVELS;
    if escaped || exponent() || long_digit_run() || deep() {
        Checked::MEMBER.decodes(raw.get())?;
    }
    Ok(())
}

/// Containers a member of the call object may nest: serde_json decodes at
/// most 127 levels, and the call object is the first.
const MEMBER_LEVELS: usize = 126;

/// A key of a call object, decoded (so checked) without being kept.
enum CallKey {
    Name,
    Arguments,
    Parameters,
    Other,
}

impl<'de> Deserialize<'de> for CallKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = CallKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> std::result::Result<CallKey, E> {
                Ok(match key {
                    "name" => CallKey::Name,
                    "arguments" => CallKey::Arguments,
                    "parameters" => CallKey::Parameters,
                    _ => CallKey::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Decodes a JSON value and keeps nothing: accepts exactly what decoding it
/// into a `Value` with [`crate::json`] accepts (escapes, surrogate pairs,
/// number ranges, depth), with at most `levels_left` containers nested in
/// it besides serde_json's own limit.
#[derive(Clone, Copy)]
struct Checked {
    levels_left: usize,
}

impl Checked {
    /// A whole JSON text: serde_json's limit alone.
    const ANY: Checked = Checked {
        levels_left: usize::MAX,
    };
    /// A member of the call object: decoding the member alone would allow
    /// it one level more than decoding it inside the object does.
    const MEMBER: Checked = Checked {
        levels_left: MEMBER_LEVELS,
    };

    /// Whether `text` is exactly one such value (whitespace around it aside).
    fn decodes(self, text: &str) -> serde_json::Result<()> {
        let mut de = serde_json::Deserializer::from_str(text);
        self.deserialize(&mut de)?;
        de.end()
    }

    fn inner<E: de::Error>(self) -> std::result::Result<Self, E> {
        match self.levels_left.checked_sub(1) {
            Some(levels_left) => Ok(Checked { levels_left }),
            None => Err(E::custom("recursion limit exceeded")),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Checked {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> std::result::Result<(), S::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> std::result::Result<(), M::Error> {
        let inner = self.inner()?;
        while map.next_key_seed(Checked::ANY)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

/// `arguments` given as a JSON-encoded string: blank means none.
fn decode_string_arguments(encoded: &str) -> std::result::Result<Map<String, Value>, String> {
    let inner = trim_ascii_ws(encoded);
    if inner.is_empty() {
        return Ok(Map::new());
    }
    match crate::json::value_from_str(inner) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("\"arguments\" string is not a JSON object".to_string()),
        Err(e) => Err(format!("\"arguments\" string is not valid JSON: {e}")),
    }
}

/// Reads a Hermes JSON body by decoding all of it into a `Value`.
fn decode_json_call(body: &str) -> std::result::Result<(String, Map<String, Value>), String> {
    let value = crate::json::value_from_str(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut call) = value else {
        return Err("tool call JSON is not an object".to_string());
    };
    let name = match call.get_mut("name") {
        Some(Value::String(name)) if !name.is_empty() => std::mem::take(name),
        Some(Value::String(_)) => return Err("\"name\" is empty".to_string()),
        Some(_) => return Err("\"name\" is not a string".to_string()),
        None => return Err("missing \"name\"".to_string()),
    };
    let args = match call.get_mut("arguments") {
        Some(v) => std::mem::take(v),
        None => call
            .get_mut("parameters")
            .map(std::mem::take)
            .unwrap_or(Value::Null),
    };
    let arguments = match args {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        Value::String(s) => decode_string_arguments(&s)?,
        _ => return Err("\"arguments\" is not an object".to_string()),
    };
    Ok((name, arguments))
}

/// Where one `<function=` block lies.
struct FunctionBlock {
    /// Offset of `<function=`.
    open: usize,
    /// End of the block's inside (at `</function>` or the limit).
    inner_end: usize,
    /// Whether `</function>` closed it.
    closed: bool,
    /// Where scanning resumes.
    next: usize,
}

fn function_block(text: &str, open: usize, limit: usize) -> FunctionBlock {
    let from = open + FUNCTION_OPEN.len();
    match find_first_tag(text, from, limit, &[FUNCTION_CLOSE, FUNCTION_OPEN]) {
        Some((p, 0)) => FunctionBlock {
            open,
            inner_end: p,
            closed: true,
            next: p + FUNCTION_CLOSE.len(),
        },
        Some((p, _)) => FunctionBlock {
            open,
            inner_end: p,
            closed: false,
            next: p,
        },
        None => FunctionBlock {
            open,
            inner_end: limit,
            closed: false,
            next: limit,
        },
    }
}

/// A bare `<function=` block (outside `<tool_call>`): [`function_block`]
/// over the rest of the text, except that no call runs over a `<tool_call>`
/// (as a `<tool_call>` body ends at the next one), and a block `</function>`
/// does not close does not run over a `<think>` either (a closed block
/// keeps one in its values as text). Meeting either, the block was not a
/// call cut off at the end of generation (it is prose naming the tag, or a
/// call whose `</function>` was forgotten): the answer is `Err` with where
/// the tag lies and which it is, the tag starting a call or reasoning of its
/// own. Linear: the second scan covers part of the first's.
fn bare_function_block(
    text: &str,
    open: usize,
) -> std::result::Result<FunctionBlock, (usize, &'static str)> {
    let from = open + FUNCTION_OPEN.len();
    let tags = [FUNCTION_CLOSE, FUNCTION_OPEN, CALL_OPEN];
    let (inner_end, next) = match find_first_tag(text, from, text.len(), &tags) {
        Some((p, 0)) => {
            return Ok(FunctionBlock {
                open,
                inner_end: p,
                closed: true,
                next: p + FUNCTION_CLOSE.len(),
            })
        }
        Some((p, 1)) => (p, p),
        Some((p, _)) => return Err((p, CALL_OPEN)),
        None => (text.len(), text.len()),
    };
    if let Some((p, _)) = find_first_tag(text, from, inner_end, &[THINK_OPEN]) {
        return Err((p, THINK_OPEN));
    }
    Ok(FunctionBlock {
        open,
        inner_end,
        closed: false,
        next,
    })
}

fn push_xml_call(
    text: &str,
    block: &FunctionBlock,
    options: Options<'_>,
    out: &mut SpannedMessage,
) {
    match parse_function_block(text, block, options) {
        Ok((name, arguments)) => out.tool_calls.push(SpannedCall {
            name,
            arguments,
            offset: block.open,
        }),
        Err(reason) => out.errors.push(CallError {
            offset: block.open,
            reason,
        }),
    }
}

/// Typed parameters gathered as arguments: a map, or (for the span form)
/// the JSON text of that map, values that were read as JSON written as they
/// were. A repeated parameter keeps its last value, in either form.
enum XmlArguments {
    Values(Map<String, Value>),
    Json(String),
}

impl XmlArguments {
    fn new(json_text: bool) -> Self {
        if json_text {
            XmlArguments::Json(String::from("{"))
        } else {
            XmlArguments::Values(Map::new())
        }
    }

    fn push(&mut self, key: &str, typed: XmlTyped<'_>) {
        match self {
            XmlArguments::Values(map) => {
                map.insert(key.to_string(), typed.into_value());
            }
            XmlArguments::Json(json) => {
                if json.len() > 1 {
                    json.push(',');
                }
                push_json_string(json, key);
                json.push(':');
                typed.write_json(json);
            }
        }
    }

    fn finish(self) -> Arguments {
        match self {
            XmlArguments::Values(map) => Arguments::Built(map),
            XmlArguments::Json(mut json) => {
                json.push('}');
                Arguments::Encoded(json)
            }
        }
    }
}

fn parse_function_block(
    text: &str,
    block: &FunctionBlock,
    options: Options<'_>,
) -> std::result::Result<(String, Arguments), String> {
    let bytes = text.as_bytes();
    let name_start = block.open + FUNCTION_OPEN.len();
    let end = block.inner_end;
    let gt = memchr(b'>', &bytes[name_start..end])
        .ok_or_else(|| "unterminated <function= tag".to_string())?;
    let name = trim_ascii_ws(&text[name_start..name_start + gt]);
    if name.is_empty() {
        return Err("empty function name".to_string());
    }
    let mut arguments = XmlArguments::new(options.json_spans);
    let mut at = name_start + gt + 1;
    while let Some((p, _)) = find_first_tag(text, at, end, &[PARAMETER_OPEN]) {
        let key_start = p + PARAMETER_OPEN.len();
        let gt = memchr(b'>', &bytes[key_start..end])
            .ok_or_else(|| "unterminated <parameter= tag".to_string())?;
        let key = trim_ascii_ws(&text[key_start..key_start + gt]);
        if key.is_empty() {
            return Err("empty parameter name".to_string());
        }
        let value_start = key_start + gt + 1;
        let (value_end, next) =
            match find_first_tag(text, value_start, end, &[PARAMETER_CLOSE, PARAMETER_OPEN]) {
                Some((q, 0)) => (q, q + PARAMETER_CLOSE.len()),
                Some((q, _)) => (q, q),
                None if block.closed => (end, end),
                None => return Err(format!("parameter {key:?} cut off")),
            };
        let mut value = &text[value_start..value_end];
        value = value.strip_prefix('\n').unwrap_or(value);
        value = value.strip_suffix('\n').unwrap_or(value);
        let types = options.schemas.and_then(|s| s.param_types(name, key));
        arguments.push(key, type_xml(value, types));
        at = next;
    }
    Ok((name.to_string(), arguments.finish()))
}

/// Types one Qwen3-Coder parameter value. `t` below is the value trimmed.
///
/// With schema types: `t == "null"` gives null when the types list `null` or
/// lack `string`; else each type is tried in order (`integer`: a JSON integer;
/// `number`: a JSON number; `boolean`: `true`/`True`/`false`/`False`;
/// `object`/`array`: JSON of that kind; `null`: `null`; `string` and unknown
/// names: the value as is; [`ParamType::Any`]: a JSON object or array),
/// and a value no type accepts stays a string.
/// Without a schema for this parameter: `t` read as JSON when that gives a
/// number, boolean, null, object or array; otherwise the value as a string.
/// JSON nested more than 126 levels deep is not read (see
/// [`XML_VALUE_MAX_DEPTH`]): such a value stays a string.
pub fn type_xml_value(value: &str, types: Option<&[ParamType]>) -> Value {
    type_xml(value, types).into_value()
}

/// A Qwen3-Coder value as typed: a JSON literal (kept as written too, so a
/// caller can read its numbers exactly), a string, a boolean or null.
enum XmlTyped<'a> {
    Json(&'a str, Value),
    Text(&'a str),
    Bool(bool),
    Null,
}

impl XmlTyped<'_> {
    fn into_value(self) -> Value {
        match self {
            XmlTyped::Json(_, v) => v,
            XmlTyped::Text(s) => Value::String(s.to_string()),
            XmlTyped::Bool(b) => Value::Bool(b),
            XmlTyped::Null => Value::Null,
        }
    }

    /// The value as JSON text.
    fn write_json(&self, out: &mut String) {
        match self {
            XmlTyped::Json(text, _) => out.push_str(text),
            XmlTyped::Text(s) => push_json_string(out, s),
            XmlTyped::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            XmlTyped::Null => out.push_str("null"),
        }
    }
}

fn push_json_string(out: &mut String, s: &str) {
    // Writing a str as JSON cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "null".to_string()));
}

/// Whether `t`, already read as a JSON number, is written as an integer
/// (serde_json reads one beyond 64 bits as a float).
fn is_integer_literal(t: &str) -> bool {
    !t.contains(['.', 'e', 'E'])
}

fn type_xml<'a>(value: &'a str, types: Option<&[ParamType]>) -> XmlTyped<'a> {
    let t = trim_ascii_ws(value);
    let literal = |keep: &dyn Fn(&Value) -> bool| {
        parse_json_literal(t)
            .filter(|v| keep(v))
            .map(|v| XmlTyped::Json(t, v))
    };
    let Some(types) = types else {
        return literal(&|v| !v.is_string()).unwrap_or(XmlTyped::Text(value));
    };
    if t == "null" && (types.contains(&ParamType::Null) || !types.contains(&ParamType::String)) {
        return XmlTyped::Null;
    }
    for ty in types {
        let typed = match ty {
            ParamType::String => return XmlTyped::Text(value),
            ParamType::Integer => {
                literal(&|v| v.is_i64() || v.is_u64() || (v.is_f64() && is_integer_literal(t)))
            }
            ParamType::Number => literal(&Value::is_number),
            ParamType::Boolean => match t {
                "true" | "True" => Some(XmlTyped::Bool(true)),
                "false" | "False" => Some(XmlTyped::Bool(false)),
                _ => None,
            },
            ParamType::Object => literal(&Value::is_object),
            ParamType::Array => literal(&Value::is_array),
            ParamType::Null => (t == "null").then_some(XmlTyped::Null),
            ParamType::Any => literal(&|v| v.is_object() || v.is_array()),
        };
        if let Some(v) = typed {
            return v;
        }
    }
    XmlTyped::Text(value)
}

/// The deepest nesting of arrays and objects a value read as JSON may have.
/// serde_json reads at most 127 levels (its recursion limit), and the value
/// is written into its call's arguments object, one level deeper, which must
/// read back (the span form and the Python bindings decode that text), so
/// 126. A deeper value stays a string.
const XML_VALUE_MAX_DEPTH: usize = 126;

fn parse_json_literal(t: &str) -> Option<Value> {
    // Cheap first-byte check keeps prose values off the JSON parser.
    let first = *t.as_bytes().first()?;
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'{' | b'[' | b't' | b'f' | b'n' | b'"'))
    {
        return None;
    }
    let value = crate::json::value_from_str(t).ok()?;
    // Each level takes two bytes: short values need no walk.
    let shallow = t.len() < 2 * (XML_VALUE_MAX_DEPTH + 1);
    (shallow || nesting(&value) <= XML_VALUE_MAX_DEPTH).then_some(value)
}

/// Levels of arrays and objects in `value` (0 for a scalar). Recursive: only
/// called on values serde_json read, at most 127 levels deep.
fn nesting(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(nesting).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(text: &str) -> ParsedMessage {
        parse_tool_calls(text, Format::Auto, None)
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    const BODY_PARTS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        " ",
        "\"name\"",
        "\"arguments\"",
        "\"parameters\"",
        "\"x\"",
        "\"f\"",
        "\"\"",
        "\"{\\\"a\\\": 1}\"",
        "\"  \"",
        "\"\\ud800\"",
        "\"\\ud83d\\ude00\"",
        "\"\\u00e9\"",
        "null",
        "true",
        "1",
        "-2.5e3",
        "1e400",
        "18446744073709551616",
        "\"é\"",
        "tail",
    ];

    fn body_from_parts() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(BODY_PARTS), 0..24)
            .prop_map(|v| v.concat())
    }

    fn call_body() -> impl Strategy<Value = String> {
        // Mostly well-formed calls (the fast path's case), each with random
        // extra members and values; also free-form bodies.
        let value = proptest::sample::select(BODY_PARTS);
        prop_oneof![
            (value.clone(), value.clone(), value, any::<bool>()).prop_map(
                |(n, a, extra, alias)| {
                    let key = if alias { "parameters" } else { "arguments" };
                    format!("{{\"name\": {n}, \"{key}\": {{\"k\": {a}}}, \"extra\": {extra}}}")
                }
            ),
            body_from_parts().prop_map(|b| format!("{{\"name\": \"f\", \"arguments\": {b}}}")),
            body_from_parts(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Where the fast path answers, it answers what decoding the whole
        /// body into a `Value` gives, and its spans decode.
        #[test]
        fn json_call_fast_path_equals_decoding(body in call_body()) {
            let slow = decode_json_call(&body);
            if let Some((name, arguments)) = checked_json_call(&body, &body) {
                let map = arguments.to_map(&body);
                prop_assert!(map.is_ok(), "{:?}", body);
                prop_assert_eq!(Ok((name, map.unwrap())), slow.clone(), "{:?}", body);
            }
            let (name, arguments) = match parse_json_call(&body, &body, true) {
                Ok((name, arguments)) => (name, arguments.to_map(&body)),
                Err(e) => return {
                    prop_assert_eq!(Err(e), slow, "{:?}", body);
                    Ok(())
                },
            };
            prop_assert_eq!(Ok((name, arguments.unwrap())), slow, "{:?}", body);
        }
    }

    fn text_and_pieces() -> impl Strategy<Value = (String, Vec<Range<usize>>)> {
        let chunk = proptest::sample::select(&["", " ", "\n", "\t ", "a", "b c", "é", " d\n"][..]);
        proptest::collection::vec(chunk, 0..12).prop_flat_map(|chunks| {
            let text = chunks.concat();
            let mut bounds = vec![0];
            for c in &chunks {
                bounds.push(bounds.last().copied().unwrap_or(0) + c.len());
            }
            let n = bounds.len();
            (
                Just(text),
                proptest::collection::vec((0..n, 0..n), 0..6).prop_map(move |pairs| {
                    // Disjoint, ordered, on character boundaries: as the
                    // parser's pieces are.
                    let mut cuts: Vec<usize> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
                    cuts.sort_unstable();
                    cuts.chunks_exact(2)
                        .map(|c| bounds[c[0]]..bounds[c[1]])
                        .collect::<Vec<_>>()
                }),
            )
        })
    }

    proptest! {
        /// Gathering pieces equals joining them and trimming, as the
        /// parser did before content and reasoning became spans.
        #[test]
        fn gather_equals_join_then_trim((text, pieces) in text_and_pieces(), newline in any::<bool>()) {
            let separator = if newline { "\n" } else { "" };
            let mut joined = String::new();
            for r in &pieces {
                if !joined.is_empty() {
                    joined.push_str(separator);
                }
                joined.push_str(&text[r.clone()]);
            }
            let got = gather(&text, &pieces, separator);
            prop_assert_eq!(got.get(&text), Some(trim_ascii_ws(&joined)));
            let nonblank = pieces.iter().filter(|r| !trim_ascii_ws(&text[(*r).clone()]).is_empty());
            prop_assert_eq!(matches!(got, Text::Span(_)), nonblank.count() <= 1);
        }
    }

    /// The shapes that skipping accepts and decoding may not, at their
    /// limits: nesting around serde_json's 128 levels (inside the arguments
    /// and in an ignored member), long digit runs, exponents of both cases.
    #[test]
    fn fast_path_equals_decoding_at_the_limits_of_skipping() {
        let mut bodies = Vec::new();
        for levels in 120..=132 {
            let arrays = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
            let objects = format!("{}1{}", "{\"k\":".repeat(levels), "}".repeat(levels));
            for deep in [arrays, objects] {
                bodies.push(format!(
                    "{{\"name\": \"f\", \"arguments\": {{\"a\": {deep}}}}}"
                ));
                bodies.push(format!(
                    "{{\"name\": \"f\", \"arguments\": {{}}, \"x\": {deep}}}"
                ));
                bodies.push(format!("{{\"name\": \"f\", \"arguments\": {deep}}}"));
            }
        }
        // Nesting alone: the fast path answers exactly where decoding
        // succeeds (a stricter limit would also pass the check below, but
        // would hand good calls to the full decoder).
        for body in &bodies {
            assert_eq!(
                checked_json_call(body, body).is_some(),
                decode_json_call(body).is_ok(),
                "{body}"
            );
        }
        for digits in [299, 300, 301, 308, 309, 310, 400] {
            let run = "9".repeat(digits);
            for value in [
                run.clone(),
                format!("-{run}"),
                format!("{run}.5"),
                format!("\"{run}\""),
            ] {
                bodies.push(format!(
                    "{{\"name\": \"f\", \"arguments\": {{\"n\": {value}}}}}"
                ));
            }
        }
        for number in ["1e400", "1E400", "1e308", "-1E-400", "2.5e+3", "\"1e400\""] {
            bodies.push(format!(
                "{{\"name\": \"f\", \"arguments\": {{\"n\": {number}}}, \"e\": {number}}}"
            ));
        }
        let mut fast = 0;
        for body in &bodies {
            let slow = decode_json_call(body);
            let got = parse_json_call(body, body, true)
                .map(|(name, arguments)| (name, arguments.to_map(body).expect("span decodes")));
            assert_eq!(got, slow, "{body}");
            fast += usize::from(checked_json_call(body, body).is_some());
        }
        // The usual shapes among them still take the fast path.
        assert!(fast > bodies.len() / 3, "{fast} of {}", bodies.len());
        // Many brackets but little depth: checked, and still a span (the
        // full decoder would turn integers beyond 64 bits into floats).
        let wide = format!(
            "{{\"name\": \"f\", \"arguments\": {{\"items\": [{}], \"big\": 123456789012345678901234567890}}}}",
            vec!["{\"a\": [1]}"; 200].join(", ")
        );
        assert!(matches!(
            checked_json_call(&wide, &wide),
            Some((_, Arguments::Json(_)))
        ));
    }

    /// serde_json's `Value` decoder would read an object whose first key is
    /// this one as the JSON inside its string; every path here keeps it a key.
    #[test]
    fn the_raw_value_key_is_an_ordinary_key_on_every_path() {
        let t = "$serde_json::private::RawValue";
        let bodies = [
            format!(r#"{{"name":"f","arguments":{{"{t}":1}}}}"#),
            format!(r#"{{"name":"f","arguments":{{}},"x":{{"{t}":"[1,"}}}}"#),
            format!(r#"{{"name":"f","arguments":"{{\"{t}\": \"{{}}\"}}"}}"#),
            format!(r#"{{"{t}":"{{\"name\":\"f\",\"arguments\":{{}}}}"}}"#),
        ];
        for (i, body) in bodies.iter().enumerate() {
            let text = format!("<tool_call>{body}</tool_call>");
            let values = parse(&text);
            let spans = parse_tool_call_spans(&text, Format::Auto, None).into_message(&text);
            assert_eq!(values, spans, "{text}");
            if i == 3 {
                assert!(
                    values.tool_calls.is_empty() && values.errors.len() == 1,
                    "{values:?}"
                );
            } else {
                assert_eq!(values.tool_calls.len(), 1, "{values:?}");
            }
        }
        let xml = format!("<function=f><parameter=m>{{\"{t}\": \"[1]\"}}</parameter></function>");
        let m = parse(&xml);
        assert_eq!(m.tool_calls[0].arguments["m"], json!({t: "[1]"}));
    }

    #[test]
    fn usual_calls_take_the_fast_path_and_keep_a_span() {
        let text = "x <tool_call>{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": null}]}}</tool_call>";
        let m = parse_tool_call_spans(text, Format::Auto, None);
        let Arguments::Json(span) = &m.tool_calls[0].arguments else {
            panic!("expected a span: {m:?}");
        };
        assert_eq!(&text[span.clone()], "{\"a\": [1, {\"b\": null}]}");
        assert_eq!(m.clone().into_message(text), parse(text));
        let copied: Vec<_> = m
            .tool_calls
            .iter()
            .map(|c| c.arguments.to_map(text))
            .collect();
        let moved: Vec<_> = m
            .tool_calls
            .into_iter()
            .map(|c| c.arguments.into_map(text))
            .collect();
        assert_eq!(copied, moved);
    }

    #[test]
    fn hermes_calls_with_prose_and_reasoning() {
        let text = "<think>plan <tool_call>{\"name\":\"no\"}</tool_call></think>Sure.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\nthen <tool_call>{\"name\": \"b\", \"arguments\": \"{\\\"y\\\": [1, 2.5]}\"}</tool_call> done";
        let m = parse(text);
        assert_eq!(
            m.reasoning.as_deref(),
            Some("plan <tool_call>{\"name\":\"no\"}</tool_call>")
        );
        assert_eq!(m.content, "Sure.\n\nthen  done");
        assert_eq!(m.tool_calls.len(), 2);
        assert_eq!(m.tool_calls[0].name, "a");
        assert_eq!(m.tool_calls[0].arguments, args(json!({"x": 1})));
        assert_eq!(m.tool_calls[1].arguments, args(json!({"y": [1, 2.5]})));
        assert!(m.errors.is_empty());
    }

    #[test]
    fn one_bad_call_keeps_the_others() {
        let text = "a<tool_call>{\"name\": \"x\"}</tool_call><tool_call>{\"name\": 3}</tool_call><tool_call>{\"name\":\"y\",\"arguments\":{\"k\":";
        let m = parse(text);
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.errors.len(), 2);
        assert_eq!(
            m.errors[0].offset,
            text.find("<tool_call>{\"name\": 3").unwrap()
        );
        assert!(m.errors[0].reason.contains("not a string"));
        assert!(m.errors[1].reason.contains("invalid JSON"));
        assert_eq!(m.content, "a");
    }

    #[test]
    fn cut_off_complete_json_and_fences() {
        let m = parse("x <tool_call>```json\n{\"name\": \"f\", \"parameters\": {\"a\": \"b\"}, \"id\": 7}\n```");
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.tool_calls[0].arguments, args(json!({"a": "b"})));
        let m = parse("<tool_call>{\"name\": \"f\"}");
        assert_eq!(m.tool_calls[0].arguments, Map::new());
    }

    #[test]
    fn schema_types_come_from_type_unions_and_enums() {
        use ParamType::*;
        let t = |v: Value| types_of_spec(&v);
        assert_eq!(t(json!({"type": "integer"})), vec![Integer]);
        assert_eq!(t(json!({"type": ["integer", "null"]})), vec![Integer, Null]);
        // pydantic's Optional[str]; a $ref branch allows any value there.
        assert_eq!(
            t(json!({"anyOf": [{"type": "string"}, {"type": "null"}, {"$ref": "#/x"}]})),
            vec![String, Null, Any]
        );
        // pydantic's Optional[Model]: not null only.
        assert_eq!(
            t(json!({"anyOf": [{"$ref": "#/$defs/M"}, {"type": "null"}]})),
            vec![Any, Null]
        );
        // Branches are read like specs: enums, nested unions, no type.
        assert_eq!(
            t(json!({"oneOf": [{"enum": ["a"]}, {"anyOf": [{"type": "integer"}, {}]}]})),
            vec![String, Integer, Any]
        );
        let mut deep = json!({"type": "integer"});
        for _ in 0..40 {
            deep = json!({"anyOf": [deep]});
        }
        assert_eq!(t(deep), vec![Any]);
        assert_eq!(
            t(json!({"oneOf": [{"type": ["number", "string"]}]})),
            vec![Number, String]
        );
        assert_eq!(t(json!({"enum": ["1", "2"]})), vec![String]);
        assert_eq!(
            t(json!({"enum": [1, 2.5, null, true]})),
            vec![Integer, Number, Null, Boolean]
        );
        assert_eq!(t(json!({"const": "x"})), vec![String]);
        assert_eq!(t(json!({"description": "free"})), Vec::<ParamType>::new());
        // "type" wins over the rest, as before.
        assert_eq!(t(json!({"type": "string", "enum": [1]})), vec![String]);
    }

    #[test]
    fn qwen3_coder_xml_typed_by_schema() {
        let mut s = ToolSchemas::new();
        s.add_openai_tool(&json!({"type": "function", "function": {"name": "book", "parameters": {"properties": {
            "n": {"type": "integer"}, "zip": {"type": "string"}, "ok": {"type": "boolean"}, "l": {"type": "array"}}}}}))
            .unwrap();
        let text = "<tool_call>\n<function=book>\n<parameter=n>\n3\n</parameter>\n<parameter=zip>\n01234\n</parameter>\n<parameter=ok>\ntrue\n</parameter>\n<parameter=l>\n[1, \"a\"]\n</parameter>\n<parameter=free>\n12\n</parameter>\n</function>\n</tool_call>";
        let m = parse_tool_calls(text, Format::Auto, Some(&s));
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(
            m.tool_calls[0].arguments,
            args(json!({"n": 3, "zip": "01234", "ok": true, "l": [1, "a"], "free": 12}))
        );
        let bare = parse_tool_calls(
            "hi <function=f><parameter=a>x</function> bye",
            Format::Qwen3Coder,
            None,
        );
        assert_eq!(bare.tool_calls[0].arguments, args(json!({"a": "x"})));
        assert_eq!(bare.content, "hi  bye");
        let cut = parse("<tool_call><function=f><parameter=a>1</parameter><parameter=b>par");
        assert_eq!(cut.errors.len(), 1);
        assert_eq!(cut.errors[0].offset, 0);
    }

    #[test]
    fn bare_unclosed_function_block_stops_at_a_later_call_or_reasoning() {
        let names = |m: &ParsedMessage| {
            m.tool_calls
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        let offsets = |m: &ParsedMessage| m.errors.iter().map(|e| e.offset).collect::<Vec<_>>();
        let json_call =
            "<tool_call>{\"name\": \"get\", \"arguments\": {\"id\": \"x\"}}</tool_call>";
        // Prose naming the tag: an error, not a call named "NAME" that
        // swallows the real call after it.
        let text = format!("Models write <function=NAME> tags; I use JSON.\n{json_call} ok");
        let m = parse(&text);
        assert_eq!(offsets(&m), vec![text.find("<function=").unwrap()]);
        assert!(m.errors[0].reason.contains("not closed before <tool_call>"));
        assert_eq!(names(&m), vec!["get"]);
        assert_eq!(m.tool_calls[0].arguments, args(json!({"id": "x"})));
        assert_eq!(m.content, "Models write  ok");
        // (Qwen3-Coder reads the JSON call as a malformed XML one.)
        let m = parse_tool_calls(&text, Format::Qwen3Coder, None);
        assert_eq!(offsets(&m), vec![13, text.find("<tool_call>").unwrap()]);
        // A forgotten `</function>` before a JSON call, or before reasoning.
        let text = format!("<function=cancel>\n<parameter=id>\nZFA04Y\n</parameter>\n{json_call}");
        let m = parse(&text);
        assert_eq!((names(&m), offsets(&m)), (vec!["get".to_string()], vec![0]));
        let m = parse("a <function=f><parameter=x>1</parameter> <think>why</think> b");
        assert_eq!(offsets(&m), vec![2]);
        assert!(m.errors[0].reason.contains("not closed before <think>"));
        assert_eq!(m.reasoning.as_deref(), Some("why"));
        assert_eq!(m.content, "a  b");
        // A block cut off at the end of the text is read as before: a call
        // when its parameters are whole, else an error.
        let m = parse("<function=f><parameter=x>1</parameter>");
        assert_eq!(
            (names(&m), m.tool_calls[0].arguments.clone()),
            (vec!["f".to_string()], args(json!({"x": 1})))
        );
        assert_eq!(offsets(&parse("<function=f><parameter=x>1")), vec![0]);
        // So is a forgotten `</function>` before the next `<function=`, and
        // a closed block keeps the tags in its values.
        let m = parse("<function=f><parameter=x>1</parameter><function=g></function>");
        assert_eq!(
            (names(&m), offsets(&m)),
            (vec!["f".to_string(), "g".to_string()], vec![])
        );
        let m = parse("<function=f><parameter=x><think></parameter></function> b");
        assert_eq!(m.tool_calls[0].arguments, args(json!({"x": "<think>"})));
        assert_eq!(
            (m.errors.len(), m.content.as_str(), m.reasoning.clone()),
            (0, "b", None)
        );
        // No call runs over a `<tool_call>`, even one a later `</function>`
        // would close.
        let text = format!("<function=f>{json_call}</function>");
        let m = parse(&text);
        assert_eq!((names(&m), offsets(&m)), (vec!["get".to_string()], vec![0]));
        assert_eq!(m.content, "</function>");
    }

    #[test]
    fn reasoning_begun_in_prompt() {
        let m = parse("thinking <tool_call>{\"name\":\"n\"}</tool_call></think>answer");
        assert_eq!(
            m.reasoning.as_deref(),
            Some("thinking <tool_call>{\"name\":\"n\"}</tool_call>")
        );
        assert_eq!(m.content, "answer");
        assert!(m.tool_calls.is_empty());
    }

    /// (reasoning, content, call names, error offsets) of `text`, `fmt`.
    fn parts(text: &str, fmt: Format) -> (Option<String>, String, Vec<String>, Vec<usize>) {
        let m = parse_tool_calls(text, fmt, None);
        let spans = parse_tool_call_spans(text, fmt, None).into_message(text);
        assert_eq!(m, spans, "{text}");
        let names = m.tool_calls.iter().map(|c| c.name.clone()).collect();
        let offsets = m.errors.iter().map(|e| e.offset).collect();
        (m.reasoning, m.content, names, offsets)
    }

    #[test]
    fn a_call_tag_named_in_reasoning_hides_no_think_close() {
        let s = |x: &str| x.to_string();
        for fmt in [Format::Auto, Format::Hermes, Format::Qwen3Coder] {
            // Prose naming the tag, then a text answer: nothing is cut off.
            let text = "Just thanks; no <tool_call> needed</think>You're welcome!";
            assert_eq!(
                parts(text, fmt),
                (
                    Some(s("Just thanks; no <tool_call> needed")),
                    s("You're welcome!"),
                    vec![],
                    vec![]
                )
            );
            let text = "<think>no <tool_call>\n needed</think>Bye.";
            assert_eq!(parts(text, fmt).0, Some(s("no <tool_call>\n needed")));
        }
        // A cut-off call that starts as one still keeps its `</think>`.
        let cut = "<tool_call>\n{\"name\": \"note\", \"arguments\": {\"text\": \"a </think>";
        assert_eq!(parse_tool_calls(cut, Format::Auto, None).reasoning, None);
    }

    #[test]
    fn think_close_inside_a_call_does_not_end_reasoning() {
        let s = |x: &str| x.to_string();
        let call = "<tool_call>{\"name\": \"note\", \"arguments\": {\"text\": \"a </think> b\"}}</tool_call>";
        for fmt in [Format::Auto, Format::Hermes] {
            // No reasoning at all: the call is read, `</think>` and all.
            let m = parse_tool_calls(call, fmt, None);
            assert_eq!(m.reasoning, None);
            assert_eq!((m.content.as_str(), m.errors.len()), ("", 0));
            assert_eq!(
                m.tool_calls[0].arguments,
                args(json!({"text": "a </think> b"}))
            );
            // Reasoning begun in the prompt ends at the `</think>` after it.
            let text = format!("plan <tool_call>x</think>y</tool_call> more</think>ok {call}");
            assert_eq!(
                parts(&text, fmt),
                (
                    Some(s("plan <tool_call>x</think>y</tool_call> more")),
                    s("ok"),
                    vec![s("note")],
                    vec![]
                )
            );
            // Or, in an explicit block, at the `</think>` outside its calls.
            let text = format!("<think>plan {call} more</think>ok");
            assert_eq!(
                parts(&text, fmt),
                (Some(format!("plan {call} more")), s("ok"), vec![], vec![])
            );
            // A call cut off at the end of generation: its `</think>` is
            // text too, and the call is an error at its own offset.
            let cut = &call[..call.find(" b").unwrap() + 2];
            let text = format!("Sure. {cut}");
            assert_eq!(parts(&text, fmt), (None, s("Sure."), vec![], vec![6]));
            let text = format!("<think>plan {cut}");
            assert_eq!(parts(&text, fmt).0, Some(format!("plan {cut}")));
            // A `<tool_call>` that the next one ends (a forgotten closer, or
            // prose naming the tag) holds no call: its `</think>` counts.
            let text = format!("I will use <tool_call> now.</think>{call}");
            assert_eq!(
                parts(&text, fmt),
                (
                    Some(s("I will use <tool_call> now.")),
                    s(""),
                    vec![s("note")],
                    vec![]
                )
            );
            // A `<think>` inside a call is text as well.
            let text = "<tool_call>{\"name\": \"n\", \"arguments\": {\"t\": \"<think>\"}}</tool_call> r</think>c";
            let (reasoning, content, _, _) = parts(text, fmt);
            assert_eq!(
                (reasoning.unwrap().ends_with(" r"), content),
                (true, s("c"))
            );
        }
    }

    #[test]
    fn think_close_inside_an_xml_block_does_not_end_reasoning() {
        let s = |x: &str| x.to_string();
        let block = "<function=note><parameter=text>a </think> b</parameter></function>";
        for fmt in [Format::Auto, Format::Qwen3Coder] {
            for call in [
                block.to_string(),
                format!("<tool_call>\n{block}\n</tool_call>"),
            ] {
                let m = parse_tool_calls(&call, fmt, None);
                assert_eq!((m.reasoning, m.errors.len()), (None, 0), "{call}");
                assert_eq!(
                    m.tool_calls[0].arguments,
                    args(json!({"text": "a </think> b"}))
                );
                let text = format!("plan</think>{call}");
                assert_eq!(
                    parts(&text, fmt),
                    (Some(s("plan")), s(""), vec![s("note")], vec![])
                );
                let text = format!("<think>x {call}</think>y");
                assert_eq!(
                    parts(&text, fmt),
                    (Some(format!("x {call}")), s("y"), vec![], vec![])
                );
            }
            // Cut off inside a bare block: no reasoning ends there.
            let cut = "ok <function=note><parameter=text>a </think> b";
            assert_eq!(parts(cut, fmt), (None, s("ok"), vec![], vec![3]));
            // A bare block that the next `<function=` ends, or that meets a
            // `<tool_call>`, holds no call here.
            let text = format!("use <function=NAME> tags</think>{block}");
            assert_eq!(
                parts(&text, fmt),
                (
                    Some(s("use <function=NAME> tags")),
                    s(""),
                    vec![s("note")],
                    vec![]
                )
            );
        }
        // Hermes reads no bare blocks: their `</think>` ends reasoning.
        let (reasoning, content, names, _) = parts(block, Format::Hermes);
        assert_eq!(
            (reasoning.as_deref(), content.as_str(), names.len()),
            (
                Some("<function=note><parameter=text>a"),
                "b</parameter></function>",
                0
            )
        );
    }

    #[test]
    fn xml_value_typing_rules() {
        use ParamType::*;
        let ty = |v: &str, t: &[ParamType]| type_xml_value(v, Some(t));
        assert_eq!(ty(" 5 ", &[Integer]), json!(5));
        assert_eq!(ty("5.5", &[Integer]), json!("5.5"));
        assert_eq!(ty("5.5", &[Integer, Number]), json!(5.5));
        assert_eq!(ty("null", &[Integer]), Value::Null);
        assert_eq!(ty("null", &[String]), json!("null"));
        assert_eq!(ty("null", &[String, Null]), Value::Null);
        assert_eq!(ty("True", &[Boolean]), json!(true));
        assert_eq!(ty("yes", &[Boolean]), json!("yes"));
        assert_eq!(ty("[1]", &[Object]), json!("[1]"));
        assert_eq!(ty("{\"a\": 1}", &[Object]), json!({"a": 1}));
        assert_eq!(ty(" 007 ", &[String]), json!(" 007 "));
        assert_eq!(type_xml_value("007", None), json!("007"));
        assert_eq!(type_xml_value("\"q\"", None), json!("\"q\""));
        assert_eq!(type_xml_value("-3", None), json!(-3));
        assert_eq!(type_xml_value("NaN", None), json!("NaN"));
        // Optional[Model]: an object, null, or a string when neither reads.
        let model = [Any, Null];
        assert_eq!(
            ty("{\"city\": \"Paris\"}", &model),
            json!({"city": "Paris"})
        );
        assert_eq!(ty("null", &model), Value::Null);
        assert_eq!(ty("Paris", &model), json!("Paris"));
        assert_eq!(ty("\"q\"", &model), json!("\"q\""));
        assert_eq!(ty("[1, 2]", &model), json!([1, 2]));
        // A $ref may be a string enum: scalars stay strings.
        assert_eq!(ty("5", &model), json!("5"));
        assert_eq!(ty("true", &model), json!("true"));
        // In its place: a string branch first still takes everything.
        assert_eq!(ty("[12]", &[String, Any]), json!("[12]"));
        assert_eq!(ty("[12]", &[Any, String]), json!([12]));
        assert_eq!(ty("12", &[Any, Integer]), json!(12));
    }

    #[test]
    fn xml_values_nested_too_deep_for_the_arguments_stay_strings() {
        let mut s = ToolSchemas::new();
        s.set_param("f", "a", vec![ParamType::Array]);
        for (depth, kept) in [(1, true), (126, true), (127, false), (128, false)] {
            let value = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let text = format!("<tool_call>{{\"name\": \"ok\"}}</tool_call><function=f><parameter=a>{value}</parameter></function>");
            for schemas in [None, Some(&s)] {
                let want = if kept {
                    crate::json::value_from_str(&value).unwrap()
                } else {
                    Value::String(value.clone())
                };
                let m = parse_tool_calls(&text, Format::Auto, schemas);
                assert_eq!(m.errors, vec![], "{depth}");
                assert_eq!(
                    m.tool_calls[1].arguments,
                    args(json!({"a": want})),
                    "{depth}"
                );
                // The span form writes the value into the arguments' JSON
                // text, one level deeper: that text must read back.
                let spans = parse_tool_call_spans(&text, Format::Auto, schemas);
                let Arguments::Encoded(json) = &spans.tool_calls[1].arguments else {
                    panic!("{depth}: {:?}", spans.tool_calls[1].arguments)
                };
                assert_eq!(
                    crate::json::map_from_str(json).ok(),
                    Some(m.tool_calls[1].arguments.clone()),
                    "{depth}"
                );
                assert_eq!(spans.into_message(&text), m, "{depth}");
            }
        }
        // An object counts as a level, like an array.
        let nested = |n: usize| format!("{{\"a\": {}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(type_xml_value(&nested(125), None).is_object());
        assert!(type_xml_value(&nested(126), None).is_string());
    }

    #[test]
    fn unknown_format_is_an_error() {
        assert!(Format::from_name("xml").is_err());
    }
}
