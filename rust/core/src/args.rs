//! Deep comparison of tool-call arguments and gold-action matching.
//!
//! Arguments are JSON values ([`serde_json::Value`]). Before two of them are
//! compared, both are brought to a canonical form by the same rules:
//!
//! * **Key order** of objects does not matter (keys are sorted; keys
//!   themselves are compared exactly: never trimmed or case-folded).
//! * **Empty is absent**: `null`, `""` (also a string of only white space),
//!   `[]` and `{}` are all "nothing", and an object key whose value is
//!   nothing counts as missing. Emptiness propagates upwards: `{"a": {"b":
//!   null}}` is nothing too. Inside a list an empty element keeps its slot
//!   (positions matter), so `[null]` is a one-element list, not nothing.
//! * **Strings** are trimmed of Unicode `White_Space` at both ends, and
//!   lower-cased when [`Policy::case_fold`] is set.
//! * **Numbers**: `5`, `5.0`, `"5"` and `" 5 "` are equal. Every number is
//!   compared as an exact decimal, so nothing is rounded: a float counts as
//!   the shortest decimal that reads back as the same float (`0.1` is
//!   `0.1`), and integers of any size keep every digit (the Python bindings
//!   turn integers beyond 64 bits into their decimal string, which by the
//!   next rule is the same number). A string is a number only when, after
//!   trimming, it is a plain decimal: `-?(0|[1-9][0-9]*)(\.[0-9]+)?`. So
//!   `"05"` (a leading zero: codes, zip codes), `"1e3"` (exponents),
//!   `"5."`, `".5"` and `"+5"` stay strings. `-0` equals `0`. Booleans are
//!   not numbers (`true` differs from `1` and from `"true"`).
//! * **Lists** keep their order, except lists named in
//!   [`Policy::unordered_keys`], which compare as multisets.
//! * **Depth**: values nested deeper than [`MAX_DEPTH`] are refused with an
//!   error naming the path (no stack overflow on hostile input).
//!
//! [`compare`] then reports [`MatchKind::Exact`], [`MatchKind::Soft`] or
//! [`MatchKind::Mismatch`] with the paths that differ, and [`label_tiers`]
//! labels every assistant turn of a trajectory with a reward tier.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

use crate::{Error, Result};

/// Deepest nesting accepted (objects and lists together). Tool arguments in
/// practice stay below 10 levels.
pub const MAX_DEPTH: usize = 256;

/// How two argument values are compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Lower-case string values (not keys) before comparing.
    pub case_fold: bool,
    /// Lists that compare as multisets (order ignored). An entry without `.`
    /// or `[` is a key name and matches a list stored under that key at any
    /// depth (`"payment_methods"`). Any other entry is a path in the syntax of
    /// [`Comparison::diffs`] with every list index written `[*]`
    /// (`"reservation.flights"`, `"legs[*].seats"`); `"$"` is the root value.
    pub unordered_keys: Vec<String>,
    /// A comparison with no structural difference is *soft* when the number
    /// of differing leaves is strictly less than `soft_max_fraction` times
    /// the number of leaves of the gold value. The default 0.5 means
    /// "strictly fewer than half of the gold leaves differ"; 0 turns soft
    /// matches off. Must lie in [0, 1]. The product is exact, with the
    /// fraction read as the decimal it prints as (0.28 × 25 is 7).
    pub soft_max_fraction: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            case_fold: false,
            unordered_keys: Vec::new(),
            soft_max_fraction: 0.5,
        }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.soft_max_fraction) {
            return Err(Error::invalid(format!(
                "soft_max_fraction must lie in [0, 1], got {}",
                self.soft_max_fraction
            )));
        }
        // A path entry that is not written as the comparison writes paths
        // would never match, and its lists would silently stay ordered.
        for entry in self
            .unordered_keys
            .iter()
            .filter(|e| Self::is_path_entry(e))
        {
            match canonical_path_entry(entry) {
                Some(canonical) if canonical == *entry => {}
                Some(canonical) => {
                    return Err(Error::invalid(format!(
                        "unordered_keys entry {entry:?} can never match: paths are written as \
                         diffs show them, every list index as [*]; did you mean {canonical:?}?"
                    )))
                }
                None => {
                    return Err(Error::invalid(format!(
                        "unordered_keys entry {entry:?} is not a path: give a key name, or a \
                         path such as \"reservation.flights\" or \"legs[*].seats\" (\"$\" is \
                         the root)"
                    )))
                }
            }
        }
        Ok(())
    }

    fn is_path_entry(entry: &str) -> bool {
        entry == "$" || entry.contains('.') || entry.contains('[')
    }

    fn has_paths(&self) -> bool {
        self.unordered_keys.iter().any(|e| Self::is_path_entry(e))
    }

    fn names_key(&self, key: &str) -> bool {
        self.unordered_keys
            .iter()
            .any(|e| e == key && !Self::is_path_entry(e))
    }

    fn names_path(&self, path: &str) -> bool {
        self.unordered_keys
            .iter()
            .any(|e| Self::is_path_entry(e) && e == path)
    }
}

// ---------------------------------------------------------------------------
// Exact decimals

/// 2^`e` for `e` in the normal range (`-1022..=1023`): the float's bits.
fn pow2(e: i64) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// An exact decimal `(-1)^neg * digits * 10^exp`. Canonical: `digits` holds
/// ASCII digits with no leading or trailing zero; zero has no digits, is not
/// negative and has exponent 0. Equal numbers are therefore equal structs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dec {
    neg: bool,
    exp: i64,
    digits: Digits,
}

/// The significant digits of a [`Dec`], inline up to 22 (every `i64`, `u64`
/// and float fits), on the heap beyond: numbers cost no allocation.
#[derive(Debug, Clone)]
enum Digits {
    Inline { len: u8, buf: [u8; 22] },
    Heap(Box<[u8]>),
}

impl Digits {
    fn new(digits: &[u8]) -> Self {
        if digits.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..digits.len()].copy_from_slice(digits);
            Digits::Inline {
                len: digits.len() as u8,
                buf,
            }
        } else {
            Digits::Heap(digits.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Digits::Inline { len, buf } => &buf[..*len as usize],
            Digits::Heap(b) => b,
        }
    }

    fn len(&self) -> usize {
        self.as_bytes().len()
    }

    fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

impl PartialEq for Digits {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Digits {}

impl Dec {
    /// From `neg`, the digits of the significand and a power of ten.
    fn build(neg: bool, raw_digits: &[u8], exp: i64) -> Dec {
        let start = raw_digits
            .iter()
            .position(|&d| d != b'0')
            .unwrap_or(raw_digits.len());
        let significant = &raw_digits[start..];
        let end = significant
            .iter()
            .rposition(|&d| d != b'0')
            .map_or(0, |i| i + 1);
        if end == 0 {
            return Dec {
                neg: false,
                exp: 0,
                digits: Digits::new(b""),
            };
        }
        Dec {
            neg,
            exp: exp + (significant.len() - end) as i64,
            digits: Digits::new(&significant[..end]),
        }
    }

    fn from_u64(neg: bool, mut n: u64) -> Dec {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Dec::build(neg, &buf[at..], 0)
    }

    /// The decimal Python's `repr` prints for `x` (finite): the shortest
    /// that reads back as `x`, of those the nearest to it, and of two
    /// equally near the one with an even last digit.
    fn from_f64(x: f64) -> Dec {
        // Integral floats below 2^53 are exact integers: skip the formatting.
        if x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0 {
            return Dec::from_u64(x < 0.0, x.abs() as u64);
        }
        // `{:e}` prints the shortest digits that read back as `x`, the
        // nearest of them, but the upper one of a tie: only an odd last
        // digit can be the wrong one.
        let mut text = StackText::default();
        let _ = write!(text, "{x:e}");
        let shortest = Dec::parse_scientific(text.as_str()).unwrap_or(Dec::build(false, b"", 0));
        if shortest
            .digits
            .as_bytes()
            .last()
            .is_some_and(|d| (d - b'0') % 2 == 1)
        {
            if let Some(even) = Dec::even_of_tie(x, &shortest) {
                return even;
            }
        }
        shortest
    }

    /// Where `x` lies exactly halfway between `shortest` (odd last digit)
    /// and a neighbour of the same length that also reads back as `x`, that
    /// neighbour, whose last digit is even. Ties happen at every length (8 +
    /// 2^-16 = 8.0000152587890625 reads back from ...062 and ...063).
    ///
    /// With `shortest` = D·10^q, a tie is x = c·10^q/2 for c = 2D ± 1: odd,
    /// below 2^58. As a float, x = m·2^e with m odd below 2^53, so c·5^q
    /// (q ≥ 0) or c/5^-q (q < 0) must be that odd m, and x must equal
    /// m·2^(q-1); all of it exact in integers and one float product.
    fn even_of_tie(x: f64, shortest: &Dec) -> Option<Dec> {
        let digits = shortest.digits.as_bytes();
        if digits.len() > 17 {
            return None;
        }
        let d = digits
            .iter()
            .fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'));
        let q = shortest.exp;
        let ax = x.abs();
        let halfway = |c: u64| -> bool {
            let m = if q >= 0 {
                u32::try_from(q)
                    .ok()
                    .and_then(|q| 5u64.checked_pow(q))
                    .and_then(|p| c.checked_mul(p))
            } else {
                u32::try_from(-q)
                    .ok()
                    .and_then(|p| 5u64.checked_pow(p))
                    .filter(|&p| c.is_multiple_of(p))
                    .map(|p| c / p)
            };
            // m < 2^53 and |q - 1| small: m·2^(q-1) is exact.
            m.is_some_and(|m| m < 1 << 53 && (m as f64) * pow2(q - 1) == ax)
        };
        let other = if halfway(2 * d - 1) {
            d - 1
        } else if halfway(2 * d + 1) {
            d + 1
        } else {
            return None;
        };
        Dec::even_neighbour(x, other, q)
    }

