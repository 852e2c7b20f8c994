//! `fm-bench`: the bare-lapin baselines and the measuring tools of `scripts/bench`.
//!
//! fm claims to be faster than what people run today and close to what the broker allows. The
//! second half of that claim needs a yardstick measured on the same machine in the same run: the
//! simplest lapin programs that do the same job, with none of fm's work (decoding, validation,
//! the callback, logging, statistics). This crate is that yardstick; it is a workspace member so
//! that `cargo build --release --workspace` builds it, and it never links into the `fm` binary.
//!
//! Subcommands (positional arguments; the script is the only caller, and every line of output
//! it reads is one JSON object):
//!
//! - `consume URL QUEUE PREFETCH COUNT`: **the consume baseline**. `basic.qos(PREFETCH)`, one
//!   consumer, and for each delivery `basic.ack` (one per message, `multiple = false`), awaited
//!   before the next delivery is looked at: the loop of lapin's own examples. Exits after COUNT
//!   acks (0: never). QUEUE may be a comma-separated list: then one channel and consumer per
//!   queue, as fm has, and COUNT acks in all.
//! - `publish URL COUNT WINDOW [SIZE]`: **the publish baseline**. Confirm mode, COUNT persistent,
//!   mandatory messages to `amq.topic` with the routing key `bench.publish`, at most WINDOW
//!   unconfirmed at once (fm publish's window is 1000); every confirm is awaited and checked.
//!   Bodies and headers are built in memory: no file is read, nothing is parsed.
//! - `fill URL QUEUE COUNT [SIZE]`: declare the durable QUEUE (the settings the benchmark's fm
//!   and fedora-messaging configurations declare it with), bind it to `amq.topic` (`fm-bench`
//!   with `bench.#`, any other queue with `scale.QUEUE`, its own key), purge it, and publish
//!   COUNT messages to it as `publish` does. QUEUE may be a comma-separated list: COUNT messages
//!   each. SIZE is the body size in bytes (default 200).
//! - `watch URL QUEUE COUNT TIMEOUT_S`: the one way every consumer is timed. Prints
//!   `{"watching": true}` once QUEUE holds COUNT ready messages, then polls the ready count
//!   (a passive `queue.declare`) every [`POLL`] until it is 0. `t_first` is the first poll that
//!   saw fewer than COUNT ready (the consumer got its first deliveries), `t_empty` the first poll
//!   that saw 0; the rate is the messages that left the queue between them divided by the time
//!   between them. In that interval the broker keeps PREFETCH messages unacknowledged and sends
//!   one more only when one is acked, so it is the consumer's steady ack rate, start-up excluded.
//!   (QUEUE may be a comma-separated list: COUNT is then their total, and so is each poll.)
//! - `depth URL QUEUE`: the ready count and the number of consumers, once (summed over a
//!   comma-separated list).
//! - `record-file COUNT PATH [SIZE]`: COUNT record-format lines (topic `bench.publish`) for the
//!   publish runs of fm and fedora-messaging.
//! - `connect-time URL QUEUE RUNS`: what the broker's side of a consumer start-up costs: the
//!   AMQP handshake (TCP connect to `connection.open-ok`), then fm's set-up steps (declare the
//!   queue, bind it, `basic.qos`, `basic.consume`), RUNS times.
//!
//! - `rpc-serve URL QUEUE PREFETCH`: **the request/reply baseline**. Declares QUEUE (not
//!   durable), `basic.qos(PREFETCH)`, and for each request publishes `{"ok":true}` to its
//!   `reply_to` with its `correlation_id` (no confirm, not mandatory), then acks it, in order of
//!   arrival, until SIGTERM: the least work a server can do per call (but one call at a time:
//!   a server that answers several at once, as fm does, can pass it).
//!
//! Messages are fedora-messaging's: a 200-byte JSON object body written with Python's separators,
//! `content_type = application/json`, `content_encoding = utf-8`, `delivery_mode = 2`, a UUID4
//! `message_id`, and the headers `fedora_messaging_schema`, `fedora_messaging_schema_package`,
//! `sent-at`, `fedora_messaging_severity` and `priority` (fedora-messaging 3.9's for its base
//! message class).

use std::collections::VecDeque;
use std::io::Write as _;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How often `watch` looks at the queue.
const POLL: Duration = Duration::from_millis(5);
/// The size of every message body, in bytes.
const BODY_SIZE: usize = 200;
/// The exchange the benchmark queue is bound to, and publishers publish to.
const EXCHANGE: &str = "amq.topic";
/// The routing key messages pre-filled for consume runs carry.
const FILL_KEY: &str = "bench.consume";
/// The routing key of published messages.
const PUBLISH_KEY: &str = "bench.publish";
/// The benchmark queue (every other queue is one of the scale section's).
const QUEUE: &str = "fm-bench";
/// The binding of the benchmark queue.
const BINDING: &str = "bench.#";
/// How many messages `fill` keeps unconfirmed at once.
const FILL_WINDOW: usize = 1000;

