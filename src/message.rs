//! The message model and its two encodings: the AMQP wire format and the record-file format.
//!
//! Both must match fedora-messaging byte for byte, because fm shares a bus (and record files)
//! with it: a message fm publishes has to load in a Python consumer, and a line `fm record`
//! writes has to equal the line `fedora-messaging record` writes for the same message.
//!
//! - On the wire (`fedora_messaging/message.py`, `Message._build_properties`): properties
//!   `content_type=application/json`, `content_encoding=utf-8`, `delivery_mode=2`, a UUID4
//!   `message_id`; headers `fedora_messaging_schema`, `sent-at`, `fedora_messaging_severity`,
//!   `priority`; the body is `json.dumps(body)` (ASCII-only, Python's separators).
//! - In files: one `json.dumps(m, ensure_ascii=False, sort_keys=True)` object per line with the
//!   keys `body, headers, id, priority, queue, topic`.
//!
//! Python's `json.dumps` differs from serde_json's output (`", "` and `": "` separators, ASCII
//! escapes, float spelling), and Python's `json.loads` accepts more (NaN, huge integers, lone
//! surrogates): bodies are [`crate::json::Json`], read and written the way Python does.

use std::fmt::Write as _;

use lapin::types::parsing::{MAX_NESTING_DEPTH, TOO_DEEP};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, message::Delivery};
use serde_json::{Map, Number, Value};

use crate::config::BodyMode;
use crate::json::{self, Json};

/// Header naming the message's schema (fedora-messaging's entry-point name).
pub const SCHEMA_HEADER: &str = "fedora_messaging_schema";
/// Header naming the Python package that provides the schema.
pub const SCHEMA_PACKAGE_HEADER: &str = "fedora_messaging_schema_package";
/// Header holding the message's severity (10, 20, 30 or 40).
pub const SEVERITY_HEADER: &str = "fedora_messaging_severity";
/// Header holding the UTC time the message was sent, ISO-8601 without microseconds.
pub const SENT_AT_HEADER: &str = "sent-at";
/// Header mirroring the message priority, for debugging (fedora-messaging sets it always).
pub const PRIORITY_HEADER: &str = "priority";
/// The schema of fedora-messaging's base `Message` class.
pub const BASE_SCHEMA: &str = "base.message";
/// The package fedora-messaging (3.9) names in `fedora_messaging_schema_package` for
/// [`BASE_SCHEMA`]: the distribution its entry point comes from.
pub const BASE_SCHEMA_PACKAGE: &str = "fedora_messaging";

/// Severity levels (fedora-messaging's `DEBUG`, `INFO`, `WARNING`, `ERROR`).
pub const DEBUG: i64 = 10;
/// The default severity.
pub const INFO: i64 = 20;
/// A problem users should know about.
pub const WARNING: i64 = 30;
/// A critically important message.
pub const ERROR: i64 = 40;
/// Every valid severity.
pub const SEVERITIES: [i64; 4] = [DEBUG, INFO, WARNING, ERROR];

/// A fedora-messaging message: what a callback sees, what `record` writes and `publish` sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic: the routing key it arrived with (no prefix stripping), or the topic to publish.
    pub topic: String,
    /// The AMQP `message_id` (a UUID4 for well-behaved publishers); `None` when absent.
    pub id: Option<String>,
    /// The AMQP headers, as JSON.
    pub headers: Map<String, Value>,
    /// The body: a JSON object once validated, held as Python holds it.
    pub body: Json,
    /// The queue it was consumed from; `None` for messages that were not consumed.
    pub queue: Option<String>,
    /// The AMQP priority; `None` when not set (fedora-messaging reports that as 0).
    pub priority: Option<i64>,
}

impl Message {
    /// The severity: the `fedora_messaging_severity` header, or INFO when it is missing.
    pub fn severity(&self) -> i64 {
        self.headers
            .get(SEVERITY_HEADER)
            .and_then(json_integer)
            .unwrap_or(INFO)
    }

    /// The message as one record-file line (no trailing newline), exactly as
    /// fedora-messaging's `dumps` writes it.
    pub fn record_line(&self) -> String {
        self.write_record(false)
    }