    /// `n`·10^`q` with the sign of `x`, if it reads back as `x`.
    #[cold]
    fn even_neighbour(x: f64, n: u64, q: i64) -> Option<Dec> {
        let text = format!("{n}e{q}");
        if text.parse::<f64>().ok()? != x.abs() {
            return None;
        }
        let dec = Dec::from_u64(false, n);
        Some(Dec::build(x < 0.0, dec.digits.as_bytes(), dec.exp + q))
    }

    /// `-?d(.d+)?e-?d+` as printed by `{:e}`.
    fn parse_scientific(s: &str) -> Option<Dec> {
        let (mantissa, exponent) = s.split_once('e')?;
        let exp: i64 = exponent.parse().ok()?;
        let (neg, mantissa) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa),
        };
        let (int_part, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let mut digits = [0u8; 24];
        let total = int_part.len() + frac.len();
        if total > digits.len() {
            return None;
        }
        digits[..int_part.len()].copy_from_slice(int_part.as_bytes());
        digits[int_part.len()..total].copy_from_slice(frac.as_bytes());
        Some(Dec::build(neg, &digits[..total], exp - frac.len() as i64))
    }

    /// A string that is a plain decimal: `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
    fn parse_plain(s: &str) -> Option<Dec> {
        let bytes = s.as_bytes();
        // Most strings are names and ids: reject them on the first byte.
        if !matches!(bytes.first(), Some(b'-' | b'0'..=b'9')) {
            return None;
        }
        let (neg, body) = match bytes.first() {
            Some(b'-') => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let dot = body.iter().position(|&b| b == b'.');
        let (int_part, frac) = match dot {
            Some(i) => (&body[..i], &body[i + 1..]),
            None => (body, &body[body.len()..]),
        };
        if int_part.is_empty() || !int_part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        if int_part.len() > 1 && int_part[0] == b'0' {
            return None;
        }
        if dot.is_some() && (frac.is_empty() || !frac.iter().all(u8::is_ascii_digit)) {
            return None;
        }
        let total = int_part.len() + frac.len();
        let exp = -(frac.len() as i64);
        if total <= 64 {
            let mut digits = [0u8; 64];
            digits[..int_part.len()].copy_from_slice(int_part);
            digits[int_part.len()..total].copy_from_slice(frac);
            return Some(Dec::build(neg, &digits[..total], exp));
        }
        let mut digits = Vec::with_capacity(total);
        digits.extend_from_slice(int_part);
        digits.extend_from_slice(frac);
        Some(Dec::build(neg, &digits, exp))
    }

    fn is_zero(&self) -> bool {
        self.digits.is_empty()
    }

    fn is_integral(&self) -> bool {
        self.exp >= 0
    }

    /// Plain decimal text without exponent (`-12.5`, `1000`, `0.001`).
    fn to_plain(&self) -> String {
        if self.is_zero() {
            return "0".to_string();
        }
        let mut out = String::new();
        if self.neg {
            out.push('-');
        }
        let digits = std::str::from_utf8(self.digits.as_bytes()).unwrap_or("0");
        if self.exp >= 0 {
            out.push_str(digits);
            out.extend(std::iter::repeat_n('0', self.exp as usize));
        } else {
            let frac_len = (-self.exp) as usize;
            if frac_len >= digits.len() {
                out.push_str("0.");
                out.extend(std::iter::repeat_n('0', frac_len - digits.len()));
                out.push_str(digits);
            } else {
                let split = digits.len() - frac_len;
                out.push_str(&digits[..split]);
                out.push('.');
                out.push_str(&digits[split..]);
            }
        }
        out
    }

    /// The JSON value a normalised number is written as: an integer when it
    /// fits 64 bits, a float when the float reads back as exactly this
    /// decimal, otherwise the plain decimal string (which compares equal).
    fn to_value(&self) -> Value {
        if self.is_zero() {
            return Value::from(0u64);
        }
        if self.is_integral() && self.digits.len() as i64 + self.exp <= 20 {
            let plain = self.to_plain();
            if let Ok(i) = plain.parse::<i64>() {
                return Value::from(i);
            }
            if let Ok(u) = plain.parse::<u64>() {
                return Value::from(u);
            }
            return Value::String(plain);
        }
        if self.is_integral() {
            return Value::String(self.to_plain());
        }
        let plain = self.to_plain();
        if self.digits.len() <= 17 {
            if let Ok(x) = plain.parse::<f64>() {
                if x.is_finite() && Dec::from_f64(x) == *self {
                    if let Some(n) = Number::from_f64(x) {
                        return Value::Number(n);
                    }
                }
            }
        }
        Value::String(plain)
    }

    fn magnitude_cmp(&self, other: &Dec) -> Ordering {
        let adj_self = self.digits.len() as i64 + self.exp;
        let adj_other = other.digits.len() as i64 + other.exp;
        adj_self
            .cmp(&adj_other)
            .then_with(|| self.digits.as_bytes().cmp(other.digits.as_bytes()))
    }
}

impl Ord for Dec {
    fn cmp(&self, other: &Self) -> Ordering {
        let sign = |d: &Dec| -> i8 {
            if d.is_zero() {
                0
            } else if d.neg {
                -1
            } else {
                1
            }
        };
        match sign(self).cmp(&sign(other)) {
            Ordering::Equal => match sign(self) {
                0 => Ordering::Equal,
                1 => self.magnitude_cmp(other),
                _ => other.magnitude_cmp(self),
            },
            unequal => unequal,
        }
    }
}

impl PartialOrd for Dec {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A fixed buffer for formatting one float without allocating.
#[derive(Default)]
struct StackText {
    buf: [u8; 32],
    len: usize,
}

impl StackText {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Canonical form

/// A normalised value. `Null` stands for every empty value; it only appears
/// at the root or in a list slot (objects drop empty keys).
#[derive(Debug, Clone)]
enum Canon<'a> {
    Null,
    Bool(bool),
    Num(Dec),
    Str(Cow<'a, str>),
    List(Vec<Canon<'a>>),
    /// An unordered list, sorted by [`canon_cmp`], each item with its index
    /// in the original list (stable: equal items keep their original order).
    Bag(Vec<(usize, Canon<'a>)>),
    /// Sorted by key, no empty values.
    Map(Vec<(&'a str, Canon<'a>)>),
}

impl Canon<'_> {
    fn rank(&self) -> u8 {
        match self {
            Canon::Null => 0,
            Canon::Bool(_) => 1,
            Canon::Num(_) => 2,
            Canon::Str(_) => 3,
            Canon::List(_) | Canon::Bag(_) => 4,
            Canon::Map(_) => 5,
        }
    }

    fn is_container(&self) -> bool {
        matches!(self, Canon::List(_) | Canon::Bag(_) | Canon::Map(_))
    }

    fn items(&self) -> Box<dyn Iterator<Item = &Canon<'_>> + '_> {
        match self {
            Canon::List(items) => Box::new(items.iter()),
            Canon::Bag(items) => Box::new(items.iter().map(|(_, c)| c)),
            _ => Box::new(std::iter::empty()),
        }
    }

    /// Scalars (including empty list slots) under this value.
    fn leaf_count(&self) -> usize {
        match self {
            Canon::Map(entries) => entries.iter().map(|(_, v)| v.leaf_count()).sum(),
            Canon::List(_) | Canon::Bag(_) => self.items().map(Canon::leaf_count).sum(),
            _ => 1,
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Canon::Null => Value::Null,
            Canon::Bool(b) => Value::Bool(*b),
            Canon::Num(d) => d.to_value(),
            Canon::Str(s) => Value::String(s.to_string()),
            Canon::List(_) | Canon::Bag(_) => {
                Value::Array(self.items().map(Canon::to_value).collect())
            }
            Canon::Map(entries) => {
                let mut map = Map::with_capacity(entries.len());
                for (k, v) in entries {
                    map.insert((*k).to_string(), v.to_value());
                }
                Value::Object(map)
            }
        }
    }
}

/// A total order on canonical values: by kind (null, bool, number, string,
/// list, object), then numerically / by code point / lexicographically.
/// Byte order of two keys, as `a.as_bytes().cmp(b.as_bytes())`. The keys
/// of one object usually differ in their first byte, which is compared
/// inline; a call to `memcmp` per comparison was a tenth of a comparison of
/// two records.
#[inline]
fn key_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    match a.first().cmp(&b.first()) {
        Ordering::Equal => a.cmp(b),
        unequal => unequal,
    }
}

fn canon_cmp(a: &Canon<'_>, b: &Canon<'_>) -> Ordering {
    match (a, b) {
        (Canon::Bool(x), Canon::Bool(y)) => x.cmp(y),
        (Canon::Num(x), Canon::Num(y)) => x.cmp(y),
        (Canon::Str(x), Canon::Str(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Canon::Map(x), Canon::Map(y)) => {
            for ((kx, vx), (ky, vy)) in x.iter().zip(y.iter()) {
                let ord = kx
                    .as_bytes()
                    .cmp(ky.as_bytes())
                    .then_with(|| canon_cmp(vx, vy));
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            x.len().cmp(&y.len())
        }
        _ if a.rank() == 4 && b.rank() == 4 => {
            let mut xs = a.items();
            let mut ys = b.items();
            loop {
                match (xs.next(), ys.next()) {
                    (Some(x), Some(y)) => {
                        let ord = canon_cmp(x, y);
                        if ord != Ordering::Equal {
                            return ord;
                        }
                    }
                    (Some(_), None) => return Ordering::Greater,
                    (None, Some(_)) => return Ordering::Less,
                    (None, None) => return Ordering::Equal,
                }
            }
        }
        _ => a.rank().cmp(&b.rank()),
    }
}

/// One step of a path: an object key or a list index.
#[derive(Debug, Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Appends one segment: `.key` (no dot at the start), `["odd key"]` for keys
/// that are not identifiers (JSON-escaped), `[3]` for an index (`[*]` when
/// `wildcard`).
fn push_segment(out: &mut String, seg: Seg<'_>, wildcard: bool) {
    match seg {
        Seg::Key(key) if is_identifier(key) => {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        Seg::Key(key) => {
            out.push('[');
            out.push_str(&serde_json::to_string(key).unwrap_or_default());
            out.push(']');
        }
        Seg::Index(_) if wildcard => out.push_str("[*]"),
        Seg::Index(i) => {
            let _ = write!(out, "[{i}]");
        }
    }
}

/// An `unordered_keys` path entry read leniently (a leading `$.`, concrete
/// indices, `["key"]` for identifiers) and written back as the comparison
/// writes wildcard paths; `None` when it is not a path at all.
fn canonical_path_entry(entry: &str) -> Option<String> {
    if entry == "$" {
        return Some(entry.to_string());
    }
    let mut rest = entry.strip_prefix('$').unwrap_or(entry);
    let mut out = String::new();
    let mut first = true;
    while !rest.is_empty() {
        if let Some(inside) = rest.strip_prefix('[') {
            if let Some(after) = inside.strip_prefix("*]") {
                push_segment(&mut out, Seg::Index(0), true);
                rest = after;
            } else if inside.starts_with('"') {
                let mut strings = serde_json::Deserializer::from_str(inside).into_iter::<String>();
                let key = strings.next()?.ok()?;
                let after = inside[strings.byte_offset()..].strip_prefix(']')?;
                push_segment(&mut out, Seg::Key(&key), true);
                rest = after;
            } else {
                let close = inside.find(']')?;
                let index = &inside[..close];
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                push_segment(&mut out, Seg::Index(0), true);
                rest = &inside[close + 1..];
            }
        } else {
            let named = match rest.strip_prefix('.') {
                Some(after) => after,
                None if first => rest,
                None => return None,
            };
            let end = named.find(['.', '[']).unwrap_or(named.len());
            if end == 0 {
                return None;
            }
            push_segment(&mut out, Seg::Key(&named[..end]), true);
            rest = &named[end..];
        }
        first = false;
    }
    (!out.is_empty()).then_some(out)
}

/// A path in diff syntax; the root is `$`.
fn format_path(segs: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in segs {
        push_segment(&mut out, *seg, false);
    }
    if out.is_empty() {
        out.push('$');
    }
    out
}

/// What a node of an argument tree is, as told by an [`ArgSource`].
#[derive(Debug, Clone, Copy)]
pub enum SourceKind<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    /// Must be finite.
    Float(f64),
    /// An integer beyond 64 bits, as decimal text (`-?[0-9]+`).
    BigInt(&'a str),
    Str(&'a str),
    /// A list with this many items.
    List(usize),
    /// An object with this many entries.
    Map(usize),
}

/// Why a tree could not be normalised: a message, and the path to where,
/// filled in (innermost segment first) on the way out of the recursion.
///
/// Boxed: every level of the recursion returns a `Result` holding one, and
/// an unboxed error made each of those results, moved at every return, half
/// again as large as the value it carries.
#[derive(Debug, Clone)]
pub struct SourceError(Box<SourceErrorInner>);

#[derive(Debug, Clone)]
struct SourceErrorInner {
    segs: Vec<String>,
    message: String,
    retry: bool,
}

impl SourceError {
    pub fn new(message: impl Into<String>) -> Self {
        SourceError(Box::new(SourceErrorInner {
            segs: Vec::new(),
            message: message.into(),
            retry: false,
        }))
    }

    /// The source cannot be read this way and will be read again another
    /// way (see [`try_canonicalize`]). The normaliser unwinds at once: it
    /// reads nothing more of the source, not even the keys of the path.
    pub fn retry() -> Self {
        SourceError(Box::new(SourceErrorInner {
            segs: Vec::new(),
            message: "the source gave up reading this value".to_string(),
            retry: true,
        }))
    }

    pub fn is_retry(&self) -> bool {
        self.0.retry
    }

    /// `{what}{path}: {message}`, e.g. `pred.passengers[0].dob: NaN is not a
    /// finite number`.
    pub fn into_error(self, what: &str) -> Error {
        let mut path = what.to_string();
        for seg in self.0.segs.iter().rev() {
            path.push_str(seg);
        }
        Error::invalid(format!("{path}: {}", self.0.message))
    }
}

/// A JSON-like tree the normaliser can read without first copying it into a
/// [`serde_json::Value`] (the Python bindings read Python objects this way).
/// Strings are borrowed for `'a`.
pub trait ArgSource<'a>: Sized {
    fn kind(&self) -> std::result::Result<SourceKind<'a>, SourceError>;
    /// Calls `f` on each list item in order (only for [`SourceKind::List`]).
    fn each_item(
        &self,
        f: &mut dyn FnMut(usize, Self) -> std::result::Result<(), SourceError>,
    ) -> std::result::Result<(), SourceError>;
    /// Calls `f` on each object entry (only for [`SourceKind::Map`]).
    fn each_entry(
        &self,
        f: &mut dyn FnMut(&'a str, Self) -> std::result::Result<(), SourceError>,
    ) -> std::result::Result<(), SourceError>;
}

impl<'a> ArgSource<'a> for &'a Value {
    fn kind(&self) -> std::result::Result<SourceKind<'a>, SourceError> {
        Ok(match *self {
            Value::Null => SourceKind::Null,
            Value::Bool(b) => SourceKind::Bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    SourceKind::UInt(u)
                } else if let Some(i) = n.as_i64() {
                    SourceKind::Int(i)
                } else {
                    SourceKind::Float(n.as_f64().unwrap_or(0.0))
                }
            }
            Value::String(s) => SourceKind::Str(s),
            Value::Array(items) => SourceKind::List(items.len()),
            Value::Object(map) => SourceKind::Map(map.len()),
        })
    }

    fn each_item(
        &self,
        f: &mut dyn FnMut(usize, Self) -> std::result::Result<(), SourceError>,
    ) -> std::result::Result<(), SourceError> {
        if let Value::Array(items) = *self {
            for (i, item) in items.iter().enumerate() {
                f(i, item)?;
            }
        }
        Ok(())
    }

    fn each_entry(
        &self,
        f: &mut dyn FnMut(&'a str, Self) -> std::result::Result<(), SourceError>,
    ) -> std::result::Result<(), SourceError> {
        if let Value::Object(map) = *self {
            for (k, v) in map {
                f(k, v)?;
            }
        }
        Ok(())
    }
}

struct Normalizer<'p> {
    policy: &'p Policy,
    /// The current path with `[*]` indices, kept only when the policy names
    /// lists by path.
    wildcard_path: Option<String>,
}

impl<'p> Normalizer<'p> {
    fn new(policy: &'p Policy) -> Self {
        Normalizer {
            policy,
            wildcard_path: policy.has_paths().then(String::new),
        }
    }

    fn list_is_unordered(&self, key: Option<&str>) -> bool {
        if self.policy.unordered_keys.is_empty() {
            return false;
        }
        if let Some(key) = key {
            if self.policy.names_key(key) {
                return true;
            }
        }
        match &self.wildcard_path {
            Some(path) if path.is_empty() => self.policy.names_path("$"),
            Some(path) => self.policy.names_path(path),
            None => false,
        }
    }

    fn descend<T>(
        &mut self,
        seg: Seg<'_>,
        f: impl FnOnce(&mut Self) -> std::result::Result<T, SourceError>,
    ) -> std::result::Result<T, SourceError> {
        let mark = self.wildcard_path.as_ref().map(String::len);
        if let Some(path) = self.wildcard_path.as_mut() {
            push_segment(path, seg, true);
        }
        let out = f(self);
        if let (Some(path), Some(mark)) = (self.wildcard_path.as_mut(), mark) {
            path.truncate(mark);
        }
        out.map_err(|mut e| {
            if e.is_retry() {
                return e;
            }
            // Always written as it follows a name: `.key`, `["odd key"]`, `[3]`.
            let mut text = String::new();
            match seg {
                Seg::Key(k) if is_identifier(k) => {
                    text.push('.');
                    text.push_str(k);
                }
                _ => push_segment(&mut text, seg, false),
            }
            e.0.segs.push(text);
            e
        })
    }

    fn canon<'a, S: ArgSource<'a>>(
        &mut self,
        src: &S,
        key: Option<&str>,
        depth: usize,
    ) -> std::result::Result<Canon<'a>, SourceError> {
        match src.kind()? {
            SourceKind::Null => Ok(Canon::Null),
            SourceKind::Bool(b) => Ok(Canon::Bool(b)),
            SourceKind::Int(i) => Ok(Canon::Num(Dec::from_u64(i < 0, i.unsigned_abs()))),
            SourceKind::UInt(u) => Ok(Canon::Num(Dec::from_u64(false, u))),
            SourceKind::Float(x) if x.is_finite() => Ok(Canon::Num(Dec::from_f64(x))),
            SourceKind::Float(x) => Err(SourceError::new(format!("{x} is not a finite number"))),
            SourceKind::BigInt(text) => Dec::parse_plain(text)
                .map(Canon::Num)
                .ok_or_else(|| SourceError::new(format!("{text:?} is not an integer"))),
            SourceKind::Str(s) => Ok(self.canon_str(s)),
            SourceKind::List(len) => {
                if depth >= MAX_DEPTH {
                    return Err(SourceError::new(format!(
                        "nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                if len == 0 {
                    return Ok(Canon::Null);
                }
                let unordered = self.list_is_unordered(key);
                let mut out = Vec::with_capacity(len);
                src.each_item(&mut |i, item| {
                    out.push(self.descend(Seg::Index(i), |me| me.canon(&item, None, depth + 1))?);
                    Ok(())
                })?;
                if out.is_empty() {
                    return Ok(Canon::Null);
                }
                if unordered {
                    let mut bag: Vec<(usize, Canon<'a>)> = out.into_iter().enumerate().collect();
                    bag.sort_by(|(_, x), (_, y)| canon_cmp(x, y));
                    Ok(Canon::Bag(bag))
                } else {
                    Ok(Canon::List(out))
                }
            }
            SourceKind::Map(len) => {
                if depth >= MAX_DEPTH {
                    return Err(SourceError::new(format!(
                        "nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                let mut entries = Vec::with_capacity(len);
                src.each_entry(&mut |k, v| {
                    let c = self.descend(Seg::Key(k), |me| me.canon(&v, Some(k), depth + 1))?;
                    if !matches!(c, Canon::Null) {
                        entries.push((k, c));
                    }
                    Ok(())
                })?;
                if entries.is_empty() {
                    return Ok(Canon::Null);
                }
                entries.sort_unstable_by(|(a, _), (b, _)| key_cmp(a, b));
                // Sources whose keys may repeat (not JSON objects, not dicts)
                // keep the last value, as a JSON parser would.
                entries.dedup_by(|later, earlier| {
                    if later.0 == earlier.0 {
                        std::mem::swap(later, earlier);
                        true
                    } else {
                        false
                    }
                });
                Ok(Canon::Map(entries))
            }
        }
    }

    fn canon_str<'a>(&self, s: &'a str) -> Canon<'a> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Canon::Null;
        }
        if let Some(d) = Dec::parse_plain(trimmed) {
            return Canon::Num(d);
        }
        if !self.policy.case_fold {
            return Canon::Str(Cow::Borrowed(trimmed));
        }
        if trimmed.is_ascii() {
            if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
                Canon::Str(Cow::Owned(trimmed.to_ascii_lowercase()))
            } else {
                Canon::Str(Cow::Borrowed(trimmed))
            }
        } else {
            let lower = trimmed.to_lowercase();
            if lower == trimmed {
                Canon::Str(Cow::Borrowed(trimmed))
            } else {
                Canon::Str(Cow::Owned(lower))
            }
        }
    }
}

/// A normalised argument tree, borrowing the strings of its source: build it
/// once with [`canonicalize`], then compare it with [`compare_canonical`] as
/// often as needed (it holds no reference to the source tree itself, only to
/// its strings).
#[derive(Debug, Clone)]
pub struct Canonical<'a>(Canon<'a>);

impl Canonical<'_> {
    /// The canonical form as JSON (see [`normalize`]).
    pub fn to_value(&self) -> Value {
        self.0.to_value()
    }
}

/// Normalises any [`ArgSource`]; errors read `{what}{path}: {reason}`.
pub fn canonicalize<'a, S: ArgSource<'a>>(
    src: S,
    policy: &Policy,
    what: &str,
) -> Result<Canonical<'a>> {
    policy.validate()?;
    Normalizer::new(policy)
        .canon(&src, None, 0)
        .map(Canonical)
        .map_err(|e| e.into_error(what))
}

/// [`canonicalize`] for a source that may give up ([`SourceError::retry`]):
/// `Ok(None)` then, and the caller reads the value again another way.
pub fn try_canonicalize<'a, S: ArgSource<'a>>(
    src: S,
    policy: &Policy,
    what: &str,
) -> Result<Option<Canonical<'a>>> {
    policy.validate()?;
    match Normalizer::new(policy).canon(&src, None, 0) {
        Ok(canon) => Ok(Some(Canonical(canon))),
        Err(e) if e.is_retry() => Ok(None),
        Err(e) => Err(e.into_error(what)),
    }
}

fn canonical<'a>(value: &'a Value, policy: &Policy, what: &str) -> Result<Canon<'a>> {
    Normalizer::new(policy)
        .canon(&value, None, 0)
        .map_err(|e| e.into_error(what))
}

/// The canonical form of `value` as JSON: keys sorted, empty values dropped
/// (an empty root becomes `null`), strings trimmed (and lower-cased under
/// `case_fold`), numeric strings turned into numbers, unordered lists sorted.
/// `normalize(normalize(v)) == normalize(v)`, and `compare(v, normalize(v))`
/// is exact.
pub fn normalize(value: &Value, policy: &Policy) -> Result<Value> {
    policy.validate()?;
    Ok(canonical(value, policy, "value")?.to_value())
}

// ---------------------------------------------------------------------------
// Comparison

/// How closely a predicted value matches the gold one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchKind {
    /// Equal after normalisation.
    Exact,
    /// The same structure (key sets at every depth, list lengths, container
    /// kinds) with fewer than `soft_max_fraction` of the gold leaves differing.
    Soft,
    /// Anything else.
    Mismatch,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact",
            MatchKind::Soft => "soft",
            MatchKind::Mismatch => "mismatch",
        }
    }
}