const USAGE: &str = "usage: fm-bench consume URL QUEUE[,QUEUE...] PREFETCH COUNT
       fm-bench publish URL COUNT WINDOW [SIZE]
       fm-bench fill URL QUEUE[,QUEUE...] COUNT [SIZE]
       fm-bench watch URL QUEUE[,QUEUE...] COUNT TIMEOUT_S
       fm-bench depth URL QUEUE[,QUEUE...]
       fm-bench record-file COUNT PATH [SIZE]
       fm-bench connect-time URL QUEUE RUNS
       fm-bench rpc-serve URL QUEUE PREFETCH";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(&args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fm-bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<()> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["consume", url, queue, prefetch, count] => {
            consume(url, queue, prefetch.parse()?, count.parse()?).await
        }
        ["publish", url, count, window] => {
            publish(url, count.parse()?, window.parse()?, BODY_SIZE).await
        }
        ["publish", url, count, window, size] => {
            publish(url, count.parse()?, window.parse()?, size.parse()?).await
        }
        ["fill", url, queue, count] => fill(url, queue, count.parse()?, BODY_SIZE).await,
        ["fill", url, queue, count, size] => fill(url, queue, count.parse()?, size.parse()?).await,
        ["watch", url, queue, count, timeout] => {
            watch(url, queue, count.parse()?, timeout.parse()?).await
        }
        ["depth", url, queue] => {
            let (conn, channel) = open(url).await?;
            let (ready, consumers) = depth_all(&channel, queue).await?;
            emit(json!({"ready": ready, "consumers": consumers}));
            conn.close(200, "done".into()).await?;
            Ok(())
        }
        ["record-file", count, path] => record_file(count.parse()?, path, BODY_SIZE),
        ["record-file", count, path, size] => record_file(count.parse()?, path, size.parse()?),
        ["connect-time", url, queue, runs] => connect_time(url, queue, runs.parse()?).await,
        ["rpc-serve", url, queue, prefetch] => rpc_serve(url, queue, prefetch.parse()?).await,
        _ => Err(USAGE.into()),
    }
}

/// Print one JSON line on stdout, at once (the script reads it while this runs).
fn emit(value: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

async fn open(url: &str) -> Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// The consume baseline: ack every delivery, one at a time. With several queues, one consumer
/// per queue, each on a channel of its own with a loop of its own (fm's layout).
async fn consume(url: &str, queues: &str, prefetch: u16, count: u64) -> Result<()> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut consumers = Vec::new();
    for (i, queue) in queues.split(',').enumerate() {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("fm-bench-baseline-{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(consumer);
    }
    emit(json!({"consuming": true}));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (acked, secs) = if consumers.len() == 1 {
        let mut consumer = consumers.pop().expect("one consumer");
        let mut acked = 0u64;
        let mut first = None;
        while let Some(delivery) = next_or_term(&mut consumer, &mut term).await? {
            first.get_or_insert_with(Instant::now);
            delivery.ack(BasicAckOptions::default()).await?;
            acked += 1;
            if acked == count {
                break;
            }
        }
        (
            acked,
            first.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64()),
        )
    } else {
        consume_many(consumers, count, &mut term).await?
    };
    emit(json!({"acked": acked, "secs": secs}));
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// The next delivery, or `None` once SIGTERM came or the consumer ended.
async fn next_or_term(
    consumer: &mut lapin::Consumer,
    term: &mut tokio::signal::unix::Signal,
) -> Result<Option<lapin::message::Delivery>> {
    tokio::select! {
        d = consumer.next() => Ok(d.transpose()?),
        _ = term.recv() => Ok(None),
    }
}

/// The request/reply baseline: answer every request with `{"ok":true}`, then ack it.
async fn rpc_serve(url: &str, queue: &str, prefetch: u16) -> Result<()> {
    let (conn, channel) = open(url).await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "fm-bench-rpc".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    emit(json!({"serving": true}));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut answered = 0u64;
    while let Some(delivery) = next_or_term(&mut consumer, &mut term).await? {
        if let Some(to) = delivery.properties.reply_to() {
            let mut properties =
                BasicProperties::default().with_content_type("application/json".into());
            if let Some(id) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(id.clone());
            }
            channel
                .basic_publish(
                    "".into(),
                    to.clone(),
                    BasicPublishOptions::default(),
                    br#"{"ok":true}"#,
                    properties,
                )
                .await?;
        }
        delivery.ack(BasicAckOptions::default()).await?;
        answered += 1;
    }
    emit(json!({"answered": answered}));
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// One loop per consumer, each acking its own deliveries; done after `count` acks in all.
async fn consume_many(
    consumers: Vec<lapin::Consumer>,
    count: u64,
    term: &mut tokio::signal::unix::Signal,
) -> Result<(u64, f64)> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let t0 = Instant::now();
    let first = Arc::new(std::sync::OnceLock::new());
    let mut loops = tokio::task::JoinSet::new();
    for mut consumer in consumers {
        let (acked, done, first) = (Arc::clone(&acked), Arc::clone(&done), Arc::clone(&first));
        loops.spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let Ok(delivery) = delivery else { break };
                first.get_or_init(|| t0.elapsed());
                if delivery.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                if acked.fetch_add(1, Ordering::Relaxed) + 1 == count {
                    done.notify_one();
                }
            }
        });
    }
    tokio::select! {
        () = done.notified() => {}
        _ = term.recv() => {}
    }
    loops.abort_all();
    let since = first
        .get()
        .map_or(0.0, |f| (t0.elapsed() - *f).as_secs_f64());
    Ok((acked.load(Ordering::Relaxed), since))
}

