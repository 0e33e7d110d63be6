//! A lazy, validating scanner for one `turnrl.rollout/1` line.
//!
//! It reads the few fields the columns need and skips everything else
//! (contents, tool calls, all of `meta` but its `stop_reason`) without
//! building values, while still checking that the whole line is valid JSON
//! and valid UTF-8. Most strings
//! end within 32 bytes and are found with one SSE2 look; longer ones are
//! skipped 64 bytes at a time with bitmasks of quotes, backslashes, control
//! characters and bytes above 0x7F; the
//! bytes that backslashes escape are found without a branch per escape, so
//! escaped quotes and backslashes cost nothing extra. That matters for tool
//! results that are JSON text themselves (an escaped quote every few bytes):
//! on such a buffer it runs about half the instructions of looking at every
//! special byte in turn.
//!
//! Strictness follows RFC 8259 as serde_json applies it: no NaN/Infinity, no
//! control characters in strings, escapes `\" \\ \/ \b \f \n \r \t \uXXXX`,
//! nesting at most 128 deep. A known key given twice is an error.

use std::borrow::Cow;

use crate::advantages::MAX_REWARD;

pub(super) struct TurnHead<'a> {
    pub role: Cow<'a, str>,
    pub tier: Option<Cow<'a, str>>,
    pub reward: Option<f64>,
}

pub(super) struct RecordHead<'a> {
    pub schema: Cow<'a, str>,
    pub task_id: Cow<'a, str>,
    pub group: Cow<'a, str>,
    pub sample: i64,
    pub outcome: f64,
    pub turns: Vec<TurnHead<'a>>,
    /// `meta.stop_reason` when `meta` is an object and its `stop_reason` a
    /// string (the last of each, if a key is given twice, as in Python's
    /// `json`); `None` otherwise. Never makes a line bad: `meta` is checked
    /// only as JSON, as any other key the columns do not need.
    pub stop_reason: Option<Cow<'a, str>>,
}

const MAX_DEPTH: usize = 128;

type Scan<T> = std::result::Result<T, String>;

/// Reads a line's bytes without checking them as UTF-8 first: outside
/// strings it accepts only ASCII, and a string with a byte above 0x7F is
/// checked when it is skipped, so the line is valid UTF-8 exactly when the
/// scan succeeds (one pass over the bytes instead of two).
pub(super) struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
    /// False when `s` runs on past the line (a block read line by line in
    /// one pass): a newline then ends the record instead of being space.
    newline_is_space: bool,
}

/// Bitmasks of one 64-byte window: bit j says `chunk[j]` is a quote, a
/// backslash, a control character, or not ASCII.
struct Masks {
    quote: u64,
    backslash: u64,
    control: u64,
    high: u64,
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks64(chunk: &[u8; 64]) -> Masks {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline; the four unaligned
    // 16-byte loads stay inside the 64-byte array.
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let control_max = _mm_set1_epi8(0x1F);
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            control: 0,
            high: 0,
        };
        for j in 0..4 {
            let v = _mm_loadu_si128(chunk.as_ptr().add(16 * j) as *const __m128i);
            let bits = |x: __m128i| ((_mm_movemask_epi8(x) as u32 & 0xFFFF) as u64) << (16 * j);
            m.high |= bits(v);
            m.quote |= bits(_mm_cmpeq_epi8(v, quote));
            m.backslash |= bits(_mm_cmpeq_epi8(v, backslash));
            // v <= 0x1F (unsigned) exactly when min(v, 0x1F) == v.
            m.control |= bits(_mm_cmpeq_epi8(_mm_min_epu8(v, control_max), v));
        }
        m
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn masks64(chunk: &[u8; 64]) -> Masks {
    let mut m = Masks {
        quote: 0,
        backslash: 0,
        control: 0,
        high: 0,
    };
    for (j, &b) in chunk.iter().enumerate() {
        m.high |= ((b >= 0x80) as u64) << j;
        m.quote |= ((b == b'"') as u64) << j;
        m.backslash |= ((b == b'\\') as u64) << j;
        m.control |= ((b < 0x20) as u64) << j;
    }
    m
}

/// [`masks64`] in one 64-byte register: a compare gives the bitmask directly.
///
/// # Safety
/// The CPU must support AVX-512BW; only called from functions compiled for it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn masks64_avx512(chunk: &[u8; 64]) -> Masks {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX-512BW; the load reads exactly the
    // 64-byte array.
    unsafe {
        let v = _mm512_loadu_si512(chunk.as_ptr() as *const __m512i);
        Masks {
            quote: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'"' as i8)),
            backslash: _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(b'\\' as i8)),
            control: _mm512_cmple_epu8_mask(v, _mm512_set1_epi8(0x1F)),
            high: _mm512_movepi8_mask(v),
        }
    }
}

