//! Operations (issue 7): what a daemon under systemd owes its operators.
//!
//! - systemd notifications: `READY=1` only once the consumer is registered, `WATCHDOG=1` only
//!   while the broker answers (none while it is down or hangs), `STOPPING=1` on SIGTERM — read
//!   from a real `NOTIFY_SOCKET` datagram socket;
//! - the monitoring endpoint: `/live` and `/ready` byte for byte as fedora-messaging answers
//!   (checked against fedora-messaging's own code when its venv is there), `/metrics` parsed as
//!   Prometheus text, scraped with a real HTTP client, its counters matching what was sent;
//! - `fm check`, the systemd units (`systemd-analyze verify`), `scripts/install`, the Debian
//!   package (installed and removed in a scratch root) and shell completions.
//!
//! "The broker is down" is played by a TCP forwarder between fm and the test node, on this
//! machine's loopback: it can drop every connection and refuse new ones (a stopped broker), or
//! hold the bytes (a broker that hangs without closing), without disturbing the shared node
//! other tests use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::util::proxy::{Mode, Proxy};
use crate::util::{self, Broker, Fm, TIMEOUT, fm_bin, plugin_path, repo_root};

// ---------------------------------------------------------------------------------------------
// systemd notifications

/// A `NOTIFY_SOCKET`: every datagram fm sends, with when it arrived.
struct NotifySocket {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("binding the notify socket");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket {
            path,
            got,
            _dir: dir,
        }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().clone()
    }

    /// Every notification, for failure messages.
    fn dump(&self) -> String {
        self.all()
            .iter()
            .map(|(_, m)| format!("{m:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many datagrams with the line `line` arrived in `[from, to)`.
    fn count(&self, line: &str, from: Instant, to: Instant) -> usize {
        self.all()
            .iter()
            .filter(|(at, m)| *at >= from && *at < to && m.lines().any(|l| l == line))
            .count()
    }

    /// Waits until a datagram with a line for which `pred` holds arrives at or after `after`;
    /// returns when it arrived.
    async fn wait_for(
        &self,
        what: &str,
        after: Instant,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Instant {
        util::eventually(timeout, async || {
            self.all()
                .into_iter()
                .find(|(at, m)| *at >= after && m.lines().any(&pred))
                .map(|(at, _)| at)
                .ok_or_else(|| format!("no {what}; notifications so far:\n{}", self.dump()))
        })
        .await
    }

    /// Waits until `count` datagrams with the line `line` arrived at or after `after`.
    async fn wait_count(&self, line: &str, after: Instant, count: usize) {
        util::eventually(TIMEOUT, async || {
            match self.count(line, after, Instant::now()) {
                n if n >= count => Ok(()),
                n => Err(format!("{n} of {count} {line}\n{}", self.dump())),
            }
        })
        .await
    }

    /// Waits until no `line` arrived for `quiet` in a row (fm stopped sending it); returns when
    /// that quiet stretch began.
    async fn wait_quiet(&self, line: &str, quiet: Duration) -> Instant {
        let since = Instant::now();
        util::eventually(TIMEOUT, async || {
            let last = self
                .all()
                .into_iter()
                .filter(|(_, m)| m.lines().any(|l| l == line))
                .map(|(at, _)| at)
                .max()
                .map_or(since, |at| at.max(since));
            if last.elapsed() >= quiet {
                Ok(last)
            } else {
                Err(format!("{line} keeps coming\n{}", self.dump()))
            }
        })
        .await
    }

    /// Returns once every datagram sent before this call has been read: a marker sent to the
    /// socket now comes out of it after them.
    async fn settle(&self) {
        let marker = format!("FM_TEST_SETTLE={}", uuid::Uuid::new_v4());
        std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(marker.as_bytes(), &self.path))
            .expect("sending to the notify socket");
        util::eventually(TIMEOUT, async || {
            match self.all().iter().any(|(_, m)| *m == marker) {
                true => Ok(()),
                false => Err("the marker sent to the notify socket did not come back"),
            }
        })
        .await;
    }
}

/// How many consumers the broker reports on `queue`.
async fn consumers_on(b: &Broker, queue: &str) -> u32 {
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"));
    let _ = conn.close(200, "done".into()).await;
    q.consumer_count()
}

fn durable_queue_toml(queue: &str) -> String {
    format!(
        "[queues.\"{queue}\"]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {{}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_registration_and_the_watchdog_is_fed_only_while_the_broker_answers() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("notify");
    b.declare_queue(&queue).await;
    let proxy = Proxy::start(b.amqp_port()).await;
    let url = proxy.url_for(b.url(), b.amqp_port());
    let notify = NotifySocket::bind();
    let config = format!(
        "amqp_url = \"{url}\"\ncallback = \"{}\"\n{}",
        plugin_path("noop").display(),
        durable_queue_toml(&queue)
    );
    let start = Instant::now();
    let fm = Fm::new()
        .config_toml(&config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .arg("consume")
        .spawn();

    // READY=1 once the consumer is registered: by then the broker lists it.
    let ready = notify
        .wait_for("READY=1", start, TIMEOUT, |l| l == "READY=1")
        .await;
    assert_eq!(
        consumers_on(&b, &queue).await,
        1,
        "READY=1 came before the consumer was registered\n{}",
        notify.dump()
    );
    let before: Vec<String> = notify
        .all()
        .into_iter()
        .filter(|(at, _)| *at < ready)
        .map(|(_, m)| m)
        .collect();
    assert!(
        before.iter().all(|m| m.starts_with("STATUS=")),
        "only STATUS lines before READY=1: {before:?}"
    );
    let ready_msg = notify
        .all()
        .into_iter()
        .find(|(at, _)| *at == ready)
        .unwrap()
        .1;
    assert!(
        ready_msg.contains(&format!(
            "STATUS=consuming from {queue} on amqp://guest:***@"
        )),
        "the status names the queue and the broker, password hidden: {ready_msg:?}"
    );

    // Healthy: a ping every half interval (three of them, however slow the machine is).
    notify.wait_count("WATCHDOG=1", ready, 3).await;

    // The broker goes away: fm says so, and no ping comes for 3 s in a row (six intervals) once
    // the last healthy check is old. A fm that kept pinging would never fall quiet.
    let down = Instant::now();
    proxy.set(Mode::Down);
    notify
        .wait_for("a reconnecting status", down, TIMEOUT, |l| {
            l.starts_with("STATUS=connection lost, reconnecting to amqp://guest:***@")
        })
        .await;
    notify
        .wait_quiet("WATCHDOG=1", Duration::from_secs(3))
        .await;

    // It comes back: fm reconnects and the pings resume.
    let back = Instant::now();
    proxy.set(Mode::Forward);
    notify
        .wait_for(
            "WATCHDOG=1 after the broker came back",
            back,
            Duration::from_secs(60),
            |l| l == "WATCHDOG=1",
        )
        .await;
    assert_eq!(consumers_on(&b, &queue).await, 1);

    // The broker hangs, the TCP connection stays open: the health check's round trip gets no
    // answer, so the pings stop again, although fm still thinks it is connected.
    proxy.set(Mode::Frozen);
    notify
        .wait_quiet("WATCHDOG=1", Duration::from_secs(3))
        .await;
    let thawed = Instant::now();
    proxy.set(Mode::Forward);
    notify
        .wait_for(
            "WATCHDOG=1 after the broker answered again",
            thawed,
            TIMEOUT,
            |l| l == "WATCHDOG=1",
        )
        .await;

    // SIGTERM: STOPPING=1, then no more pings, exit 0.
    let term = Instant::now();
    fm.kill("TERM");
    let stopping = notify
        .wait_for("STOPPING=1", term, TIMEOUT, |l| l == "STOPPING=1")
        .await;
    let out = fm.wait().await;
    out.assert_code(0);
    notify.settle().await;
    assert_eq!(
        notify.count(
            "WATCHDOG=1",
            stopping + Duration::from_millis(1),
            Instant::now()
        ),
        0,
        "pings after STOPPING=1\n{}",
        notify.dump()
    );
    assert_eq!(
        notify.count("READY=1", start, Instant::now()),
        1,
        "READY=1 is said once"
    );
}

#[tokio::test]
async fn a_consumer_that_cannot_register_never_says_ready() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("never-ready"); // never declared
    let notify = NotifySocket::bind();
    let config = format!(
        "amqp_url = \"{}\"\npassive_declares = true\ncallback = \"{}\"\n{}",
        b.url(),
        plugin_path("noop").display(),
        durable_queue_toml(&queue)
    );
    let out = Fm::new()
        .config_toml(&config)
        .env("NOTIFY_SOCKET", &notify.path)
        .arg("consume")
        .run()
        .await;
    out.assert_code(10);
    notify.settle().await;
    let all = notify.dump();
    assert!(
        all.contains("STATUS=connected to amqp://guest:***@"),
        "fm connected and said so: {all}"
    );
    assert!(
        !all.contains("READY=1"),
        "READY=1 without a consumer: {all}"
    );
}

// ---------------------------------------------------------------------------------------------
// Monitoring

/// An answer, read by hyper's HTTP/1 client.
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

async fn http(method: &str, addr: SocketAddr, path: &str) -> Answer {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connecting to fm's monitoring");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("HTTP request");
    let (parts, body) = resp.into_parts();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.expect("HTTP body").to_bytes(),
    }
}

/// The raw bytes of an HTTP/1.0 exchange, to check headers byte for byte (an HTTP client may
/// trim the trailing space fedora-messaging puts in its Content-Type).
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut out))
        .await
        .expect("fm closes an HTTP/1.0 connection")
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn body_of(raw: &str) -> &str {
    &raw[raw.find("\r\n\r\n").expect("end of headers") + 4..]
}

