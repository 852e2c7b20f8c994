//! Python's JSON: the values `json.loads` accepts and the text `json.dumps` writes.
//!
//! fedora-messaging reads bodies with Python's `json`, which accepts more than RFC 8259 and
//! keeps what it reads exactly: `NaN`, `Infinity` and `-Infinity`; numbers that overflow a
//! double (`1e400` is infinity); integers of any size (`123456789012345678901234567890` stays
//! that integer); strings holding lone UTF-16 surrogates (`"\ud800"`). A consumer that dropped
//! such a body as invalid, or changed a big integer into a float, would not be a drop-in
//! (issue 17). So fm's message bodies are this crate's [`Json`], not `serde_json::Value`: every
//! path (the record line plugins, commands, workers and the Python shim get; `fm record`;
//! `fm publish`) carries them byte-faithfully.
//!
//! Python's limits are kept too: an integer of more than 4,300 digits is refused (its
//! `int_max_str_digits`), and nesting is bounded ([`MAX_DEPTH`]; Python's recursion limit is
//! about 1,000), which also bounds this parser's stack. Strings are kept as WTF-8 — UTF-8 that
//! may also encode surrogate code points — so a lone surrogate survives to the output, where it
//! is always written escaped (`\ud800`: Python would write it raw only to fail encoding it).

use std::collections::HashMap;
use std::fmt::{self, Write as _};

use serde_json::Value;

/// The deepest nesting accepted (arrays and objects), below Python's recursion limit.
pub const MAX_DEPTH: usize = 500;

/// The longest integer Python's `int()` converts (`sys.int_info.str_digits_check_threshold`'s
/// default limit, 4,300 digits).
const MAX_INT_DIGITS: usize = 4300;

/// A JSON value as Python's `json` module holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// An integer, as its decimal digits (with a leading `-` when negative): Python's ints have
    /// no size limit.
    Int(String),
    /// A float, NaN and the infinities included.
    Float(f64),
    Str(PyStr),
    Array(Vec<Json>),
    /// Keys in the order first seen; a repeated key keeps its first place and its last value,
    /// as a Python dict built by `json.loads` does.
    Object(Vec<(PyStr, Json)>),
}

/// A Python `str`: text that may hold lone surrogates, kept as WTF-8.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PyStr(Vec<u8>);

impl PyStr {
    /// The text, unless it holds a lone surrogate.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    fn push(&mut self, code: u32) {
        match char::from_u32(code) {
            Some(c) => self
                .0
                .extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            // A surrogate: UTF-8's three-byte form, which is what makes this WTF-8.
            None => self.0.extend_from_slice(&[
                0xe0 | (code >> 12) as u8,
                0x80 | ((code >> 6) & 0x3f) as u8,
                0x80 | (code & 0x3f) as u8,
            ]),
        }
    }
}

impl From<&str> for PyStr {
    fn from(s: &str) -> PyStr {
        PyStr(s.as_bytes().to_vec())
    }
}

impl fmt::Debug for PyStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        write_str(&mut out, self, true);
        f.write_str(&out)
    }
}

/// Why a text is not JSON (as Python's `json` reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// What is wrong, in serde_json's words where it has them ("EOF while parsing a list").
    pub what: String,
    /// Where: the 1-based character column of the line it was found on.
    pub column: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.what, self.column)
    }
}

impl std::error::Error for ParseError {}

/// The length of the run of string bytes at the start of `bytes` that stand for themselves:
/// up to the first `"`, `\\` or control character (which Python's strict mode refuses). Big
/// bodies are mostly such runs, so it is found with `memchr` (SIMD) rather than byte by byte.
fn plain_run(bytes: &[u8]) -> usize {
    let end = memchr::memchr2(b'"', b'\\', bytes).unwrap_or(bytes.len());
    let run = &bytes[..end];
    // No early exit, so that it vectorizes; the rare run with a control character is searched.
    if run.iter().fold(u8::MAX, |low, &b| low.min(b)) >= 0x20 {
        end
    } else {
        run.iter().position(|&b| b < 0x20).unwrap_or(end)
    }
}