/// [`masks64`] in two 32-byte registers.
///
/// # Safety
/// The CPU must support AVX2; only called from functions compiled for it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn masks64_avx2(chunk: &[u8; 64]) -> Masks {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX2; the two loads stay inside the
    // 64-byte array.
    unsafe {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let control_max = _mm256_set1_epi8(0x1F);
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            control: 0,
            high: 0,
        };
        for j in 0..2 {
            let v = _mm256_loadu_si256(chunk.as_ptr().add(32 * j) as *const __m256i);
            let bits = |x: __m256i| (_mm256_movemask_epi8(x) as u32 as u64) << (32 * j);
            m.high |= bits(v);
            m.quote |= bits(_mm256_cmpeq_epi8(v, quote));
            m.backslash |= bits(_mm256_cmpeq_epi8(v, backslash));
            m.control |= bits(_mm256_cmpeq_epi8(_mm256_min_epu8(v, control_max), v));
        }
        m
    }
}

/// With `at` just past an opening quote: just past the closing quote when
/// it lies in the next 32 bytes with only printable ASCII other than a
/// backslash before it; `None` sends the string down the full path.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn short_string_end(s: &[u8], at: usize) -> Option<usize> {
    use std::arch::x86_64::*;
    let window: &[u8; 32] = s.get(at..at.checked_add(32)?)?.try_into().ok()?;
    // SAFETY: SSE2 is part of the x86_64 baseline; the two loads read
    // exactly the 32-byte array.
    let (quote, special) = unsafe {
        let mut quote = 0u32;
        let mut special = 0u32;
        for half in 0..2 {
            let v = _mm_loadu_si128(window.as_ptr().add(16 * half) as *const __m128i);
            let q = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            // v <= 0x1F (unsigned) exactly when min(v, 0x1F) == v.
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1F)), v);
            quote |= (_mm_movemask_epi8(q) as u32) << (16 * half);
            // The sign bit marks the bytes above 0x7F.
            let special_here = _mm_or_si128(_mm_or_si128(backslash, control), v);
            special |= (_mm_movemask_epi8(special_here) as u32) << (16 * half);
        }
        (quote, special)
    };
    if quote == 0 {
        return None;
    }
    let first = quote.trailing_zeros();
    (special & ((1u32 << first) - 1) == 0).then_some(at + first as usize + 1)
}

/// Checks the string `s[start..end]` as UTF-8 when it has a byte above 0x7F.
#[inline(always)]
fn check_utf8(s: &[u8], start: usize, end: usize, non_ascii: bool) -> Scan<()> {
    if !non_ascii {
        return Ok(());
    }
    std::str::from_utf8(&s[start..end])
        .map(|_| ())
        .map_err(|e| format!("not valid UTF-8 (byte {})", start + e.valid_up_to()))
}

/// Bits of the bytes that a backslash escapes, i.e. that follow an odd run
/// of backslashes. `carry` comes in as 1 when the window's first byte is
/// escaped by the previous window and goes out the same way for the next.
///
/// Runs starting on an odd bit are found with a carry-propagating add: adding
/// a run's start bit to the run carries past its end, and whether the bit
/// after the run flips depends on the parity of the run's start and length.
#[inline]
fn escaped_bits(backslash: u64, carry: &mut u64) -> u64 {
    const EVEN: u64 = 0x5555_5555_5555_5555;
    // A backslash that is itself escaped escapes nothing.
    let backslash = backslash & !*carry;
    let follows_backslash = (backslash << 1) | *carry;
    let odd_starts = backslash & !EVEN & !follows_backslash;
    let (even_sequences, overflow) = odd_starts.overflowing_add(backslash);
    *carry = overflow as u64;
    let invert = even_sequences << 1;
    (EVEN ^ invert) & follows_backslash
}

impl<'a> Cursor<'a> {
    pub(super) fn new(line: &'a [u8]) -> Self {
        Cursor {
            s: line,
            i: 0,
            newline_is_space: true,
        }
    }

    /// A cursor at the start of a line within `rest`, which runs on to the
    /// end of the block.
    pub(super) fn at_line_start(rest: &'a [u8]) -> Self {
        Cursor {
            s: rest,
            i: 0,
            newline_is_space: false,
        }
    }