/// A JSON object of `size` bytes (200 unless a size is given), as Python's `json.dumps` writes it.
fn body(seq: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"seq\": {seq}, \"text\": \"");
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(head.as_bytes());
    b.resize(head.len() + pad, b'x');
    b.extend_from_slice(tail.as_bytes());
    b
}

/// A fixed `sent-at`: the value does not matter to anyone here, its shape does.
const SENT_AT: &str = "2025-01-01T00:00:00+00:00";

/// fedora-messaging's properties and headers, with a new UUID4 message id.
fn properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("fedora_messaging_schema"),
        AMQPValue::LongString(LongString::from("base.message")),
    );
    headers.insert(
        ShortString::from("fedora_messaging_schema_package"),
        AMQPValue::LongString(LongString::from("fedora_messaging")),
    );
    headers.insert(
        ShortString::from("sent-at"),
        AMQPValue::LongString(LongString::from(SENT_AT)),
    );
    headers.insert(
        ShortString::from("fedora_messaging_severity"),
        AMQPValue::LongInt(20),
    );
    headers.insert(ShortString::from("priority"), AMQPValue::LongInt(0));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
        .with_headers(headers)
}

/// Publish `count` messages with confirms, at most `window` unconfirmed.
async fn publish_many(
    channel: &Channel,
    routing_key: &str,
    count: u64,
    window: usize,
    size: usize,
) -> Result<()> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut pending = VecDeque::with_capacity(window);
    for seq in 0..count {
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                routing_key.into(),
                options,
                &body(seq, size),
                properties(),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= window.max(1)
            && let Some(oldest) = pending.pop_front()
        {
            check(oldest.await?)?;
        }
    }
    for confirm in pending {
        check(confirm.await?)?;
    }
    Ok(())
}

fn check(confirmation: Confirmation) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err("a message was returned as unroutable".into()),
        Confirmation::Nack(_) => Err("the broker nacked a message".into()),
        Confirmation::NotRequested => Err("the channel is not in confirm mode".into()),
    }
}

