//! `fm publish` (issue 4): wire-compatible with fedora-messaging, pipelined with publisher
//! confirms, and never losing a message silently.
//!
//! fedora-messaging itself (installed from PyPI into `FM_TEST_VENV` by scripts/test) is the
//! peer: its consumer must see exactly what fm published, and fm must accept and refuse the
//! same record files it does. [`Peer`] drives it; `record.rs` uses it too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::util::peer::{Peer, exchange_and_queue, ids_of, lines, queue_config, wait_for_lines};
use crate::util::proxy::Proxy;
use crate::util::{Fm, FmProcess, broker, fedora_fixture};

/// Sends SIGTERM to a child and waits for it.
async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().expect("the child is running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the child stops within 30 s of SIGTERM")
        .expect("waiting for the child")
}

/// Runs `fm publish ARGS... --failed FILE` and returns its output and the lines of FILE
/// (kept in a folder of the test's, as fm's own folder goes when the run ends).
async fn publish_with_failed(run: Fm, args: &[&str]) -> (crate::util::FmOutput, Vec<String>) {
    let keep = tempfile::tempdir().unwrap();
    let failed = keep.path().join("failed.jsonl");
    let out = run
        .arg("publish")
        .args(args)
        .arg("--failed")
        .arg(&failed)
        .run()
        .await;
    let saved = lines(&failed);
    (out, saved)
}

/// `n` record lines `{"topic": "fm.test.I", "body": {"i": I}}` with fixed ids, so a test
/// can tell which arrived.
fn numbered_lines(n: usize) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        text.push_str(
            &json!({"topic": format!("fm.test.{i}"), "body": {"i": i}, "id": id}).to_string(),
        );
        text.push('\n');
        ids.push(id);
    }
    (text, ids)
}

#[tokio::test]
async fn fm_publish_reaches_a_fedora_messaging_consumer_intact() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "to-python").await;
    let config = queue_config(&b, &exchange, &queue);

    // One message from the command line, with every option…
    let out = Fm::new()
        .config_toml(&config)
        .args(["publish", "--topic", "org.example.event"])
        .args([
            "--body",
            r#"{"name": "é😀", "n": [1, 2.5, null], "nested": {"b": 1, "a": true}}"#,
        ])
        .args(["--header", "x-app=bodhi", "--header", "x-count:=3"])
        .args(["--severity", "warning", "--priority", "7"])
        .run()
        .await;
    out.assert_code(0);
    let adhoc_id = out.stdout.trim().to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&adhoc_id).unwrap().get_version_num(),
        4
    );

    // …and two from a record file, whose ids and sent-at are kept.
    let run = Fm::new().config_toml(&config);
    run.write_file(
        "msgs.jsonl",
        concat!(
            r#"{"topic": "org.example.file", "body": {"k": "v"}, "id": "2a3b3e1c-6f0e-4a51-9d53-3c1b2a4f5e60", "headers": {"sent-at": "2020-02-03T04:05:06+00:00", "fedora_messaging_severity": 40, "custom": "kept"}}"#,
            "\n",
            r#"{"topic": "org.example.file2", "body": {}, "priority": 2}"#,
            "\n"
        ),
    );
    run.args(["publish", "msgs.jsonl"])
        .run()
        .await
        .assert_code(0);

    let peer = Peer::new(&b);
    let conf = peer.file("peer.toml", &config);
    let (mut consumer, seen) = peer.consume(&conf);
    let seen = wait_for_lines(&seen, 3).await;
    assert!(terminate(&mut consumer).await.success());
    let seen: Vec<Value> = seen
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let adhoc = &seen[0];
    assert_eq!(adhoc["topic"], "org.example.event");
    assert_eq!(adhoc["id"], adhoc_id.as_str());
    assert_eq!(
        adhoc["body"],
        json!({"name": "é😀", "n": [1, 2.5, null], "nested": {"b": 1, "a": true}})
    );
    assert_eq!(adhoc["severity"], 30);
    assert_eq!(adhoc["priority"], 7);
    assert_eq!(adhoc["queue"], queue.as_str());
    let h = &adhoc["headers"];
    assert_eq!(h["x-app"], "bodhi");
    assert_eq!(h["x-count"], 3);
    assert_eq!(h["fedora_messaging_severity"], 30);
    assert_eq!(h["fedora_messaging_schema"], "base.message");
    assert_eq!(h["fedora_messaging_schema_package"], "fedora_messaging");
    assert_eq!(h["priority"], 7);
    let sent_at = h["sent-at"].as_str().unwrap();
    assert_eq!(
        sent_at.len(),
        "2019-07-30T19:12:22+00:00".len(),
        "{sent_at}"
    );
    assert!(
        sent_at.ends_with("+00:00") && sent_at.as_bytes()[10] == b'T',
        "{sent_at}"
    );

    let kept = &seen[1];
    assert_eq!(kept["topic"], "org.example.file");
    assert_eq!(kept["id"], "2a3b3e1c-6f0e-4a51-9d53-3c1b2a4f5e60");
    assert_eq!(kept["headers"]["sent-at"], "2020-02-03T04:05:06+00:00");
    assert_eq!(kept["headers"]["custom"], "kept");
    assert_eq!(kept["severity"], 40);
    assert_eq!(kept["priority"], 0);
    assert_eq!(seen[2]["priority"], 2);
    assert_eq!(seen[2]["headers"]["priority"], 2);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// The same record line published by fedora-messaging and by fm gives the same AMQP message:
/// body bytes, properties and header types (the field tables compare equal).
#[tokio::test]
async fn fm_and_fedora_messaging_put_the_same_bytes_on_the_wire() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "same-bytes").await;
    let config = queue_config(&b, &exchange, &queue);
    let line = json!({
        "topic": "org.example.bytes",
        "id": "0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5",
        "body": {"z": "é\u{2603}😀 \"q\" \\ \t", "a": [1, -2, 3.25, 1e100, 12345678901i64, null, true],
                 "nested": {"y": {}, "x": []}},
        "headers": {"sent-at": "2021-01-01T00:00:00+00:00", "fedora_messaging_severity": 10,
                    "text": "t", "int": 42, "big": 12345678901i64, "flag": false,
                    "fedora_messaging_user_alice": true},
        "priority": 4
    })
    .to_string();

    let peer = Peer::new(&b);
    let conf = peer.file("peer.toml", &config);
    let file = peer.file("one.jsonl", format!("{line}\n"));
    let out = peer.run(&conf, &["publish", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    let from_python = b.get(&queue).await.expect("fedora-messaging published");

    let run = Fm::new().config_toml(&config);
    run.write_file("one.jsonl", format!("{line}\n"));
    run.args(["publish", "one.jsonl"])
        .run()
        .await
        .assert_code(0);
    let from_fm = b.get(&queue).await.expect("fm published");

    assert_eq!(
        String::from_utf8_lossy(&from_fm.data),
        String::from_utf8_lossy(&from_python.data)
    );
    assert_eq!(from_fm.routing_key, from_python.routing_key);
    let (p, f) = (&from_python.properties, &from_fm.properties);
    assert_eq!(f.content_type(), p.content_type());
    assert_eq!(f.content_encoding(), p.content_encoding());
    assert_eq!(f.delivery_mode(), p.delivery_mode());
    assert_eq!(f.message_id(), p.message_id());
    assert_eq!(f.priority(), p.priority());
    assert_eq!(*f.priority(), Some(4));
    let headers = |t: &Option<FieldTable>| t.clone().expect("headers are set");
    assert_eq!(headers(f.headers()), headers(p.headers()));
    assert_eq!(
        headers(f.headers()).inner().get("big"),
        Some(&AMQPValue::LongLongInt(12345678901))
    );
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn topic_prefix_and_publish_priority_come_from_the_configuration() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "prefix").await;
    let config = format!(
        "topic_prefix = \"org.fedoraproject.test..\"\npublish_priority = 5\n{}",
        queue_config(&b, &exchange, &queue)
    );
    Fm::new()
        .config_toml(&config)
        .args(["publish", "--topic", "app.event", "--body", "{}"])
        .run()
        .await
        .assert_code(0);
    let d = b.get(&queue).await.expect("published");
    assert_eq!(d.routing_key.as_str(), "org.fedoraproject.test.app.event");
    assert_eq!(*d.properties.priority(), Some(5));
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn the_body_can_come_from_standard_input() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "stdin-body").await;
    let config = queue_config(&b, &exchange, &queue);
    Fm::new()
        .config_toml(&config)
        .args(["publish", "--topic", "t"])
        .stdin(r#"{"from": "stdin"}"#)
        .run()
        .await
        .assert_code(0);
    assert_eq!(b.get_json(&queue).await, Some(json!({"from": "stdin"})));

    // Not an object, or nothing at all: a usage error, nothing sent.
    for body in ["[1]", ""] {
        let out = Fm::new()
            .config_toml(&config)
            .args(["publish", "--topic", "t"])
            .stdin(body)
            .run()
            .await;
        out.assert_code(2);
        assert!(out.stderr.contains("body"), "{}", out.stderr);
    }
    assert_eq!(b.queue_depth(&queue).await, 0);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// Every record file among fedora-messaging's fixtures: fm accepts and refuses exactly what
/// `fedora-messaging publish` does, with the same exit status, and names the line.
#[tokio::test]
async fn record_fixtures_are_accepted_and_refused_like_fedora_messaging() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "fixtures").await;
    let config = queue_config(&b, &exchange, &queue);
    let peer = Peer::new(&b);
    let conf = peer.file("peer.toml", &config);
    for (fixture, want) in [
        ("good_msg_dump.txt", 0),
        ("invalid_msg_dump.txt", 2),
        ("msg_without_topic_dump.txt", 2),
        ("wrong_json_msg_dump.txt", 2),
    ] {
        let path = fedora_fixture(fixture);
        let python = peer.run(&conf, &["publish", path.to_str().unwrap()]).await;
        assert_eq!(
            python.status.code(),
            Some(want),
            "fedora-messaging on {fixture}: {python:?}"
        );
        let out = Fm::new()
            .config_toml(&config)
            .arg("publish")
            .arg(&path)
            .run()
            .await;
        out.assert_code(want);
        if want == 0 {
            // Both published it, keeping its id and sent-at.
            for who in ["fedora-messaging", "fm"] {
                let d = b
                    .get(&queue)
                    .await
                    .unwrap_or_else(|| panic!("{who} published"));
                assert_eq!(
                    d.properties.message_id().as_ref().unwrap().as_str(),
                    "273ed91d-b8b5-487a-9576-95b9fbdf3eec"
                );
                let headers = d.properties.headers().clone().unwrap();
                assert_eq!(
                    headers.inner().get("sent-at"),
                    Some(&AMQPValue::LongString("2018-11-18T10:11:41+00:00".into()))
                );
            }
        } else {
            assert!(
                out.stderr
                    .contains(&format!("line 1 of {}", path.display())),
                "{fixture}: {}",
                out.stderr
            );
        }
    }
    assert_eq!(
        b.queue_depth(&queue).await,
        0,
        "nothing invalid was published"
    );
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn a_bad_line_stops_publishing_unless_keep_going() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "bad-line").await;
    let config = queue_config(&b, &exchange, &queue);
    let (good, ids) = numbered_lines(4);
    let good: Vec<&str> = good.lines().collect();
    let file = format!(
        "{}\n{}\n{{\"topic\": \"t\", \"body\": \"not an object\"}}\n{}\n{}\n",
        good[0], good[1], good[2], good[3]
    );

    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &file);
    let out = run.args(["publish", "in.jsonl"]).run().await;
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("line 3 of in.jsonl: the body must be a JSON object"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("nothing after it was sent"),
        "{}",
        out.stderr
    );
    assert_eq!(b.drain_ids(&queue).await, ids[..2]);

    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &file);
    let out = run
        .args(["publish", "in.jsonl", "--keep-going"])
        .run()
        .await;
    out.assert_code(2);
    assert!(out.stderr.contains("line 3 of in.jsonl"), "{}", out.stderr);
    assert!(out.stderr.contains("4 published"), "{}", out.stderr);
    // With --keep-going the bad line is skipped and every good one is sent.
    assert_eq!(b.drain_ids(&queue).await, ids);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn the_lines_after_a_bad_one_are_saved_with_failed() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "bad-line-failed").await;
    let config = queue_config(&b, &exchange, &queue);
    let (good, ids) = numbered_lines(4);
    let good: Vec<&str> = good.lines().collect();
    let file = format!("{}\n\n{}\n{}\n{}\n", good[0], good[1], good[2], good[3]);

    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &file);
    let (out, failed_lines) = publish_with_failed(run, &["in.jsonl"]).await;
    out.assert_code(2);
    assert!(
        out.stderr.contains("line 2 of in.jsonl: the line is empty"),
        "{}",
        out.stderr
    );
    assert_eq!(b.drain_ids(&queue).await, ids[..1]);
    assert_eq!(ids_of(&failed_lines), ids[1..]);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn an_unroutable_message_is_refused_with_121_and_saved() {
    let Some(b) = broker() else { return };
    let exchange = b.unique("no-binding");
    b.declare_topic_exchange(&exchange).await;
    let config = format!(
        "amqp_url = \"{}\"\npublish_exchange = \"{exchange}\"\n",
        b.url()
    );

    let (out, saved) = publish_with_failed(
        Fm::new().config_toml(&config),
        &["--topic", "nobody.listens", "--body", r#"{"a": 1}"#],
    )
    .await;
    out.assert_code(121);
    assert!(out.stderr.contains("unroutable"), "{}", out.stderr);
    assert_eq!(saved.len(), 1);
    let saved: Value = serde_json::from_str(&saved[0]).unwrap();
    assert_eq!(saved["topic"], "nobody.listens");
    assert_eq!(saved["body"], json!({"a": 1}));
    let id = saved["id"].as_str().unwrap();
    assert!(
        out.stderr.contains(id),
        "the error names the message: {}",
        out.stderr
    );

    // fedora-messaging does not ask for routing: --allow-unroutable does the same.
    Fm::new()
        .config_toml(&config)
        .args([
            "publish",
            "--topic",
            "nobody.listens",
            "--body",
            "{}",
            "--allow-unroutable",
        ])
        .run()
        .await
        .assert_code(0);
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn returned_messages_in_a_file_are_all_reported_with_keep_going() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = (b.unique("partly-routed-ex"), b.unique("partly-routed-q"));
    b.declare_topic_exchange(&exchange).await;
    b.declare_queue(&queue).await;
    b.bind(&queue, &exchange, "fm.test.routed.#").await;
    let config = queue_config(&b, &exchange, &queue).replace("[\"#\"]", "[\"fm.test.routed.#\"]");
    // Every third message is routed; the others come back.
    let mut text = String::new();
    let (mut routed, mut returned) = (Vec::new(), Vec::new());
    for i in 0..300 {
        let id = uuid::Uuid::new_v4().to_string();
        let topic = if i % 3 == 0 {
            "fm.test.routed.x"
        } else {
            "fm.test.lost.x"
        };
        text.push_str(&json!({"topic": topic, "body": {"i": i}, "id": id}).to_string());
        text.push('\n');
        if i % 3 == 0 {
            &mut routed
        } else {
            &mut returned
        }
        .push(id);
    }
    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &text);
    let (out, saved) = publish_with_failed(run, &["in.jsonl", "--keep-going"]).await;
    out.assert_code(121);
    assert!(
        out.stderr.contains("100 published, 200 not published"),
        "{}",
        out.stderr
    );
    assert_eq!(
        ids_of(&saved),
        returned,
        "exactly the returned ones, in input order"
    );
    assert_eq!(b.drain_ids(&queue).await, routed);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn a_missing_exchange_is_refused_with_121() {
    let Some(b) = broker() else { return };
    let missing = b.unique("missing-exchange");
    let out = Fm::new()
        .config_toml(&format!("amqp_url = \"{}\"\n", b.url()))
        .args([
            "publish",
            "--exchange",
            &missing,
            "--topic",
            "t",
            "--body",
            "{}",
        ])
        .run()
        .await;
    out.assert_code(121);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
    assert!(out.stderr.contains(&missing), "{}", out.stderr);
}

#[tokio::test]
async fn no_broker_means_111_within_the_timeout() {
    let Some(_b) = broker() else { return };
    // A port nothing listens on: bind one, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!("amqp_url = \"amqp://guest:guest@127.0.0.1:{port}/%2F\"\n");
    let (text, ids) = numbered_lines(3);
    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &text);
    let started = Instant::now();
    let (out, saved) = publish_with_failed(run, &["in.jsonl", "--timeout", "2"]).await;
    let took = started.elapsed();
    out.assert_code(111);
    // --timeout 2, not the default 30 s: half the default is a bound no load reaches.
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} with --timeout 2"
    );
    assert!(out.stderr.contains("connection refused"), "{}", out.stderr);
    assert_eq!(ids_of(&saved), ids, "every message is saved, none was sent");

    // An empty file needs no broker, as with fedora-messaging.
    let run = Fm::new().config_toml(&config);
    run.write_file("empty.jsonl", "");
    run.args(["publish", "empty.jsonl", "--timeout", "2"])
        .run()
        .await
        .assert_code(0);
}