    /// `s[from..to]` as text, for ranges this scanner has read: ASCII
    /// outside strings, and strings checked by [`Cursor::skip_string`].
    fn text(&self, from: usize, to: usize) -> &'a str {
        let bytes = &self.s[from..to];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: the scanner accepts only ASCII outside strings and checks
        // every string holding a byte above 0x7F with `from_utf8` (see
        // `skip_string_with`), so a range it has read is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r') => self.i += 1,
                Some(b'\n') if self.newline_is_space => self.i += 1,
                _ => return,
            }
        }
    }

    /// A syntax error at the cursor (or a truncation when the line ended).
    fn syntax(&self, what: &str) -> String {
        if self.i >= self.s.len() {
            format!("truncated JSON: the line ends inside a value ({what})")
        } else {
            format!("invalid JSON at byte {}: {what}", self.i)
        }
    }

    fn expect(&mut self, byte: u8, what: &str) -> Scan<()> {
        self.ws();
        if self.peek() == Some(byte) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.syntax(what))
        }
    }

    /// Length of the escape sequence starting with the backslash at `at`.
    #[inline(always)]
    fn escape_len(&self, at: usize) -> Scan<usize> {
        match self.s.get(at + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(2),
            Some(b'u') => match self.s.get(at + 2..at + 6) {
                Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => Ok(6),
                Some(_) => Err(format!("invalid JSON at byte {at}: bad \\u escape")),
                None => Err("truncated JSON: the line ends inside a string".into()),
            },
            Some(_) => Err(format!("invalid JSON at byte {at}: bad escape")),
            None => Err("truncated JSON: the line ends inside a string".into()),
        }
    }

    /// With the cursor just past an opening quote: moves past the closing
    /// quote and tells whether the string holds escapes.
    ///
    /// Keys and most values are short: one 32-byte look, inlined in the
    /// caller, finds where they end (a rollout line has hundreds of them).
    /// Long strings (tool results, contents) are most of a buffer's bytes, so
    /// their window masks use the widest vectors the CPU has.
    #[inline(always)]
    fn skip_string(&mut self) -> Scan<bool> {
        #[cfg(target_arch = "x86_64")]
        if let Some(end) = short_string_end(self.s, self.i) {
            self.i = end;
            return Ok(false);
        }
        self.skip_long_string()
    }

    #[inline(never)]
    fn skip_long_string(&mut self) -> Scan<bool> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: the CPU supports AVX-512BW, checked just above.
                return unsafe { self.skip_string_avx512() };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { self.skip_string_avx2() };
            }
        }
        self.skip_string_with(masks64)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn skip_string_avx512(&mut self) -> Scan<bool> {
        // SAFETY: this function only runs on CPUs with AVX-512BW.
        self.skip_string_with(|chunk| unsafe { masks64_avx512(chunk) })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn skip_string_avx2(&mut self) -> Scan<bool> {
        // SAFETY: this function only runs on CPUs with AVX2.
        self.skip_string_with(|chunk| unsafe { masks64_avx2(chunk) })
    }

    #[inline(always)]
    fn skip_string_with(&mut self, masks64: impl Fn(&[u8; 64]) -> Masks) -> Scan<bool> {
        let s = self.s;
        let start = self.i;
        let mut i = start;
        let mut escaped = false;
        let mut high = 0u64;
        let mut carry = 0u64;
        while let Some(chunk) = s.get(i..i + 64) {
            let chunk: &[u8; 64] = chunk.try_into().map_err(|_| self.syntax("string"))?;
            let m = masks64(chunk);
            let escaped_here = escaped_bits(m.backslash, &mut carry);
            let quotes = m.quote & !escaped_here;
            // Bytes of this window that belong to the string.
            let inside = match quotes {
                0 => u64::MAX,
                q => (1u64 << q.trailing_zeros()) - 1,
            };
            let control = m.control & inside;
            if control != 0 {
                return Err(format!(
                    "invalid JSON at byte {}: control character in a string",
                    i + control.trailing_zeros() as usize
                ));
            }
            high |= m.high & inside;
            let escapes_here = escaped_here & inside;
            escaped |= escapes_here != 0;
            // Escaped quotes and backslashes are valid; only the other
            // escaped bytes (rare: \n, \t, \uXXXX, ...) need a look.
            let mut escapes = escapes_here & !(m.quote | m.backslash);
            while escapes != 0 {
                let k = escapes.trailing_zeros() as usize;
                match chunk[k] {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => match s.get(i + k + 1..i + k + 5) {
                        Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => {}
                        Some(_) => {
                            return Err(format!("invalid JSON at byte {}: bad \\u escape", i + k))
                        }
                        None => return Err("truncated JSON: the line ends inside a string".into()),
                    },
                    _ => return Err(format!("invalid JSON at byte {}: bad escape", i + k - 1)),
                }
                escapes &= escapes - 1;
            }
            if quotes != 0 {
                let end = i + quotes.trailing_zeros() as usize;
                self.i = end + 1;
                return check_utf8(s, start, end, high != 0).map(|()| escaped);
            }
            i += 64;
        }
        if carry != 0 {
            // The last window ended in a backslash that escapes byte i.
            escaped = true;
            i = i - 1 + self.escape_len(i - 1)?;
        }
        while let Some(&b) = s.get(i) {
            match b {
                b'"' => {
                    self.i = i + 1;
                    return check_utf8(s, start, i, high != 0).map(|()| escaped);
                }
                b'\\' => {
                    escaped = true;
                    i += self.escape_len(i)?;
                }
                0..=0x1F => {
                    return Err(format!(
                        "invalid JSON at byte {i}: control character in a string"
                    ))
                }
                0x80.. => {
                    high = 1;
                    i += 1;
                }
                _ => i += 1,
            }
        }
        self.i = s.len();
        Err("truncated JSON: the line ends inside a string".into())
    }

    /// A string value, borrowed from the line unless it has escapes.
    fn string(&mut self, field: &dyn Fn() -> String) -> Scan<Cow<'a, str>> {
        self.ws();
        if self.peek() != Some(b'"') {
            return Err(self.type_error(field, "a string"));
        }
        let start = self.i;
        self.i += 1;
        let escaped = self.skip_string()?;
        if !escaped {
            return Ok(Cow::Borrowed(self.text(start + 1, self.i - 1)));
        }
        // Rare for the fields read here; serde_json decodes the escapes
        // (surrogate pairs included).
        serde_json::from_str::<String>(self.text(start, self.i))
            .map(Cow::Owned)
            .map_err(|e| format!("invalid JSON at byte {start}: {e}"))
    }

    /// The type error for a field, or the syntax error if what sits there is
    /// not JSON at all.
    fn type_error(&mut self, field: &dyn Fn() -> String, expected: &str) -> String {
        let at = self.i;
        match self.skip_value(1) {
            Err(e) => e,
            Ok(()) => {
                let mut end = self.i.min(at + 40);
                // Back to a character boundary (not a continuation byte).
                while end > at && end < self.s.len() && (self.s[end] as i8) < -0x40 {
                    end -= 1;
                }
                format!(
                    "bad record: {}: expected {expected}, got {}",
                    field(),
                    self.text(at, end)
                )
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Scan<()> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else if word.starts_with(&self.s[self.i..]) {
            self.i = self.s.len();
            Err(self.syntax("literal"))
        } else {
            Err(self.syntax("expected a value"))
        }
    }

    /// Validates a number and returns its text.
    fn number(&mut self) -> Scan<&'a str> {
        let s = self.s;
        let start = self.i;
        let mut i = start;
        let digits = |i: &mut usize| {
            let from = *i;
            while s.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > from
        };
        if s.get(i) == Some(&b'-') {
            i += 1;
        }
        match s.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => {
                self.i = i;
                return Err(self.syntax("bad number"));
            }
        }
        if s.get(i) == Some(&b'.') {
            i += 1;
            if !digits(&mut i) {
                self.i = i;
                return Err(self.syntax("bad number"));
            }
        }
        if let Some(b'e' | b'E') = s.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = s.get(i) {
                i += 1;
            }
            if !digits(&mut i) {
                self.i = i;
                return Err(self.syntax("bad number"));
            }
        }
        self.i = i;
        Ok(self.text(start, i))
    }

    fn is_number_start(&self) -> bool {
        matches!(self.peek(), Some(b'-' | b'0'..=b'9'))
    }

    fn float(&mut self, field: &dyn Fn() -> String) -> Scan<f64> {
        self.ws();
        if !self.is_number_start() {
            return Err(self.type_error(field, "a number"));
        }
        let text = self.number()?;
        // Beyond MAX_REWARD the estimators' sums of squares overflow: such a
        // line is skipped here, with its file and line, not refused later
        // for the whole buffer at an index into the merged columns.
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v.abs() <= MAX_REWARD => Ok(v),
            _ => Err(format!(
                "bad record: {}: number out of range (at most {MAX_REWARD:e} in size)",
                field()
            )),
        }
    }

    fn nullable<T>(&mut self, value: impl FnOnce(&mut Self) -> Scan<T>) -> Scan<Option<T>> {
        self.ws();
        if self.peek() == Some(b'n') {
            return self.literal(b"null").map(|_| None);
        }
        value(self).map(Some)
    }

    fn integer(&mut self, field: &dyn Fn() -> String) -> Scan<i64> {
        self.ws();
        if !self.is_number_start() {
            return Err(self.type_error(field, "an integer"));
        }
        let text = self.number()?;
        if text.contains(['.', 'e', 'E']) {
            return Err(format!(
                "bad record: {}: expected an integer, got {text}",
                field()
            ));
        }
        text.parse::<i64>()
            .map_err(|_| format!("bad record: {}: integer out of range", field()))
    }

    /// Skips one JSON value, checking it.
    fn skip_value(&mut self, depth: usize) -> Scan<()> {
        self.ws();
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                self.skip_string().map(|_| ())
            }
            Some(open @ (b'{' | b'[')) => {
                if depth > MAX_DEPTH {
                    return Err(self.syntax("nesting deeper than 128"));
                }
                self.i += 1;
                let close = if open == b'{' { b'}' } else { b']' };
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        self.expect(b'"', "expected a key")?;
                        self.skip_string()?;
                        self.expect(b':', "expected ':'")?;
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b) if b == close => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(self.syntax("expected ',' or a closing bracket")),
                    }
                }
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| ()),
            _ => Err(self.syntax("expected a value")),
        }
    }

    /// Iterates the members of an object, handing each key to `member`
    /// with the cursor on the value.
    fn object(
        &mut self,
        what: &dyn Fn() -> String,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Scan<()>,
    ) -> Scan<()> {
        self.ws();
        if self.peek() != Some(b'{') {
            return Err(self.type_error(what, "an object"));
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.syntax("expected a key"));
            }
            let key = self.string(&|| "key".to_string())?;
            self.expect(b':', "expected ':'")?;
            member(self, key)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.syntax("expected ',' or '}'")),
            }
        }
    }

    fn turn(&mut self, k: usize) -> Scan<TurnHead<'a>> {
        let (mut role, mut tier, mut reward) = (None, None, None);
        let here = || format!("turns[{k}]");
        self.object(&here, |c, key| {
            let name = || format!("turns[{k}].{key}");
            match key.as_ref() {
                "role" => put(&mut role, c.string(&name)?, &name),
                "tier" => put(&mut tier, c.nullable(|c| c.string(&name))?, &name),
                "reward" => put(&mut reward, c.nullable(|c| c.float(&name))?, &name),
                _ => c.skip_value(2),
            }
        })?;
        Ok(TurnHead {
            role: role.ok_or_else(|| format!("bad record: turns[{k}]: missing field `role`"))?,
            tier: tier.flatten(),
            reward: reward.flatten(),
        })
    }

    fn turns(&mut self) -> Scan<Vec<TurnHead<'a>>> {
        self.ws();
        if self.peek() != Some(b'[') {
            return Err(self.type_error(&|| "turns".into(), "a list"));
        }
        self.i += 1;
        let mut out = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            out.push(self.turn(out.len())?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => return Err(self.syntax("expected ',' or ']'")),
            }
        }
    }

    /// Reads a whole line as a record head.
    pub(super) fn record(mut self) -> Scan<RecordHead<'a>> {
        let head = self.record_fields()?;
        self.ws();
        if self.i < self.s.len() {
            return Err(self.syntax("trailing characters after the record"));
        }
        Ok(head)
    }

    /// The line at the start of the block rest this cursor reads: `Some` with
    /// its record head (`None` for a blank line) and the line's length, when
    /// the line is a record that ends where the line ends; `None` when the
    /// caller must find the line's end and read it on its own (a bad line,
    /// whose error message is written from the line alone).
    pub(super) fn line_in_block(mut self) -> Option<(Option<RecordHead<'a>>, usize)> {
        self.ws();
        if matches!(self.peek(), None | Some(b'\n')) {
            return Some((None, self.i));
        }
        let head = self.record_fields().ok()?;
        self.ws();
        matches!(self.peek(), None | Some(b'\n')).then_some((Some(head), self.i))
    }

    fn record_fields(&mut self) -> Scan<RecordHead<'a>> {
        let (mut schema, mut task_id, mut group) = (None, None, None);
        let (mut sample, mut outcome, mut turns) = (None, None, None);
        let mut stop_reason = None;
        self.object(&|| "the line".into(), |c, key| {
            let name = || key.to_string();
            match key.as_ref() {
                "schema" => put(&mut schema, c.string(&name)?, &name),
                "task_id" => put(&mut task_id, c.string(&name)?, &name),
                "group" => put(&mut group, c.string(&name)?, &name),
                "sample" => put(&mut sample, c.integer(&name)?, &name),
                "outcome" => put(&mut outcome, c.float(&name)?, &name),
                "turns" => put(&mut turns, c.turns()?, &name),
                "meta" => {
                    stop_reason = c.meta_stop_reason()?;
                    Ok(())
                }
                _ => c.skip_value(1),
            }
        })?;
        let missing = |f: &str| format!("bad record: missing field `{f}`");
        Ok(RecordHead {
            schema: schema.ok_or_else(|| missing("schema"))?,
            task_id: task_id.ok_or_else(|| missing("task_id"))?,
            group: group.ok_or_else(|| missing("group"))?,
            sample: sample.ok_or_else(|| missing("sample"))?,
            outcome: outcome.ok_or_else(|| missing("outcome"))?,
            turns: turns.ok_or_else(|| missing("turns"))?,
            stop_reason,
        })
    }

    /// Skips the record's `meta` exactly as `skip_value(1)` does (the same
    /// checks in the same order, so the same lines pass with the same
    /// errors) and returns its `stop_reason` when `meta` is an object and
    /// that member a string; the last member of that name counts. Keys are
    /// compared decoded, so an escaped `stop_reason` key is that key.
    #[inline(never)]
    fn meta_stop_reason(&mut self) -> Scan<Option<Cow<'a, str>>> {
        self.ws();
        if self.peek() != Some(b'{') {
            return self.skip_value(1).map(|()| None);
        }
        // Depth 1: within MAX_DEPTH, as skip_value(1) finds.
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(None);
        }
        let mut found = None;
        loop {
            self.expect(b'"', "expected a key")?;
            let key = self.i;
            let escaped = self.skip_string()?;
            let is_stop = self.decoded_is(key, escaped, "stop_reason");
            self.expect(b':', "expected ':'")?;
            if is_stop {
                self.ws();
                found = if self.peek() == Some(b'"') {
                    self.i += 1;
                    let start = self.i;
                    let escaped = self.skip_string()?;
                    Some(self.decoded(start, escaped))
                } else {
                    self.skip_value(2)?;
                    None
                };
            } else {
                self.skip_value(2)?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(found);
                }
                _ => return Err(self.syntax("expected ',' or a closing bracket")),
            }
        }
    }

    /// Whether the string skipped from `start` (just past its opening
    /// quote) to the cursor (just past its closing quote) decodes to `want`.
    fn decoded_is(&self, start: usize, escaped: bool, want: &str) -> bool {
        let raw = &self.s[start..self.i - 1];
        if !escaped {
            return raw == want.as_bytes();
        }
        raw.len() >= want.len() && self.decoded(start, true) == want
    }

    /// The string skipped from `start` (just past its opening quote) to the
    /// cursor (just past its closing quote), decoded. Unlike
    /// [`Cursor::string`] it never fails: the scan has checked the string,
    /// and a lone surrogate escape (which serde_json refuses to decode, and
    /// Python's `json` keeps) becomes U+FFFD.
    fn decoded(&self, start: usize, escaped: bool) -> Cow<'a, str> {
        let text = self.text(start, self.i - 1);
        if !escaped {
            return Cow::Borrowed(text);
        }
        match serde_json::from_str::<String>(self.text(start - 1, self.i)) {
            Ok(s) => Cow::Owned(s),
            Err(_) => Cow::Owned(unescape_lossy(text)),
        }
    }

    /// Checks that the whole text is one JSON value (for tests).
    #[cfg(test)]
    pub(super) fn validate_value(mut self) -> Scan<()> {
        self.skip_value(1)?;
        self.ws();
        if self.i < self.s.len() {
            return Err(self.syntax("trailing characters"));
        }
        Ok(())
    }
}