    /// The record line of a message whose body is not a JSON object and was handed over as
    /// bytes (`[callback] body = "bytes"`): `body` holds its text, and `"raw_body": true` (in
    /// its sorted place) says so.
    pub fn record_line_raw(&self) -> String {
        self.write_record(true)
    }

    fn write_record(&self, raw_body: bool) -> String {
        // `json.dumps(m, ensure_ascii=False, sort_keys=True)`: the keys below are in sorted
        // order, and the body and headers are written in place, not copied into a record
        // first (this runs once per message).
        let mut out = String::with_capacity(512);
        let text = |out: &mut String, s: Option<&str>| match s {
            Some(s) => json::write_text(out, s, false),
            None => out.push_str("null"),
        };
        out.push_str("{\"body\": ");
        self.body.write(&mut out, true, false);
        out.push_str(", \"headers\": ");
        let mut headers: Vec<(&String, &Value)> = self.headers.iter().collect();
        headers.sort_by(|a, b| a.0.cmp(b.0));
        out.push('{');
        for (i, (name, value)) in headers.into_iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            json::write_text(&mut out, name, false);
            out.push_str(": ");
            Json::from(value).write(&mut out, true, false);
        }
        out.push_str("}, \"id\": ");
        text(&mut out, self.id.as_deref());
        let _ = write!(
            out,
            ", \"priority\": {}, \"queue\": ",
            self.priority.unwrap_or(0)
        );
        text(&mut out, self.queue.as_deref());
        if raw_body {
            out.push_str(", \"raw_body\": true");
        }
        out.push_str(", \"topic\": ");
        text(&mut out, Some(&self.topic));
        out.push('}');
        out
    }

    /// Check the headers and body against fedora-messaging's base schemas: the body is a JSON
    /// object; severity is one of 10/20/30/40; schema, schema package and sent-at are strings.
    pub fn validate(&self) -> Result<(), String> {
        if !self.body.is_object() {
            return Err(format!(
                "the body must be a JSON object, not {}",
                self.body.type_name()
            ));
        }
        validate_headers(&self.headers)
    }

    /// Rebuild a message from one record-file object, as fedora-messaging's `load_message`:
    /// only `topic` and `body` are required; `id`, `headers` (with `sent-at`), `queue` and
    /// `priority` are kept when present. The headers fm adds on publish are filled in by
    /// [`Message::prepare_for_publish`].
    pub fn from_record(mut record: Json) -> Result<Message, String> {
        if !record.is_object() {
            return Err(format!(
                "a message must be a JSON object, not {}",
                record.type_name()
            ));
        }
        let body = record
            .take("body")
            .ok_or_else(|| "'body' is a required property".to_string())?;
        // The rest becomes AMQP values and log text: serde_json's model is enough for it.
        let value = record
            .to_value()
            .map_err(|e| format!("the message's fields: {e}"))?;
        let Value::Object(mut obj) = value else {
            unreachable!("checked: an object");
        };
        let topic = match obj.remove("topic") {
            Some(Value::String(t)) => t,
            Some(other) => {
                return Err(format!(
                    "'topic' must be a string, not {}",
                    json_type_name(&other)
                ));
            }
            None => return Err("'topic' is a required property".into()),
        };
        let headers = match obj.remove("headers") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(h)) => h,
            Some(other) => {
                return Err(format!(
                    "'headers' must be an object, not {}",
                    json_type_name(&other)
                ));
            }
        };
        let id = match obj.remove("id") {
            None => None,
            Some(Value::String(id)) => Some(id),
            Some(other) => {
                return Err(format!(
                    "'id' must be a string, not {}",
                    json_type_name(&other)
                ));
            }
        };
        let queue = match obj.remove("queue") {
            None | Some(Value::Null) => None,
            Some(Value::String(q)) => Some(q),
            Some(other) => {
                return Err(format!(
                    "'queue' must be a string or null, not {}",
                    json_type_name(&other)
                ));
            }
        };
        let priority = match obj.remove("priority") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                json_integer(&v)
                    .filter(|p| (0..=255).contains(p))
                    .ok_or_else(|| {
                        format!("'priority' must be an integer from 0 to 255, not {v}")
                    })?,
            ),
        };
        let message = Message {
            topic,
            id,
            headers,
            body,
            queue,
            priority,
        };
        message.validate()?;
        Ok(message)
    }

    /// A new message to publish, with the headers fedora-messaging's `Message` builds.
    pub fn new_outgoing(
        topic: String,
        body: Json,
        mut headers: Map<String, Value>,
        schema: &str,
        severity: i64,
        priority: Option<i64>,
    ) -> Message {
        headers.insert(SCHEMA_HEADER.into(), Value::from(schema));
        if schema == BASE_SCHEMA {
            headers.insert(
                SCHEMA_PACKAGE_HEADER.into(),
                Value::from(BASE_SCHEMA_PACKAGE),
            );
        }
        headers.insert(SENT_AT_HEADER.into(), Value::from(utc_now_iso8601()));
        headers.insert(SEVERITY_HEADER.into(), Value::from(severity));
        headers.insert(PRIORITY_HEADER.into(), Value::from(priority.unwrap_or(0)));
        Message {
            topic,
            id: Some(new_message_id()),
            headers,
            body,
            queue: None,
            priority,
        }
    }

    /// Fill in what a message loaded from a record file lacks before it is published, as
    /// fedora-messaging's `load_message` + `publish` do: a schema header (`base.message` when
    /// absent; fm keeps a present one, having no schema registry to regenerate it from), a
    /// `sent-at` (kept when present), the severity (INFO when absent), the `priority` mirror,
    /// and a new UUID4 id when it has none. For `base.message`, the schema package header is
    /// set to `fedora_messaging`, as fedora-messaging 3.9 regenerates it.
    pub fn prepare_for_publish(&mut self) {
        let schema = self
            .headers
            .entry(SCHEMA_HEADER)
            .or_insert_with(|| Value::from(BASE_SCHEMA));
        if schema == BASE_SCHEMA {
            self.headers.insert(
                SCHEMA_PACKAGE_HEADER.into(),
                Value::from(BASE_SCHEMA_PACKAGE),
            );
        }
        self.headers
            .entry(SENT_AT_HEADER)
            .or_insert_with(|| Value::from(utc_now_iso8601()));
        let severity = self.severity();
        self.headers
            .insert(SEVERITY_HEADER.into(), Value::from(severity));
        // load_message sets `message.priority = dict.get("priority")`, which stores 0 for None
        // in both the property and the header.
        let priority = self.priority.unwrap_or(0);
        self.priority = Some(priority);
        self.headers
            .insert(PRIORITY_HEADER.into(), Value::from(priority));
        if self.id.is_none() {
            self.id = Some(new_message_id());
        }
    }

    /// The routing key to publish with: `topic_prefix.rstrip(".") + "." + topic` when a prefix
    /// is set, else the topic.
    pub fn routing_key(&self, topic_prefix: &str) -> String {
        if topic_prefix.is_empty() {
            self.topic.clone()
        } else {
            format!("{}.{}", topic_prefix.trim_end_matches('.'), self.topic)
        }
    }

    /// The encoded body: Python's `json.dumps(body).encode("utf-8")`.
    pub fn encoded_body(&self) -> Vec<u8> {
        self.body.to_python(false, true).into_bytes()
    }

    /// The AMQP properties fedora-messaging publishes with.
    pub fn amqp_properties(&self) -> Result<BasicProperties, String> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_headers(json_to_field_table(&self.headers)?);
        if let Some(id) = &self.id {
            props = props.with_message_id(
                ShortString::try_new(id.as_str())
                    .map_err(|_| format!("message id is longer than 255 bytes: {id:.40}…"))?,
            );
        }
        if let Some(p) = self.priority {
            props = props.with_priority(
                u8::try_from(p).map_err(|_| format!("priority {p} is not between 0 and 255"))?,
            );
        }
        Ok(props)
    }
}

