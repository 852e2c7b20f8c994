//! `fm consume` against a real broker: what a plugin sees, what each outcome does to the
//! message, passive declares, bad configs, heartbeats during a long callback, and SIGTERM.
//!
//! The callback is `tests/fixtures/plugins/recorder.c`, built with `cc` at test time: it writes
//! one JSON line per message and answers according to the topic's last word.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;

use crate::util::recorder::{
    Extra, config, consuming, dead_letter_to, out_file, recorded, wait_for_lines,
};
use crate::util::{self, Fm, field_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_the_plugin_with_every_field_and_is_acked() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("fields");
    let fm = Fm::new();
    let (_keep, out) = out_file();
    let fm = fm
        .config_toml(&config(broker.url(), &queue, &out, Extra::default()))
        .arg("consume");
    let mut proc = fm.spawn();
    proc.wait_consuming().await;

    let headers = field_table([
        (
            "fedora_messaging_schema",
            AMQPValue::LongString("base.message".into()),
        ),
        ("fedora_messaging_severity", AMQPValue::LongInt(30)),
        (
            "sent-at",
            AMQPValue::LongString("2026-01-02T03:04:05+00:00".into()),
        ),
        ("custom", AMQPValue::LongString(LongString::from("välue"))),
    ]);
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_message_id("0a6b9a3c-4fd8-4d6b-8c52-0c2b5c0f0b8e".into())
        .with_priority(5)
        .with_headers(headers);
    broker
        .publish(
            "amq.topic",
            &format!("{queue}.ack"),
            r#"{"k": "wörld", "n": [1, 2.5]}"#.as_bytes(),
            props,
        )
        .await;

    let lines = wait_for_lines(&proc, &out, 1).await;
    let line = &lines[0];
    assert_eq!(line["redelivered"], 0);
    assert_eq!(line["severity"], 30);
    assert_eq!(line["priority"], 5);
    assert_eq!(line["exchange"], "amq.topic");
    assert_eq!(line["queue"], queue.as_str());
    assert_eq!(line["headers"]["custom"], "välue");
    assert_eq!(line["body"], json!({"k": "wörld", "n": [1, 2.5]}));
    let record = &line["record"];
    assert_eq!(record["id"], "0a6b9a3c-4fd8-4d6b-8c52-0c2b5c0f0b8e");
    assert_eq!(record["topic"], format!("{queue}.ack"));
    assert_eq!(record["queue"], queue.as_str());
    assert_eq!(record["priority"], 5);
    assert_eq!(record["body"]["k"], "wörld");
    assert_eq!(record["headers"]["fedora_messaging_severity"], 30);

    proc.wait_for_stderr("Successfully consumed message").await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    assert_eq!(broker.queue_depth(&queue).await, 0, "the message was acked");
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_requeues_and_the_message_comes_back_redelivered() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("nack");
    let (_keep, out) = out_file();
    let proc = consuming(&config(broker.url(), &queue, &out, Extra::default())).await;
    let id = broker
        .publish_fedora("amq.topic", &format!("{queue}.nack"), &json!({}))
        .await;
    let lines = wait_for_lines(&proc, &out, 2).await;
    assert_eq!(lines[0]["redelivered"], 0);
    assert_eq!(lines[1]["redelivered"], 1);
    assert_eq!(lines[1]["record"]["id"], id.as_str());
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    assert_eq!(broker.queue_depth(&queue).await, 0);
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_rejects_the_message_to_the_dead_letter_exchange() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("drop");
    let dlq = format!("{queue}.dead");
    broker.declare_queue(&dlq).await;
    let (_keep, out) = out_file();
    // The queue dead-letters through the default exchange straight into `dlq`.
    let args = dead_letter_to(&dlq);
    let cfg = config(
        broker.url(),
        &queue,
        &out,
        Extra {
            queue_args: &args,
            ..Extra::default()
        },
    );
    let proc = consuming(&cfg).await;
    let id = broker
        .publish_fedora("amq.topic", &format!("{queue}.drop"), &json!({"x": 1}))
        .await;
    broker.wait_for_depth(&dlq, 1).await;
    let dead = broker.get(&dlq).await.expect("dead-lettered message");
    assert_eq!(dead.properties.message_id().as_ref().unwrap().as_str(), id);
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    assert_eq!(broker.queue_depth(&queue).await, 0);
    assert_eq!(recorded(&out).len(), 1, "handled once, never redelivered");
    broker.delete_queue(&queue).await;
    broker.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_exits_with_its_code_and_acks_or_requeues() {
    let Some(broker) = util::broker() else { return };
    for (word, left) in [("halt7", 0), ("halt7r", 1)] {
        let queue = util::unique(word);
        let (_keep, out) = out_file();
        let proc = consuming(&config(broker.url(), &queue, &out, Extra::default())).await;
        broker
            .publish_fedora("amq.topic", &format!("{queue}.{word}"), &json!({}))
            .await;
        let output = proc.wait().await;
        output.assert_code(7);
        assert!(output.stderr.contains("exit code 7"), "{}", output.stderr);
        assert_eq!(broker.queue_depth(&queue).await, left, "{word}");
        broker.delete_queue(&queue).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_callback_returns_every_prefetched_message_and_exits_13() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("fail");
    broker.declare_queue(&queue).await;
    broker
        .bind(&queue, "amq.topic", &format!("{queue}.#"))
        .await;
    broker
        .publish_fedora("amq.topic", &format!("{queue}.fail"), &json!({}))
        .await;
    for _ in 0..4 {
        broker
            .publish_fedora("amq.topic", &format!("{queue}.ack"), &json!({}))
            .await;
    }
    let fm = Fm::new();
    let (_keep, out) = out_file();
    let output = fm
        .config_toml(&config(broker.url(), &queue, &out, Extra::default()))
        .arg("consume")
        .run()
        .await;
    output.assert_code(13);
    assert!(
        output.stderr.contains("recorder was told to fail"),
        "{}",
        output.stderr
    );
    assert_eq!(
        recorded(&out).len(),
        1,
        "nothing after the failure was handled"
    );
    assert_eq!(
        broker.queue_depth(&queue).await,
        5,
        "all five messages are back"
    );
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dropped_and_consuming_goes_on() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("invalid");
    let (_keep, out) = out_file();
    let proc = consuming(&config(broker.url(), &queue, &out, Extra::default())).await;
    let rk = format!("{queue}.ack");
    let props = || lapin::BasicProperties::default().with_message_id("bad-1".into());
    broker.publish("amq.topic", &rk, b"not json", props()).await;
    broker.publish("amq.topic", &rk, b"\xff\xfe", props()).await;
    broker.publish("amq.topic", &rk, b"[1, 2]", props()).await;
    let bad_severity = props().with_headers(field_table([(
        "fedora_messaging_severity",
        AMQPValue::LongInt(21),
    )]));
    broker.publish("amq.topic", &rk, b"{}", bad_severity).await;
    // No headers at all is only logged: the message is handled.
    broker
        .publish("amq.topic", &rk, b"{\"ok\": true}", props())
        .await;
    let lines = wait_for_lines(&proc, &out, 1).await;
    assert_eq!(lines[0]["body"], json!({"ok": true}));
    proc.kill("TERM");
    let output = proc.wait().await;
    output.assert_code(0);
    assert!(output.stderr.contains("message bad-1"), "{}", output.stderr);
    assert!(
        output.stderr.contains("not valid UTF-8"),
        "{}",
        output.stderr
    );
    assert!(
        output.stderr.contains("must be a JSON object"),
        "{}",
        output.stderr
    );
    assert!(
        output.stderr.contains("must be one of 10, 20, 30, 40"),
        "{}",
        output.stderr
    );
    assert_eq!(recorded(&out).len(), 1);
    assert_eq!(broker.queue_depth(&queue).await, 0);
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declares_need_the_queue_to_exist() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("passive");
    let fm = Fm::new();
    let (_keep, out) = out_file();
    let cfg = config(
        broker.url(),
        &queue,
        &out,
        Extra {
            top: "passive_declares = true",
            ..Extra::default()
        },
    );
    let output = fm.config_toml(&cfg).arg("consume").run().await;
    output.assert_code(10);
    assert!(
        output
            .stderr
            .contains(&format!("queue '{queue}' does not exist in vhost '/'")),
        "{}",
        output.stderr
    );
    assert!(
        !broker.queue_exists(&queue).await,
        "a passive declare creates nothing"
    );

    broker.declare_queue(&queue).await;
    let (_keep, out) = out_file();
    let proc = consuming(&config(
        broker.url(),
        &queue,
        &out,
        Extra {
            top: "passive_declares = true",
            ..Extra::default()
        },
    ))
    .await;
    broker
        .publish_fedora("amq.topic", &format!("{queue}.ack"), &json!({}))
        .await;
    wait_for_lines(&proc, &out, 1).await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_named_queue_is_bound_and_consumed() {
    let Some(broker) = util::broker() else { return };
    let prefix = util::unique("servernamed");
    let fm = Fm::new();
    let (_keep, out) = out_file();
    // fedora.toml's shape: no [queues], a binding without a queue.
    let cfg = format!(
        "amqp_url = \"{}\"\ncallback = \"{}\"\n[[bindings]]\nexchange = \"amq.topic\"\nrouting_keys = [\"{prefix}.#\"]\n[consumer_config]\nout = \"{}\"\n",
        broker.url(),
        crate::util::recorder::plugin().display(),
        out.display()
    );
    let mut proc = fm.config_toml(&cfg).arg("consume").spawn();
    proc.wait_for_stderr("Successfully registered AMQP consumer Consumer(queue=amq.gen-")
        .await;
    broker
        .publish_fedora("amq.topic", &format!("{prefix}.ack"), &json!({}))
        .await;
    let lines = wait_for_lines(&proc, &out, 1).await;
    assert!(lines[0]["queue"].as_str().unwrap().starts_with("amq.gen-"));
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_files_exit_2_naming_the_problem() {
    let output = Fm::new()
        .arg("--conf")
        .arg(util::fedora_fixture("bad_conf.toml"))
        .arg("consume")
        .run()
        .await;
    output.assert_code(2);
    assert!(output.stderr.contains("bad_conf.toml"), "{}", output.stderr);
    assert!(output.stderr.contains("line 1"), "{}", output.stderr);

    let output = Fm::new()
        .config_toml("amqp_url = \"amqp://localhost\"\nprefetch = 3\n")
        .arg("consume")
        .run()
        .await;
    output.assert_code(2);
    assert!(output.stderr.contains("'prefetch'"), "{}", output.stderr);

    let output = Fm::new()
        .arg("--conf")
        .arg("/nonexistent/fm.toml")
        .arg("consume")
        .run()
        .await;
    output.assert_code(2);
    assert!(
        output.stderr.contains("/nonexistent/fm.toml"),
        "{}",
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_load_exits_1() {
    let Some(broker) = util::broker() else { return };
    let plugin =
        util::build_c_plugin(&util::repo_root().join("tests/fixtures/plugins/bad_abi_major.c"));
    let cfg = format!(
        "amqp_url = \"{}\"\ncallback = \"{}\"\n",
        broker.url(),
        plugin.display()
    );
    let output = Fm::new().config_toml(&cfg).arg("consume").run().await;
    output.assert_code(1);
    // fm's own words (the file name also says "abi": it proves nothing).
    assert!(
        output
            .stderr
            .contains("was built for plugin ABI 2, but this fm speaks ABI 1; "),
        "{}",
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_twice_as_long_as_the_heartbeat_keeps_the_connection() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("heartbeat");
    let (_keep, out) = out_file();
    // A 2 s heartbeat: the broker closes a connection that is silent for ~4 s.
    let url = format!("{}?heartbeat=2", broker.url());
    let cfg = config(broker.url(), &queue, &out, Extra::default()).replace(broker.url(), &url);
    let mut proc = consuming(&cfg).await;
    broker
        .publish_fedora("amq.topic", &format!("{queue}.slow5"), &json!({}))
        .await;
    broker
        .publish_fedora("amq.topic", &format!("{queue}.ack"), &json!({}))
        .await;
    wait_for_lines(&proc, &out, 2).await;
    proc.wait_for_stderr("Successfully consumed message").await;
    proc.kill("TERM");
    let output = proc.wait().await;
    output.assert_code(0);
    assert!(
        !output.stderr.contains("connection lost"),
        "{}",
        output.stderr
    );
    let lines = recorded(&out);
    assert_eq!(lines.len(), 2, "nothing was redelivered");
    assert_eq!(broker.queue_depth(&queue).await, 0);
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_callback_acks_it_and_exits_0() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("sigterm");
    let (_keep, out) = out_file();
    let mut proc = consuming(&config(broker.url(), &queue, &out, Extra::default())).await;
    broker
        .publish_fedora("amq.topic", &format!("{queue}.slow2"), &json!({}))
        .await;
    for _ in 0..3 {
        broker
            .publish_fedora("amq.topic", &format!("{queue}.ack"), &json!({}))
            .await;
    }
    wait_for_lines(&proc, &out, 1).await;
    proc.kill("TERM");
    // A second signal is logged and ignored (sent once the first was seen: signals that
    // arrive together may be merged into one).
    proc.wait_for_stderr("received SIGTERM").await;
    proc.kill("TERM");
    let output = proc.wait().await;
    output.assert_code(0);
    assert!(output.stderr.contains("ignored"), "{}", output.stderr);
    assert_eq!(
        recorded(&out).len(),
        1,
        "no new message was taken after SIGTERM"
    );
    // The slow one was acked; the three prefetched ones went back.
    assert_eq!(broker.queue_depth(&queue).await, 3);
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_time_arguments_pass_through_for_quorum_queues() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("quorum");
    let (_keep, out) = out_file();
    let cfg = config(
        broker.url(),
        &queue,
        &out,
        Extra {
            queue_args: "\"x-queue-type\" = \"quorum\"",
            ..Extra::default()
        },
    );
    let proc = consuming(&cfg).await;
    broker
        .publish_fedora("amq.topic", &format!("{queue}.ack"), &json!({}))
        .await;
    wait_for_lines(&proc, &out, 1).await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    // Declaring it as a classic queue now fails: it really is a quorum queue.
    let channel = broker.channel().await;
    let classic = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(
        classic.is_err(),
        "the queue was declared with x-queue-type = quorum"
    );
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_does_not_starve_the_others_at_concurrency_1() {
    let Some(broker) = util::broker() else { return };
    let idle = util::unique("idle");
    let busy = util::unique("busy");
    let (_keep, out) = out_file();
    let queue_table = |name: &str| {
        format!(
            "[queues.\"{name}\"]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {{}}\n\
             [[bindings]]\nqueue = \"{name}\"\nexchange = \"amq.topic\"\nrouting_keys = [\"{name}.#\"]\n"
        )
    };
    let cfg = format!(
        "amqp_url = \"{}\"\ncallback = \"{}\"\n{}{}[consumer_config]\nout = \"{}\"\n",
        broker.url(),
        crate::util::recorder::plugin().display(),
        queue_table(&idle),
        queue_table(&busy),
        out.display()
    );
    let proc = consuming(&cfg).await;
    for _ in 0..3 {
        broker
            .publish_fedora("amq.topic", &format!("{busy}.ack"), &json!({}))
            .await;
    }
    let lines = wait_for_lines(&proc, &out, 3).await;
    assert!(lines.iter().all(|l| l["queue"] == busy.as_str()));
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    broker.delete_queue(&idle).await;
    broker.delete_queue(&busy).await;
}