/// The result of [`compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub kind: MatchKind,
    /// Paths that differ, in order (object keys sorted, indices ascending):
    /// `user_id`, `passengers[0].dob`, `payment_methods[2]`, `["odd key"]`;
    /// `$` is the root. A missing or extra key, or a list element beyond the
    /// other list's end, is reported at its own path (not at its leaves).
    pub diffs: Vec<String>,
    /// Leaves (scalars) that differ.
    pub differing_leaves: usize,
    /// Leaves of the normalised gold value.
    pub gold_leaves: usize,
    /// Whether the structure differs (key sets, list lengths, a container
    /// against a scalar): such a comparison is never soft.
    pub structural: bool,
}

#[derive(Default)]
struct DiffAcc {
    diffs: Vec<String>,
    differing: usize,
    structural: bool,
}

impl DiffAcc {
    fn record(&mut self, path: &[Seg<'_>], structural: bool) {
        self.diffs.push(format_path(path));
        if structural {
            self.structural = true;
        } else {
            self.differing += 1;
        }
    }
}

fn diff_canon<'a>(
    pred: &'a Canon<'a>,
    gold: &'a Canon<'a>,
    path: &mut Vec<Seg<'a>>,
    acc: &mut DiffAcc,
) {
    match (pred, gold) {
        (Canon::Map(p), Canon::Map(g)) => diff_maps(p, g, path, acc),
        (Canon::Null, Canon::Map(g)) => diff_maps(&[], g, path, acc),
        (Canon::Map(p), Canon::Null) => diff_maps(p, &[], path, acc),
        (Canon::List(p), Canon::List(g)) => {
            for i in 0..p.len().max(g.len()) {
                path.push(Seg::Index(i));
                match (p.get(i), g.get(i)) {
                    (Some(x), Some(y)) => diff_canon(x, y, path, acc),
                    _ => acc.record(path, true),
                }
                path.pop();
            }
        }
        (Canon::Bag(p), Canon::Bag(g)) => diff_bags(p, g, path, acc),
        _ if pred.is_container() || gold.is_container() => acc.record(path, true),
        _ => {
            if canon_cmp(pred, gold) != Ordering::Equal {
                acc.record(path, false);
            }
        }
    }
}