/// A message as it was delivered from a queue, with the delivery's context.
#[derive(Debug, Clone)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// The exchange it was published to ("" for the default exchange).
    pub exchange: String,
    /// Whether the broker has delivered it before.
    pub redelivered: bool,
    /// The body bytes as received.
    pub raw_body: Vec<u8>,
    /// The message as a record-file line (no newline): what plugins, commands and workers get.
    pub record: String,
    /// The AMQP `reply_to` property: where the callback's reply goes (request/reply, issue 13).
    pub reply_to: Option<String>,
    /// The AMQP `correlation_id` property, copied into the reply.
    pub correlation_id: Option<String>,
    /// The body is not a JSON object and is handed over as bytes (`[callback] body =
    /// "bytes"`): `raw_body` is it, `message.body` its text (invalid UTF-8 replaced) and
    /// `record` says `"raw_body": true`.
    pub raw: bool,
}

impl Received {
    /// Decode a delivery from `queue` the way fedora-messaging's `get_message` does. Missing
    /// headers, schema, severity or content encoding are logged and defaulted; a body that is
    /// not UTF-8, not JSON, or not a JSON object, headers that fail the base schema, or a
    /// message the AMQP parser had to repair ([`damage`]) make the message invalid: the caller
    /// drops it (`nack` without requeue).
    ///
    /// With [`BodyMode::Bytes`], a body that is not UTF-8 JSON holding an object (in any
    /// content encoding) is not a reason: the message is handed over with [`Received::raw`].
    ///
    /// The body bytes are moved out of `delivery` (what is left of it is for acking).
    pub fn from_delivery(
        delivery: &mut Delivery,
        queue: &str,
        bodies: BodyMode,
    ) -> Result<Received, Invalid> {
        let props = &delivery.properties;
        let id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
        let topic = delivery.routing_key.as_str();
        let invalid = |reason: String| Invalid {
            id: id.clone(),
            topic: topic.to_owned(),
            queue: queue.to_owned(),
            reason,
        };
        if let Some(reason) = damage(delivery) {
            return Err(invalid(reason));
        }
        // The message id and topic are on the caller's span ("message{queue, topic, id}").
        let headers = match props.headers() {
            Some(table) => field_table_to_json(table),
            None => {
                tracing::warn!("message arrived without headers: a publisher is misbehaving");
                Map::new()
            }
        };
        if !headers.contains_key(SCHEMA_HEADER) {
            tracing::warn!("message arrived without a schema header: a publisher is misbehaving");
        }
        if !headers.contains_key(SEVERITY_HEADER) {
            tracing::warn!(
                "message arrived without a severity: a publisher is misbehaving; defaulting to INFO"
            );
        }
        let decoded = decode_body(props, &delivery.data);
        let (body, raw) = match (decoded, bodies) {
            (Ok(body), _) if body.is_object() => (body, false),
            (Ok(body), BodyMode::Json) => {
                return Err(invalid(format!(
                    "the body must be a JSON object, not {}",
                    body.type_name()
                )));
            }
            (Err(reason), BodyMode::Json) => return Err(invalid(reason)),
            (_, BodyMode::Bytes) => (
                Json::from(Value::from(String::from_utf8_lossy(&delivery.data))),
                true,
            ),
        };
        let message = Message {
            topic: topic.to_owned(),
            id: id.clone(),
            headers,
            body,
            queue: Some(queue.to_owned()),
            priority: Some(props.priority().map_or(0, i64::from)),
        };
        if raw {
            validate_headers(&message.headers).map_err(invalid)?;
        } else {
            message.validate().map_err(invalid)?;
        }
        let record = if raw {
            message.record_line_raw()
        } else {
            message.record_line()
        };
        let short = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
        Ok(Received {
            message,
            exchange: delivery.exchange.as_str().to_owned(),
            redelivered: delivery.redelivered,
            raw_body: std::mem::take(&mut delivery.data),
            record,
            reply_to: short(props.reply_to()).filter(|r| !r.is_empty()),
            correlation_id: short(props.correlation_id()),
            raw,
        })
    }

