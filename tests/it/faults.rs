//! Breaking things on purpose: fm must never stay dead and never lose a message.
//!
//! Every test publishes a known set of messages with unique ids, runs fm with the recorder
//! plugin (it writes each message's id to a file before answering), injects a fault, and
//! checks that every id was handled at least once, that the queue is empty at the end (so no
//! message was acked without being handled, since the recorder writes before it acks), and
//! that fm is consuming again afterwards. Faults that disturb the broker itself (restarts,
//! closing every connection) run on a node of their own, so the other tests are not touched.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};

use crate::util::recorder::{Extra, config, consuming, dead_letter_to, out_file};
use crate::util::{self, Fm, FmProcess};

/// How many times each message id was handled.
fn handled(out: &Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue; // a line cut by SIGKILL
        };
        if let Some(id) = v["record"]["id"].as_str() {
            *seen.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    seen
}

/// Waits until every id in `ids` was handled, showing fm's log if it takes too long.
async fn wait_all_handled(proc: &FmProcess, out: &Path, ids: &BTreeSet<String>, within: Duration) {
    util::eventually(within, async || {
        let seen = handled(out);
        match ids.iter().filter(|id| !seen.contains_key(*id)).count() {
            0 => Ok(()),
            missing => Err(format!(
                "{missing} of {} messages never handled\n--- fm's stderr (tail):\n{}",
                ids.len(),
                tail(&proc.stderr(), 40)
            )),
        }
    })
    .await
}

/// Waits until fm handled at least `n` distinct messages.
async fn wait_handled_at_least(proc: &FmProcess, out: &Path, n: usize, within: Duration) {
    util::eventually(within, async || match handled(out).len() {
        got if got >= n => Ok(()),
        got => Err(format!(
            "only {got} of {n} messages handled\n--- fm's stderr (tail):\n{}",
            tail(&proc.stderr(), 40)
        )),
    })
    .await
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Publishes `n` fedora-messaging messages to `amq.topic` with routing key `key`, pipelined
/// with publisher confirms; returns their ids.
async fn publish_many(url: &str, key: &str, n: usize, body: &Value) -> BTreeSet<String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connecting to publish");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut ids = BTreeSet::new();
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        let msg = fm::message::Message::new_outgoing(
            key.to_owned(),
            body.into(),
            serde_json::Map::new(),
            fm::message::BASE_SCHEMA,
            fm::message::INFO,
            None,
        );
        ids.insert(msg.id.clone().expect("outgoing messages have an id"));
        let confirm = channel
            .basic_publish(
                "amq.topic".into(),
                key.into(),
                BasicPublishOptions::default(),
                &msg.encoded_body(),
                msg.amqp_properties().expect("properties"),
            )
            .await
            .expect("publishing");
        pending.push(confirm);
    }
    for confirm in pending {
        assert!(
            confirm.await.expect("confirm").is_ack(),
            "the broker nacked a message"
        );
    }
    let _ = conn.close(200, "done".into()).await;
    ids
}