/// The text of a JSON string (between its quotes, its escapes checked by
/// the scan) decoded, with U+FFFD for each escaped surrogate that is not
/// half of a pair.
fn unescape_lossy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    let hex = |chars: &mut std::str::Chars<'_>| -> Option<u32> {
        let digits: String = chars.by_ref().take(4).collect();
        u32::from_str_radix(&digits, 16).ok()
    };
    let mut pending_high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != '\\' {
            if pending_high.take().is_some() {
                out.push('\u{fffd}');
            }
            out.push(c);
            continue;
        }
        let e = chars.next().unwrap_or('\\');
        if e != 'u' {
            if pending_high.take().is_some() {
                out.push('\u{fffd}');
            }
            out.push(match e {
                'b' => '\u{8}',
                'f' => '\u{c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                other => other, // '"', '\\', '/'
            });
            continue;
        }
        let unit = hex(&mut chars).unwrap_or(0xFFFD);
        match (pending_high.take(), unit) {
            (Some(high), 0xDC00..=0xDFFF) => {
                let code = 0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00);
                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
            }
            (high, 0xD800..=0xDBFF) => {
                if high.is_some() {
                    out.push('\u{fffd}');
                }
                pending_high = Some(unit);
            }
            (high, _) => {
                if high.is_some() {
                    out.push('\u{fffd}');
                }
                out.push(char::from_u32(unit).unwrap_or('\u{fffd}'));
            }
        }
    }
    if pending_high.is_some() {
        out.push('\u{fffd}');
    }
    out
}

