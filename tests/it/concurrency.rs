//! `[callback] concurrency = N`: up to N messages at once, each acked as it finishes; commands
//! run N at a time, workers run N processes, a plugin only when it says it is thread-safe; and
//! halt and failure still drain cleanly (in-flight messages finish, the rest go back).
//!
//! The timing tests use a callback that takes 100 ms and a generous bound (`concurrency = 8`
//! must take less than half the time of `concurrency = 1`): the speed figures themselves belong
//! to the benchmarks. They also check, from the start and end times the callback records, that
//! no more than N messages were ever in flight.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::callbacks::{Setup, fixture, python3, wait_settled};
use crate::util::{self, Broker, Fm};

const MESSAGES: usize = 40;

/// Runs `callback` (a `[callback]` table body, `{n}` replaced by the concurrency) over 40
/// "sleep" messages published beforehand; returns how long fm took to settle them all and the
/// most messages that were in flight at once.
async fn timed(b: &Broker, name: &str, callback: &str, n: usize) -> (Duration, usize) {
    let s = Setup::new(b, name).await;
    let mut ids = Vec::new();
    for _ in 0..MESSAGES {
        ids.push(s.publish(b, "sleep", json!({})).await);
    }
    let config = s.fm_config(&callback.replace("{n}", &n.to_string()), "");
    let started = Instant::now();
    let mut fm = s.fm(&config).spawn();
    wait_settled(&mut fm, MESSAGES).await;
    let took = started.elapsed();
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    b.wait_for_depth(&s.queue, 0).await;

    // Every message ran once; count the most that overlapped.
    let mut events = Vec::new();
    for id in &ids {
        let span = s.read(&format!("{id}.span"));
        let (start, end) = span
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("message {id} was not handled (span {span:?})"));
        events.push((start.parse::<u128>().unwrap(), 1i32));
        events.push((end.parse::<u128>().unwrap(), -1));
    }
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    s.cleanup(b).await;
    (took, most as usize)
}

