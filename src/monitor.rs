//! The monitoring HTTP endpoint (`[monitoring] address`, `port`): `/live`, `/ready` and
//! `/metrics`.
//!
//! `/live` and `/ready` answer byte for byte what fedora-messaging's monitoring answers
//! (`fedora_messaging/twisted/monitor.py`, 3.9.1), so health checks written for it (OpenShift
//! probes, scripts comparing the JSON) keep working: status 200 whatever the state, the header
//! `Content-Type: application/json ` — with its trailing space — and Python's `json.dumps`
//! layout (`", "` and `": "` separators, keys in fedora-messaging's order) plus a newline.
//! As with Twisted's leaf resources, anything below `/live/` or `/ready/` answers the same, and
//! `HEAD` works wherever `GET` does.
//!
//! `/metrics` is fm's own: the Prometheus text exposition format (version 0.0.4) with
//! per-queue message counters, a callback-duration histogram, reconnections, the connection
//! state, in-flight messages and when fm was last found healthy.
//!
//! The server is hyper's HTTP/1 connection driver on the tokio runtime; fm parses no HTTP
//! itself. Slow clients cannot hold a connection open forever (`header_read_timeout`).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Monitoring;
use crate::stats::{DURATION_BUCKETS, QueueStats, Stats};

/// fedora-messaging's `Content-Type`, trailing space included (`request.setHeader(
/// "Content-Type", "application/json ")` in its `monitor.py`).
/// What fm logs, followed by the address, once monitoring listens (port 0 picks a free one:
/// tests and operators read the address from this line).
pub const LISTENING: &str = "monitoring on http://";

pub const JSON_CONTENT_TYPE: &str = "application/json ";
/// The Prometheus text format's media type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `/live`'s body: `json.dumps({"status": "OK"}) + "\n"`.
pub const LIVE_BODY: &str = "{\"status\": \"OK\"}\n";
/// A client has this long to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The running monitoring server.
pub struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Running {
    /// The address it listens on (useful with `port = 0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Listen where `[monitoring]` says and serve until [`Running::stop`] (or drop).
///
/// An `address` of `""` means every IPv4 interface, as in fedora-messaging (Twisted's
/// `interface=""`). A port that cannot be bound is an error: the operator asked for
/// monitoring, and silently running without it would hide the consumer from its probes.
pub async fn start(monitoring: &Monitoring, stats: Arc<Stats>) -> anyhow::Result<Running> {
    let host = if monitoring.address.is_empty() {
        "0.0.0.0"
    } else {
        monitoring.address.as_str()
    };
    let where_ = format!("[monitoring] address '{}' port {}", host, monitoring.port);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, monitoring.port))
        .await
        .with_context(|| format!("{where_}: cannot resolve the address"))?
        .collect();
    let mut last_err = None;
    let mut listener = None;
    for addr in &addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let listener = match (listener, last_err) {
        (Some(l), _) => l,
        (None, Some(e)) => {
            return Err(e).with_context(|| {
                format!(
                    "{where_}: cannot listen for monitoring (is another process, perhaps \
                     another consumer with the same configuration, using that port?)"
                )
            });
        }
        (None, None) => anyhow::bail!("{where_}: the address resolves to nothing"),
    };
    let addr = listener
        .local_addr()
        .context("reading the monitoring address")?;
    tracing::info!("{LISTENING}{addr}/ (/live, /ready, /metrics)");
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, stats, stop.clone()));
    Ok(Running { addr, stop })
}

/// The most monitoring connections served at once. More wait in the kernel's backlog, costing
/// fm no file descriptor: idle connections once exhausted them (issue 17), and then exec mode
/// could not start its commands. A probe needs one connection; 64 leaves room for several.
const MAX_CONNECTIONS: usize = 64;

async fn serve(listener: TcpListener, stats: Arc<Stats>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!("monitoring: accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let stats = Arc::clone(&stats);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let stats = Arc::clone(&stats);
                async move { Ok::<_, Infallible>(respond(&req, &stats)) }
            });
            let conn = http1::Builder::new()
                .title_case_headers(true)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(err) = r {
                    tracing::debug!("monitoring: connection from {peer}: {err}");
                },
                _ = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// The answer to one request.