fn put<T>(slot: &mut Option<T>, value: T, name: &dyn Fn() -> String) -> Scan<()> {
    if slot.is_some() {
        return Err(format!("bad record: {}: duplicate field", name()));
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    fn ours_accepts(text: &str) -> bool {
        Cursor::new(text.as_bytes()).validate_value().is_ok()
    }

    /// serde_json decodes every string into a `String`, so it rejects bytes
    /// that are not UTF-8 wherever they are.
    fn serde_accepts_bytes(bytes: &[u8]) -> bool {
        serde_json::from_slice::<Value>(bytes).is_ok()
    }

    fn ours_accept_bytes(bytes: &[u8]) -> bool {
        Cursor::new(bytes).validate_value().is_ok()
    }

    fn bytes_from_alphabet(
        alphabet: &'static [&'static [u8]],
        max: usize,
    ) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(alphabet), 0..max)
            .prop_map(|v| v.concat())
    }

    // Valid sequences of every length, and the ways UTF-8 goes wrong: a lone
    // lead or continuation byte, a truncated sequence, an overlong form, an
    // encoded surrogate, a byte that never occurs.
    const UTF8_PARTS: &[&[u8]] = &[
        b"a",
        b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        b"\\\"",
        b"\\n",
        "é".as_bytes(),
        "✈".as_bytes(),
        "😀".as_bytes(),
        b"\xc3",
        b"\xa9",
        b"\xe2\x9c",
        b"\xf0\x9f\x98",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xff",
    ];
    const UTF8_VALUE_PARTS: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b"\"",
        b"\"k\"",
        b" ",
        b"1",
        b"null",
        "é".as_bytes(),
        b"\xa9",
        b"\xff",
        b"\xc3",
        b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ];

    fn from_alphabet(
        alphabet: &'static [&'static str],
        max: usize,
    ) -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(alphabet), 0..max)
            .prop_map(|v| v.concat())
    }

    // No 'd' or '8' among the hex digits: serde_json rejects lone surrogates
    // when it decodes, which this scanner (like Python's json) does not check.
    const STRING_PARTS: &[&str] = &[
        "a",
        "b",
        " ",
        "\"",
        "\\",
        "\\\"",
        "\\\\",
        "u",
        "0",
        "1",
        "F",
        "n",
        "/",
        "\u{1f}",
        "\t",
        "é",
        "✈",
        "xxxxxxxxxxxxxxxx",
        "\\u00e9",
    ];
    const VALUE_PARTS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\"k\"",
        "\\",
        " ",
        "true",
        "fals",
        "null",
        "0",
        "-",
        "1",
        "2.5",
        ".",
        "e",
        "E",
        "+",
        "é",
        "\"x\\\"y\"",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn utf8_in_strings_agrees_with_serde(body in bytes_from_alphabet(UTF8_PARTS, 40)) {
            let text = [&b"\""[..], &body, b"\""].concat();
            prop_assert_eq!(ours_accept_bytes(&text), serde_accepts_bytes(&text), "{:?}", text);
        }

        #[test]
        fn utf8_anywhere_agrees_with_serde(text in bytes_from_alphabet(UTF8_VALUE_PARTS, 40)) {
            prop_assert_eq!(ours_accept_bytes(&text), serde_accepts_bytes(&text), "{:?}", text);
        }

        #[test]
        fn strings_agree_with_serde(body in from_alphabet(STRING_PARTS, 120)) {
            let text = format!("\"{body}\"");
            prop_assert_eq!(ours_accepts(&text), serde_accepts(&text), "{:?}", text);
        }

        #[test]
        fn values_agree_with_serde(text in from_alphabet(VALUE_PARTS, 40)) {
            prop_assert_eq!(ours_accepts(&text), serde_accepts(&text), "{:?}", text);
        }

        #[test]
        fn numbers_agree_with_serde(text in from_alphabet(&["-", "+", "0", "1", "9", ".", "e", "E"], 8)) {
            prop_assert_eq!(ours_accepts(&text), serde_accepts(&text), "{:?}", text);
        }
    }

    #[test]
    fn escapes_across_window_edges() {
        for pad in 0..140 {
            for tail in ["\\\"", "\\\\", "\\u00e9", "\\n", "\\x", "\\u12", "\u{1}"] {
                let text = format!("\"{}{tail}end\"", "a".repeat(pad));
                assert_eq!(ours_accepts(&text), serde_accepts(&text), "{text:?}");
            }
        }
    }

    #[test]
    fn backslash_runs_across_window_edges() {
        for pad in 0..140 {
            for run in 1..7 {
                for after in ["\"", "\"x\"", "n\"", "u00e9\"", "x\""] {
                    let text = format!("\"{}{}{after}", "a".repeat(pad), "\\".repeat(run));
                    assert_eq!(ours_accepts(&text), serde_accepts(&text), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn reads_fields_with_escapes_and_unicode() {
        let line = r#"{"schema":"turnrl.rollout/1","t\u0061sk_id":"a\"b","group":"✈","sample":-2,"outcome":1e-3,"turns":[{"role":"assistant","tier":null,"reward":null},{"role":"tool","content":"x"}]}"#;
        let head = Cursor::new(line.as_bytes()).record().unwrap();
        assert_eq!(head.task_id, "a\"b");
        assert_eq!(head.group, "✈");
        assert_eq!((head.sample, head.outcome), (-2, 1e-3));
        assert_eq!(head.turns.len(), 2);
        assert!(head.turns[0].tier.is_none() && head.turns[0].reward.is_none());
    }
}

#[cfg(test)]
mod escape_tests {
    use super::{escaped_bits, masks64, Masks};
    #[cfg(target_arch = "x86_64")]
    use super::{masks64_avx2, masks64_avx512};
    use proptest::prelude::*;

    /// One byte at a time: a byte is escaped when the byte before it is an
    /// unescaped backslash.
    fn escaped_naive(backslash: u64, carry_in: u64) -> (u64, u64) {
        let mut escaped = 0u64;
        let mut next_escaped = carry_in == 1;
        for j in 0..64 {
            if next_escaped {
                escaped |= 1 << j;
                next_escaped = false;
            } else {
                next_escaped = backslash >> j & 1 == 1;
            }
        }
        (escaped, next_escaped as u64)
    }

    /// (quote, backslash, control, high) bits of one window.
    type MaskBits = (u64, u64, u64, u64);

    fn masks_naive(chunk: &[u8; 64]) -> MaskBits {
        let bits = |f: &dyn Fn(u8) -> bool| {
            chunk
                .iter()
                .enumerate()
                .fold(0u64, |acc, (j, &b)| acc | ((f(b) as u64) << j))
        };
        (
            bits(&|b| b == b'"'),
            bits(&|b| b == b'\\'),
            bits(&|b| b < 0x20),
            bits(&|b| b >= 0x80),
        )
    }

    /// Every mask width the CPU supports, as (quote, backslash, control, high).
    fn masks_every_width(chunk: &[u8; 64]) -> Vec<(&'static str, MaskBits)> {
        let all_masks = |m: Masks| (m.quote, m.backslash, m.control, m.high);
        #[allow(unused_mut)]
        let mut out = vec![("baseline", all_masks(masks64(chunk)))];
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            fn avx2(chunk: &[u8; 64]) -> Masks {
                // SAFETY: compiled for AVX2 and called only when detected.
                unsafe { masks64_avx2(chunk) }
            }
            #[target_feature(enable = "avx512f,avx512bw")]
            fn avx512(chunk: &[u8; 64]) -> Masks {
                // SAFETY: compiled for AVX-512BW and called only when detected.
                unsafe { masks64_avx512(chunk) }
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 detected just above.
                out.push(("avx2", all_masks(unsafe { avx2(chunk) })));
            }
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: AVX-512BW detected just above.
                out.push(("avx512", all_masks(unsafe { avx512(chunk) })));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn every_mask_width_matches_bytewise(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'"'), Just(b'\\'), Just(0x1Fu8), Just(0x20u8), Just(0x7Fu8), Just(0x80u8), any::<u8>()],
                64,
            ),
        ) {
            let chunk: [u8; 64] = bytes.try_into().unwrap();
            let want = masks_naive(&chunk);
            for (width, got) in masks_every_width(&chunk) {
                prop_assert_eq!(got, want, "{} masks differ for {:?}", width, chunk);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20000))]
        #[test]
        fn branchless_escapes_match_naive(backslash in any::<u64>(), dense in any::<u64>(), carry in 0u64..2) {
            // `dense` makes long runs of backslashes common.
            for bs in [backslash, backslash | dense, !backslash & dense, u64::MAX, 0] {
                let mut c = carry;
                let got = escaped_bits(bs, &mut c);
                prop_assert_eq!((got, c), escaped_naive(bs, carry), "bs={:064b} carry={}", bs, carry);
            }
        }
    }
}