async fn eight_beat_one(b: &Broker, name: &str, callback: &str) {
    let (serial, most_serial) = timed(b, &format!("{name}-1"), callback, 1).await;
    let (parallel, most_parallel) = timed(b, &format!("{name}-8"), callback, 8).await;
    eprintln!(
        "{name}: {MESSAGES} messages of 100 ms: {serial:?} at concurrency 1, {parallel:?} at 8 \
         ({most_parallel} at once)"
    );
    assert_eq!(most_serial, 1, "concurrency = 1 is serial");
    assert!(
        (2..=8).contains(&most_parallel),
        "concurrency = 8 ran {most_parallel} at once"
    );
    assert!(
        parallel < serial / 2,
        "concurrency = 8 took {parallel:?}, concurrency = 1 took {serial:?}"
    );
    // 40 × 100 ms one at a time cannot take less than 4 s.
    assert!(serial >= Duration::from_secs(4), "{serial:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_n_at_a_time() {
    let Some(b) = util::broker() else { return };
    let callback = format!(
        "command = [\"{}\"]\nconcurrency = {{n}}",
        fixture("exec.sh").display()
    );
    eight_beat_one(&b, "conc-exec", &callback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_n_processes() {
    let Some(b) = util::broker() else { return };
    let callback = format!(
        "command = [\"{}\", \"{}\"]\nmode = \"worker\"\nconcurrency = {{n}}",
        python3(),
        fixture("worker.py").display()
    );
    eight_beat_one(&b, "conc-worker", &callback).await;
}

/// Four workers busy with three slow messages and `last` (published fourth), six more
/// prefetched behind them. Returns fm's output and the ids.
async fn drain(
    b: &Broker,
    name: &str,
    last: &str,
) -> (util::FmOutput, Setup, Vec<String>, Vec<String>) {
    let s = Setup::new(b, name).await;
    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(s.publish(b, "slow", json!({})).await);
    }
    let last = s.publish(b, last, json!({})).await;
    let mut waiting = vec![last];
    for _ in 0..6 {
        waiting.push(s.publish(b, "ack", json!({})).await);
    }
    let callback = format!(
        "command = [\"{}\", \"{}\"]\nmode = \"worker\"\nconcurrency = 4",
        python3(),
        fixture("worker.py").display()
    );
    let out = s.fm(&s.fm_config(&callback, "")).run().await;
    (out, s, slow, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_lets_in_flight_messages_finish_and_returns_the_rest() {
    let Some(b) = util::broker() else { return };
    let (out, s, slow, waiting) = drain(&b, "conc-halt", "halt").await;
    out.assert_code(7);
    for id in &slow {
        assert!(
            s.out(&format!("{id}.done")).is_file(),
            "{id} did not finish:\n{}",
            out.stderr
        );
    }
    assert_eq!(
        out.stderr.matches("Successfully consumed message").count(),
        3,
        "{}",
        out.stderr
    );
    // The halted message was acked; the six behind it were never started and went back.
    b.wait_for_depth(&s.queue, 6).await;
    let seen = s.read("seen.jsonl");
    for id in &waiting[1..] {
        assert!(
            !seen.contains(id.as_str()),
            "{id} was started after the halt"
        );
    }
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_lets_in_flight_messages_finish_and_returns_the_rest() {
    let Some(b) = util::broker() else { return };
    let (out, s, slow, waiting) = drain(&b, "conc-fail", "fail").await;
    out.assert_code(13);
    for id in &slow {
        assert!(
            s.out(&format!("{id}.done")).is_file(),
            "{id} did not finish:\n{}",
            out.stderr
        );
    }
    assert_eq!(
        out.stderr.matches("Successfully consumed message").count(),
        3,
        "{}",
        out.stderr
    );
    // The failed message and the six behind it are back in the queue.
    b.wait_for_depth(&s.queue, 7).await;
    let seen = s.read("seen.jsonl");
    for id in &waiting[1..] {
        assert!(
            !seen.contains(id.as_str()),
            "{id} was started after the failure"
        );
    }
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_runs_concurrently_only_when_thread_safe() {
    let src = util::repo_root().join("tests/fixtures/plugins/roundtrip.c");
    // Not thread-safe: fm refuses to start with concurrency > 1, and says why (no broker needed).
    let plain = util::build_c_plugin(&src);
    let out = Fm::new()
        .config_toml(&format!(
            "amqp_url = \"amqp://localhost:1/\"\n[callback]\nplugin = \"{}\"\nconcurrency = 2\n",
            plain.display()
        ))
        .arg("consume")
        .run()
        .await;
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("is not thread-safe (it does not set FM_PLUGIN_THREAD_SAFE)")
            && out.stderr.contains("concurrency = 2; set concurrency = 1"),
        "{}",
        out.stderr
    );

    // Thread-safe: up to 4 "slow" calls at once (the plugin halts with the most it saw).
    let Some(b) = util::broker() else { return };
    let safe = util::build_c_plugin_with(&src, &["-DROUNDTRIP_FLAGS=FM_PLUGIN_THREAD_SAFE"]);
    let s = Setup::new(&b, "conc-plugin").await;
    // The plugin acts on the whole topic: route "slow" and "max" through an exchange of our own.
    let exchange = util::unique("conc-plugin");
    b.declare_topic_exchange(&exchange).await;
    b.bind(&s.queue, &exchange, "#").await;
    for _ in 0..16 {
        b.publish_fedora(&exchange, "slow", &json!({})).await;
    }
    let config = s.fm_config(
        &format!("plugin = \"{}\"\nconcurrency = 4", safe.display()),
        "",
    );
    let mut fm = s.fm(&config).spawn();
    wait_settled(&mut fm, 16).await;
    b.publish_fedora(&exchange, "max", &json!({})).await;
    let out = fm.wait().await;
    let most = out.code().unwrap();
    assert!(
        (2..=4).contains(&most),
        "at most {most} calls at once:\n{}",
        out.stderr
    );
    s.cleanup(&b).await;
    b.delete_exchange(&exchange).await;
}

/// `[callback] queue_concurrency = 1` with `concurrency = 4` (issue 15): fedora-messaging's
/// model, each queue's messages one after the other while the queues run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_concurrency_limits_each_queue_not_the_others() {
    let Some(b) = util::broker() else { return };
    let a = Setup::new(&b, "conc-perq-a").await;
    let other = Setup::new(&b, "conc-perq-b").await;
    let (a1, a2) = (
        a.publish(&b, "gate", json!({})).await,
        a.publish(&b, "gate", json!({})).await,
    );
    let b1 = other.publish(&b, "gate", json!({})).await;
    let config = a.fm_config(
        &format!(
            "command = [\"{}\"]\nconcurrency = 4\nqueue_concurrency = 1",
            fixture("exec.sh").display()
        ),
        &second_queue(&other),
    );
    // Both queues' evidence goes to the first queue's folder.
    let mut fm = a.fm(&config).spawn();
    let waiting = |id: &str| a.out(&format!("{id}.waiting")).exists();
    util::eventually(Duration::from_secs(20), async || {
        if waiting(&a1) && waiting(&b1) {
            Ok(())
        } else {
            Err("the first message of each queue is not running yet")
        }
    })
    .await;
    // The second message of the first queue waits for the first, though two slots are free.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting(&a2), "two messages of one queue ran at once");
    std::fs::write(a.out(&format!("{a1}.go")), "").unwrap();
    util::eventually(Duration::from_secs(20), async || {
        if waiting(&a2) {
            Ok(())
        } else {
            Err("the queue's second message did not start after its first")
        }
    })
    .await;
    for id in [&a2, &b1] {
        std::fs::write(a.out(&format!("{id}.go")), "").unwrap();
    }
    wait_settled(&mut fm, 3).await;
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    a.cleanup(&b).await;
    other.cleanup(&b).await;
}

/// The tables that add `s`'s queue to a config made by another `Setup`'s `fm_config`.
fn second_queue(s: &Setup) -> String {
    format!(
        "[queues.\"{q}\"]\ndurable = true\nauto_delete = false\nexclusive = false\n\
         arguments = {{\"x-dead-letter-exchange\" = \"\", \"x-dead-letter-routing-key\" = \"{dlq}\"}}\n\n\
         [[bindings]]\nqueue = \"{q}\"\nexchange = \"amq.topic\"\nrouting_keys = [\"{q}.#\"]\n",
        q = s.queue,
        dlq = s.dlq,
    )
}

/// A plugin's consume threads (one per queue per slot) outnumbering tokio's blocking pool (512
/// threads) (issue 15): they were blocking-pool threads, so the second queue's loops never
/// started and its messages were never handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_threads_beyond_the_blocking_pool_all_consume() {
    let Some(b) = util::broker() else { return };
    let src = util::repo_root().join("tests/fixtures/plugins/roundtrip.c");
    let safe = util::build_c_plugin_with(&src, &["-DROUNDTRIP_FLAGS=FM_PLUGIN_THREAD_SAFE"]);
    let first = Setup::new(&b, "conc-many-a").await;
    let second = Setup::new(&b, "conc-many-b").await;
    // The plugin acts on the whole topic: route "ack" to both queues through an exchange.
    let exchange = util::unique("conc-many");
    b.declare_topic_exchange(&exchange).await;
    b.bind(&first.queue, &exchange, "#").await;
    b.bind(&second.queue, &exchange, "#").await;
    for _ in 0..3 {
        b.publish_fedora(&exchange, "ack", &json!({})).await;
    }
    let config = first.fm_config(
        &format!("plugin = \"{}\"\nconcurrency = 600", safe.display()),
        &second_queue(&second),
    );
    let mut fm = first.fm(&config).spawn();
    // Three messages on each queue.
    wait_settled(&mut fm, 6).await;
    b.wait_for_depth(&second.queue, 0).await;
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    first.cleanup(&b).await;
    second.cleanup(&b).await;
    b.delete_exchange(&exchange).await;
}