#[tokio::test]
async fn many_messages_are_pipelined_in_order_and_all_confirmed() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "many").await;
    let config = queue_config(&b, &exchange, &queue);
    let (text, ids) = numbered_lines(5000);
    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &text);
    let out = run.args(["publish", "in.jsonl"]).run().await;
    out.assert_code(0);
    assert!(
        !out.stdout.contains('\n') || out.stdout.trim().is_empty(),
        "a file publish prints nothing on stdout: {}",
        out.stdout
    );
    assert_eq!(b.drain_ids(&queue).await, ids);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// Publishing does not wait for each confirm before the next message: behind a broker 200 ms
/// away, 300 messages one round trip each would take a minute; pipelined they take a few round
/// trips (the handshake's and the last confirm's), about 2 s. The bound, 20 s, is ten times
/// that and a third of the serial time.
#[tokio::test]
async fn publishing_is_pipelined_behind_a_slow_link() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "far").await;
    let proxy = Proxy::with_latency(b.amqp_port(), Duration::from_millis(200)).await;
    let config = queue_config(&b, &exchange, &queue)
        .replace(b.url(), &proxy.url_for(b.url(), b.amqp_port()));
    let (text, ids) = numbered_lines(300);
    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &text);
    let started = Instant::now();
    run.args(["publish", "in.jsonl"]).run().await.assert_code(0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "300 messages took {took:?}");
    assert_eq!(b.drain_ids(&queue).await, ids);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// `fm publish -` fed through a pipe this test controls.