/// What fedora-messaging's own monitoring code answers for these numbers (its `Ready` and
/// `Live` resources, rendered by the installed fedora-messaging): the Content-Type, a newline,
/// then the body. `None` (after a skip line) without the venv.
fn fedora_messaging_answer(
    b: &Broker,
    resource: &str,
    ready: [u64; 6],
    consuming: bool,
) -> Option<String> {
    if std::env::var_os("FM_TEST_VENV").is_none() {
        util::skip("FM_TEST_VENV is not set: cannot compare with fedora-messaging's own answer");
        return None;
    }
    let script = r#"
import sys
from fedora_messaging.twisted import monitor
from fedora_messaging.twisted.stats import ConsumerStatistics, FactoryStatistics
resource, consuming = sys.argv[1], sys.argv[2] == "true"
published, received, processed, dropped, rejected, failed = map(int, sys.argv[3:9])
class Service:
    pass
service = Service()
service.consuming = consuming
service.stats = FactoryStatistics(published=published, consumed=ConsumerStatistics(
    received=received, processed=processed, dropped=dropped, rejected=rejected, failed=failed))
class Request:
    headers = {}
    def setHeader(self, name, value):
        self.headers[name] = value
request = Request()
cls = {"live": monitor.Live, "ready": monitor.Ready}[resource]
body = cls(fm_service=service).render_GET(request)
sys.stdout.buffer.write(request.headers["Content-Type"].encode() + b"\n" + body)
"#;
    let mut cmd = std::process::Command::new(b.venv_python());
    cmd.args([
        "-c",
        script,
        resource,
        if consuming { "true" } else { "false" },
    ]);
    cmd.args(ready.iter().map(u64::to_string));
    let out = cmd.output().expect("running the venv's python");
    assert!(
        out.status.success(),
        "fedora-messaging's monitor code failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_answers_like_fedora_messaging_and_counts_every_message_per_queue() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("monitor");
    let topic = b.unique("mon");
    let fm = Fm::new();
    // The callback decides by topic: *.ack acks, *.drop drops (65), *.nack requeues (75) the
    // first time and acks the redelivery.
    let script = fm.write_file(
        "decide.sh",
        "#!/bin/sh\ncat >/dev/null\ncase \"$FM_TOPIC\" in\n  *.drop) exit 65 ;;\n  \
         *.nack) [ \"$FM_REDELIVERED\" = true ] && exit 0; exit 75 ;;\nesac\nexit 0\n",
    );
    set_executable(&script);
    let config = format!(
        r#"amqp_url = "{url}"
[callback]
command = ["{script}"]
[monitoring]
address = "127.0.0.1"
port = 0
[queues."{queue}"]
durable = false
auto_delete = true
exclusive = true
arguments = {{}}
[[bindings]]
queue = "{queue}"
exchange = "amq.topic"
routing_keys = ["{topic}.#"]
"#,
        url = b.url(),
        script = script.display()
    );
    let mut fm = fm.config_toml(&config).arg("consume").spawn();
    let addr = fm.monitor_addr().await;

    // /live: fedora-messaging's exact bytes, with the real HTTP client and raw.
    let live = http("GET", addr, "/live").await;
    assert_eq!(live.status, 200);
    assert_eq!(&live.body[..], b"{\"status\": \"OK\"}\n");
    let raw = raw_get(addr, "/live").await;
    assert!(raw.starts_with("HTTP/1.0 200 OK\r\n"), "{raw:?}");
    assert!(
        raw.contains("\r\nContent-Type: application/json \r\n"),
        "the trailing space of fedora-messaging's Content-Type: {raw:?}"
    );
    if let Some(theirs) = fedora_messaging_answer(&b, "live", [0; 6], true) {
        assert_eq!(theirs, format!("application/json \n{}", body_of(&raw)));
    }

    // Wait for the consumer, then send: 3 to ack, 2 to drop, 1 to requeue once, 1 invalid.
    util::eventually(TIMEOUT, async || {
        let ready = http("GET", addr, "/ready").await;
        match String::from_utf8_lossy(&ready.body).starts_with("{\"consuming\": true") {
            true => Ok(()),
            false => Err(format!("fm never said consuming: {}", fm.stderr())),
        }
    })
    .await;
    for suffix in ["ack", "ack", "drop", "nack", "ack", "drop"] {
        b.publish_fedora(
            "amq.topic",
            &format!("{topic}.{suffix}"),
            &serde_json::json!({"n": 1}),
        )
        .await;
    }
    b.publish(
        "amq.topic",
        &format!("{topic}.ack"),
        b"this is not JSON",
        BasicProperties::default(),
    )
    .await;

    // received 7 = 6 valid + the requeued one again; the invalid one is counted nowhere in
    // /ready (as in fedora-messaging), only in fm_messages_invalid_total.
    let expected = "{\"consuming\": true, \"published\": 0, \"consumed\": {\"received\": 7, \
                    \"processed\": 4, \"dropped\": 2, \"rejected\": 1, \"failed\": 0}}\n";
    util::eventually(TIMEOUT, async || {
        let metrics = String::from_utf8(http("GET", addr, "/metrics").await.body.to_vec()).unwrap();
        let ready = http("GET", addr, "/ready").await;
        let invalid = metrics.contains(&format!(
            "fm_messages_invalid_total{{queue=\"{queue}\"}} 1\n"
        ));
        match ready.body == expected.as_bytes() && invalid {
            true => Ok(()),
            false => Err(format!(
                "/ready is {:?}, expected {expected:?}\n{}",
                String::from_utf8_lossy(&ready.body),
                fm.stderr()
            )),
        }
    })
    .await;
    let raw = raw_get(addr, "/ready").await;
    assert!(
        raw.contains("\r\nContent-Type: application/json \r\n"),
        "{raw:?}"
    );
    assert_eq!(body_of(&raw), expected);
    if let Some(theirs) = fedora_messaging_answer(&b, "ready", [0, 7, 4, 2, 1, 0], true) {
        assert_eq!(theirs, format!("application/json \n{expected}"));
    }

    // /metrics: valid Prometheus text whose numbers are the messages sent.
    let answer = http("GET", addr, "/metrics").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers[hyper::header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let metrics = prometheus::parse(&text);
    let q = [("queue", queue.as_str())];
    for (name, value) in [
        ("fm_messages_received_total", 7.0),
        ("fm_messages_acked_total", 4.0),
        ("fm_messages_nacked_total", 1.0),
        ("fm_messages_dropped_total", 2.0),
        ("fm_messages_failed_total", 0.0),
        ("fm_messages_invalid_total", 1.0),
        ("fm_callback_duration_seconds_count", 7.0),
        ("fm_callback_duration_seconds_bucket", 7.0), // le="+Inf" is checked below
    ] {
        if name.ends_with("_bucket") {
            let inf = [("queue", queue.as_str()), ("le", "+Inf")];
            assert_eq!(metrics.value(name, &inf), value, "{name}\n{text}");
        } else {
            assert_eq!(metrics.value(name, &q), value, "{name}\n{text}");
        }
    }
    assert_eq!(metrics.kind("fm_callback_duration_seconds"), "histogram");
    assert_eq!(metrics.kind("fm_messages_received_total"), "counter");
    assert!(metrics.value("fm_callback_duration_seconds_sum", &q) > 0.0);
    assert_eq!(metrics.value("fm_connected", &[]), 1.0);
    assert_eq!(metrics.value("fm_consuming", &[]), 1.0);
    assert_eq!(metrics.value("fm_in_flight_messages", &[]), 0.0);
    assert_eq!(metrics.value("fm_reconnects_total", &[]), 0.0);
    let healthy = metrics.value("fm_last_healthy_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - healthy < 30.0 && healthy <= now + 1.0,
        "last healthy {healthy}, now {now}"
    );

    // HEAD works like GET without a body; other paths and methods are refused.
    let head = http("HEAD", addr, "/ready").await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(http("GET", addr, "/nope").await.status, 404);
    let post = http("POST", addr, "/ready").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.headers[hyper::header::ALLOW], "GET, HEAD");

    fm.kill("TERM");
    fm.wait().await.assert_code(0);
}

#[tokio::test]
async fn a_monitoring_port_in_use_stops_fm_at_start() {
    let Some(b) = util::broker() else { return };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = format!(
        "amqp_url = \"{}\"\ncallback = \"{}\"\n[monitoring]\naddress = \"127.0.0.1\"\nport = {port}\n",
        b.url(),
        plugin_path("noop").display()
    );
    let out = Fm::new().config_toml(&config).arg("consume").run().await;
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!(
            "[monitoring] address '127.0.0.1' port {port}: cannot listen for monitoring"
        )),
        "{}",
        out.stderr
    );
}

