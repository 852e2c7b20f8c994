//! Messages no client library would publish (issue 17): short strings that are not UTF-8 and
//! headers nested thousands deep. RabbitMQ passes them on as they came, and a client cannot
//! refuse a frame: before fm's fork of amq-protocol-types (`vendor/amq-protocol-types/FORK.md`),
//! lapin failed to parse such a delivery (or overflowed its stack on it), the connection
//! dropped, the broker delivered the message again, and fm never consumed anything more.
//!
//! Each test runs fm on a queue that dead-letters into another, publishes the hostile message
//! and then a good one, and checks that the good one is handled, the hostile one is dropped as
//! invalid (dead-lettered) with a log line naming it, the connection was never lost, and fm
//! still stops cleanly. Libraries encode only valid UTF-8 (lapin's `ShortString` is a
//! `String`), so the messages are published over a hand-made AMQP connection, [`RawPublisher`].

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::recorder::{Extra, config, consuming, dead_letter_to, out_file};
use crate::util::{self, Broker, FmProcess};

/// How deep the AMQP parser keeps nested tables and arrays (the fork's `MAX_NESTING_DEPTH`;
/// the headers table itself is level 1).
const MAX_DEPTH: usize = lapin::types::parsing::MAX_NESTING_DEPTH;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_that_is_not_utf8_is_dropped_and_consuming_goes_on() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message.message_id.extend(b"-\xff\xfe");
    let run = HostileRun::start(&broker, "hostile-id").await;
    let line = format!(
        "message {id}-\u{FFFD}\u{FFFD} on topic \"{}.ack\" in queue \"{}\" is invalid: its \
             message id is not valid UTF-8; dropping it",
        run.queue, run.queue
    );
    run.publish(message).await.expect_dropped(&line).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_dropped_and_consuming_goes_on() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message
        .headers
        .push(entry(b"bad-\xc3(", b'S', &long_str(b"x")));
    let run = HostileRun::start(&broker, "hostile-key").await;
    let line = format!(
        "message {id} on topic \"{}.ack\" in queue \"{}\" is invalid: its header name \
             \"bad-\u{FFFD}(\" is not valid UTF-8; dropping it",
        run.queue, run.queue
    );
    run.publish(message).await.expect_dropped(&line).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_key_that_is_not_utf8_is_dropped_and_consuming_goes_on() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message.routing_suffix = b".ack\xff".to_vec();
    let run = HostileRun::start(&broker, "hostile-topic").await;
    let line = format!(
        "message {id} on topic \"{}.ack\u{FFFD}\" in queue \"{}\" is invalid: its routing \
             key is not valid UTF-8; dropping it",
        run.queue, run.queue
    );
    run.publish(message).await.expect_dropped(&line).await;
}

/// The deepest headers a frame can carry: 6 bytes a level, so about 21,800 levels within
/// frame_max = 131072 (fm's); this run uses 21,000, leaving room for the other properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_21000_deep_are_dropped_and_consuming_goes_on() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message
        .headers
        .push(entry(b"deep", b'F', &nested_tables(21_000 - 1)));
    let run = HostileRun::start(&broker, "hostile-deep").await;
    let line = too_deep_line(&id, &run);
    run.publish(message).await.expect_dropped(&line).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_one_level_deeper_than_the_parser_keeps_are_dropped() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message
        .headers
        .push(entry(b"deep", b'F', &nested_tables(MAX_DEPTH)));
    let run = HostileRun::start(&broker, "hostile-over").await;
    let line = too_deep_line(&id, &run);
    run.publish(message).await.expect_dropped(&line).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_as_deep_as_the_parser_keeps_are_a_valid_message() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message
        .headers
        .push(entry(b"deep", b'F', &nested_tables(MAX_DEPTH - 1)));
    let run = HostileRun::start(&broker, "hostile-under").await;
    let handled = run.publish(message).await;
    let line = handled.expect_handled(&id).await;
    let mut deep = &line["record"]["headers"]["deep"];
    let mut levels = 2; // the headers table and "deep"
    while let Some(inner) = deep.get("") {
        (deep, levels) = (inner, levels + 1);
    }
    assert_eq!(levels, MAX_DEPTH, "{line}");
}