    /// The message id for logs: the id, or `<none>`.
    pub fn id_for_log(&self) -> &str {
        self.message.id.as_deref().unwrap_or("<none>")
    }
}

/// A body as fedora-messaging decodes it: its content encoding UTF-8 (or absent), UTF-8 text,
/// JSON. Whether it holds an object is the caller's question.
fn decode_body(props: &BasicProperties, data: &[u8]) -> Result<Json, String> {
    match props.content_encoding().as_ref().map(|e| e.as_str()) {
        None => tracing::warn!("message arrived without a content encoding; assuming utf-8"),
        Some(enc) if is_utf8_name(enc) => {}
        Some(enc) => {
            return Err(format!(
                "unsupported content encoding {enc:?} (fm decodes utf-8 only)"
            ));
        }
    }
    let text =
        std::str::from_utf8(data).map_err(|e| format!("the body is not valid UTF-8: {e}"))?;
    json::parse(text).map_err(|e| format!("the body is not valid JSON: {e}"))
}

/// Why a delivered message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "message {} on topic {topic:?} in queue {queue:?} is invalid: {reason}",
    .id.as_deref().map_or("<none>".into(), |id| id.escape_debug().to_string())
)]
pub struct Invalid {
    /// The message id, if the message had one (escaped in the log: a publisher chose it).
    pub id: Option<String>,
    /// The routing key.
    pub topic: String,
    /// The queue it was consumed from.
    pub queue: String,
    /// What is wrong with it.
    pub reason: String,
}

