//! `fm record` (issue 4): the lines it writes are the lines `fedora-messaging record` writes,
//! a recording replays through `fm publish` unchanged, and a message is acked only once its
//! line is written.

use std::path::Path;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::json;

use crate::util::peer::{Peer, exchange_and_queue, lines, queue_config, wait_for_lines};
use crate::util::{Broker, Fm, broker};

/// Messages that exercise the record format: non-ASCII kept as UTF-8, escapes, nested keys
/// to sort, floats in Python's spelling, big integers, typed headers, priorities.
fn tricky_messages() -> String {
    [
        json!({"topic": "org.example.one", "id": "d8f1c7f4-6c1e-4c53-9f11-1b2c3d4e5f60",
               "body": {"z": "é ☃ 😀 \"quoted\" \\ \t \u{1}", "a": [1, -2, 2.5, 1e100, 0.1, 12345678901234567890u64, null, true],
                        "m": {"b": {"d": 1, "c": 2}, "a": []}},
               "headers": {"sent-at": "2022-03-04T05:06:07+00:00", "fedora_messaging_severity": 30,
                           "x-text": "v", "x-int": 7, "x-big": 12345678901i64, "x-bool": false,
                           "fedora_messaging_user_alice": true}}),
        json!({"topic": "org.example.two", "body": {}, "priority": 3}),
        json!({"topic": "org.example.three", "body": {"ü": "ß"}, "headers": {"fedora_messaging_severity": 10}}),
    ]
    .iter()
    .map(|m| format!("{m}\n"))
    .collect()
}

/// `fm record` with `config`, to FILE, for `limit` messages; returns its lines.
async fn fm_record(config: &str, limit: usize) -> Vec<String> {
    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("fm.jsonl");
    let out = Fm::new()
        .config_toml(config)
        .arg("record")
        .arg(&file)
        .args(["--limit", &limit.to_string()])
        .run()
        .await;
    out.assert_code(0);
    lines(&file)
}

/// `fedora-messaging record` with `config`, for `limit` messages; returns its lines.
async fn python_record(peer: &Peer, config: &str, limit: usize) -> Vec<String> {
    let conf = peer.file("record.toml", config);
    let file = peer.file("python.jsonl", "");
    let out = peer
        .run(
            &conf,
            &[
                "record",
                file.to_str().unwrap(),
                "--limit",
                &limit.to_string(),
            ],
        )
        .await;
    assert!(out.status.success(), "fedora-messaging record: {out:?}");
    lines(&file)
}