/// The publish baseline.
async fn publish(url: &str, count: u64, window: usize, size: usize) -> Result<()> {
    let started = Instant::now();
    let (conn, channel) = open(url).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let t0 = Instant::now();
    publish_many(&channel, PUBLISH_KEY, count, window, size).await?;
    let secs = t0.elapsed().as_secs_f64();
    emit(json!({"published": count, "secs": secs, "wall": started.elapsed().as_secs_f64()}));
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// The routing key a queue is bound with: the benchmark queue gets every `bench.` message, any
/// other (the scale section's queues) a key of its own.
fn binding(queue: &str) -> String {
    if queue == QUEUE {
        BINDING.to_owned()
    } else {
        format!("scale.{queue}")
    }
}

/// The queue as the benchmark's configurations declare it.
async fn declare(channel: &Channel, queue: &str) -> Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            EXCHANGE.into(),
            binding(queue).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

async fn fill(url: &str, queues: &str, count: u64, size: usize) -> Result<()> {
    let t0 = Instant::now();
    let (conn, channel) = open(url).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for queue in queues.split(',') {
        declare(&channel, queue).await?;
        channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        let key = if queue == QUEUE {
            FILL_KEY.to_owned()
        } else {
            binding(queue)
        };
        // Big messages are few: a window of 1000 × 16 MB would hold 16 GB in the client.
        let window = (FILL_WINDOW * BODY_SIZE / size.max(1)).clamp(1, FILL_WINDOW);
        publish_many(&channel, &key, count, window, size).await?;
        let (ready, _) = depth(&channel, queue).await?;
        if u64::from(ready) != count {
            return Err(format!(
                "queue {queue} holds {ready} messages after the fill, not {count}"
            )
            .into());
        }
    }
    let (_, consumers) = depth_all(&channel, queues).await?;
    emit(json!({"filled": count, "consumers": consumers, "secs": t0.elapsed().as_secs_f64()}));
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// The ready and consumer counts summed over a comma-separated list of queues.
async fn depth_all(channel: &Channel, queues: &str) -> Result<(u32, u32)> {
    let (mut ready, mut consumers) = (0, 0);
    for queue in queues.split(',') {
        let (r, c) = depth(channel, queue).await?;
        ready += r;
        consumers += c;
    }
    Ok((ready, consumers))
}

/// The ready count and the consumer count of `queue` (a passive declare).
async fn depth(channel: &Channel, queue: &str) -> Result<(u32, u32)> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

async fn watch(url: &str, queue: &str, count: u32, timeout_s: f64) -> Result<()> {
    let (conn, channel) = open(url).await?;
    let (ready, _) = depth_all(&channel, queue).await?;
    if ready != count {
        return Err(format!("queue {queue} holds {ready} ready messages, expected {count}").into());
    }
    let origin = Instant::now();
    let deadline = origin + Duration::from_secs_f64(timeout_s);
    emit(json!({"watching": true}));
    let mut first: Option<(Instant, u32)> = None;
    let mut polls = 0u64;
    let end = loop {
        let (ready, _) = depth_all(&channel, queue).await?;
        let now = Instant::now();
        polls += 1;
        if first.is_none() && ready < count {
            first = Some((now, ready));
        }
        if ready == 0 {
            break now;
        }
        if now > deadline {
            return Err(format!(
                "queue {queue} still holds {ready} ready messages after {timeout_s} s"
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    };
    let (t_first, left) = first.expect("ready went from count to 0, so below count once");
    let secs = end.duration_since(t_first).as_secs_f64();
    let rate = if secs > 0.0 {
        f64::from(left) / secs
    } else {
        0.0
    };
    emit(json!({
        "t_first": t_first.duration_since(origin).as_secs_f64(),
        "t_empty": end.duration_since(origin).as_secs_f64(),
        "counted": left,
        "secs": secs,
        "rate": rate,
        "polls": polls,
    }));
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// Record-format lines, keys sorted, Python's separators (as `fm record` and
/// `fedora-messaging record` write them).
fn record_file(count: u64, path: &str, size: usize) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for seq in 0..count {
        let body = String::from_utf8(body(seq, size))?;
        let id = uuid::Uuid::new_v4();
        writeln!(
            out,
            "{{\"body\": {body}, \"headers\": {{\"fedora_messaging_schema\": \"base.message\", \
             \"fedora_messaging_schema_package\": \"fedora_messaging\", \
             \"fedora_messaging_severity\": 20, \"priority\": 0, \"sent-at\": \"{SENT_AT}\"}}, \
             \"id\": \"{id}\", \"priority\": 0, \"queue\": null, \"topic\": \"{PUBLISH_KEY}\"}}"
        )?;
    }
    out.flush()?;
    emit(json!({"written": count, "path": path}));
    Ok(())
}

async fn connect_time(url: &str, queue: &str, runs: u32) -> Result<()> {
    let mut handshake = Vec::new();
    let mut consuming = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let t1 = Instant::now();
        let setup = conn.create_channel().await?;
        declare(&setup, queue).await?;
        setup.close(200, "declared".into()).await?;
        let channel = conn.create_channel().await?;
        channel.basic_qos(10, BasicQosOptions::default()).await?;
        let _consumer = channel
            .basic_consume(
                queue.into(),
                "fm-bench-connect-time".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let t2 = Instant::now();
        handshake.push(t1.duration_since(t0).as_secs_f64() * 1e3);
        consuming.push(t2.duration_since(t0).as_secs_f64() * 1e3);
        conn.close(200, "done".into()).await?;
    }
    emit(json!({"handshake_ms": handshake, "consuming_ms": consuming}));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_200_bytes_of_json_objects() {
        for seq in [0, 7, 19_999, u64::MAX] {
            let b = body(seq, BODY_SIZE);
            assert_eq!(b.len(), BODY_SIZE, "{seq}");
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["seq"], json!(seq));
        }
    }

    #[test]
    fn record_lines_are_messages_fedora_messaging_can_load() {
        let dir = std::env::temp_dir().join(format!("fm-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        record_file(3, path.to_str().unwrap(), BODY_SIZE).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for line in lines {
            let v: Value = serde_json::from_str(line).unwrap();
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["body", "headers", "id", "priority", "queue", "topic"]
            );
            assert_eq!(v["headers"]["fedora_messaging_severity"], 20);
            assert_eq!(v["topic"], PUBLISH_KEY);
            assert!(v["body"].is_object());
        }
    }
}
