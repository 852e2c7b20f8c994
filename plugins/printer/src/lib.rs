//! `printer`: prints every message to standard output and acknowledges it.
//!
//! It is fm's `fedora_messaging.example:printer`, and prints byte for byte what that callback
//! prints (`print(str(message))`):
//!
//! ```text
//! Id: <id, or None>
//! Topic: <topic>
//! Headers: <json.dumps(headers, sort_keys=True, indent=4, separators=(",", ": "))>
//! Body: <json.dumps(body, sort_keys=True, indent=4, separators=(",", ": "))>
//! ```
//!
//! followed by a newline. Python's `json.dumps` keeps its default `ensure_ascii=True`, so
//! non-ASCII text is written as `\uXXXX` escapes (surrogate pairs beyond the BMP), floats use
//! Python's `repr`, and empty objects and arrays are `{}` and `[]`; [`py_pretty`] reproduces all
//! of that. The message is read from the record-format JSON fm passes (`Message::json`), which
//! also tells an absent id (`null`, printed `None`, as Python does) from an empty one.
//!
//! Each message is written with one `write_all` and flushed, so lines of concurrent messages
//! never interleave and output shows up at once even when standard output is a pipe.

use std::fmt::Write as _;
use std::io::Write as _;

use fm_plugin::{Host, Message, Outcome, ThreadSafePlugin};
use serde_json::{Number, Value};

struct Printer;

impl ThreadSafePlugin for Printer {
    fn init(_host: Host, _config: &str) -> Result<Self, String> {
        Ok(Printer)
    }

    fn handle(&self, msg: &Message<'_>) -> Outcome {
        let text = match render(msg.json()) {
            Ok(text) => text,
            Err(e) => return Outcome::Fail(format!("cannot read message {}: {e}", msg.id())),
        };
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => Outcome::Ack,
            // Python's print raises here, which fedora-messaging treats as a callback failure.
            Err(e) => Outcome::Fail(format!("cannot write to standard output: {e}")),
        }
    }
}

fm_plugin::export!(Printer, name = "printer", thread_safe = true);

/// What `print(str(message))` writes for the record-format message `record`.
pub fn render(record: &str) -> Result<String, serde_json::Error> {
    let record: Value = serde_json::from_str(record)?;
    let empty = Value::Object(Default::default());
    let field = |name: &str| record.get(name).unwrap_or(&empty);
    let id = match record.get("id") {
        Some(Value::String(id)) => id.as_str(),
        _ => "None",
    };
    let topic = record
        .get("topic")
        .and_then(Value::as_str)
        .unwrap_or("None");
    Ok(format!(
        "Id: {id}\nTopic: {topic}\nHeaders: {}\nBody: {}\n",
        py_pretty(field("headers")),
        py_pretty(field("body"))
    ))
}

/// `json.dumps(value, sort_keys=True, indent=4, separators=(",", ": "))`, as Python writes it.
pub fn py_pretty(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn newline_indent(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            newline_indent(out, depth);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            // Python sorts str keys by code point, which is Rust's str order (UTF-8 byte
            // order preserves code-point order).
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(out, depth + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, depth + 1);
            }
            newline_indent(out, depth);
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&py_float_repr(f));
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional when the decimal
/// exponent is in -4..16, otherwise `d.ddde±XX` with at least two exponent digits.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!(
                "{sign}0.{}{digits}",
                "0".repeat(point.unsigned_abs() as usize)
            )
        } else if point as usize >= digits.len() {
            let zeros = "0".repeat(point as usize - digits.len());
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{dot}{rest}e{esign}{:02}", exp.unsigned_abs())
    }
}

/// A JSON string with Python's `ensure_ascii=True` escapes: everything outside printable
/// ASCII (0x20–0x7e) is `\uXXXX` in lowercase hex, except the short escapes.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    //! Expected texts are what CPython 3 prints for the same values (checked with
    //! `json.dumps(v, sort_keys=True, indent=4, separators=(",", ": "))`).
    use super::*;
    use serde_json::json;

    #[test]
    fn fedora_messagings_test_message_prints_as_python_prints_it() {
        // tests/fixtures/good_msg_dump.txt in fedora-messaging.
        let record = r#"{"body": {"test_key1": "test_value1"}, "headers": {"fedora_messaging_schema": "base.message", "fedora_messaging_severity": 20, "sent-at": "2018-11-18T10:11:41+00:00"}, "id": "273ed91d-b8b5-487a-9576-95b9fbdf3eec", "queue": "test_queue", "topic": "test_topic"}"#;
        assert_eq!(
            render(record).unwrap(),
            "Id: 273ed91d-b8b5-487a-9576-95b9fbdf3eec\n\
             Topic: test_topic\n\
             Headers: {\n    \"fedora_messaging_schema\": \"base.message\",\n    \
             \"fedora_messaging_severity\": 20,\n    \"sent-at\": \"2018-11-18T10:11:41+00:00\"\n}\n\
             Body: {\n    \"test_key1\": \"test_value1\"\n}\n"
        );
    }

    #[test]
    fn an_absent_id_prints_none_and_empty_tables_print_braces() {
        let record = r#"{"body": {}, "headers": {}, "id": null, "priority": 0, "queue": null, "topic": "t"}"#;
        assert_eq!(
            render(record).unwrap(),
            "Id: None\nTopic: t\nHeaders: {}\nBody: {}\n"
        );
    }

    #[test]
    fn nesting_sorting_and_escapes_match_python() {
        let v = json!({"b": [1, {}, []], "a": {"z": null, "é": "😀\u{7f}\n\""}});
        assert_eq!(
            py_pretty(&v),
            "{\n    \"a\": {\n        \"z\": null,\n        \"\\u00e9\": \"\\ud83d\\ude00\\u007f\\n\\\"\"\n    },\n    \
             \"b\": [\n        1,\n        {},\n        []\n    ]\n}"
        );
    }

    #[test]
    fn numbers_match_python_repr() {
        for (v, want) in [
            (json!(1e16), "1e+16"),
            (json!(1.5e-7), "1.5e-07"),
            (json!(0.0001), "0.0001"),
            (json!(1e-5), "1e-05"),
            (json!(100.0), "100.0"),
            (json!(123456789012345.6), "123456789012345.6"),
            (json!(-0.0), "-0.0"),
            (json!(5e-324), "5e-324"),
            (json!(1.7976931348623157e308), "1.7976931348623157e+308"),
            (json!(0.1 + 0.2), "0.30000000000000004"),
            (json!(9223372036854775808u64), "9223372036854775808"),
            (json!(-9223372036854775808i64), "-9223372036854775808"),
        ] {
            assert_eq!(py_pretty(&v), want, "{v}");
        }
    }
}