fn diff_maps<'a>(
    p: &'a [(&'a str, Canon<'a>)],
    g: &'a [(&'a str, Canon<'a>)],
    path: &mut Vec<Seg<'a>>,
    acc: &mut DiffAcc,
) {
    let (mut i, mut j) = (0, 0);
    while i < p.len() || j < g.len() {
        let ord = match (p.get(i), g.get(j)) {
            (Some((kp, _)), Some((kg, _))) => key_cmp(kp, kg),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match ord {
            Ordering::Equal => {
                path.push(Seg::Key(p[i].0));
                diff_canon(&p[i].1, &g[j].1, path, acc);
                path.pop();
                i += 1;
                j += 1;
            }
            Ordering::Less => {
                path.push(Seg::Key(p[i].0));
                acc.record(path, true);
                path.pop();
                i += 1;
            }
            Ordering::Greater => {
                path.push(Seg::Key(g[j].0));
                acc.record(path, true);
                path.pop();
                j += 1;
            }
        }
    }
}

/// Multiset comparison: equal items pair off (the k-th gold occurrence of a
/// value with the k-th predicted one, in original order); the rest pair up
/// in original order and are compared in depth at the gold index; surplus
/// items are reported at their own index.
fn diff_bags<'a>(
    p: &'a [(usize, Canon<'a>)],
    g: &'a [(usize, Canon<'a>)],
    path: &mut Vec<Seg<'a>>,
    acc: &mut DiffAcc,
) {
    let (mut i, mut j) = (0, 0);
    let mut lone_p: Vec<&(usize, Canon<'a>)> = Vec::new();
    let mut lone_g: Vec<&(usize, Canon<'a>)> = Vec::new();
    while i < p.len() || j < g.len() {
        let ord = match (p.get(i), g.get(j)) {
            (Some((_, x)), Some((_, y))) => canon_cmp(x, y),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match ord {
            Ordering::Equal => {
                i += 1;
                j += 1;
            }
            Ordering::Less => {
                lone_p.push(&p[i]);
                i += 1;
            }
            Ordering::Greater => {
                lone_g.push(&g[j]);
                j += 1;
            }
        }
    }
    lone_p.sort_by_key(|(idx, _)| *idx);
    lone_g.sort_by_key(|(idx, _)| *idx);
    let paired = lone_p.len().min(lone_g.len());
    for k in 0..paired {
        path.push(Seg::Index(lone_g[k].0));
        diff_canon(&lone_p[k].1, &lone_g[k].1, path, acc);
        path.pop();
    }
    for (idx, _) in lone_g[paired..].iter().chain(lone_p[paired..].iter()) {
        path.push(Seg::Index(*idx));
        acc.record(path, true);
        path.pop();
    }
}

/// Whether `count < fraction × total`, with `fraction` taken as the decimal
/// it prints as: 0.28 is 28/100, not the double just above it, so 7 of 25
/// is not fewer than 0.28 of them (in floats, 0.28 × 25 is 7.000000000000001).
fn fewer_than_fraction(count: usize, total: usize, fraction: f64) -> bool {
    // Away from the boundary the float product decides (its error is a few
    // ulps); only near it is the fraction's decimal worked out, which costs
    // formatting the float.
    let (count_f, product) = (count as f64, fraction * total as f64);
    if (count_f - product).abs() > 1e-9 * product.abs().max(1.0) {
        return count_f < product;
    }
    let fraction = Dec::from_f64(fraction);
    if fraction.is_zero() || fraction.neg {
        return false;
    }
    if count == 0 {
        return total > 0;
    }
    // At most 17 digits: below 10^17, and times a usize within u128.
    let digits = fraction
        .digits
        .as_bytes()
        .iter()
        .fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
    let scale = |n: u128, exp: i64| {
        u32::try_from(exp)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .and_then(|p| n.checked_mul(p))
    };
    let (count, total) = (count as u128, total as u128);
    if fraction.exp >= 0 {
        scale(digits * total, fraction.exp).is_none_or(|limit| count < limit)
    } else {
        // An overflowing left side exceeds any right side.
        scale(count, -fraction.exp).is_some_and(|scaled| scaled < digits * total)
    }
}

fn compare_canon<'a>(
    pred: &'a Canon<'a>,
    gold: &'a Canon<'a>,
    soft_max_fraction: f64,
) -> Comparison {
    let mut acc = DiffAcc::default();
    let mut path = Vec::new();
    diff_canon(pred, gold, &mut path, &mut acc);
    let gold_leaves = gold.leaf_count();
    let kind = if acc.structural {
        MatchKind::Mismatch
    } else if acc.differing == 0 {
        MatchKind::Exact
    } else if fewer_than_fraction(acc.differing, gold_leaves, soft_max_fraction) {
        MatchKind::Soft
    } else {
        MatchKind::Mismatch
    };
    Comparison {
        kind,
        diffs: acc.diffs,
        differing_leaves: acc.differing,
        gold_leaves,
        structural: acc.structural,
    }
}

/// Compares two trees normalised with the same `policy` by [`canonicalize`].
pub fn compare_canonical(
    pred: &Canonical<'_>,
    gold: &Canonical<'_>,
    policy: &Policy,
) -> Comparison {
    compare_canon(&pred.0, &gold.0, policy.soft_max_fraction)
}

/// Compares a predicted argument value with the gold one under `policy`.
pub fn compare(pred: &Value, gold: &Value, policy: &Policy) -> Result<Comparison> {
    policy.validate()?;
    let p = canonical(pred, policy, "pred")?;
    let g = canonical(gold, policy, "gold")?;
    Ok(compare_canon(&p, &g, policy.soft_max_fraction))
}

/// [`compare_canonical`] over many pairs. Sequential: reading the source
/// trees costs far more than comparing them, so threads gain little here.
pub fn compare_canonical_many(
    pairs: &[(Canonical<'_>, Canonical<'_>)],
    policy: &Policy,
) -> Vec<Comparison> {
    pairs
        .iter()
        .map(|(pred, gold)| compare_canonical(pred, gold, policy))
        .collect()
}

// ---------------------------------------------------------------------------
// Reward tiers

/// Whether a tool only reads the environment or changes its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolKind {
    Read,
    Write,
}

impl ToolKind {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "read" => Ok(ToolKind::Read),
            "write" => Ok(ToolKind::Write),
            _ => Err(Error::UnknownName {
                what: "tool kind",
                name: name.to_string(),
                valid: vec!["read".into(), "write".into()],
            }),
        }
    }
}