/// Parses `text` as Python's `json.loads` does.
pub fn parse(text: &str) -> Result<Json, ParseError> {
    let mut p = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    p.skip_space();
    let value = p.value(0)?;
    p.skip_space();
    if p.at < p.bytes.len() {
        return Err(p.error("trailing characters"));
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> ParseError {
        let line_start = self.text[..self.at].rfind('\n').map_or(0, |i| i + 1);
        ParseError {
            what: what.to_owned(),
            column: self.text[line_start..self.at].chars().count() + 1,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.bytes[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, ParseError> {
        match self.peek() {
            None => Err(self.error("EOF while parsing a value")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Json::Str),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) if self.eat("null") => Ok(Json::Null),
            Some(_) if self.eat("true") => Ok(Json::Bool(true)),
            Some(_) if self.eat("false") => Ok(Json::Bool(false)),
            Some(_) if self.eat("NaN") => Ok(Json::Float(f64::NAN)),
            Some(_) if self.eat("Infinity") => Ok(Json::Float(f64::INFINITY)),
            Some(_) => Err(self.error("expected value")),
        }
    }

    fn nested(&self, depth: usize) -> Result<(), ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn array(&mut self, depth: usize) -> Result<Json, ParseError> {
        self.nested(depth)?;
        self.at += 1; // [
        let mut items = Vec::new();
        self.skip_space();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Array(items));
        }
        loop {
            self.skip_space();
            if self.peek().is_none() {
                return Err(self.error("EOF while parsing a list"));
            }
            items.push(self.value(depth)?);
            self.skip_space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                None => return Err(self.error("EOF while parsing a list")),
                Some(_) => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, ParseError> {
        self.nested(depth)?;
        self.at += 1; // {
        let mut entries: Vec<(PyStr, Json)> = Vec::new();
        // Where each key is, once there are enough of them for a linear search to cost: a
        // body of many keys must not take quadratic time.
        let mut index: HashMap<PyStr, usize> = HashMap::new();
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Object(entries));
        }
        loop {
            self.skip_space();
            match self.peek() {
                Some(b'"') => {}
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("key must be a string")),
            }
            let key = self.string()?;
            self.skip_space();
            match self.peek() {
                Some(b':') => self.at += 1,
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("expected `:`")),
            }
            self.skip_space();
            let value = self.value(depth)?;
            let seen = if entries.len() < 16 {
                entries.iter().position(|(k, _)| *k == key)
            } else {
                if index.is_empty() {
                    index.extend(entries.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)));
                }
                index.get(&key).copied()
            };
            match seen {
                Some(i) => entries[i].1 = value,
                None => {
                    if !index.is_empty() || entries.len() >= 16 {
                        index.insert(key.clone(), entries.len());
                    }
                    entries.push((key, value));
                }
            }
            self.skip_space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Object(entries));
                }
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    fn number(&mut self) -> Result<Json, ParseError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
            if self.eat("Infinity") {
                return Ok(Json::Float(f64::NEG_INFINITY));
            }
        }
        let digits = |p: &mut Parser<'_>| {
            let from = p.at;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.at += 1;
            }
            p.at - from
        };
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error("invalid number")),
        }
        let mut float = false;
        if self.peek() == Some(b'.') && matches!(self.bytes.get(self.at + 1), Some(b'0'..=b'9')) {
            self.at += 1;
            digits(self);
            float = true;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let before = self.at;
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                // Python's number pattern stops before a bare `e`; what follows is then not
                // JSON.
                self.at = before;
            } else {
                float = true;
            }
        }
        let text = &self.text[start..self.at];
        if float {
            let value: f64 = text.parse().map_err(|_| self.error("invalid number"))?;
            return Ok(Json::Float(value));
        }
        if text.trim_start_matches('-').len() > MAX_INT_DIGITS {
            return Err(self.error(&format!(
                "an integer of more than {MAX_INT_DIGITS} digits (Python's limit)"
            )));
        }
        Ok(Json::Int(if text == "-0" { "0" } else { text }.to_owned()))
    }

    fn string(&mut self) -> Result<PyStr, ParseError> {
        self.at += 1; // "
        let mut out = PyStr(Vec::new());
        loop {
            let run = self.at;
            self.at += plain_run(&self.bytes[run..]);
            out.0.extend_from_slice(&self.bytes[run..self.at]);
            match self.peek() {
                None => return Err(self.error("EOF while parsing a string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = self.peek();
                    self.at += 1;
                    match escaped {
                        Some(b'"') => out.0.push(b'"'),
                        Some(b'\\') => out.0.push(b'\\'),
                        Some(b'/') => out.0.push(b'/'),
                        Some(b'b') => out.0.push(0x08),
                        Some(b'f') => out.0.push(0x0c),
                        Some(b'n') => out.0.push(b'\n'),
                        Some(b'r') => out.0.push(b'\r'),
                        Some(b't') => out.0.push(b'\t'),
                        Some(b'u') => {
                            let unit = self.hex4()?;
                            // A high surrogate followed by an escaped low one is one character;
                            // anything else stays a lone surrogate, as in Python.
                            let pair = (0xd800..0xdc00).contains(&unit)
                                && self.bytes[self.at..].starts_with(b"\\u");
                            if pair {
                                let back = self.at;
                                self.at += 2;
                                let low = self.hex4()?;
                                if (0xdc00..0xe000).contains(&low) {
                                    out.push(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00));
                                    continue;
                                }
                                self.at = back;
                            }
                            out.push(unit);
                        }
                        None => return Err(self.error("EOF while parsing a string")),
                        Some(_) => {
                            self.at -= 1;
                            return Err(self.error("invalid escape"));
                        }
                    }
                }
                Some(_) => return Err(self.error("control character in a string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let hex = self
            .text
            .get(self.at..self.at + 4)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error("invalid \\u escape"))?;
        self.at += 4;
        Ok(u32::from_str_radix(hex, 16).expect("checked: four hex digits"))
    }
}

impl Json {
    /// Python's `json.dumps(value, sort_keys=…, ensure_ascii=…)` with its default separators
    /// (`", "` and `": "`).
    pub fn to_python(&self, sort_keys: bool, ensure_ascii: bool) -> String {
        let mut out = String::with_capacity(256);
        self.write(&mut out, sort_keys, ensure_ascii);
        out
    }

    /// [`Json::to_python`], appended to `out`.
    pub fn write(&self, out: &mut String, sort_keys: bool, ensure_ascii: bool) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(true) => out.push_str("true"),
            Json::Bool(false) => out.push_str("false"),
            Json::Int(digits) => out.push_str(digits),
            Json::Float(f) => out.push_str(&py_float_repr(*f)),
            Json::Str(s) => write_str(out, s, ensure_ascii),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, sort_keys, ensure_ascii);
                }
                out.push(']');
            }
            Json::Object(entries) => {
                out.push('{');
                let mut entries: Vec<&(PyStr, Json)> = entries.iter().collect();
                if sort_keys {
                    // Python sorts str keys by code point, which is WTF-8's byte order.
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                for (i, (key, value)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(out, key, ensure_ascii);
                    out.push_str(": ");
                    value.write(out, sort_keys, ensure_ascii);
                }
                out.push('}');
            }
        }
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Json::Object(_))
    }

    /// The type's name in messages ("a JSON array"...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Int(_) | Json::Float(_) => "a number",
            Json::Str(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }

    /// Takes the value of `key` out of an object (`None` if this is not an object or it has no
    /// such key).
    pub fn take(&mut self, key: &str) -> Option<Json> {
        let Json::Object(entries) = self else {
            return None;
        };
        let i = entries.iter().position(|(k, _)| k.0 == key.as_bytes())?;
        Some(entries.remove(i).1)
    }

    /// As a `serde_json::Value`, for the parts of a message that become AMQP values (headers):
    /// integers beyond 64 bits become floats, and what a `Value` cannot hold (NaN, infinities,
    /// lone surrogates) is refused.
    pub fn to_value(&self) -> Result<Value, String> {
        Ok(match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(digits) => match (digits.parse::<i64>(), digits.parse::<u64>()) {
                (Ok(i), _) => Value::from(i),
                (_, Ok(u)) => Value::from(u),
                _ => Json::Float(digits.parse().unwrap_or(f64::NAN)).to_value()?,
            },
            Json::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| format!("{} is not a finite number", py_float_repr(*f)))?,
            Json::Str(s) => Value::String(
                s.as_str()
                    .ok_or_else(|| format!("{s:?} holds a lone surrogate"))?
                    .to_owned(),
            ),
            Json::Array(items) => {
                Value::Array(items.iter().map(Json::to_value).collect::<Result<_, _>>()?)
            }
            Json::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| {
                        let key = k
                            .as_str()
                            .ok_or_else(|| format!("key {k:?} holds a lone surrogate"))?;
                        Ok((key.to_owned(), v.to_value()?))
                    })
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