/// A strict reader of the Prometheus text exposition format (0.0.4), written from the format's
/// description, independent of fm's writer.
mod prometheus {
    use super::BTreeMap;

    pub struct Metrics {
        kinds: BTreeMap<String, String>,
        samples: Vec<(String, BTreeMap<String, String>, f64)>,
    }

    impl Metrics {
        /// The value of the one sample `name{labels}` (labels given in full).
        pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            let want: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let found: Vec<f64> = self
                .samples
                .iter()
                .filter(|(n, l, _)| n == name && *l == want)
                .map(|(_, _, v)| *v)
                .collect();
            assert_eq!(found.len(), 1, "samples of {name}{want:?}");
            found[0]
        }

        pub fn kind(&self, family: &str) -> &str {
            &self.kinds[family]
        }
    }

    fn valid_name(s: &str, colons: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
    }

    fn parse_value(s: &str) -> Option<f64> {
        match s {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => s.parse().ok(),
        }
    }

    /// The family a sample belongs to: `x_bucket`, `x_sum`, `x_count` of histogram `x`.
    fn family<'a>(name: &'a str, kinds: &BTreeMap<String, String>) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && kinds.get(base).map(String::as_str) == Some("histogram")
            {
                return base;
            }
        }
        name
    }

    /// `name="value",...}` (after the `{`): the labels, and what follows the `}`.
    fn parse_labels<'a>(mut rest: &'a str, at: &str) -> (BTreeMap<String, String>, &'a str) {
        let mut labels = BTreeMap::new();
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                return (labels, after);
            }
            let eq = rest
                .find('=')
                .unwrap_or_else(|| panic!("no = in labels, {at}"));
            let name = &rest[..eq];
            assert!(valid_name(name, false), "bad label name {name:?}, {at}");
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("label value not quoted, {at}"));
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        other => panic!("bad escape {other:?}, {at}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value, {at}"),
                }
            };
            assert!(
                labels.insert(name.to_owned(), value).is_none(),
                "repeated label, {at}"
            );
            rest = &rest[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else {
                assert!(rest.starts_with('}'), "expected , or }} in labels, {at}");
            }
        }
    }

    pub fn parse(text: &str) -> Metrics {
        assert!(text.ends_with('\n'), "the text ends with a newline");
        let mut kinds = BTreeMap::new();
        let mut helped = BTreeMap::new();
        let mut samples: Vec<(String, BTreeMap<String, String>, f64)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let at = format!("line {}: {line:?}", i + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        assert!(valid_name(name, true), "{at}");
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                            "{at}"
                        );
                        assert!(
                            !samples.iter().any(|(n, _, _)| family(n, &kinds) == name),
                            "TYPE after samples, {at}"
                        );
                        assert!(
                            kinds.insert(name.to_owned(), kind.to_owned()).is_none(),
                            "{at}"
                        );
                    }
                    (Some("HELP"), Some(name), _) => {
                        assert!(valid_name(name, true), "{at}");
                        assert!(helped.insert(name.to_owned(), ()).is_none(), "{at}");
                    }
                    _ => {} // a comment
                }
                continue;
            }
            assert!(!line.starts_with('#'), "{at}");
            // name, optional {labels}, value, optional timestamp
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{at}"));
            let name = &line[..name_end];
            assert!(valid_name(name, true), "bad metric name, {at}");
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(r) = rest.strip_prefix('{') {
                (labels, rest) = parse_labels(r, &at);
            }
            let mut fields = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("{at}"))
                .split(' ');
            let value = parse_value(fields.next().unwrap()).unwrap_or_else(|| panic!("{at}"));
            if let Some(ts) = fields.next() {
                ts.parse::<i64>()
                    .unwrap_or_else(|_| panic!("bad timestamp, {at}"));
            }
            assert!(fields.next().is_none(), "{at}");
            let fam = family(name, &kinds);
            let kind = kinds
                .get(fam)
                .unwrap_or_else(|| panic!("sample without TYPE, {at}"));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counters end in _total, {at}");
                assert!(value >= 0.0, "{at}");
            }
            assert!(
                !samples.iter().any(|(n, l, _)| n == name && *l == labels),
                "duplicate sample, {at}"
            );
            samples.push((name.to_owned(), labels, value));
        }
        // Histograms: per label set, `le` ascending, counts cumulative, +Inf equal to _count.
        for (fam, kind) in &kinds {
            if kind != "histogram" {
                continue;
            }
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for (n, l, v) in &samples {
                if *n == format!("{fam}_bucket") {
                    let mut key = l.clone();
                    let le = key.remove("le").expect("a bucket has le");
                    series
                        .entry(key)
                        .or_default()
                        .push((parse_value(&le).expect("le is a number"), *v));
                }
            }
            for (key, buckets) in series {
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{fam}{key:?}: buckets not ascending or not cumulative: {buckets:?}"
                );
                let last = buckets.last().unwrap();
                assert!(last.0.is_infinite(), "{fam}{key:?} ends with +Inf");
                let count = samples
                    .iter()
                    .find(|(n, l, _)| *n == format!("{fam}_count") && *l == key)
                    .map(|(_, _, v)| *v)
                    .unwrap_or_else(|| panic!("{fam}_count{key:?} missing"));
                assert_eq!(last.1, count, "{fam}{key:?}: +Inf bucket != _count");
                assert!(
                    samples
                        .iter()
                        .any(|(n, l, _)| *n == format!("{fam}_sum") && *l == key),
                    "{fam}_sum{key:?} missing"
                );
            }
        }
        Metrics { kinds, samples }
    }
}