/// The reward tier of an assistant turn (DESIGN.md "Reward tiers and IRC").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    // Declared from lowest to highest precedence: when one turn makes several
    // calls, the turn takes the highest tier among them.
    Respond,
    Read,
    Write,
    Soft,
    Gold,
    Error,
}

impl Tier {
    pub const NAMES: [&'static str; 6] = ["gold", "soft", "read", "write", "error", "respond"];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Gold => "gold",
            Tier::Soft => "soft",
            Tier::Read => "read",
            Tier::Write => "write",
            Tier::Error => "error",
            Tier::Respond => "respond",
        }
    }
}

/// Tiers of one trajectory, from [`label_tiers`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TierLabels {
    /// One entry per input turn: the tier of an assistant turn, `None` for
    /// any other role.
    pub tiers: Vec<Option<Tier>>,
    /// One entry per input turn: the tier of each tool call of an assistant
    /// turn, in call order (empty for other roles and for calls-free turns).
    pub call_tiers: Vec<Vec<Tier>>,
    /// Indices of the gold actions matched exactly, ascending.
    pub matched_gold: Vec<usize>,
    /// Indices of the gold actions that earned a soft match, ascending.
    pub soft_gold: Vec<usize>,
    /// Per gold action, the index of the turn that matched it exactly.
    pub gold_turn: Vec<Option<usize>>,
}

/// One call of an assistant turn, as read from the record.
struct CallIn<'a> {
    /// `None` when the call is not an object or has no string `name`.
    name: Option<&'a str>,
    /// `None` when `arguments` was a string that is not a JSON object.
    arguments: Option<Cow<'a, Value>>,
}

struct GoldIn<'a> {
    name: &'a str,
    args: Canon<'a>,
}

/// A tool turn's result as text: a string, or the text parts of an
/// OpenAI-style list of content parts (`[{"type": "text", "text": ...}]`)
/// joined; anything else reads as empty.
fn result_text(content: Option<&Value>) -> Cow<'_, str> {
    match content {
        Some(Value::String(text)) => Cow::Borrowed(text),
        Some(Value::Array(parts)) => {
            let mut texts = parts.iter().filter_map(|part| match part {
                Value::String(text) => Some(text.as_str()),
                Value::Object(part) => part.get("text").and_then(Value::as_str),
                _ => None,
            });
            match (texts.next(), texts.clone().next()) {
                (None, _) => Cow::Borrowed(""),
                (Some(only), None) => Cow::Borrowed(only),
                (Some(first), Some(_)) => {
                    let mut joined = first.to_string();
                    texts.for_each(|t| joined.push_str(t));
                    Cow::Owned(joined)
                }
            }
        }
        _ => Cow::Borrowed(""),
    }
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A call that cannot be read (not an object, no string name, arguments
/// that are not a JSON object) is still a call: it gets the `error` tier.
fn read_call(call: &Value) -> CallIn<'_> {
    let Some(obj) = call.as_object() else {
        return CallIn {
            name: None,
            arguments: None,
        };
    };
    // OpenAI style nests the call under "function".
    let obj = match field(obj, "function").and_then(Value::as_object) {
        Some(inner) if !obj.contains_key("name") => inner,
        _ => obj,
    };
    let name = field(obj, "name").and_then(Value::as_str);
    static EMPTY: Value = Value::Null;
    let arguments = match field(obj, "arguments") {
        None => Some(Cow::Borrowed(&EMPTY)),
        Some(Value::String(text)) => match crate::json::value_from_str(text) {
            Ok(v @ (Value::Object(_) | Value::Null)) => Some(Cow::Owned(v)),
            _ => None,
        },
        Some(v @ Value::Object(_)) => Some(Cow::Borrowed(v)),
        Some(_) => None,
    };
    CallIn { name, arguments }
}