impl From<&Value> for Json {
    fn from(value: &Value) -> Json {
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) if n.is_f64() => Json::Float(n.as_f64().unwrap_or(f64::NAN)),
            Value::Number(n) => Json::Int(n.to_string()),
            Value::String(s) => Json::Str(PyStr::from(s.as_str())),
            Value::Array(items) => Json::Array(items.iter().map(Json::from).collect()),
            Value::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| (PyStr::from(k.as_str()), Json::from(v)))
                    .collect(),
            ),
        }
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Json {
        Json::from(&value)
    }
}

/// Python's `repr(float)`, as `json.dumps` writes floats: the shortest round-trip digits, in
/// positional notation when the decimal exponent is in -4..16, otherwise as `d.ddde±XX`; and
/// `NaN`, `Infinity`, `-Infinity`.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!(
                "{sign}{digits}{}.0",
                "0".repeat(point as usize - digits.len())
            )
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// Writes `text` as Python's `json` writes a string.
pub fn write_text(out: &mut String, text: &str, ensure_ascii: bool) {
    write_str(out, &PyStr::from(text), ensure_ascii);
}

/// The code points of WTF-8 `bytes` (surrogates included).
fn code_points(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut bytes = bytes.iter().copied();
    std::iter::from_fn(move || {
        let b0 = u32::from(bytes.next()?);
        let mut cont = || u32::from(bytes.next().unwrap_or(0x80)) & 0x3f;
        Some(match b0 {
            0..=0x7f => b0,
            0xc0..=0xdf => ((b0 & 0x1f) << 6) | cont(),
            0xe0..=0xef => ((b0 & 0x0f) << 12) | (cont() << 6) | cont(),
            _ => ((b0 & 0x07) << 18) | (cont() << 12) | (cont() << 6) | cont(),
        })
    })
}