// ---------------------------------------------------------------------------------------------
// fm check

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn check_passes_a_working_configuration_and_changes_nothing() {
    let Some(b) = util::broker() else { return };
    let existing = b.unique("check-ok");
    let missing = b.unique("check-missing");
    b.declare_queue(&existing).await;
    let config = format!(
        "amqp_url = \"{}\"\ncallback = \"{}\"\n{}{}[[bindings]]\nqueue = \"{existing}\"\n\
         exchange = \"amq.topic\"\nrouting_keys = [\"{existing}.#\"]\n",
        b.url(),
        plugin_path("noop").display(),
        durable_queue_toml(&existing),
        durable_queue_toml(&missing),
    );
    let out = Fm::new().config_toml(&config).arg("check").run().await;
    out.assert_code(0);
    for line in [
        "ok    callback: plugin noop 0.1.0 (".to_owned(),
        "ok    broker amqp://guest:***@".to_owned(),
        format!(
            "ok    queue '{existing}': exists with the configured settings (0 message(s) ready, 0 consumer(s))"
        ),
        format!(
            "note  queue '{missing}': does not exist yet in vhost '/'; fm consume will declare it"
        ),
        format!("ok    exchange 'amq.topic': exists (bound to queue(s) '{existing}')"),
        "fm check: no problem found; fm consume should start".to_owned(),
    ] {
        assert!(
            out.stdout.contains(&line),
            "missing {line:?} in:\n{}",
            out.stdout
        );
    }
    assert!(
        !b.queue_exists(&missing).await,
        "fm check created queue {missing}"
    );
    // The missing queue's 404 is expected and reported as a note: lapin's own error line for
    // the channel the broker closed must not repeat it.
    assert!(
        !out.stderr.contains("ERROR") && !out.stderr.contains("404"),
        "fm check logged an error for the expected 404:\n{}",
        out.stderr
    );
}