/// Labels every assistant turn of a trajectory with a reward tier.
///
/// `turns` are the `turns` of a `turnrl.rollout/1` record: objects with a
/// `role`. Assistant turns carry `tool_calls` (`[{"name", "arguments"}]`;
/// `arguments` may be an object, a JSON string or missing; an OpenAI-style
/// `{"function": {...}}` wrapper is accepted) and optionally `errors` (parse
/// errors). The `tool` turns that follow an assistant turn are its calls'
/// results, in call order. `gold_actions` are `{"name", "arguments"}` (or
/// tau-bench's `"kwargs"`).
///
/// Each call gets a tier, checked in this order:
/// 1. `error`: the call is not an object or has no string `name`, the tool
///    is not in `tool_kinds`, its arguments are not a JSON object (or nest
///    too deep, or hold what the comparison cannot read), or its result
///    starts with `Error` (tau-bench tools report failures that way). An
///    erroring call matches nothing; the rest of the trajectory is labelled
///    as usual.
/// 2. `gold`: the arguments equal (after normalisation) those of a gold
///    action of the same name not yet matched exactly; the first such gold
///    action in task order is consumed. Each gold action matches once, so a
///    repeated call is not gold again.
/// 3. `soft`: a soft match to a gold action of the same name that is not
///    matched exactly and has not yet given a soft match (the closest one by
///    differing leaves, first in task order on ties). A soft match does not
///    consume the gold action: a later exact call still earns `gold`.
/// 4. `read` / `write`: the tool's kind.
///
/// The turn's tier is the highest of its calls' tiers by the precedence
/// `error > gold > soft > write > read`; a turn with parse errors is `error`;
/// a turn with neither calls nor errors is `respond`.
pub fn label_tiers(
    turns: &[Value],
    gold_actions: &[Value],
    tool_kinds: &HashMap<String, ToolKind>,
    policy: &Policy,
) -> Result<TierLabels> {
    policy.validate()?;
    let mut gold = Vec::with_capacity(gold_actions.len());
    for (i, action) in gold_actions.iter().enumerate() {
        let at = format!("gold_actions[{i}]");
        let obj = action
            .as_object()
            .ok_or_else(|| Error::invalid(format!("{at} must be an object")))?;
        let name = field(obj, "name")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(format!("{at}.name must be a string")))?;
        let args = match field(obj, "arguments").or_else(|| field(obj, "kwargs")) {
            None => Canon::Null,
            Some(v @ Value::Object(_)) => canonical(v, policy, &format!("{at}.arguments"))?,
            Some(_) => return Err(Error::invalid(format!("{at}.arguments must be an object"))),
        };
        gold.push(GoldIn { name, args });
    }

    // Read the record first: calls per assistant turn and the results that
    // follow them.
    struct AssistantIn<'a> {
        turn: usize,
        calls: Vec<CallIn<'a>>,
        has_errors: bool,
        results: Vec<Cow<'a, str>>,
    }
    let mut assistants: Vec<AssistantIn<'_>> = Vec::new();
    let mut collecting_results = false;
    for (t, turn) in turns.iter().enumerate() {
        let obj = turn
            .as_object()
            .ok_or_else(|| Error::invalid(format!("turns[{t}] must be an object")))?;
        let role = field(obj, "role")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(format!("turns[{t}].role must be a string")))?;
        match role {
            "assistant" => {
                let calls = match field(obj, "tool_calls") {
                    None => Vec::new(),
                    Some(Value::Array(items)) => items.iter().map(read_call).collect(),
                    Some(_) => {
                        return Err(Error::invalid(format!(
                            "turns[{t}].tool_calls must be a list"
                        )))
                    }
                };
                let has_errors = match field(obj, "errors") {
                    None => false,
                    Some(Value::Array(items)) => !items.is_empty(),
                    Some(_) => {
                        return Err(Error::invalid(format!("turns[{t}].errors must be a list")))
                    }
                };
                assistants.push(AssistantIn {
                    turn: t,
                    calls,
                    has_errors,
                    results: Vec::new(),
                });
                collecting_results = true;
            }
            "tool" => {
                if let (true, Some(last)) = (collecting_results, assistants.last_mut()) {
                    last.results.push(result_text(field(obj, "content")));
                }
            }
            _ => collecting_results = false,
        }
    }

    let mut labels = TierLabels {
        tiers: vec![None; turns.len()],
        call_tiers: vec![Vec::new(); turns.len()],
        matched_gold: Vec::new(),
        soft_gold: Vec::new(),
        gold_turn: vec![None; gold.len()],
    };
    let mut soft_claimed = vec![false; gold.len()];
    for turn in &assistants {
        let mut call_tiers = Vec::with_capacity(turn.calls.len());
        for (c, call) in turn.calls.iter().enumerate() {
            let tier = label_call(
                call,
                turn.results.get(c).map(|r| r.as_ref()),
                turn.turn,
                &gold,
                tool_kinds,
                policy,
                &mut labels.gold_turn,
                &mut soft_claimed,
            );
            call_tiers.push(tier);
        }
        let mut tier = call_tiers.iter().copied().max().unwrap_or(Tier::Respond);
        if turn.has_errors {
            tier = Tier::Error;
        }
        labels.tiers[turn.turn] = Some(tier);
        labels.call_tiers[turn.turn] = call_tiers;
    }
    labels.matched_gold = (0..gold.len())
        .filter(|&g| labels.gold_turn[g].is_some())
        .collect();
    labels.soft_gold = (0..gold.len()).filter(|&g| soft_claimed[g]).collect();
    Ok(labels)
}