/// fedora-messaging publishes; fm and fedora-messaging each record a copy (from two queues
/// bound to the same exchange): the lines are equal, but for the queue name.
#[tokio::test]
async fn fm_record_writes_what_fedora_messaging_record_writes() {
    let Some(b) = broker() else { return };
    let (exchange, q_fm) = exchange_and_queue(&b, "rec-fm").await;
    let q_py = b.unique("rec-py");
    b.declare_queue(&q_py).await;
    b.bind(&q_py, &exchange, "#").await;

    let peer = Peer::new(&b);
    let conf = peer.file("publish.toml", queue_config(&b, &exchange, &q_fm));
    let file = peer.file("in.jsonl", tricky_messages());
    let out = peer.run(&conf, &["publish", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "fedora-messaging publish: {out:?}");

    let from_fm = fm_record(&queue_config(&b, &exchange, &q_fm), 3).await;
    let from_python = python_record(&peer, &queue_config(&b, &exchange, &q_py), 3).await;
    assert_eq!(from_fm.len(), 3);
    let as_if_fm: Vec<String> = from_python
        .iter()
        .map(|l| {
            l.replace(
                &format!("\"queue\": \"{q_py}\""),
                &format!("\"queue\": \"{q_fm}\""),
            )
        })
        .collect();
    assert_eq!(from_fm, as_if_fm);
    // Spot checks of the format itself.
    assert!(from_fm[0].starts_with(r#"{"body": {"a": [1, -2, 2.5, 1e+100, 0.1, 12345678901234567890, null, true], "m": {"a": [], "b": {"c": 2, "d": 1}}, "z": "é ☃ 😀 \"quoted\" \\ \t \u0001"}, "headers": {"#), "{}", from_fm[0]);
    assert!(from_fm[0].ends_with(&format!(r#""id": "d8f1c7f4-6c1e-4c53-9f11-1b2c3d4e5f60", "priority": 0, "queue": "{q_fm}", "topic": "org.example.one"}}"#)), "{}", from_fm[0]);
    assert!(from_fm[1].contains(r#""priority": 3"#), "{}", from_fm[1]);
    for q in [q_fm, q_py] {
        b.delete_queue(&q).await;
    }
    b.delete_exchange(&exchange).await;
}

/// `fedora-messaging record` file → `fm publish` → `fm record`: the same lines come out, ids
/// and sent-at kept.
#[tokio::test]
async fn a_fedora_messaging_recording_replays_through_fm_unchanged() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "replay").await;
    let config = queue_config(&b, &exchange, &queue);
    let peer = Peer::new(&b);
    let conf = peer.file("publish.toml", &config);
    let file = peer.file("in.jsonl", tricky_messages());
    let out = peer.run(&conf, &["publish", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "fedora-messaging publish: {out:?}");
    let recorded = python_record(&peer, &config, 3).await;

    let run = Fm::new().config_toml(&config);
    run.write_file("recorded.jsonl", recorded.join("\n") + "\n");
    run.args(["publish", "recorded.jsonl"])
        .run()
        .await
        .assert_code(0);
    let replayed = fm_record(&config, 3).await;
    assert_eq!(replayed, recorded);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

async fn publish_numbered(b: &Broker, exchange: &str, n: usize) {
    for i in 0..n {
        b.publish_fedora(exchange, &format!("fm.test.{i}"), &json!({"i": i}))
            .await;
    }
}

#[tokio::test]
async fn the_limit_stops_recording_and_leaves_the_rest_queued() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "limit").await;
    publish_numbered(&b, &exchange, 10).await;
    let got = fm_record(&queue_config(&b, &exchange, &queue), 3).await;
    let bodies: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["body"].clone())
        .collect();
    assert_eq!(bodies, [json!({"i": 0}), json!({"i": 1}), json!({"i": 2})]);
    // The prefetched messages went back to the queue, unacked.
    b.wait_for_depth(&queue, 7).await;
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn records_go_to_standard_output_with_a_dash() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "stdout").await;
    publish_numbered(&b, &exchange, 2).await;
    let out = Fm::new()
        .config_toml(&queue_config(&b, &exchange, &queue))
        .args(["record", "-", "--limit", "2"])
        .run()
        .await;
    out.assert_code(0);
    let got: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(got.len(), 2, "only the lines on stdout: {}", out.stdout);
    assert!(
        got[0].starts_with(r#"{"body": {"i": 0}, "headers": {"#),
        "{}",
        got[0]
    );
    assert!(got[1].ends_with(r#""topic": "fm.test.1"}"#), "{}", got[1]);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// A line that cannot be written is not acked: the message stays in its queue and fm exits 1
/// (fedora-messaging acks it, losing it).
#[tokio::test]
async fn a_message_whose_line_cannot_be_written_stays_queued() {
    let Some(b) = broker() else { return };
    if !Path::new("/dev/full").exists() {
        crate::util::skip("no /dev/full on this machine");
        return;
    }
    let (exchange, queue) = exchange_and_queue(&b, "full").await;
    publish_numbered(&b, &exchange, 1).await;
    let out = Fm::new()
        .config_toml(&queue_config(&b, &exchange, &queue))
        .args(["record", "/dev/full"])
        .run()
        .await;
    out.assert_code(1);
    assert!(
        out.stderr.contains("unable to save messages to /dev/full"),
        "{}",
        out.stderr
    );
    b.wait_for_depth(&queue, 1).await;
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// Each line is on disk before its message is acked: while fm still runs the file already
/// holds every line, and SIGTERM then ends it cleanly (exit 0) with the queue empty. The
/// application name is "recorder" unless --app-name says otherwise, and its connection runs
/// with the 128 KiB frames fm proposes (the URL sets no `frame_max`).
#[tokio::test]
async fn lines_are_written_before_the_ack_and_sigterm_ends_cleanly() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "sigterm").await;
    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("rec.jsonl");
    let mut fm = Fm::new()
        .config_toml(&queue_config(&b, &exchange, &queue))
        .arg("record")
        .arg(&file)
        .spawn();
    publish_numbered(&b, &exchange, 3).await;
    wait_for_lines(&file, 3).await;
    b.wait_for_depth(&queue, 0).await;
    let connections = b
        .rabbitmqctl(&["-q", "list_connections", "frame_max", "client_properties"])
        .await;
    let ours = connections.lines().find(|l| l.contains("recorder"));
    assert!(
        ours.is_some_and(|l| l.starts_with("131072\t")),
        "{connections}"
    );
    fm.kill("TERM");
    let status = fm.wait_timeout(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", fm.stderr());
    assert_eq!(lines(&file).len(), 3);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn record_takes_the_consume_overrides() {
    let Some(b) = broker() else { return };
    let (exchange, sink) = exchange_and_queue(&b, "overrides").await;
    let queue = b.unique("overrides-q");
    // The file binds a server-named queue elsewhere; --queue-name, --exchange and
    // --routing-key point fm at the test's, and --app-name renames the connection.
    let run = Fm::new().config_toml(&format!(
        r#"amqp_url = "{}"

[queues.""]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
exchange = "amq.topic"
routing_keys = ["fm.test.nothing"]
"#,
        b.url()
    ));
    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("rec.jsonl");
    let mut fm = run
        .arg("record")
        .arg(&file)
        .args(["--queue-name", &queue, "--exchange", &exchange])
        .args([
            "--routing-key",
            "fm.test.wanted",
            "--app-name",
            "my-recorder",
        ])
        .args(["--limit", "1"])
        .spawn();
    // Once fm consumes, its queue is declared and bound: send one unwanted and one wanted message.
    fm.wait_consuming().await;
    assert!(b.queue_exists(&queue).await, "fm declared {queue}");
    let connections = b
        .rabbitmqctl(&["list_connections", "client_properties"])
        .await;
    assert!(connections.contains("my-recorder"), "{connections}");
    b.publish_fedora(&exchange, "fm.test.unwanted", &json!({"n": 0}))
        .await;
    b.publish_fedora(&exchange, "fm.test.wanted", &json!({"n": 1}))
        .await;
    fm.wait().await.assert_code(0);
    let got = lines(&file);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].contains(r#""topic": "fm.test.wanted""#),
        "{}",
        got[0]
    );
    assert!(
        got[0].contains(&format!(r#""queue": "{queue}""#)),
        "{}",
        got[0]
    );
    for q in [queue, sink] {
        b.delete_queue(&q).await;
    }
    b.delete_exchange(&exchange).await;
}

/// Issue 17: bodies Python's json accepts beyond strict JSON — NaN, infinities (1e400), an
/// integer beyond 64 bits, a lone surrogate — were dropped as invalid or changed (the integer
/// became `1.2345678901234568e+29`). fm now records them as fedora-messaging does; the lone
/// surrogate, which fedora-messaging cannot even write to its file, fm writes escaped.
#[tokio::test]
async fn bodies_beyond_strict_json_are_recorded_as_python_reads_them() {
    let Some(b) = broker() else { return };
    let (exchange, q_fm) = exchange_and_queue(&b, "rec-py-json").await;
    let q_py = b.unique("rec-py-json-py");
    b.declare_queue(&q_py).await;
    b.bind(&q_py, &exchange, "#").await;
    let headers = crate::util::field_table([
        (
            "fedora_messaging_schema",
            AMQPValue::LongString("base.message".into()),
        ),
        ("fedora_messaging_severity", AMQPValue::LongInt(20)),
        (
            "sent-at",
            AMQPValue::LongString("2026-11-26T00:00:00+00:00".into()),
        ),
    ]);
    let bodies: [&[u8]; 2] = [
        br#"{"nan": NaN, "inf": 1e400, "ninf": -Infinity, "big": 123456789012345678901234567890, "neg0": -0, "f": 1E5}"#,
        br#"{"s": "x\ud800y"}"#,
    ];
    for (n, body) in bodies.iter().enumerate() {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_message_id(format!("py-json-{n}").as_str().into())
            .with_headers(headers.clone());
        b.publish(&exchange, "org.example.py", body, props).await;
    }

    let from_fm = fm_record(&queue_config(&b, &exchange, &q_fm), 2).await;
    assert_eq!(
        from_fm[0],
        format!(
            r#"{{"body": {{"big": 123456789012345678901234567890, "f": 100000.0, "inf": Infinity, "nan": NaN, "neg0": 0, "ninf": -Infinity}}, "headers": {{"fedora_messaging_schema": "base.message", "fedora_messaging_severity": 20, "sent-at": "2026-11-26T00:00:00+00:00"}}, "id": "py-json-0", "priority": 0, "queue": "{q_fm}", "topic": "org.example.py"}}"#
        )
    );
    assert!(
        from_fm[1].starts_with(r#"{"body": {"s": "x\ud800y"}, "#),
        "{}",
        from_fm[1]
    );
    // fedora-messaging's own record of the first one is the same line.
    let peer = Peer::new(&b);
    let from_python = python_record(&peer, &queue_config(&b, &exchange, &q_py), 1).await;
    assert_eq!(
        from_python[0].replace(&q_py, &q_fm),
        from_fm[0],
        "fm and fedora-messaging record the same line"
    );
    for q in [q_fm, q_py] {
        b.delete_queue(&q).await;
    }
    b.delete_exchange(&exchange).await;
}