/// What the AMQP parser decodes a byte that is not UTF-8 in a short string as (fm's fork of
/// amq-protocol-types, `vendor/amq-protocol-types/FORK.md`): a client cannot refuse a frame, so
/// the parser repairs what it cannot read instead of dropping the connection.
const NOT_UTF8: char = char::REPLACEMENT_CHARACTER;

/// What, if anything, the AMQP parser had to repair in a delivery that fm relies on (issue 17):
/// a routing key, message id or header name that was not UTF-8 (U+FFFD in it, which a
/// publisher could also have sent as such: fm cannot tell, and treats both alike), or headers
/// nesting tables and arrays deeper than the parser keeps ([`TOO_DEEP`] in place of the rest).
///
/// Such a message is invalid rather than handled with its names changed: its topic, id and
/// header names are what callbacks dispatch on, and a record of it could not be replayed as
/// it was sent. The other short strings (`content_type`, `correlation_id`, `reply_to`, …) are
/// not part of a fedora-messaging message, so their repair does not matter; a bad
/// `content_encoding` is refused by [`Received::from_delivery`]'s own check; header *values*
/// are long strings, raw bytes decoded leniently as pika does.
pub fn damage(delivery: &Delivery) -> Option<String> {
    if delivery.routing_key.as_str().contains(NOT_UTF8) {
        return Some("its routing key is not valid UTF-8".into());
    }
    let props = &delivery.properties;
    if props
        .message_id()
        .as_ref()
        .is_some_and(|id| id.as_str().contains(NOT_UTF8))
    {
        return Some("its message id is not valid UTF-8".into());
    }
    props.headers().as_ref().and_then(header_damage)
}

/// [`damage`] in the headers, at every depth: a walk with a stack of its own, not recursion.
fn header_damage(headers: &FieldTable) -> Option<String> {
    let mut todo: Vec<&AMQPValue> = Vec::new();
    let mut table = Some(headers);
    loop {
        if let Some(t) = table.take() {
            for (key, value) in t {
                if key.as_str().contains(NOT_UTF8) {
                    return Some(format!(
                        "its header name {:?} is not valid UTF-8",
                        key.as_str()
                    ));
                }
                todo.push(value);
            }
        }
        match todo.pop()? {
            AMQPValue::FieldTable(t) => table = Some(t),
            AMQPValue::FieldArray(a) => todo.extend(a.as_slice()),
            AMQPValue::LongString(s) if s.as_bytes() == TOO_DEEP.as_bytes() => {
                return Some(format!(
                    "its headers nest tables or arrays deeper than {MAX_NESTING_DEPTH} levels"
                ));
            }
            _ => {}
        }
    }
}

fn is_utf8_name(enc: &str) -> bool {
    matches!(
        enc.to_ascii_lowercase().replace('_', "-").as_str(),
        "utf-8" | "utf8" | "u8" | "utf"
    )
}