#[tokio::test]
async fn check_exits_with_the_status_consume_would_exit_with() {
    let Some(b) = util::broker() else { return };
    let noop = plugin_path("noop");
    let existing = b.unique("check-durable");
    b.declare_queue(&existing).await; // durable
    let missing = b.unique("check-absent");
    let exchange = b.unique("check-no-exchange");

    struct Case {
        what: &'static str,
        config: String,
        code: i32,
        says: String,
    }
    let cases = [
        Case {
            what: "a queue that must exist does not",
            config: format!(
                "amqp_url = \"{}\"\npassive_declares = true\ncallback = \"{}\"\n{}",
                b.url(),
                noop.display(),
                durable_queue_toml(&missing)
            ),
            code: 10,
            says: format!(
                "FAIL  queue '{missing}': does not exist in vhost '/', and passive_declares is on"
            ),
        },
        Case {
            what: "a queue exists with other settings",
            config: format!(
                "amqp_url = \"{}\"\ncallback = \"{}\"\n[queues.\"{existing}\"]\ndurable = false\n\
                 auto_delete = false\nexclusive = false\narguments = {{}}\n",
                b.url(),
                noop.display()
            ),
            code: 10,
            says: format!("FAIL  queue '{existing}': exists in vhost '/' with other settings"),
        },
        Case {
            what: "a binding's exchange does not exist",
            config: format!(
                "amqp_url = \"{}\"\ncallback = \"{}\"\n{}[[bindings]]\nqueue = \"{existing}\"\n\
                 exchange = \"{exchange}\"\nrouting_keys = [\"#\"]\n",
                b.url(),
                noop.display(),
                durable_queue_toml(&existing)
            ),
            code: 10,
            says: format!("FAIL  exchange '{exchange}': does not exist in vhost '/'"),
        },
        Case {
            what: "the command callback's program is missing",
            config: format!(
                "amqp_url = \"{}\"\n[callback]\ncommand = [\"/nonexistent/fm-handler\"]\n{}",
                b.url(),
                durable_queue_toml(&existing)
            ),
            code: 1,
            says: "FAIL  callback: command (exec): cannot run '/nonexistent/fm-handler'".into(),
        },
        Case {
            what: "the broker cannot be reached",
            config: format!(
                "amqp_url = \"amqp://guest:guest@127.0.0.1:{}/%2F\"\nconnection_timeout = 5\n\
                 callback = \"{}\"\n",
                closed_port(),
                noop.display()
            ),
            code: 14,
            says: "FAIL  cannot connect to the broker".into(),
        },
    ];
    for case in cases {
        let out = Fm::new().config_toml(&case.config).arg("check").run().await;
        assert_eq!(
            out.code(),
            Some(case.code),
            "{}: exit status\n--- stdout:\n{}\n--- stderr:\n{}",
            case.what,
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout.contains(&case.says),
            "{}: missing {:?} in:\n{}",
            case.what,
            case.says,
            out.stdout
        );
        assert!(
            out.stdout.contains(&format!(
                "problem(s); fm consume would exit with status {}",
                case.code
            )),
            "{}: {}",
            case.what,
            out.stdout
        );
    }
    assert!(!b.queue_exists(&missing).await);
}