#[allow(clippy::too_many_arguments)]
fn label_call(
    call: &CallIn<'_>,
    result: Option<&str>,
    turn: usize,
    gold: &[GoldIn<'_>],
    tool_kinds: &HashMap<String, ToolKind>,
    policy: &Policy,
    gold_turn: &mut [Option<usize>],
    soft_claimed: &mut [bool],
) -> Tier {
    let Some(name) = call.name else {
        return Tier::Error;
    };
    let Some(&kind) = tool_kinds.get(name) else {
        return Tier::Error;
    };
    if result.is_some_and(|r| r.trim_start().starts_with("Error")) {
        return Tier::Error;
    }
    let Some(arguments) = call.arguments.as_ref() else {
        return Tier::Error;
    };
    let Ok(args) = canonical(arguments, policy, "arguments") else {
        return Tier::Error;
    };
    let mut best_soft: Option<(usize, usize)> = None;
    for (g, action) in gold.iter().enumerate() {
        if action.name != name || gold_turn[g].is_some() {
            continue;
        }
        let cmp = compare_canon(&args, &action.args, policy.soft_max_fraction);
        match cmp.kind {
            MatchKind::Exact => {
                gold_turn[g] = Some(turn);
                return Tier::Gold;
            }
            MatchKind::Soft
                if !soft_claimed[g] && best_soft.is_none_or(|(_, d)| cmp.differing_leaves < d) =>
            {
                best_soft = Some((g, cmp.differing_leaves));
            }
            _ => {}
        }
    }
    if let Some((g, _)) = best_soft {
        soft_claimed[g] = true;
        return Tier::Soft;
    }
    match kind {
        ToolKind::Read => Tier::Read,
        ToolKind::Write => Tier::Write,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn cmp(p: Value, g: Value) -> Comparison {
        compare(&p, &g, &Policy::default()).unwrap()
    }

    /// Python's `repr` of `x` (finite, not 0) by its definition, from the
    /// exact decimal expansion (at most 767 significant digits, so 801 are
    /// exact): for n = 1, 2, …, the n-digit decimals just below and just
    /// above `x`; the first n where one reads back as `x` gives it, the
    /// nearer if both do, the even one if they are equally near.
    fn python_repr(x: f64) -> Dec {
        let exact = format!("{:.800e}", x.abs());
        let (mantissa, exponent) = exact.split_once('e').unwrap();
        let exp: i64 = exponent.parse().unwrap();
        let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
        for n in 1..=17 {
            let below: u64 = std::str::from_utf8(&digits[..n]).unwrap().parse().unwrap();
            let scale = exp - (n as i64 - 1);
            let reads_back = |k: u64| format!("{k}e{scale}").parse::<f64>().unwrap() == x.abs();
            let rest = &digits[n..];
            let at = |k: u64| Dec::build(x < 0.0, k.to_string().as_bytes(), scale);
            if rest.iter().all(|&d| d == b'0') {
                if reads_back(below) {
                    return at(below);
                }
                continue;
            }
            let nearer = match rest[0].cmp(&b'5') {
                Ordering::Less => below,
                Ordering::Greater => below + 1,
                Ordering::Equal if rest[1..].iter().any(|&d| d != b'0') => below + 1,
                Ordering::Equal => below + below % 2,
            };
            let farther = if nearer == below { below + 1 } else { below };
            for k in [nearer, farther] {
                if reads_back(k) {
                    return at(k);
                }
            }
        }
        unreachable!("17 digits always read back: {x:e}")
    }

    /// Floats where ties between two shortest forms are common: k/2^(p+1)
    /// for odd k lies halfway between two decimals with p fraction digits,
    /// both of which read back when k ≥ 2^53/5^p (8 + 2^-16 is one); and
    /// an integer of up to 53 bits times a power of two.
    fn tie_prone_float() -> impl Strategy<Value = f64> {
        let halfway = (1u32..=24, any::<u64>()).prop_map(|(p, r)| {
            let lo = (1u64 << 53) / 5u64.pow(p);
            let k = (lo + r % ((1 << 53) - lo)) | 1;
            k as f64 * pow2(-i64::from(p) - 1)
        });
        let short = (1u64..1 << 53, 0u32..53, -80i32..40)
            .prop_map(|(m, drop, e)| (m >> drop) as f64 * 2f64.powi(e));
        (prop_oneof![halfway, short], any::<bool>()).prop_map(|(x, neg)| if neg { -x } else { x })
    }

    #[test]
    fn floats_halfway_between_two_shorter_forms_take_the_even_one() {
        // 8 + 2^-16 = 8.0000152587890625 reads back from ...062 and ...063:
        // Python prints ...062, Rust's `{:e}` ...063.
        let x = 8.0 + 1.0 / 65536.0;
        let even = Dec::parse_plain("8.000015258789062").unwrap();
        assert_eq!(Dec::from_f64(x), even);
        assert_eq!(python_repr(x), even);
        assert_eq!(
            Dec::from_f64(-x),
            Dec::parse_plain("-8.000015258789062").unwrap()
        );
        assert_eq!(
            Dec::from_f64(-607150627375807.2),
            Dec::parse_plain("-607150627375807.2").unwrap()
        );
        // Through the comparison: the float equals the string Python prints.
        let c = compare(
            &json!({"a": x}),
            &json!({"a": "8.000015258789062"}),
            &Policy::default(),
        );
        assert_eq!(c.unwrap().kind, MatchKind::Exact);
        let c = compare(
            &json!({"a": x}),
            &json!({"a": "8.000015258789063"}),
            &Policy::default(),
        );
        assert_eq!(c.unwrap().kind, MatchKind::Mismatch);
    }

    #[test]
    fn floats_halfway_between_two_shortest_forms_take_the_even_one() {
        // 1000000000000000.25 reads back from ...0.2 and from ...0.3;
        // Python prints ...0.2.
        let x = 1e15 + 0.25;
        assert_eq!(
            Dec::from_f64(x),
            Dec::parse_plain("1000000000000000.2").unwrap()
        );
        assert_eq!(
            Dec::from_f64(-x),
            Dec::parse_plain("-1000000000000000.2").unwrap()
        );
        let mut ties = 0;
        for k in 0..2000u64 {
            for (int, frac) in [
                (1_000_000_000_000_000u64, 0.25),
                (1_000_000_000_000_000, 0.75),
            ] {
                let x = (int + 7919 * k) as f64 + frac;
                assert_eq!(Dec::from_f64(x), python_repr(x), "{x:e}");
                ties += 1;
            }
            for eighths in [1.0, 3.0, 5.0, 7.0] {
                let x = (100_000_000_000_000 + 7919 * k) as f64 + eighths / 8.0;
                assert_eq!(Dec::from_f64(x), python_repr(x), "{x:e}");
            }
        }
        assert!(ties > 0);
    }

    #[test]
    fn the_soft_limit_is_the_decimal_fraction() {
        // 0.28 × 25 is 7.000000000000001 in floats.
        assert!(!fewer_than_fraction(7, 25, 0.28));
        assert!(fewer_than_fraction(6, 25, 0.28));
        assert!(!fewer_than_fraction(0, 25, 0.0));
        assert!(fewer_than_fraction(24, 25, 1.0));
        assert!(!fewer_than_fraction(25, 25, 1.0));
        assert!(!fewer_than_fraction(1, 10, 5e-324));
        assert!(fewer_than_fraction(0, 10, 5e-324));
    }

    proptest! {
        #[test]
        fn soft_limit_matches_exact_arithmetic(
            numerator in 0u64..=1000,
            scale in prop_oneof![Just(10u64), Just(100), Just(1000)],
            total in 0usize..2000,
            count_part in 0usize..2000,
        ) {
            prop_assume!(numerator <= scale);
            let count = count_part % (total + 1);
            let fraction = numerator as f64 / scale as f64;
            let want = (count as u128) * u128::from(scale) < u128::from(numerator) * total as u128;
            prop_assert_eq!(fewer_than_fraction(count, total, fraction), want);
        }

        /// Every float takes the digits Python's `repr` prints.
        #[test]
        fn floats_take_python_repr_digits(bits in any::<u64>()) {
            let x = f64::from_bits(bits);
            prop_assume!(x.is_finite() && x != 0.0);
            prop_assert_eq!(Dec::from_f64(x), python_repr(x), "{:e}", x);
        }

        /// Likewise where ties are common, at every length.
        #[test]
        fn tie_prone_floats_take_python_repr_digits(x in tie_prone_float()) {
            prop_assume!(x != 0.0);
            prop_assert_eq!(Dec::from_f64(x), python_repr(x), "{:e}", x);
        }

        #[test]
        fn key_order_is_byte_order(a in "[ab\\x00é]{0,6}", b in "[ab\\x00é]{0,6}") {
            prop_assert_eq!(key_cmp(&a, &b), a.as_bytes().cmp(b.as_bytes()));
        }
    }

    #[test]
    fn numbers_and_numeric_strings() {
        assert_eq!(
            cmp(json!({"a": "5"}), json!({"a": 5})).kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(json!({"a": 5.0}), json!({"a": 5})).kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(json!({"a": " 5 "}), json!({"a": 5})).kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(json!({"a": "-0"}), json!({"a": 0})).kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(json!({"a": "0.50"}), json!({"a": 0.5})).kind,
            MatchKind::Exact
        );
        for s in ["05", "1e3", "5.", ".5", "+5"] {
            let c = cmp(
                json!({ "a": s }),
                json!({"a": s.trim_start_matches('+').parse::<f64>().unwrap_or(0.0)}),
            );
            assert_eq!(c.diffs, vec!["a"], "{s}");
        }
        assert_eq!(cmp(json!({"a": true}), json!({"a": 1})).diffs, vec!["a"]);
        let big = "123456789012345678901234567890";
        assert_eq!(
            cmp(json!({ "a": big }), json!({ "a": big })).kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(
                json!({ "a": "123456789012345678901234567891" }),
                json!({ "a": big })
            )
            .diffs,
            vec!["a"]
        );
        assert_eq!(
            cmp(json!({"a": u64::MAX}), json!({"a": u64::MAX.to_string()})).kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(json!({"a": i64::MIN}), json!({"a": i64::MIN.to_string()})).kind,
            MatchKind::Exact
        );
    }

    #[test]
    fn empties_are_missing() {
        let gold = json!({"a": 1, "b": 2});
        for extra in [
            json!(null),
            json!(""),
            json!("  "),
            json!([]),
            json!({}),
            json!({"x": null}),
        ] {
            let pred = json!({"a": 1, "b": 2, "c": extra});
            assert_eq!(cmp(pred, gold.clone()).kind, MatchKind::Exact);
        }
        assert_eq!(cmp(json!({}), json!(null)).kind, MatchKind::Exact);
        assert_eq!(cmp(json!([null]), json!([])).kind, MatchKind::Mismatch);
    }

    #[test]
    fn diff_paths() {
        let gold = json!({"user_id": "u", "passengers": [{"dob": "1990-01-01", "name": "A"}],
                          "payment_methods": [{"id": 1}, {"id": 2}, {"id": 3}]});
        let pred = json!({"user_id": "v", "passengers": [{"dob": "1991-01-01", "name": "A"}],
                          "payment_methods": [{"id": 1}, {"id": 2}]});
        let c = cmp(pred, gold);
        assert_eq!(
            c.diffs,
            vec!["passengers[0].dob", "payment_methods[2]", "user_id"]
        );
        assert_eq!(c.kind, MatchKind::Mismatch);
        assert!(c.structural);
        let c = cmp(
            json!({"a b": 1, "x": [[1, 2]]}),
            json!({"a b": 2, "x": [[1, 3]]}),
        );
        assert_eq!(c.diffs, vec!["[\"a b\"]", "x[0][1]"]);
        assert_eq!(cmp(json!(1), json!(2)).diffs, vec!["$"]);
    }

    #[test]
    fn soft_threshold() {
        let gold = json!({"a": 1, "b": 2, "c": 3});
        assert_eq!(
            cmp(json!({"a": 1, "b": 2, "c": 4}), gold.clone()).kind,
            MatchKind::Soft
        );
        assert_eq!(
            cmp(json!({"a": 1, "b": 5, "c": 4}), gold.clone()).kind,
            MatchKind::Mismatch
        );
        // Exactly half is not "fewer than half".
        let c = cmp(json!({"a": 1, "b": 3}), json!({"a": 1, "b": 2}));
        assert_eq!(c.kind, MatchKind::Mismatch);
        let off = Policy {
            soft_max_fraction: 0.0,
            ..Policy::default()
        };
        let c = compare(&json!({"a": 1, "b": 2, "c": 4}), &gold, &off).unwrap();
        assert_eq!(c.kind, MatchKind::Mismatch);
        let bad = Policy {
            soft_max_fraction: f64::NAN,
            ..Policy::default()
        };
        assert!(compare(&gold, &gold, &bad).is_err());
    }

    #[test]
    fn unordered_lists() {
        let policy = Policy {
            unordered_keys: vec!["tags".into(), "legs[*].seats".into()],
            ..Policy::default()
        };
        let p = json!({"tags": ["b", "a", "a"], "legs": [{"seats": [2, 1]}], "order": [1, 2]});
        let g = json!({"tags": ["a", "b", "a"], "legs": [{"seats": [1, 2]}], "order": [1, 2]});
        assert_eq!(compare(&p, &g, &policy).unwrap().kind, MatchKind::Exact);
        let p2 = json!({"tags": ["a", "b", "a"], "legs": [{"seats": [1, 2]}], "order": [2, 1]});
        assert_eq!(
            compare(&p2, &g, &policy).unwrap().diffs,
            vec!["order[0]", "order[1]"]
        );
        let p3 = json!({"tags": ["a", "c", "a"], "legs": [{"seats": [1, 2]}], "order": [1, 2]});
        assert_eq!(compare(&p3, &g, &policy).unwrap().diffs, vec!["tags[1]"]);
        let root = Policy {
            unordered_keys: vec!["$".into()],
            ..Policy::default()
        };
        assert_eq!(
            compare(&json!([2, 1]), &json!([1, 2]), &root).unwrap().kind,
            MatchKind::Exact
        );
    }

    #[test]
    fn case_folding() {
        let fold = Policy {
            case_fold: true,
            ..Policy::default()
        };
        assert_eq!(
            compare(&json!({"a": "JFK"}), &json!({"a": "jfk"}), &fold)
                .unwrap()
                .kind,
            MatchKind::Exact
        );
        assert_eq!(
            cmp(json!({"a": "JFK"}), json!({"a": "jfk"})).kind,
            MatchKind::Mismatch
        );
        assert_eq!(
            cmp(json!({"A": 1}), json!({"a": 1})).kind,
            MatchKind::Mismatch
        );
    }

    #[test]
    fn too_deep_is_an_error_with_path() {
        let mut v = json!(1);
        for _ in 0..(MAX_DEPTH + 5) {
            v = json!([v]);
        }
        let v = json!({ "outer": v });
        let err = normalize(&v, &Policy::default()).unwrap_err().to_string();
        assert!(err.contains("nested deeper than 256 levels"), "{err}");
        assert!(err.contains("value.outer[0][0]"), "{err}");
        // serde_json's recursive Drop would overflow on deeper values; this
        // depth is safe.
    }

    /// A `Value` source that gives up at strings equal to "give up".
    struct GivesUp<'a>(&'a Value);

    impl<'a> ArgSource<'a> for GivesUp<'a> {
        fn kind(&self) -> std::result::Result<SourceKind<'a>, SourceError> {
            match self.0 {
                Value::String(s) if s == "give up" => Err(SourceError::retry()),
                other => other.kind(),
            }
        }
        fn each_item(
            &self,
            f: &mut dyn FnMut(usize, Self) -> std::result::Result<(), SourceError>,
        ) -> std::result::Result<(), SourceError> {
            self.0.each_item(&mut |i, v| f(i, GivesUp(v)))
        }
        fn each_entry(
            &self,
            f: &mut dyn FnMut(&'a str, Self) -> std::result::Result<(), SourceError>,
        ) -> std::result::Result<(), SourceError> {
            self.0.each_entry(&mut |k, v| f(k, GivesUp(v)))
        }
    }

    #[test]
    fn a_source_that_gives_up_is_read_again() {
        let policy = Policy::default();
        let v = json!({"a": [1, {"b": "give up"}], "c": "x"});
        assert!(try_canonicalize(GivesUp(&v), &policy, "v")
            .unwrap()
            .is_none());
        let plain = json!({"a": [1, {"b": "fine"}], "c": "x"});
        let tree = try_canonicalize(GivesUp(&plain), &policy, "v")
            .unwrap()
            .unwrap();
        assert_eq!(tree.to_value(), normalize(&plain, &policy).unwrap());
        // Real errors are still errors, with their path.
        let mut deep = json!(1);
        for _ in 0..(MAX_DEPTH + 1) {
            deep = json!([deep]);
        }
        let deep = json!({"d": deep});
        let err = try_canonicalize(GivesUp(&deep), &policy, "v")
            .unwrap_err()
            .to_string();
        assert!(err.contains("v.d[0]"), "{err}");
        // `canonicalize` reports a source that gives up as an error.
        assert!(canonicalize(GivesUp(&v), &policy, "v").is_err());
    }

    #[test]
    fn normalize_output() {
        let v = json!({"b": " X ", "a": "5", "c": "", "d": "0.1", "e": 5.0,
                       "f": "123456789012345678901234567890", "g": "0.12345678901234567890"});
        let n = normalize(
            &v,
            &Policy {
                case_fold: true,
                ..Policy::default()
            },
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"a":5,"b":"x","d":0.1,"e":5,"f":"123456789012345678901234567890","g":"0.1234567890123456789"}"#
        );
    }

    fn kinds() -> HashMap<String, ToolKind> {
        [("get", ToolKind::Read), ("book", ToolKind::Write)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    fn assistant(calls: Value) -> Value {
        json!({"role": "assistant", "content": "", "tool_calls": calls})
    }

    #[test]
    fn tiers_and_precedence() {
        let gold = vec![json!({"name": "book", "arguments": {"a": 1, "b": 2, "c": 3}})];
        let turns = vec![
            json!({"role": "user", "content": "hi"}),
            assistant(json!([{"name": "get", "arguments": {"id": 1}}])),
            json!({"role": "tool", "name": "get", "content": "{}"}),
            assistant(json!([{"name": "book", "arguments": {"a": 1, "b": 2, "c": 4}}])),
            json!({"role": "tool", "name": "book", "content": "ok"}),
            assistant(
                json!([{"name": "get", "arguments": {}}, {"name": "book", "arguments": "{\"c\": \"3\", \"b\": 2, \"a\": 1}"}]),
            ),
            json!({"role": "tool", "content": "{}"}),
            json!({"role": "tool", "content": "{}"}),
            assistant(json!([{"name": "book", "arguments": {"a": 1, "b": 2, "c": 3}}])),
            json!({"role": "tool", "content": "ok"}),
            assistant(json!([{"name": "nope", "arguments": {}}, {"name": "get"}])),
            json!({"role": "tool", "content": "Unknown action nope"}),
            json!({"role": "tool", "content": "{}"}),
            assistant(json!([{"name": "get", "arguments": {}}])),
            json!({"role": "tool", "content": "Error: user not found"}),
            json!({"role": "assistant", "content": "done", "errors": ["bad call at byte 3"]}),
            json!({"role": "assistant", "content": "bye"}),
        ];
        let labels = label_tiers(&turns, &gold, &kinds(), &Policy::default()).unwrap();
        let names: Vec<Option<&str>> = labels.tiers.iter().map(|t| t.map(Tier::as_str)).collect();
        assert_eq!(
            names,
            vec![
                None,
                Some("read"),
                None,
                Some("soft"),
                None,
                Some("gold"),
                None,
                None,
                Some("write"),
                None,
                Some("error"),
                None,
                None,
                Some("error"),
                None,
                Some("error"),
                Some("respond")
            ]
        );
        assert_eq!(labels.call_tiers[5], vec![Tier::Read, Tier::Gold]);
        assert_eq!(labels.matched_gold, vec![0]);
        assert_eq!(labels.soft_gold, vec![0]);
        assert_eq!(labels.gold_turn, vec![Some(5)]);
    }

    #[test]
    fn bad_records_are_errors() {
        let gold = vec![];
        let e = label_tiers(
            &[json!({"content": 1})],
            &gold,
            &kinds(),
            &Policy::default(),
        );
        assert!(e.unwrap_err().to_string().contains("turns[0].role"));
        let e = label_tiers(
            &[],
            &[json!({"name": "x", "arguments": 3})],
            &kinds(),
            &Policy::default(),
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("gold_actions[0].arguments"));
    }

    #[test]
    fn unordered_path_entries_must_be_written_as_paths_are() {
        for good in [
            "$",
            "a.b",
            "legs[*].seats",
            "[*]",
            "[*].x",
            "[\"odd key\"].x",
            "a[*][*]",
        ] {
            let policy = Policy {
                unordered_keys: vec![good.to_string()],
                ..Policy::default()
            };
            assert!(policy.validate().is_ok(), "{good}");
        }
        for (bad, hint) in [
            ("$.a.b", Some("a.b")),
            ("p[0].x", Some("p[*].x")),
            ("a[\"b\"]", Some("a.b")),
            ("odd key.x", Some("[\"odd key\"].x")),
            ("a..b", None),
            ("a.", None),
            ("a[x]", None),
            ("a[\"b\"", None),
        ] {
            let policy = Policy {
                unordered_keys: vec![bad.to_string()],
                ..Policy::default()
            };
            let err = policy.validate().unwrap_err().to_string();
            match hint {
                Some(hint) => assert!(err.contains(&format!("did you mean {hint:?}")), "{err}"),
                None => assert!(err.contains("is not a path"), "{err}"),
            }
        }
        // Bare names match a key at any depth and are never paths.
        let policy = Policy {
            unordered_keys: vec!["odd key".to_string()],
            ..Policy::default()
        };
        assert!(policy.validate().is_ok());
    }

    /// A call that cannot be read is an `error` call; the trajectory's other
    /// calls and turns are labelled as usual.
    #[test]
    fn unreadable_calls_are_error_calls() {
        let gold = vec![json!({"name": "get", "arguments": {"id": "a"}})];
        let good = json!({"name": "get", "arguments": {"id": "a"}});
        for bad in [
            json!({"arguments": {}}),
            json!({"name": null, "arguments": {}}),
            json!({"name": 3}),
            json!("get"),
            json!({"name": "get", "arguments": "not json"}),
            json!({"name": "get", "arguments": [1]}),
        ] {
            let labels = label_tiers(
                &[assistant(json!([bad.clone(), good.clone()]))],
                &gold,
                &kinds(),
                &Policy::default(),
            )
            .unwrap();
            assert_eq!(labels.call_tiers[0], vec![Tier::Error, Tier::Gold], "{bad}");
            assert_eq!(labels.matched_gold, vec![0], "{bad}");
        }
    }

    /// OpenAI-style tool results given as content parts are read as their
    /// text, so an `Error...` result in parts still makes the call `error`.
    #[test]
    fn tool_results_as_content_parts() {
        let call = json!([{"name": "get", "arguments": {"id": "a"}}]);
        for (content, tier) in [
            (
                json!([{"type": "text", "text": "Error: no such user"}]),
                Tier::Error,
            ),
            (
                json!([{"type": "text", "text": "  "}, {"type": "text", "text": "Error"}]),
                Tier::Error,
            ),
            (json!(["Error: plain string part"]), Tier::Error),
            (
                json!([{"type": "text", "text": "{\"name\": \"Mia\"}"}]),
                Tier::Read,
            ),
            (json!([]), Tier::Read),
            (json!({"text": "Error"}), Tier::Read),
        ] {
            let turns = [
                assistant(call.clone()),
                json!({"role": "tool", "content": content}),
            ];
            let labels = label_tiers(&turns, &[], &kinds(), &Policy::default()).unwrap();
            assert_eq!(labels.tiers[0], Some(tier), "{content}");
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |x| x.is_finite())
                .prop_map(Value::from),
            prop_oneof![
                Just("5".to_string()),
                Just(" 05 ".to_string()),
                Just("-0.10".to_string()),
                Just("".to_string()),
                Just("1e3".to_string()),
                Just("123456789012345678901234567890.5".to_string()),
                "[ a-zA-Z0-9.\\-ΣσİK]{0,6}",
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-c]{1,2}|tags", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (any::<bool>(), any::<bool>(), 0.0..=1.0f64).prop_map(|(case_fold, bag, soft)| Policy {
            case_fold,
            unordered_keys: if bag {
                vec!["tags".into(), "a[*]".into()]
            } else {
                vec![]
            },
            soft_max_fraction: soft,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn self_compare_is_exact(v in arb_json(), policy in arb_policy()) {
            let c = compare(&v, &v, &policy).unwrap();
            prop_assert_eq!(c.kind, MatchKind::Exact);
            prop_assert!(c.diffs.is_empty());
        }

        #[test]
        fn normalize_is_idempotent(v in arb_json(), policy in arb_policy()) {
            let once = normalize(&v, &policy).unwrap();
            let twice = normalize(&once, &policy).unwrap();
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(compare(&v, &once, &policy).unwrap().kind, MatchKind::Exact);
            prop_assert_eq!(compare(&once, &v, &policy).unwrap().kind, MatchKind::Exact);
        }

        #[test]
        fn never_panics(p in arb_json(), g in arb_json(), policy in arb_policy()) {
            let a = compare(&p, &g, &policy).unwrap();
            let b = compare(&g, &p, &policy).unwrap();
            // Exactness and the structural flag are symmetric.
            prop_assert_eq!(a.kind == MatchKind::Exact, b.kind == MatchKind::Exact);
            prop_assert_eq!(a.structural, b.structural);
            prop_assert_eq!(a.differing_leaves, b.differing_leaves);
        }
    }
}