/// fm is consuming: a new message is handled.
async fn assert_consuming(proc: &FmProcess, url: &str, queue: &str, out: &Path) {
    let ids = publish_many(url, &format!("{queue}.ack"), 1, &json!({"probe": true})).await;
    wait_all_handled(proc, out, &ids, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_in_the_middle_of_5000_messages_loses_nothing() {
    let Some(broker) = util::broker() else { return };
    let node = broker.extra_node("restart");
    let queue = util::unique("restart");
    let (_keep, out) = out_file();
    let fm = Fm::new().config_toml(&config(
        node.url(),
        &queue,
        &out,
        Extra {
            prefetch: 50,
            ..Extra::default()
        },
    ));
    let mut proc = fm.arg("consume").spawn();
    proc.wait_consuming().await;
    let ids = publish_many(node.url(), &format!("{queue}.ack"), 5000, &json!({"n": 1})).await;

    // Restart once fm is part-way through.
    wait_handled_at_least(&proc, &out, 500, Duration::from_secs(60)).await;
    node.stop_node().await;
    node.start_node().await;

    wait_all_handled(&proc, &out, &ids, Duration::from_secs(180)).await;
    assert!(
        proc.stderr().contains("connection lost"),
        "{}",
        proc.stderr()
    );
    assert_consuming(&proc, node.url(), &queue, &out).await;
    node.wait_for_depth(&queue, 0).await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_three_times_in_a_row() {
    let Some(broker) = util::broker() else { return };
    let node = broker.extra_node("closeall");
    let queue = util::unique("closeall");
    let (_keep, out) = out_file();
    let fm = Fm::new().config_toml(&config(
        node.url(),
        &queue,
        &out,
        Extra {
            prefetch: 50,
            ..Extra::default()
        },
    ));
    let mut proc = fm.arg("consume").spawn();
    proc.wait_consuming().await;
    let ids = publish_many(node.url(), &format!("{queue}.ack"), 300, &json!({})).await;
    for round in 1..=3 {
        node.rabbitmqctl(&["close_all_connections", &format!("fault injection {round}")])
            .await;
        // Wait for fm to come back before the next blow.
        proc.wait_for_stderr_count(util::CONSUMING, round + 1).await;
    }
    wait_all_handled(&proc, &out, &ids, Duration::from_secs(60)).await;
    assert_consuming(&proc, node.url(), &queue, &out).await;
    node.wait_for_depth(&queue, 0).await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_a_restart_handles_everything() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("sigkill");
    let (_keep, out) = out_file();
    let cfg = config(
        broker.url(),
        &queue,
        &out,
        Extra {
            prefetch: 50,
            ..Extra::default()
        },
    );
    let mut first = Fm::new().config_toml(&cfg).arg("consume").spawn();
    first.wait_consuming().await;
    let ids = publish_many(broker.url(), &format!("{queue}.ack"), 2000, &json!({})).await;
    wait_handled_at_least(&first, &out, 200, Duration::from_secs(60)).await;
    first.kill("KILL");
    first.wait_timeout(Duration::from_secs(10)).await;

    let mut second = Fm::new().config_toml(&cfg).arg("consume").spawn();
    wait_all_handled(&second, &out, &ids, Duration::from_secs(120)).await;
    second.wait_consuming().await;
    broker.wait_for_depth(&queue, 0).await;
    second.kill("TERM");
    second.wait().await.assert_code(0);
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_8_slow_callbacks_in_flight_finishes_and_acks_them() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("drain8");
    let (_keep, out) = out_file();
    let cfg = config(
        broker.url(),
        &queue,
        &out,
        Extra {
            callback: "concurrency = 8",
            prefetch: 50,
            ..Extra::default()
        },
    );
    let ids = {
        broker.declare_queue(&queue).await;
        broker
            .bind(&queue, "amq.topic", &format!("{queue}.#"))
            .await;
        publish_many(broker.url(), &format!("{queue}.slow2"), 20, &json!({})).await
    };
    let proc = Fm::new().config_toml(&cfg).arg("consume").spawn();
    // Eight callbacks start at once (each records before sleeping).
    wait_handled_at_least(&proc, &out, 8, Duration::from_secs(30)).await;
    proc.kill("TERM");
    let output = proc.wait().await;
    output.assert_code(0);
    let seen = handled(&out);
    assert_eq!(seen.len(), 8, "no new message was started after SIGTERM");
    assert!(
        output
            .stderr
            .matches("Successfully consumed message")
            .count()
            == 8,
        "all 8 in-flight messages were acked:\n{}",
        output.stderr
    );
    assert_eq!(broker.queue_depth(&queue).await, 12, "the others went back");
    assert!(seen.keys().all(|id| ids.contains(id)));
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_blocking_past_the_heartbeat_timeout_keeps_the_connection() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("blocking");
    let (_keep, out) = out_file();
    // Heartbeat 1 s: the broker gives up on a silent connection after about 2 s.
    let url = format!("{}?heartbeat=1", broker.url());
    let proc = consuming(&config(
        &url,
        &queue,
        &out,
        Extra {
            prefetch: 50,
            ..Extra::default()
        },
    ))
    .await;
    let slow = publish_many(broker.url(), &format!("{queue}.slow4"), 1, &json!({})).await;
    let fast = publish_many(broker.url(), &format!("{queue}.ack"), 5, &json!({})).await;
    wait_all_handled(&proc, &out, &fast, Duration::from_secs(60)).await;
    proc.kill("TERM");
    let output = proc.wait().await;
    output.assert_code(0);
    assert!(
        !output.stderr.contains("connection lost"),
        "{}",
        output.stderr
    );
    assert_eq!(
        handled(&out)[slow.first().unwrap()],
        1,
        "handled once, not redelivered"
    );
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dropped_after_max_redeliveries_and_bad_messages_never_stop_fm() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("poison");
    let dlq = format!("{queue}.dead");
    broker.declare_queue(&dlq).await;
    let (_keep, out) = out_file();
    let dlx = dead_letter_to(&dlq);
    let cfg = config(
        broker.url(),
        &queue,
        &out,
        Extra {
            callback: "max_redeliveries = 3",
            queue_args: &dlx,
            prefetch: 50,
            ..Extra::default()
        },
    );
    let proc = consuming(&cfg).await;

    let poison = publish_many(broker.url(), &format!("{queue}.poison"), 1, &json!({})).await;
    // Bad messages of every kind, straight to the queue.
    let rk = format!("{queue}.ack");
    let bad_props = || BasicProperties::default().with_message_id("bad".into());
    broker
        .publish("amq.topic", &rk, b"{not json", bad_props())
        .await;
    broker
        .publish("amq.topic", &rk, b"\xc3\x28", bad_props())
        .await;
    broker
        .publish("amq.topic", &rk, b"[1, 2, 3]", bad_props())
        .await;
    broker
        .publish(
            "amq.topic",
            &rk,
            b"{\"no\": \"headers\"}",
            BasicProperties::default(),
        )
        .await;
    let big = json!({"data": "x".repeat(10 * 1024 * 1024)});
    let big_ids = publish_many(broker.url(), &rk, 1, &big).await;
    let good = publish_many(broker.url(), &rk, 20, &json!({"fine": true})).await;

    wait_all_handled(&proc, &out, &good, Duration::from_secs(60)).await;
    wait_all_handled(&proc, &out, &big_ids, Duration::from_secs(60)).await;
    broker.wait_for_depth(&dlq, 1 + 3).await; // the poison message and three bad bodies
    let seen = handled(&out);
    assert_eq!(
        seen[poison.first().unwrap()],
        4,
        "first delivery + 3 redeliveries, then dropped"
    );
    assert!(
        proc.stderr().contains("max_redeliveries = 3"),
        "{}",
        proc.stderr()
    );
    assert_consuming(&proc, broker.url(), &queue, &out).await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    assert_eq!(broker.queue_depth(&queue).await, 0);
    broker.delete_queue(&queue).await;
    broker.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fm_processes_share_one_queue() {
    let Some(broker) = util::broker() else { return };
    let queue = util::unique("shared");
    let (_keep, out) = out_file();
    let (_keep_b, out_b) = out_file();
    let mut a = Fm::new()
        .config_toml(&config(
            broker.url(),
            &queue,
            &out,
            Extra {
                prefetch: 50,
                ..Extra::default()
            },
        ))
        .arg("consume")
        .spawn();
    let mut b = Fm::new()
        .config_toml(&config(
            broker.url(),
            &queue,
            &out_b,
            Extra {
                prefetch: 50,
                ..Extra::default()
            },
        ))
        .arg("consume")
        .spawn();
    a.wait_consuming().await;
    b.wait_consuming().await;
    let ids = publish_many(broker.url(), &format!("{queue}.ack"), 1000, &json!({})).await;
    let (sa, sb) = util::eventually(Duration::from_secs(60), async || {
        let (sa, sb) = (handled(&out), handled(&out_b));
        let all: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
        match ids.iter().filter(|id| !all.contains(id)).count() {
            0 => Ok((sa, sb)),
            missing => Err(format!("{missing} of 1000 never handled")),
        }
    })
    .await;
    assert!(
        !sa.is_empty() && !sb.is_empty(),
        "each handled some: {} and {}",
        sa.len(),
        sb.len()
    );
    broker.wait_for_depth(&queue, 0).await;
    a.kill("TERM");
    b.kill("TERM");
    a.wait().await.assert_code(0);
    b.wait().await.assert_code(0);
    broker.delete_queue(&queue).await;
}

/// The three-node cluster (scripts/test --full): fm follows the URL list to another node when
/// the one it is connected to stops, and a quorum queue loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_stopping_moves_fm_to_another_node() {
    let Some(nodes) = util::cluster() else { return };
    let queue = util::unique("cluster");
    let (_keep, out) = out_file();
    let urls: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.url())).collect();
    let cfg = config(
        nodes[0].url(),
        &queue,
        &out,
        Extra {
            queue_args: "\"x-queue-type\" = \"quorum\"",
            prefetch: 50,
            ..Extra::default()
        },
    )
    .replace(
        &format!("amqp_url = \"{}\"", nodes[0].url()),
        &format!("amqp_url = [{}]", urls.join(", ")),
    );
    let proc = consuming(&cfg).await;
    let ids = publish_many(nodes[1].url(), &format!("{queue}.ack"), 2000, &json!({})).await;
    wait_handled_at_least(&proc, &out, 200, Duration::from_secs(60)).await;
    // Stop the node fm is connected to (it logs which).
    let connected = nodes
        .iter()
        .find(|n| proc.stderr().contains(&format!(":{}/", n.amqp_port())))
        .expect("fm logged the broker it connected to");
    connected.stop_node().await;
    wait_all_handled(&proc, &out, &ids, Duration::from_secs(180)).await;
    connected.start_node().await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
}