#[tokio::test]
async fn check_imports_nothing_but_finds_a_python_callbacks_modules() {
    let Some(b) = util::broker() else { return };
    if std::env::var_os("FM_TEST_VENV").is_none() {
        util::skip("FM_TEST_VENV is not set: no interpreter with fedora-messaging");
        return;
    }
    let python = b.venv_python();
    let config = |target: &str| {
        format!(
            "amqp_url = \"{}\"\n[callback]\npython = \"{target}\"\ninterpreter = \"{}\"\n",
            b.url(),
            python.display()
        )
    };
    let out = Fm::new()
        .config_toml(&config("fedora_messaging.example:printer"))
        .arg("check")
        .run()
        .await;
    out.assert_code(0);
    assert!(
        out.stdout.contains(
            "ok    callback: python fedora_messaging.example:printer: module \
             'fedora_messaging.example' found by"
        ),
        "{}",
        out.stdout
    );
    let out = Fm::new()
        .config_toml(&config("fm_test_no_such_module:callback"))
        .arg("check")
        .run()
        .await;
    out.assert_code(1);
    assert!(
        out.stdout
            .contains("cannot import module 'fm_test_no_such_module'"),
        "{}",
        out.stdout
    );
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// systemd units

/// `tool` is installed, or (after a skip line, which fails under CI) `None`.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        util::skip(&format!("{name} is not installed"));
    }
    found
}

/// The man pages in `man/` laid out as a man tree (man1/fm.1...), for `man` and systemd.
fn man_tree(dir: &Path) -> PathBuf {
    let root = dir.join("man");
    for page in ["fm.1", "fm.toml.5", "fm-callbacks.7"] {
        let section = page.rsplit('.').next().unwrap();
        let to = root.join(format!("man{section}"));
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(repo_root().join("man").join(page), to.join(page))
            .unwrap_or_else(|e| panic!("copying man/{page}: {e}"));
    }
    root
}

fn unit_text(user: bool) -> String {
    let path = if user {
        "systemd/user/fm-consumer@.service"
    } else {
        "systemd/fm-consumer@.service"
    };
    std::fs::read_to_string(repo_root().join(path)).unwrap()
}

/// `Key=Value` lines of a unit (comments and sections left out).
fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn directive(unit: &str, key: &str) -> String {
    let found: Vec<String> = directives(unit)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{key}= should be set once in:\n{unit}");
    found[0].clone()
}

fn seconds(v: &str) -> u64 {
    if let Some(m) = v.strip_suffix("min") {
        m.parse::<u64>().unwrap() * 60
    } else {
        v.trim_end_matches('s').parse().unwrap()
    }
}