/// A string as Python's `json` writes it. A lone surrogate is always written escaped.
///
/// Runs of printable ASCII other than `"` and `\\` are copied as they are, a run at a time: a
/// body of megabytes of text is mostly that, and writing it one code point at a time was 71 %
/// of fm's CPU time with 1 MiB messages (issue 15, BENCHMARKS.md).
fn write_str(out: &mut String, s: &PyStr, ensure_ascii: bool) {
    out.push('"');
    let mut rest = s.0.as_slice();
    loop {
        let plain = rest
            .iter()
            .position(|&b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\')
            .unwrap_or(rest.len());
        out.push_str(std::str::from_utf8(&rest[..plain]).expect("printable ASCII is UTF-8"));
        rest = &rest[plain..];
        let Some(&first) = rest.first() else { break };
        // One code point the careful way; its length as `code_points` reads it.
        let len = match first {
            0..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            _ => 4,
        }
        .min(rest.len());
        let code = code_points(&rest[..len]).next().expect("one code point");
        write_code_point(out, code, ensure_ascii);
        rest = &rest[len..];
    }
    out.push('"');
}

/// One code point of a string, escaped as Python's `json` escapes it.
fn write_code_point(out: &mut String, code: u32, ensure_ascii: bool) {
    match code {
        0x22 => out.push_str("\\\""),
        0x5c => out.push_str("\\\\"),
        0x0a => out.push_str("\\n"),
        0x0d => out.push_str("\\r"),
        0x09 => out.push_str("\\t"),
        0x08 => out.push_str("\\b"),
        0x0c => out.push_str("\\f"),
        0..0x20 | 0xd800..0xe000 => {
            let _ = write!(out, "\\u{code:04x}");
        }
        0x7f.. if ensure_ascii => {
            let c = char::from_u32(code).expect("not a surrogate: checked above");
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
        _ => out.push(char::from_u32(code).expect("not a surrogate: checked above")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15: strings are scanned a run at a time; a run stops where the byte loop stopped.
    #[test]
    fn a_plain_run_ends_at_a_quote_a_backslash_or_a_control_character() {
        assert_eq!(plain_run(b""), 0);
        assert_eq!(plain_run(b"abc"), 3);
        assert_eq!(plain_run(b"ab\"c"), 2);
        assert_eq!(plain_run(b"ab\\c\""), 2);
        assert_eq!(plain_run("h\u{e9}\u{2028}!\"".as_bytes()), 7);
        let mut long = vec![b'x'; 100_000];
        long[70_000] = b'\n';
        long[90_000] = b'"';
        assert_eq!(
            plain_run(&long),
            70_000,
            "the control character comes first"
        );
        long[70_000] = b'x';
        assert_eq!(plain_run(&long), 90_000);
        long[10] = 0x1f;
        assert_eq!(plain_run(&long), 10);
        // And through the parser: a raw control character is refused, escapes are kept.
        assert!(parse("{\"a\": \"x\ty\"}").is_err());
        let big = format!(
            "{{\"a\": \"{}\\n{}\"}}",
            "x".repeat(50_000),
            "y".repeat(50_000)
        );
        let Json::Object(fields) = parse(&big).unwrap() else {
            panic!("an object")
        };
        let Json::Str(text) = &fields[0].1 else {
            panic!("a string")
        };
        let text = text.as_str().unwrap();
        assert_eq!(text.len(), 100_001);
        assert_eq!(&text[49_999..50_002], "x\ny");
    }

    /// Issue 15: the run-at-a-time copy writes what the code point at a time writing wrote.
    #[test]
    fn long_plain_runs_and_the_escapes_between_them_are_written_as_python_writes_them() {
        let a = "a".repeat(5000);
        let text = format!("{a}\"\\\n\u{e9}\u{1f600}\u{7f}bbb");
        let mut out = String::new();
        write_text(&mut out, &text, true);
        assert_eq!(
            out,
            format!("\"{a}\\\"\\\\\\n\\u00e9\\ud83d\\ude00\\u007fbbb\"")
        );
        out.clear();
        write_text(&mut out, &text, false);
        assert_eq!(out, format!("\"{a}\\\"\\\\\\n\u{e9}\u{1f600}\u{7f}bbb\""));
    }

    /// `json.dumps(json.loads(text))`, as fedora-messaging round-trips a body.
    fn python(text: &str) -> String {
        parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .to_python(false, true)
    }

    /// Issue 17: what Python's json accepts, fm accepts and writes back unchanged.
    #[test]
    fn bodies_python_accepts_are_carried_byte_for_byte() {
        // Expected texts are Python 3.11's json.dumps(json.loads(text)).
        for (text, dumped) in [
            (r#"{"a": NaN}"#, r#"{"a": NaN}"#),
            (
                r#"{"a": 1e400, "b": -1e400}"#,
                r#"{"a": Infinity, "b": -Infinity}"#,
            ),
            (
                r#"{"a": Infinity, "b": -Infinity}"#,
                r#"{"a": Infinity, "b": -Infinity}"#,
            ),
            (r#"{"a": "\ud800"}"#, r#"{"a": "\ud800"}"#),
            (r#"{"a": "x\udc00\ud83d"}"#, r#"{"a": "x\udc00\ud83d"}"#),
            (r#"{"a": "\ud83d\ude00"}"#, r#"{"a": "\ud83d\ude00"}"#),
            (
                r#"{"a": 123456789012345678901234567890}"#,
                r#"{"a": 123456789012345678901234567890}"#,
            ),
            (
                r#"{"a": -0, "b": -0.0, "c": 0.1, "d": 1e16, "e": 1E-5}"#,
                r#"{"a": 0, "b": -0.0, "c": 0.1, "d": 1e+16, "e": 1e-05}"#,
            ),
            (r#"{"a": 1, "a": 2, "b": 3}"#, r#"{"a": 2, "b": 3}"#),
            (" {\"\\/\": \"\u{e9}\\u00e9\"} ", r#"{"/": "\u00e9\u00e9"}"#),
        ] {
            assert_eq!(python(text), dumped, "{text}");
        }
    }

    #[test]
    fn floats_are_spelled_as_python_repr_spells_them() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.6, "123456789012345.6"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e100, "1e+100"),
            (100.0, "100.0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(py_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn what_python_refuses_is_refused_with_a_place() {
        for (text, what) in [
            ("", "EOF while parsing a value at column 1"),
            ("[1, 2", "EOF while parsing a list at column 6"),
            ("[", "EOF while parsing a list at column 2"),
            ("{\"a\": 1", "EOF while parsing an object at column 8"),
            ("\"abc", "EOF while parsing a string at column 5"),
            ("{\"a\": 1} x", "trailing characters at column 10"),
            ("\"a\tb\"", "control character in a string at column 3"),
            ("\"\\x\"", "invalid escape at column 3"),
            ("nan", "expected value at column 1"),
            ("01", "trailing characters at column 2"),
            ("1.", "trailing characters at column 2"),
            ("{1: 2}", "key must be a string at column 2"),
        ] {
            assert_eq!(parse(text).unwrap_err().to_string(), what, "{text:?}");
        }
        let long = "9".repeat(MAX_INT_DIGITS + 1);
        assert!(parse(&long).unwrap_err().what.contains("4300 digits"));
        assert!(parse(&"9".repeat(MAX_INT_DIGITS)).is_ok());
    }

    #[test]
    fn nesting_is_bounded_without_exhausting_the_stack() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        // A megabyte of brackets, on a test thread's small stack.
        let deep = "[".repeat(1 << 20);
        assert!(
            parse(&deep)
                .unwrap_err()
                .what
                .starts_with("nested deeper than 500 levels")
        );
    }

    #[test]
    fn many_keys_parse_in_linear_time() {
        let body: String = (0..200_000)
            .map(|i| format!("\"k{i}\": {i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let started = std::time::Instant::now();
        let Json::Object(entries) = parse(&format!("{{{body}, \"k5\": -1}}")).unwrap() else {
            panic!("an object");
        };
        assert_eq!(entries.len(), 200_000);
        assert_eq!(entries[5].1, Json::Int("-1".into()));
        // Quadratic would be 2e10 comparisons: minutes, not this.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn sorted_keys_follow_code_points_and_ensure_ascii_escapes() {
        let v =
            parse(r#"{"b": [1, 2.5, true, null], "a": "é\n\"x\"\u007f😀", "\ud800": 1}"#).unwrap();
        assert_eq!(
            v.to_python(true, true),
            r#"{"a": "\u00e9\n\"x\"\u007f\ud83d\ude00", "b": [1, 2.5, true, null], "\ud800": 1}"#
        );
        assert_eq!(
            v.to_python(false, false),
            "{\"b\": [1, 2.5, true, null], \"a\": \"é\\n\\\"x\\\"\u{7f}😀\", \"\\ud800\": 1}"
        );
    }

    #[test]
    fn values_convert_to_serde_json_where_they_can() {
        let v = parse(r#"{"i": 1, "u": 18446744073709551615, "big": 123456789012345678901234567890, "s": "x"}"#)
            .unwrap();
        assert_eq!(
            v.to_value().unwrap(),
            serde_json::json!({"i": 1, "u": 18446744073709551615u64, "big": 1.2345678901234568e29, "s": "x"})
        );
        assert!(
            parse(r#"[NaN]"#)
                .unwrap()
                .to_value()
                .unwrap_err()
                .contains("NaN is not a finite number")
        );
        assert!(
            parse(r#"["\udc00"]"#)
                .unwrap()
                .to_value()
                .unwrap_err()
                .contains("lone surrogate")
        );
    }
}