/// `fm publish -` reading a standard input the test writes to as it goes, saving what it
/// could not publish to `failed.jsonl` in a folder of the test's (fm's own goes with the run).
fn piped(config: &str, args: &[&str]) -> (FmProcess, PathBuf, tempfile::TempDir) {
    let keep = tempfile::tempdir().unwrap();
    let failed = keep.path().join("failed.jsonl");
    let fm = Fm::new()
        .config_toml(config)
        .args(["publish", "-", "--failed"])
        .arg(&failed)
        .args(args)
        .stdin_pipe()
        .spawn();
    (fm, failed, keep)
}

/// A broker whose memory alarm is on blocks fm's connection as soon as it publishes. fm says so
/// in its log (a stuck publisher with a silent log is what operators curse), keeps its
/// messages (none saved as failed), and goes on when the alarm clears.
#[tokio::test]
async fn a_blocked_connection_is_logged_and_publishing_resumes_when_the_alarm_clears() {
    let Some(b) = broker() else { return };
    let node = b.extra_node("publish-blocked");
    let (exchange, queue) = exchange_and_queue(&node, "blocked").await;
    let config = queue_config(&node, &exchange, &queue);
    // A high watermark of one byte: the node's memory alarm goes on at once.
    node.rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"])
        .await;
    let (text, ids) = numbered_lines(20);
    let (mut fm, failed, _keep) = piped(&config, &["--timeout", "120"]);
    fm.write_stdin(&text).await;
    fm.wait_for_stderr("the broker blocks publishing on this connection")
        .await;
    assert!(fm.stderr().contains("memory"), "{}", fm.stderr());
    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
        .await;
    fm.close_stdin();
    let out = fm.wait_within(Duration::from_secs(60)).await;
    out.assert_code(0);
    assert!(
        out.stderr.contains("the broker unblocked this connection"),
        "{}",
        out.stderr
    );
    assert!(lines(&failed).is_empty());
    let got: BTreeSet<String> = node.drain_ids(&queue).await.into_iter().collect();
    assert_eq!(got, ids.into_iter().collect::<BTreeSet<_>>());
}