fn validate_headers(headers: &Map<String, Value>) -> Result<(), String> {
    if let Some(sev) = headers.get(SEVERITY_HEADER) {
        let ok = sev
            .as_f64()
            .is_some_and(|f| SEVERITIES.iter().any(|&s| s as f64 == f));
        if !ok {
            return Err(format!(
                "header '{SEVERITY_HEADER}' must be one of 10, 20, 30, 40, not {sev}"
            ));
        }
    }
    for key in [SCHEMA_HEADER, SCHEMA_PACKAGE_HEADER, SENT_AT_HEADER] {
        if let Some(v) = headers.get(key)
            && !v.is_string()
        {
            return Err(format!(
                "header '{key}' must be a string, not {}",
                json_type_name(v)
            ));
        }
    }
    Ok(())
}

/// An integer JSON value (also `20.0`, which Python's schema accepts as 20).
fn json_integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// The JSON-schema name of a value's type, for error messages.
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A new message id: a random UUID4, as fedora-messaging's wire format requires.
pub fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The current UTC time as fedora-messaging writes `sent-at`: `2019-07-30T19:12:22+00:00`.
pub fn utc_now_iso8601() -> String {
    crate::time::iso8601(crate::time::now_unix())
}

/// AMQP headers as JSON, decoded as pika decodes them (strings as text, timestamps as
/// seconds, decimals as numbers, byte arrays as text).
pub fn field_table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), amqp_to_json(v)))
        .collect()
}