#[test]
fn the_units_say_what_operators_expect() {
    let default_stop = fm::config::Config::default().shutdown_timeout.as_secs();
    for user in [false, true] {
        let unit = unit_text(user);
        assert_eq!(directive(&unit, "Type"), "notify");
        assert_eq!(directive(&unit, "NotifyAccess"), "main");
        assert_eq!(directive(&unit, "Restart"), "on-failure");
        assert!(
            seconds(&directive(&unit, "RestartSec")) >= 60,
            "restart storms (#214)"
        );
        assert_eq!(
            directive(&unit, "RestartPreventExitStatus"),
            fm::error::code::USAGE.to_string(),
            "a configuration error is not restarted"
        );
        assert!(seconds(&directive(&unit, "TimeoutStopSec")) > default_stop);
        assert!(seconds(&directive(&unit, "WatchdogSec")) > 0);
        assert_eq!(directive(&unit, "KillMode"), "mixed");
        assert_eq!(directive(&unit, "NoNewPrivileges"), "yes");
        assert_eq!(
            directive(&unit, "Documentation"),
            "man:fm(1) man:fm.toml(5) man:fm-callbacks(7)"
        );
        let exec = directive(&unit, "ExecStart");
        if user {
            assert_eq!(
                exec,
                "/usr/bin/fm consume --config %E/fedora-messaging/%i.toml"
            );
            assert_eq!(directive(&unit, "WantedBy"), "default.target");
        } else {
            assert_eq!(
                exec,
                "/usr/bin/fm consume --config /etc/fedora-messaging/%i.toml"
            );
            assert_eq!(directive(&unit, "WantedBy"), "multi-user.target");
            for (key, value) in [
                ("ProtectSystem", "strict"),
                ("ProtectHome", "yes"),
                ("PrivateTmp", "yes"),
            ] {
                assert_eq!(directive(&unit, key), value);
            }
        }
    }
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let man = man_tree(dir.path());
    for user in [false, true] {
        let units = dir.path().join(if user { "user" } else { "system" });
        std::fs::create_dir_all(&units).unwrap();
        // The real binary, since verify checks that ExecStart= can be executed.
        let unit = unit_text(user).replace("/usr/bin/fm ", &format!("{} ", fm_bin().display()));
        std::fs::write(units.join("fm-consumer@.service"), unit).unwrap();
        let runtime = dir.path().join(format!("runtime-{user}"));
        std::fs::create_dir_all(&runtime).unwrap();
        let mut cmd = std::process::Command::new(&analyze);
        if user {
            cmd.arg("--user");
        }
        // verify also runs `man` on each Documentation= page: our pages, from this tree.
        let out = cmd
            .args(["verify", "./fm-consumer@example.service"])
            .current_dir(&units)
            .env("MANPATH", &man)
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze {}verify: {}\n{stderr}",
            if user { "--user " } else { "" },
            out.status
        );
        if !user {
            // And the hardening is worth its name: systemd's own exposure score stays "OK".
            let out = std::process::Command::new(&analyze)
                .args([
                    "security",
                    "--offline=yes",
                    "--no-pager",
                    "./fm-consumer@example.service",
                ])
                .current_dir(&units)
                .env("MANPATH", &man)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let score: f64 = text
                .lines()
                .find_map(|l| l.split("fm-consumer@example.service: ").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
            assert!(score <= 3.0, "exposure {score} is above 3.0:\n{text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Install, package, completions

/// Every file under `root`, relative to it, sorted.
fn files_under(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out.sort();
    out
}

/// What `PREFIX=/usr scripts/install` puts in place.
const INSTALLED_UNDER_USR: &[&str] = &[
    "usr/bin/fm",
    "usr/include/fm_plugin.h",
    "usr/lib/systemd/system/fm-consumer@.service",
    "usr/lib/systemd/system/fm-relay@.service",
    "usr/lib/systemd/user/fm-consumer@.service",
    "usr/share/bash-completion/completions/fm",
    "usr/share/doc/fm/examples/fedora.toml",
    "usr/share/doc/fm/examples/fm.toml",
    "usr/share/fish/vendor_completions.d/fm.fish",
    "usr/share/fm/python/fm_shim.py",
    "usr/share/man/man1/fm.1",
    "usr/share/man/man5/fm.toml.5",
    "usr/share/man/man7/fm-callbacks.7",
    "usr/share/pkgconfig/fm-plugin.pc",
    "usr/share/zsh/vendor-completions/_fm",
];

fn install(destdir: &Path, prefix: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new("bash")
        .arg(repo_root().join("scripts/install"))
        .args(extra)
        .env("DESTDIR", destdir)
        .env("PREFIX", prefix)
        .env("FM_BIN", fm_bin())
        .output()
        .unwrap()
}

#[test]
fn install_puts_every_file_in_its_place_and_uninstall_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("root");
    let out = install(&dest, "/usr", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files_under(&dest), INSTALLED_UNDER_USR);

    // --list says the same, without installing anything.
    let listed = install(&dest, "/usr", &["--list"]);
    let mut listed: Vec<String> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            l.strip_prefix(&format!("{}/", dest.display()))
                .unwrap()
                .to_owned()
        })
        .collect();
    listed.sort();
    assert_eq!(listed, INSTALLED_UNDER_USR);

    // The files are the repository's; the binary is executable; completions come from it.
    let same = |installed: &str, source: &str| {
        assert_eq!(
            std::fs::read(dest.join(installed)).unwrap(),
            std::fs::read(repo_root().join(source)).unwrap(),
            "{installed}"
        );
    };
    same("usr/share/man/man1/fm.1", "man/fm.1");
    same("usr/include/fm_plugin.h", "include/fm_plugin.h");
    same(
        "usr/lib/systemd/system/fm-consumer@.service",
        "systemd/fm-consumer@.service",
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dest.join("usr/bin/fm"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let bash =
        std::fs::read_to_string(dest.join("usr/share/bash-completion/completions/fm")).unwrap();
    assert!(
        bash.contains("--queue-name") && bash.contains("completions"),
        "{bash}"
    );

    let out = install(&dest, "/usr", &["--uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files_under(&dest), Vec::<String>::new());
}

#[test]
fn install_under_another_prefix_points_the_units_at_its_binary() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("root");
    let out = install(&dest, "/opt/fm", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = files_under(&dest);
    assert!(files.contains(&"opt/fm/bin/fm".to_owned()), "{files:?}");
    assert!(
        files.contains(&"opt/fm/share/zsh/site-functions/_fm".to_owned()),
        "{files:?}"
    );
    for unit in [
        "opt/fm/lib/systemd/system/fm-consumer@.service",
        "opt/fm/lib/systemd/user/fm-consumer@.service",
    ] {
        let text = std::fs::read_to_string(dest.join(unit)).unwrap();
        assert!(
            text.contains("\nExecStart=/opt/fm/bin/fm consume --config "),
            "{unit}:\n{text}"
        );
    }
    // Issue 14: the relay's unit too.
    let relay =
        std::fs::read_to_string(dest.join("opt/fm/lib/systemd/system/fm-relay@.service")).unwrap();
    assert!(
        relay.contains("\nExecStart=/opt/fm/bin/fm relay --config "),
        "{relay}"
    );
}

/// The RPM installs with UNIT=fm (packaging/rpm/fm.spec, issue 16): both units are fm@.service,
/// and their comments name them so.
#[test]
fn install_with_another_unit_name_renames_both_units() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("root");
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/install"))
        .env("DESTDIR", &dest)
        .env("PREFIX", "/usr")
        .env("UNIT", "fm")
        .env("FM_BIN", fm_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = files_under(&dest);
    for unit in [
        "usr/lib/systemd/system/fm@.service",
        "usr/lib/systemd/user/fm@.service",
    ] {
        assert!(files.contains(&unit.to_owned()), "{files:?}");
        let text = std::fs::read_to_string(dest.join(unit)).unwrap();
        assert!(!text.contains("fm-consumer@"), "{unit}:\n{text}");
        assert!(
            text.contains("enable --now fm@NAME.service"),
            "{unit}:\n{text}"
        );
    }
    assert!(
        !files.iter().any(|f| f.contains("fm-consumer@")),
        "{files:?}"
    );
    let bad = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/install"))
        .arg("--list")
        .env("UNIT", "fm@x")
        .output()
        .unwrap();
    assert!(!bad.status.success(), "UNIT with an '@' is refused");
}

#[test]
fn the_debian_package_installs_and_removes_cleanly_in_a_scratch_root() {
    let Some(dpkg) = tool("dpkg") else { return };
    let Some(_) = tool("dpkg-deb") else { return };
    let Some(_) = tool("dpkg-shlibdeps") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/deb"))
        .arg(dir.path().join("out"))
        .env("FM_BIN", fm_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/deb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(deb.is_file(), "{}", deb.display());

    let field = |name: &str| {
        let out = std::process::Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(field("Package"), "fm");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Depends").contains("libc6"), "{}", field("Depends"));

    // A scratch root with an empty dpkg database.
    let root = dir.path().join("scratch");
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg_run = |args: &[&str]| {
        let out = std::process::Command::new(&dpkg)
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-not-root",
                "--force-script-chrootless",
                "--force-depends",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpkg {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    dpkg_run(&["--install", deb.to_str().unwrap()]);
    let expected: Vec<String> = INSTALLED_UNDER_USR
        .iter()
        .map(|f| {
            if f.starts_with("usr/share/man/") {
                format!("{f}.gz")
            } else {
                (*f).to_owned()
            }
        })
        .chain(["usr/share/doc/fm/copyright".to_owned()])
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    let installed: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|f| !f.starts_with("var/lib/dpkg/"))
        .collect();
    assert_eq!(installed, expected_sorted);
    let listed = dpkg_run(&["--listfiles", "fm"]);
    for f in &expected {
        assert!(
            listed.lines().any(|l| l == format!("/{f}")),
            "dpkg -L lacks /{f}:\n{listed}"
        );
    }
    let version = std::process::Command::new(root.join("usr/bin/fm"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(version.stdout).unwrap().trim(),
        format!("fm {}", env!("CARGO_PKG_VERSION"))
    );

    dpkg_run(&["--purge", "fm"]);
    let left: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|f| !f.starts_with("var/lib/dpkg/"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "files left after dpkg --purge");
}

#[tokio::test]
async fn completions_are_printed_without_reading_any_configuration() {
    for (shell, marker) in [
        ("bash", "_fm()"),
        ("zsh", "#compdef fm"),
        ("fish", "complete -c fm"),
    ] {
        let out = Fm::new()
            .args(["completions", shell])
            // A broken configuration must not matter.
            .env("FEDORA_MESSAGING_CONF", "/nonexistent/fm.toml")
            .run()
            .await;
        out.assert_code(0);
        for word in [marker, "consume", "check", "queue-name", "config"] {
            assert!(out.stdout.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = Fm::new().args(["completions", "tcsh"]).run().await;
    out.assert_code(2); // an unknown shell is a usage error
}