/// The short strings fm does not read (content type, correlation id) are repaired by the parser
/// and do not make the message invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_properties_that_are_not_utf8_do_not_matter() {
    let Some(broker) = util::broker() else { return };
    let id = hostile_id();
    let mut message = Hostile::fedora(&id);
    message.content_type = b"application/json\xff".to_vec();
    message.correlation_id = Some(b"corr-\xfe".to_vec());
    let run = HostileRun::start(&broker, "hostile-props").await;
    let handled = run.publish(message).await;
    handled.expect_handled(&id).await;
}

/// fm consuming a queue that dead-letters into `{queue}.dead`, through the recorder plugin.
struct HostileRun<'a> {
    broker: &'a Broker,
    queue: String,
    dlq: String,
    proc: FmProcess,
    out: std::path::PathBuf,
    _keep: tempfile::TempDir,
}

impl<'a> HostileRun<'a> {
    async fn start(broker: &'a Broker, name: &str) -> HostileRun<'a> {
        let queue = util::unique(name);
        let dlq = format!("{queue}.dead");
        broker.declare_queue(&dlq).await;
        let (keep, out) = out_file();
        let dlx = dead_letter_to(&dlq);
        let extra = Extra {
            queue_args: &dlx,
            ..Extra::default()
        };
        let proc = consuming(&config(broker.url(), &queue, &out, extra)).await;
        HostileRun {
            broker,
            queue,
            dlq,
            proc,
            out,
            _keep: keep,
        }
    }

    /// Publishes `message` to amq.topic with the routing key `{queue}{suffix}`, then a good
    /// message; returns once the broker confirmed both and fm handled the good one.
    async fn publish(mut self, mut message: Hostile) -> Self {
        let mut publisher = RawPublisher::connect(self.broker.url()).await;
        let mut routing_key = self.queue.clone().into_bytes();
        routing_key.append(&mut message.routing_suffix);
        publisher.publish(&routing_key, &message).await;
        let good_id = uuid::Uuid::new_v4().to_string();
        let good_key = format!("{}.ack", self.queue);
        publisher
            .publish(good_key.as_bytes(), &Hostile::fedora(&good_id))
            .await;
        wait_handled(&mut self.proc, &self.out, &good_id).await;
        self
    }

    /// The hostile message was dropped as invalid, logging `line`, and dead-lettered; fm never
    /// lost its connection, and stops cleanly on SIGTERM.
    async fn expect_dropped(mut self, line: &str) {
        self.proc.wait_for_stderr(line).await;
        self.broker.wait_for_depth(&self.dlq, 1).await;
        self.stop().await;
    }

    /// The message with this id was handled; returns the recorder's line for it.
    async fn expect_handled(mut self, id: &str) -> Value {
        let line = wait_handled(&mut self.proc, &self.out, id).await;
        assert_eq!(self.broker.queue_depth(&self.dlq).await, 0);
        self.stop().await;
        line
    }

    async fn stop(self) {
        self.proc.kill("TERM");
        let output = self.proc.wait().await;
        output.assert_code(0);
        for sign in ["connection lost", "parse error", "overflowed its stack"] {
            assert!(!output.stderr.contains(sign), "{}", output.stderr);
        }
        assert_eq!(self.broker.queue_depth(&self.queue).await, 0);
        self.broker.delete_queue(&self.queue).await;
        self.broker.delete_queue(&self.dlq).await;
    }
}

fn hostile_id() -> String {
    format!("hostile-{}", uuid::Uuid::new_v4().simple())
}

fn too_deep_line(id: &str, run: &HostileRun) -> String {
    format!(
        "message {id} on topic \"{}.ack\" in queue \"{}\" is invalid: its headers nest tables \
         or arrays deeper than {MAX_DEPTH} levels; dropping it",
        run.queue, run.queue
    )
}

/// Waits until the recorder wrote the message `id`; returns its line.
async fn wait_handled(proc: &mut FmProcess, out: &Path, id: &str) -> Value {
    let deadline = Instant::now() + util::TIMEOUT;
    loop {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["record"]["id"] == id);
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "message {id} was never handled\n--- fm's stderr:\n{}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message as raw bytes: every short string may be anything.
struct Hostile {
    /// Appended to the queue name to make the routing key.
    routing_suffix: Vec<u8>,
    message_id: Vec<u8>,
    content_type: Vec<u8>,
    correlation_id: Option<Vec<u8>>,
    /// The header table's entries, each from [`entry`].
    headers: Vec<Vec<u8>>,
}

impl Hostile {
    /// A valid fedora-messaging message (routing key `{queue}.ack`: the recorder acks it).
    fn fedora(id: &str) -> Hostile {
        Hostile {
            routing_suffix: b".ack".to_vec(),
            message_id: id.as_bytes().to_vec(),
            content_type: b"application/json".to_vec(),
            correlation_id: None,
            headers: vec![
                entry(b"fedora_messaging_schema", b'S', &long_str(b"base.message")),
                entry(b"fedora_messaging_severity", b'l', &20i64.to_be_bytes()),
                entry(b"sent-at", b'S', &long_str(b"2026-01-02T03:04:05+00:00")),
            ],
        }
    }

    /// The content header frame's payload for a body of `body_size` bytes.
    fn content_header(&self, body_size: u64) -> Vec<u8> {
        const CONTENT_TYPE: u16 = 1 << 15;
        const CONTENT_ENCODING: u16 = 1 << 14;
        const HEADERS: u16 = 1 << 13;
        const DELIVERY_MODE: u16 = 1 << 12;
        const CORRELATION_ID: u16 = 1 << 10;
        const MESSAGE_ID: u16 = 1 << 7;
        let mut flags = CONTENT_TYPE | CONTENT_ENCODING | HEADERS | DELIVERY_MODE | MESSAGE_ID;
        if self.correlation_id.is_some() {
            flags |= CORRELATION_ID;
        }
        let mut p = Vec::new();
        p.extend(60u16.to_be_bytes()); // class basic
        p.extend(0u16.to_be_bytes()); // weight
        p.extend(body_size.to_be_bytes());
        p.extend(flags.to_be_bytes());
        // In the order of the flags' bits, highest first.
        p.extend(short_str(&self.content_type));
        p.extend(short_str(b"utf-8"));
        p.extend(table(&self.headers));
        p.push(2); // persistent
        if let Some(c) = &self.correlation_id {
            p.extend(short_str(c));
        }
        p.extend(short_str(&self.message_id));
        p
    }
}

fn short_str(s: &[u8]) -> Vec<u8> {
    let mut v = vec![u8::try_from(s.len()).expect("a short string is at most 255 bytes")];
    v.extend(s);
    v
}

fn long_str(s: &[u8]) -> Vec<u8> {
    let mut v = u32::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    v.extend(s);
    v
}

/// A field table entry: name, type tag, encoded value.
fn entry(name: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
    let mut v = short_str(name);
    v.push(tag);
    v.extend(value);
    v
}

fn table(entries: &[Vec<u8>]) -> Vec<u8> {
    long_str(&entries.concat())
}

/// `levels` tables, each the only entry (named "") of the one around it, the innermost empty:
/// 6 bytes a level. Built outside in, as the lengths are known: level k holds 6 × (levels − k).
fn nested_tables(levels: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 * levels);
    for k in 1..levels {
        v.extend(u32::try_from(6 * (levels - k)).unwrap().to_be_bytes());
        v.extend(b"\0F");
    }
    v.extend([0, 0, 0, 0]);
    v
}

/// Just enough AMQP 0-9-1 over plain TCP to publish hand-encoded messages with confirms: the
/// handshake (PLAIN guest/guest, the broker's tuning, no heartbeats), channel 1 in confirm
/// mode, and `basic.publish` with mandatory set.
struct RawPublisher {
    stream: TcpStream,
    frame_max: u32,
}

const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

impl RawPublisher {
    async fn connect(url: &str) -> RawPublisher {
        let url = url::Url::parse(url).expect("broker URL");
        let host = url.host_str().expect("broker host");
        let port = url.port().unwrap_or(5672);
        let stream = TcpStream::connect((host, port))
            .await
            .unwrap_or_else(|e| panic!("connecting to {host}:{port}: {e}"));
        let mut p = RawPublisher {
            stream,
            frame_max: 0,
        };
        p.stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        p.expect_method(0, (10, 10)).await; // connection.start
        let mut start_ok = Vec::new();
        start_ok.extend(table(&[])); // client properties
        start_ok.extend(short_str(b"PLAIN"));
        start_ok.extend(long_str(b"\0guest\0guest"));
        start_ok.extend(short_str(b"en_US"));
        p.send_method(0, (10, 11), &start_ok).await;
        let tune = p.expect_method(0, (10, 30)).await; // connection.tune
        let channel_max = &tune[0..2];
        p.frame_max = u32::from_be_bytes(tune[2..6].try_into().unwrap());
        let mut tune_ok = channel_max.to_vec();
        tune_ok.extend(p.frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        p.send_method(0, (10, 31), &tune_ok).await;
        let vhost = percent_encoding::percent_decode_str(url.path().trim_start_matches('/'))
            .decode_utf8()
            .unwrap()
            .into_owned();
        let mut open = short_str(vhost.as_bytes());
        open.extend([0, 0]); // reserved short string, reserved bit
        p.send_method(0, (10, 40), &open).await;
        p.expect_method(0, (10, 41)).await; // connection.open-ok
        p.send_method(1, (20, 10), &[0]).await; // channel.open
        p.expect_method(1, (20, 11)).await;
        p.send_method(1, (85, 10), &[0]).await; // confirm.select
        p.expect_method(1, (85, 11)).await;
        p
    }

    /// Publishes `message` (body `{}`) to amq.topic and waits for the broker's confirm.
    async fn publish(&mut self, routing_key: &[u8], message: &Hostile) {
        let body = b"{}";
        let mut publish = 0u16.to_be_bytes().to_vec(); // reserved
        publish.extend(short_str(b"amq.topic"));
        publish.extend(short_str(routing_key));
        publish.push(1); // mandatory
        self.send_method(1, (60, 40), &publish).await;
        let header = message.content_header(body.len() as u64);
        assert!(
            header.len() + 8 <= self.frame_max as usize,
            "the content header ({} bytes) does not fit frame_max = {}",
            header.len(),
            self.frame_max
        );
        self.send_frame(HEADER, 1, &header).await;
        self.send_frame(BODY, 1, body).await;
        // A basic.return (unroutable) would come before the ack.
        self.expect_method(1, (60, 80)).await; // basic.ack
    }

    async fn send_method(&mut self, channel: u16, (class, method): (u16, u16), args: &[u8]) {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend(method.to_be_bytes());
        payload.extend(args);
        self.send_frame(METHOD, channel, &payload).await;
    }

    async fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend(channel.to_be_bytes());
        frame.extend(u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend(payload);
        frame.push(FRAME_END);
        self.stream
            .write_all(&frame)
            .await
            .expect("writing a frame");
    }

    /// Reads the next frame, which must be the method `want` on `channel`; returns its arguments.
    async fn expect_method(&mut self, channel: u16, want: (u16, u16)) -> Vec<u8> {
        let read = async {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).await?;
            let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).await?;
            std::io::Result::Ok((head, payload))
        };
        let (head, mut payload) = tokio::time::timeout(util::TIMEOUT, read)
            .await
            .unwrap_or_else(|_| panic!("no answer from the broker for method {want:?}"))
            .expect("reading a frame");
        assert_eq!(payload.pop(), Some(FRAME_END), "frame end");
        let got_channel = u16::from_be_bytes([head[1], head[2]]);
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        assert!(
            head[0] == METHOD && got_channel == channel && got == want,
            "expected method {want:?} on channel {channel}, got frame type {} on channel \
             {got_channel}: {}",
            head[0],
            String::from_utf8_lossy(&payload)
        );
        payload.split_off(4)
    }
}