/// One AMQP value as JSON (see [`field_table_to_json`]).
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => float_value(f64::from(*f)),
        AMQPValue::Double(f) => float_value(*f),
        AMQPValue::DecimalValue(d) => {
            float_value(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(b) => Value::from(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(field_table_to_json(t)),
        AMQPValue::Void => Value::Null,
    }
}

fn float_value(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// JSON headers as an AMQP field table, encoded as pika encodes Python values: booleans as
/// `t`, integers as 32-bit `I` when they fit and 64-bit `l` otherwise, floats as `d`, strings
/// as long strings, objects as tables, arrays as arrays, null as void.
pub fn json_to_field_table(headers: &Map<String, Value>) -> Result<FieldTable, String> {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        let key = ShortString::try_new(k.as_str())
            .map_err(|_| format!("header name is longer than 255 bytes: {k:.40}…"))?;
        table.insert(key, json_to_amqp(v)?);
    }
    Ok(table)
}

fn json_to_amqp(v: &Value) -> Result<AMQPValue, String> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(i),
                }
            } else if let Some(u) = n.as_u64() {
                return Err(format!(
                    "header value {u} does not fit a signed 64-bit integer"
                ));
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(json_to_amqp).collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(o) => AMQPValue::FieldTable(json_to_field_table(o)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GOOD_DUMP: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fedora-messaging/good_msg_dump.txt"
    ));

    #[test]
    fn record_line_round_trips_the_fixture_adding_priority_and_sorting_keys() {
        let line = GOOD_DUMP.trim_end();
        let msg = Message::from_record(json::parse(line).unwrap()).unwrap();
        assert_eq!(msg.topic, "test_topic");
        assert_eq!(
            msg.id.as_deref(),
            Some("273ed91d-b8b5-487a-9576-95b9fbdf3eec")
        );
        assert_eq!(msg.queue.as_deref(), Some("test_queue"));
        assert_eq!(msg.severity(), 20);
        // fedora-messaging's dumps always writes priority (0 when unset).
        let want = line.replace(r#", "queue""#, r#", "priority": 0, "queue""#);
        assert_eq!(msg.record_line(), want);
    }

    #[test]
    fn from_record_refuses_what_load_message_refuses() {
        let err = |v: Value| Message::from_record(v.into()).unwrap_err();
        assert!(err(json!({"body": {}})).contains("'topic' is a required property"));
        assert!(err(json!({"topic": "t"})).contains("'body' is a required property"));
        assert!(err(json!({"topic": "t", "body": []})).contains("body must be a JSON object"));
        assert!(
            err(json!({"topic": "t", "body": {}, "headers": {"fedora_messaging_severity": 21}}))
                .contains("must be one of 10, 20, 30, 40")
        );
        assert!(err(json!({"topic": 1, "body": {}})).contains("'topic' must be a string"));
        assert!(err(json!({"topic": "t", "body": {}, "priority": 300})).contains("priority"));
        assert!(err(json!([1])).contains("must be a JSON object"));
    }

    #[test]
    fn prepare_for_publish_keeps_id_and_sent_at_and_fills_the_rest() {
        let mut msg = Message::from_record(json!({"topic": "t", "body": {"k": 1}}).into()).unwrap();
        msg.prepare_for_publish();
        assert_eq!(msg.headers[SCHEMA_HEADER], "base.message");
        // fedora-messaging 3.9 publishes base messages with the package named.
        assert_eq!(msg.headers[SCHEMA_PACKAGE_HEADER], "fedora_messaging");
        assert_eq!(msg.headers[SEVERITY_HEADER], 20);
        assert_eq!(msg.headers[PRIORITY_HEADER], 0);
        assert_eq!(msg.priority, Some(0));
        let id = msg.id.clone().unwrap();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        let sent_at = msg.headers[SENT_AT_HEADER].as_str().unwrap().to_owned();
        assert!(
            sent_at.ends_with("+00:00") && sent_at.len() == 25,
            "{sent_at}"
        );

        let mut kept = Message::from_record(json::parse(GOOD_DUMP.trim_end()).unwrap()).unwrap();
        kept.prepare_for_publish();
        assert_eq!(
            kept.id.as_deref(),
            Some("273ed91d-b8b5-487a-9576-95b9fbdf3eec")
        );
        assert_eq!(kept.headers[SENT_AT_HEADER], "2018-11-18T10:11:41+00:00");
    }

    #[test]
    fn outgoing_messages_carry_fedora_messaging_properties() {
        let msg = Message::new_outgoing(
            "app.event".into(),
            json!({"b": 1, "a": "ü"}).into(),
            Map::new(),
            BASE_SCHEMA,
            WARNING,
            None,
        );
        assert_eq!(msg.routing_key(""), "app.event");
        assert_eq!(
            msg.routing_key("org.fedoraproject.prod.."),
            "org.fedoraproject.prod.app.event"
        );
        // Key order kept, ASCII-only, Python separators.
        assert_eq!(msg.encoded_body(), br#"{"b": 1, "a": "\u00fc"}"#);
        let props = msg.amqp_properties().unwrap();
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(props.content_encoding().as_ref().unwrap().as_str(), "utf-8");
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(*props.priority(), None);
        let headers = field_table_to_json(props.headers().as_ref().unwrap());
        assert_eq!(headers[SEVERITY_HEADER], 30);
        assert_eq!(headers[PRIORITY_HEADER], 0);
        assert_eq!(headers[SCHEMA_HEADER], "base.message");
        assert_eq!(headers[SCHEMA_PACKAGE_HEADER], "fedora_messaging");
        // Another schema: fm does not know its package, and does not make one up.
        let other = Message::new_outgoing(
            "t".into(),
            json!({}).into(),
            Map::new(),
            "bodhi.x",
            INFO,
            None,
        );
        assert!(!other.headers.contains_key(SCHEMA_PACKAGE_HEADER));
    }

    #[test]
    fn headers_convert_like_pika() {
        let h = json!({"i": 5, "big": 5_000_000_000i64, "f": 1.5, "s": "x", "b": true,
                       "n": null, "a": [1, "y"], "o": {"k": "v"}});
        let table = json_to_field_table(h.as_object().unwrap()).unwrap();
        let inner = table.inner();
        assert!(matches!(inner.get("i"), Some(AMQPValue::LongInt(5))));
        assert!(matches!(
            inner.get("big"),
            Some(AMQPValue::LongLongInt(5_000_000_000))
        ));
        assert!(matches!(inner.get("f"), Some(AMQPValue::Double(_))));
        assert!(matches!(inner.get("n"), Some(AMQPValue::Void)));
        assert_eq!(Value::Object(field_table_to_json(&table)), h);
    }

    #[test]
    fn utc_formatting() {}

    /// A delivery as lapin hands it over once the parser has repaired it: U+FFFD for bytes that
    /// were not UTF-8, [`TOO_DEEP`] for nesting it dropped.
    fn delivery(routing_key: &str, id: &str, headers: FieldTable) -> Delivery {
        let mut d = Delivery::mock(
            1,
            "amq.topic".into(),
            routing_key.into(),
            false,
            b"{}".into(),
        );
        d.properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers);
        d
    }

    fn table(key: &str, value: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(key.into(), value);
        t
    }

    #[test]
    fn a_delivery_the_parser_repaired_is_invalid_and_says_why() {
        let refused =
            |d: &mut Delivery| Received::from_delivery(d, "q\n", BodyMode::Json).unwrap_err();
        let err = refused(&mut delivery("t.\u{FFFD}", "id-1", FieldTable::default()));
        assert_eq!(err.reason, "its routing key is not valid UTF-8");
        let err = refused(&mut delivery(
            "t",
            "poison-\u{FFFD}\n",
            FieldTable::default(),
        ));
        assert_eq!(err.reason, "its message id is not valid UTF-8");
        // The id and the queue are escaped: a publisher cannot write lines of its own in the log.
        assert_eq!(
            err.to_string(),
            "message poison-\u{FFFD}\\n on topic \"t\" in queue \"q\\n\" is invalid: its message \
             id is not valid UTF-8"
        );
        let nested_key = table(
            "a",
            AMQPValue::FieldArray(
                vec![AMQPValue::FieldTable(table("\u{FFFD}", AMQPValue::Void))].into(),
            ),
        );
        let err = refused(&mut delivery("t", "id-1", nested_key));
        assert_eq!(
            err.reason,
            "its header name \"\u{FFFD}\" is not valid UTF-8"
        );
        let cut = table(
            "a",
            AMQPValue::FieldTable(table("b", AMQPValue::LongString(TOO_DEEP.into()))),
        );
        let err = refused(&mut delivery("t", "id-1", cut));
        assert_eq!(
            err.reason,
            "its headers nest tables or arrays deeper than 64 levels"
        );
    }

    /// Issue 13: `[callback] body = "bytes"` hands over what fedora-messaging would drop.
    #[test]
    fn a_body_that_is_not_a_json_object_is_raw_under_body_bytes_and_invalid_otherwise() {
        let request = |body: &[u8]| {
            let mut d = delivery("rpc", "id-1", FieldTable::default());
            d.data = body.to_vec();
            d.properties = d
                .properties
                .clone()
                .with_reply_to("amq.rabbitmq.reply-to.x".into())
                .with_correlation_id("c-1".into());
            d
        };
        for body in [&b"Marco"[..], b"[1, 2]", b"\xff\xfe"] {
            let mut d = request(body);
            let mut again = request(body);
            let r = Received::from_delivery(&mut d, "q", BodyMode::Bytes).unwrap();
            assert!(r.raw);
            assert_eq!(r.raw_body, body);
            assert_eq!(r.reply_to.as_deref(), Some("amq.rabbitmq.reply-to.x"));
            assert_eq!(r.correlation_id.as_deref(), Some("c-1"));
            assert!(
                r.record
                    .contains(", \"raw_body\": true, \"topic\": \"rpc\"}"),
                "{}",
                r.record
            );
            assert!(Received::from_delivery(&mut again, "q", BodyMode::Json).is_err());
        }
        let mut d = delivery("rpc", "id-1", FieldTable::default());
        d.data = br#"{"op": "get"}"#.to_vec();
        let r = Received::from_delivery(&mut d, "q", BodyMode::Bytes).unwrap();
        assert!(!r.raw, "a JSON object is a message as ever");
        assert!(!r.record.contains("raw_body"));
        assert_eq!(r.reply_to, None);
    }

    #[test]
    fn a_delivery_the_parser_did_not_repair_is_decoded() {
        let headers = table(
            "x-death",
            AMQPValue::FieldArray(
                vec![AMQPValue::FieldTable(table(
                    "reason",
                    AMQPValue::LongString(b"r\xff".to_vec().into()),
                ))]
                .into(),
            ),
        );
        let mut d = delivery("t.é", "id-é", headers);
        let r = Received::from_delivery(&mut d, "q", BodyMode::Json).unwrap();
        assert_eq!(r.message.topic, "t.é");
        // Header values are raw bytes, decoded leniently as pika does.
        assert_eq!(r.message.headers["x-death"][0]["reason"], "r\u{FFFD}");
    }
}