fn respond(req: &Request<Incoming>, stats: &Stats) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let under = |name: &str| {
        path.strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let (content_type, body) = if under("/live") {
        (JSON_CONTENT_TYPE, LIVE_BODY.to_owned())
    } else if under("/ready") {
        (JSON_CONTENT_TYPE, ready_body(stats))
    } else if path == "/metrics" {
        (METRICS_CONTENT_TYPE, metrics_body(stats))
    } else {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: fm serves /live, /ready and /metrics\n",
        );
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are allowed\n",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    // hyper leaves the body out of a HEAD response and keeps its Content-Length.
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `/ready`: fedora-messaging's `{"consuming": …, "published": …, "consumed": {…}}` in
/// `json.dumps` layout, then a newline; for `fm relay`, [`relay_ready_body`].
pub fn ready_body(stats: &Stats) -> String {
    if stats.spool.is_active() {
        return relay_ready_body(stats);
    }
    format!(
        "{{\"consuming\": {}, \"published\": {}, \"consumed\": {{\"received\": {}, \
         \"processed\": {}, \"dropped\": {}, \"rejected\": {}, \"failed\": {}}}}}\n",
        if stats.consuming() { "true" } else { "false" },
        Stats::get(&stats.published),
        Stats::get(&stats.received),
        Stats::get(&stats.processed),
        Stats::get(&stats.dropped),
        Stats::get(&stats.rejected),
        Stats::get(&stats.failed),
    )
}

/// `/ready` of `fm relay`: `{"relaying": …, "spool": {"depth": …, "oldest_age_seconds": …,
/// "sent": …, "failed": …, "quarantined": …}}` in the same layout. `relaying` is true while a
/// channel to the broker is open; the age is 0 when nothing waits.
pub fn relay_ready_body(stats: &Stats) -> String {
    let spool = &stats.spool;
    format!(
        "{{\"relaying\": {}, \"spool\": {{\"depth\": {}, \"oldest_age_seconds\": {:.3}, \
         \"sent\": {}, \"failed\": {}, \"quarantined\": {}}}}}\n",
        if stats.consuming() { "true" } else { "false" },
        Stats::get(&spool.depth),
        spool.oldest_age().unwrap_or_default().as_secs_f64(),
        Stats::get(&spool.sent),
        Stats::get(&spool.failed),
        Stats::get(&spool.quarantined),
    )
}

/// `fm relay`'s spool in `/metrics`.
fn spool_metrics(out: &mut String, stats: &Stats) {
    let spool = &stats.spool;
    let rows: [(&str, &str, &str, f64); 5] = [
        (
            "fm_spool_depth_messages",
            "Messages waiting in the spool (fm relay).",
            "gauge",
            Stats::get(&spool.depth) as f64,
        ),
        (
            "fm_spool_oldest_age_seconds",
            "How long the oldest message waiting in the spool has waited (0 when none waits).",
            "gauge",
            spool.oldest_age().unwrap_or_default().as_secs_f64(),
        ),
        (
            "fm_spool_sent_total",
            "Spooled messages the broker confirmed, deleted from the spool.",
            "counter",
            Stats::get(&spool.sent) as f64,
        ),
        (
            "fm_spool_failed_total",
            "Spooled messages the broker returned or refused, moved to the failed area.",
            "counter",
            Stats::get(&spool.failed) as f64,
        ),
        (
            "fm_spool_quarantined_total",
            "Files and lines of the spool that were not messages, moved aside.",
            "counter",
            Stats::get(&spool.quarantined) as f64,
        ),
    ];
    for (name, help, kind, value) in rows {
        header(out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }
}

/// Reads one per-queue counter.
type QueueCounter = fn(&QueueStats) -> u64;

/// `/metrics`: the Prometheus text format.
pub fn metrics_body(stats: &Stats) -> String {
    let mut out = String::with_capacity(4096);
    let queues = stats.queues();

    let per_queue: [(&str, &str, QueueCounter); 6] = [
        (
            "fm_messages_received_total",
            "Messages delivered from the queue that passed validation and went to the callback.",
            |q| Stats::get(&q.received),
        ),
        (
            "fm_messages_acked_total",
            "Messages acknowledged after the callback handled them (\"processed\" in /ready).",
            |q| Stats::get(&q.acked),
        ),
        (
            "fm_messages_nacked_total",
            "Messages returned to the queue: the callback said Nack, or Halt with requeue \
             (\"rejected\" in /ready).",
            |q| Stats::get(&q.nacked),
        ),
        (
            "fm_messages_dropped_total",
            "Messages rejected without requeue because the callback said Drop or they were \
             handed to the callback more than max_redeliveries times.",
            |q| Stats::get(&q.dropped),
        ),
        (
            "fm_messages_failed_total",
            "Messages whose callback failed unexpectedly.",
            |q| Stats::get(&q.failed),
        ),
        (
            "fm_messages_invalid_total",
            "Messages rejected without requeue before the callback because they failed \
             validation (not UTF-8, not a JSON object, bad headers).",
            |q| Stats::get(&q.invalid),
        ),
    ];
    for (name, help, value) in per_queue {
        header(&mut out, name, help, "counter");
        for q in &queues {
            let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", escape(&q.label), value(q));
        }
    }

    let name = "fm_callback_duration_seconds";
    header(
        &mut out,
        name,
        "How long the callback took to handle a message, per queue.",
        "histogram",
    );
    for q in &queues {
        let label = escape(&q.label);
        let cumulative = q.duration.cumulative();
        for (le, count) in DURATION_BUCKETS.iter().zip(&cumulative) {
            let _ = writeln!(
                out,
                "{name}_bucket{{queue=\"{label}\",le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{queue=\"{label}\",le=\"+Inf\"}} {}",
            cumulative[DURATION_BUCKETS.len()]
        );
        let _ = writeln!(
            out,
            "{name}_sum{{queue=\"{label}\"}} {}",
            q.duration.sum_seconds()
        );
        let _ = writeln!(
            out,
            "{name}_count{{queue=\"{label}\"}} {}",
            q.duration.count()
        );
    }

    let single: [(&str, &str, &str, f64); 6] = [
        (
            "fm_reconnects_total",
            "Reconnections to the broker after a lost connection.",
            "counter",
            Stats::get(&stats.reconnects) as f64,
        ),
        (
            "fm_messages_published_total",
            "Messages published (\"published\" in /ready).",
            "counter",
            Stats::get(&stats.published) as f64,
        ),
        (
            "fm_connected",
            "1 while fm has an open connection to the broker, else 0.",
            "gauge",
            f64::from(u8::from(stats.broker().is_some())),
        ),
        (
            "fm_consuming",
            "1 while every consumer is registered and receiving, else 0 (\"consuming\" in \
             /ready).",
            "gauge",
            f64::from(u8::from(stats.consuming())),
        ),
        (
            "fm_in_flight_messages",
            "Messages being handled by the callback right now.",
            "gauge",
            Stats::get(&stats.in_flight) as f64,
        ),
        (
            "fm_last_healthy_timestamp_seconds",
            "When the health check last found the connection, channels and consumers alive \
             (Unix time; 0 if never).",
            "gauge",
            stats.last_healthy_unix().unwrap_or(0.0),
        ),
    ];
    for (name, help, kind, value) in single {
        header(&mut out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }

    if stats.spool.is_active() {
        spool_metrics(&mut out, stats);
    }
    header(
        &mut out,
        "fm_build_info",
        "fm's version, as a label; the value is always 1.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "fm_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\"));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Counter;

    #[test]
    fn ready_has_fedora_messagings_layout() {
        let stats = Stats::default();
        assert_eq!(
            ready_body(&stats),
            "{\"consuming\": false, \"published\": 0, \"consumed\": {\"received\": 0, \
             \"processed\": 0, \"dropped\": 0, \"rejected\": 0, \"failed\": 0}}\n"
        );
        stats.set_consuming(true);
        for what in [
            Counter::Received,
            Counter::Received,
            Counter::Processed,
            Counter::Failed,
        ] {
            stats.count("q", what);
        }
        stats.count("q", Counter::Invalid); // not a fedora-messaging counter
        assert_eq!(
            ready_body(&stats),
            "{\"consuming\": true, \"published\": 0, \"consumed\": {\"received\": 2, \
             \"processed\": 1, \"dropped\": 0, \"rejected\": 0, \"failed\": 1}}\n"
        );
    }

    #[test]
    fn metrics_label_queues_by_their_configured_name() {
        let stats = Stats::default();
        stats.register_queue("amq.gen-abc", "");
        stats.register_queue("odd\"name", "odd\"name");
        stats.count("amq.gen-abc", Counter::Received);
        stats.observe_callback("amq.gen-abc", Duration::from_millis(3));
        let text = metrics_body(&stats);
        assert!(
            text.contains("fm_messages_received_total{queue=\"\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("fm_messages_received_total{queue=\"odd\\\"name\"} 0\n"));
        assert!(text.contains("fm_callback_duration_seconds_bucket{queue=\"\",le=\"0.001\"} 0\n"));
        assert!(text.contains("fm_callback_duration_seconds_bucket{queue=\"\",le=\"0.005\"} 1\n"));
        assert!(text.contains("fm_callback_duration_seconds_bucket{queue=\"\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("fm_callback_duration_seconds_count{queue=\"\"} 1\n"));
        assert!(text.contains("fm_connected 0\n"));
        assert!(text.contains("fm_last_healthy_timestamp_seconds 0\n"));
        assert!(
            !text.contains("fm_spool_"),
            "only a relay speaks of a spool"
        );
    }

    #[test]
    fn a_relay_reports_its_spool() {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = Stats::default();
        stats.spool.active.store(true, Relaxed);
        stats.spool.depth.store(7, Relaxed);
        stats.spool.sent.store(3, Relaxed);
        assert_eq!(
            ready_body(&stats),
            "{\"relaying\": false, \"spool\": {\"depth\": 7, \"oldest_age_seconds\": 0.000, \
             \"sent\": 3, \"failed\": 0, \"quarantined\": 0}}\n"
        );
        let text = metrics_body(&stats);
        assert!(text.contains("fm_spool_depth_messages 7\n"), "{text}");
        assert!(text.contains("fm_spool_sent_total 3\n"), "{text}");
    }
}