/// A broker restart within `--timeout` loses nothing (fm reconnects and sends the unconfirmed
/// messages again); a broker gone for longer ends fm with 111, and `--failed` then holds the
/// messages that were not confirmed, so that publishing it completes the set.
#[tokio::test]
async fn broker_outages_lose_no_message() {
    let Some(b) = broker() else { return };
    let node = b.extra_node("publish-outage");
    let (exchange, queue) = exchange_and_queue(&node, "outage").await;
    let config = queue_config(&node, &exchange, &queue);

    // 1. The node restarts while fm waits: everything arrives (some perhaps twice).
    let (text, ids) = numbered_lines(400);
    let all: Vec<&str> = text.lines().collect();
    let (mut fm, failed, _keep) = piped(&config, &["--timeout", "60"]);
    fm.write_stdin(&(all[..200].join("\n") + "\n")).await;
    node.wait_for_depth(&queue, 200).await;
    node.stop_node().await;
    fm.write_stdin(&(all[200..].join("\n") + "\n")).await;
    node.start_node().await;
    fm.close_stdin();
    let out = fm.wait_within(Duration::from_secs(90)).await;
    out.assert_code(0);
    assert!(out.stderr.contains("reconnecting"), "{}", out.stderr);
    assert!(lines(&failed).is_empty());
    let got: BTreeSet<String> = node.drain_ids(&queue).await.into_iter().collect();
    assert_eq!(got, ids.iter().cloned().collect::<BTreeSet<_>>());

    // 2. The node stops mid-file for good: exit 111, and --failed completes the set. The
    // rest of the file trickles in while the node stops, so some messages are confirmed,
    // some are in flight when the connection drops, and the last 100 are certainly read after
    // it (they are written only once the node is down).
    let (text, ids) = numbered_lines(3000);
    let all: Vec<String> = text.lines().map(|l| format!("{l}\n")).collect();
    let (mut fm, failed, _keep) = piped(&config, &["--timeout", "3"]);
    fm.write_stdin(&all[..500].concat()).await;
    node.wait_for_depth(&queue, 500).await;
    let mut stdin = fm.take_stdin();
    let (trickle, after_stop) = (all[500..2900].to_vec(), all[2900..].concat());
    let writer = tokio::spawn(async move {
        for chunk in trickle.chunks(25) {
            if stdin.write_all(chunk.concat().as_bytes()).await.is_err() {
                return None; // fm gave up reading
            }
            // Pacing, not waiting: the input arrives while the node stops.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Some(stdin)
    });
    node.stop_node().await;
    if let Some(mut stdin) = writer.await.expect("the writer") {
        let _ = stdin.write_all(after_stop.as_bytes()).await;
    }
    let out = fm.wait_within(Duration::from_secs(60)).await;
    out.assert_code(111);
    let stderr = out.stderr;
    assert!(
        stderr.contains("--failed") || stderr.contains("failed.jsonl"),
        "{stderr}"
    );
    let saved = ids_of(&lines(&failed));
    let position = |id: &String| ids.iter().position(|i| i == id).expect("a known id");
    let positions: Vec<usize> = saved.iter().map(position).collect();
    assert!(!saved.is_empty(), "{stderr}");
    assert!(
        positions[0] >= 500,
        "the first 500 were confirmed, not saved"
    );
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "saved in input order"
    );
    assert_eq!(
        positions.last(),
        Some(&2999),
        "saved to the end of the input"
    );

    node.start_node().await;
    let before: BTreeSet<String> = node.drain_ids(&queue).await.into_iter().collect();
    let saved_set: BTreeSet<&String> = saved.iter().collect();
    assert!(
        ids.iter()
            .filter(|id| !saved_set.contains(id))
            .all(|id| before.contains(id)),
        "every message not saved was confirmed, and survived the restart"
    );
    let run = Fm::new().config_toml(&config);
    let again = run.write_file("again.jsonl", std::fs::read(&failed).unwrap());
    run.arg("publish").arg(&again).run().await.assert_code(0);
    let after: BTreeSet<String> = node.drain_ids(&queue).await.into_iter().collect();
    let complete: BTreeSet<String> = before.union(&after).cloned().collect();
    assert_eq!(complete, ids.iter().cloned().collect::<BTreeSet<_>>());

    // 3. A broker that takes messages but does not confirm them (a memory alarm blocks
    // publishers): 111 once --timeout has passed, and the message is saved.
    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0"])
        .await;
    let started = Instant::now();
    let (out, saved) = publish_with_failed(
        Fm::new().config_toml(&config),
        &["--topic", "t", "--body", "{}", "--timeout", "2"],
    )
    .await;
    out.assert_code(111);
    assert!(out.stderr.contains("did not confirm"), "{}", out.stderr);
    // --timeout 2, not the default 30 s: half the default is a bound no load reaches.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(saved.len(), 1);
}