#[cfg(test)]
mod unescape_tests {
    use super::unescape_lossy;
    use proptest::prelude::*;

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        assert_eq!(unescape_lossy(r"a\ud800b"), "a\u{fffd}b");
        assert_eq!(unescape_lossy(r"\udc00"), "\u{fffd}");
        assert_eq!(unescape_lossy(r"\ud800\ud800\udc00"), "\u{fffd}\u{10000}");
        assert_eq!(unescape_lossy(r"\ud83d\ude00\ud83d"), "😀\u{fffd}");
        assert_eq!(unescape_lossy(r"\ud83d\n"), "\u{fffd}\n");
        assert_eq!(
            unescape_lossy(r#"\"\\\/\b\f\n\r\t\u00e9é"#),
            "\"\\/\u{8}\u{c}\n\r\té\u{e9}"
        );
    }

    const PARTS: &[&str] = &[
        "a",
        "é",
        "✈",
        r"\n",
        r"\t",
        r#"\""#,
        r"\\",
        r"\/",
        r"\b",
        r"\f",
        r"\r",
        r"\u0041",
        r"\u00e9",
        r"\u2708",
        r"\ud83d\ude00",
        r"\uDBFF\uDFFF",
        " ",
    ];

    proptest! {
        // Where serde_json decodes (no lone surrogate), the two agree.
        #[test]
        fn agrees_with_serde_json(parts in proptest::collection::vec(proptest::sample::select(PARTS), 0..20)) {
            let body = parts.concat();
            let want: String = serde_json::from_str(&format!("\"{body}\"")).unwrap();
            prop_assert_eq!(unescape_lossy(&body), want);
        }
    }
}