#[tokio::test]
async fn sigint_stops_after_the_in_flight_messages_are_confirmed() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "sigint").await;
    let config = queue_config(&b, &exchange, &queue);
    let (text, ids) = numbered_lines(10);
    let (mut fm, failed, _keep) = piped(&config, &[]);
    fm.write_stdin(&text).await;
    b.wait_for_depth(&queue, 10).await;
    // All ten are in the queue, their confirms on the way or in; stdin stays open, so the end
    // of the input cannot race the signal: only SIGINT can stop fm.
    fm.kill("INT");
    let out = fm.wait().await;
    out.assert_code(1);
    let stderr = out.stderr;
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("after line 10"), "{stderr}");
    assert!(lines(&failed).is_empty(), "all 10 were confirmed");
    assert_eq!(b.drain_ids(&queue).await, ids);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// A queue that refuses what it has no room for nacks the message: 121, and it is saved.
#[tokio::test]
async fn a_nacked_message_is_refused_with_121_and_saved() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = (b.unique("full-ex"), b.unique("full-q"));
    b.declare_topic_exchange(&exchange).await;
    let args = crate::util::field_table([
        ("x-max-length", AMQPValue::LongInt(1)),
        ("x-overflow", AMQPValue::LongString("reject-publish".into())),
    ]);
    let opts = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    b.declare_queue_with(&queue, opts, args).await;
    b.bind(&queue, &exchange, "#").await;
    let config = format!(
        "amqp_url = \"{}\"\npublish_exchange = \"{exchange}\"\n",
        b.url()
    );
    let (text, ids) = numbered_lines(3);
    let run = Fm::new().config_toml(&config);
    run.write_file("in.jsonl", &text);
    let (out, saved) = publish_with_failed(run, &["in.jsonl", "--keep-going"]).await;
    out.assert_code(121);
    assert!(out.stderr.contains("basic.nack"), "{}", out.stderr);
    assert!(
        out.stderr.contains("1 published, 2 not published"),
        "{}",
        out.stderr
    );
    assert_eq!(ids_of(&saved), ids[1..]);
    assert_eq!(b.drain_ids(&queue).await, ids[..1]);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

/// A login the broker refuses will not succeed by waiting: exit 1 at once, as
/// fedora-messaging (whose ConnectionException is not a publish error).
#[tokio::test]
async fn a_refused_login_fails_at_once_with_1() {
    let Some(b) = broker() else { return };
    let url = b.url().replacen("guest:guest@", "guest:wrong@", 1);
    // Retrying would last the whole --timeout, ten times util::TIMEOUT, within which `run`
    // requires fm to exit.
    let out = Fm::new()
        .config_toml(&format!("amqp_url = \"{url}\"\n"))
        .args([
            "publish",
            "--topic",
            "t",
            "--body",
            "{}",
            "--timeout",
            "300",
        ])
        .run()
        .await;
    out.assert_code(1);
    assert!(out.stderr.contains("refused the login"), "{}", out.stderr);
}
