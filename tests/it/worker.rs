//! Long-lived workers (`[callback] command`, `mode = "worker"`), against a real broker with real
//! processes: the protocol round trip (a shell worker and a Python one), every answer, a worker
//! that crashes mid-message, one that answers garbage, one that hangs, one that keeps crashing,
//! one that cannot start, and workers leaving with fm.
//!
//! The workers are `tests/fixtures/callbacks/worker.sh` (acks everything) and `worker.py`
//! (answers what the last word of the topic says and logs each message to `seen.jsonl`).

use serde_json::{Value, json};

use crate::util::callbacks::{Setup, assert_gone, fixture, python3, wait_settled};
use crate::util::{self, Fm};

/// A config running `worker.py` as a worker, with extra `[callback]` lines.
fn py_worker(s: &Setup, settings: &str) -> String {
    let argv = [python3(), fixture("worker.py").display().to_string()];
    s.fm_config(
        &format!(
            "command = {}\nmode = \"worker\"\n{settings}",
            serde_json::to_string(&argv).unwrap()
        ),
        "",
    )
}

/// What worker.py saw, one object per message it was given.
fn seen(s: &Setup) -> Vec<Value> {
    s.read("seen.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn seen_of<'a>(seen: &'a [Value], id: &str) -> Vec<&'a Value> {
    seen.iter().filter(|v| v["id"] == id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_worker_gets_record_lines_and_its_answers_ack() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-sh").await;
    let config = s.fm_config(
        &format!(
            "command = [\"{}\"]\nmode = \"worker\"",
            fixture("worker.sh").display()
        ),
        "",
    );
    let mut fm = s.fm(&config).spawn();
    fm.wait_consuming().await;
    let bodies = [
        json!({"a": "é ✓", "n": 1.5}),
        json!({"shell": "$(id); `id` 'x' \"y\""}),
    ];
    let mut ids = Vec::new();
    for body in &bodies {
        ids.push(s.publish(&b, "any", body.clone()).await);
    }
    wait_settled(&mut fm, 2).await;
    assert_eq!(
        fm.stderr().matches("Successfully consumed message").count(),
        2
    );

    // One record-format line per message, exactly what `fm record` would write.
    let lines: Vec<Value> = s
        .read("worker-sh.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for ((line, id), body) in lines.iter().zip(&ids).zip(&bodies) {
        assert_eq!(line["id"], id.as_str());
        assert_eq!(&line["body"], body);
        assert_eq!(line["queue"], s.queue.as_str());
        assert_eq!(line["topic"], format!("{}.any", s.queue));
        assert_eq!(line["headers"]["fedora_messaging_severity"], 20);
    }
    // Its stderr is in the log, tagged with the message it was (or had just been) working on.
    let log = fm.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker.sh: worker.sh got"))
        .collect();
    assert_eq!(lines.len(), 2, "worker stderr is not in the log:\n{log}");
    for line in lines {
        assert!(
            ids.iter()
                .any(|id| line.contains(&format!("message_id={id}"))),
            "{line}"
        );
    }
    b.wait_for_depth(&s.queue, 0).await;
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_ack_nack_drop_and_halt_act_on_the_message() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-answers").await;
    let mut fm = s.fm(&py_worker(&s, "")).spawn();
    fm.wait_consuming().await;
    let ack = s.publish(&b, "ack", json!({})).await;
    let nack = s.publish(&b, "nack", json!({})).await;
    let drop = s.publish(&b, "drop", json!({})).await;
    // ack, nack (returned), drop, then the nacked message again (acked this time).
    wait_settled(&mut fm, 4).await;
    let halt = s.publish(&b, "halt", json!({})).await;
    let after = s.publish(&b, "ack", json!({"after": "halt"})).await;

    let out = fm.wait().await;
    out.assert_code(7);
    assert!(
        out.stderr.contains(&format!(
            "consumer halted with exit code 7 on message {halt}: asked to stop"
        )),
        "{}",
        out.stderr
    );
    let seen = seen(&s);
    assert_eq!(seen_of(&seen, &ack).len(), 1);
    assert_eq!(
        seen_of(&seen, &nack).len(),
        2,
        "nack returns it; it comes back"
    );
    assert_eq!(seen_of(&seen, &after).len(), 0, "nothing after the halt");
    assert_eq!(s.dead_lettered(&b, 1).await, [drop]);
    // The halted message was acked; the one after it went back to the queue.
    b.wait_for_depth(&s.queue, 1).await;
    let left = b.get(&s.queue).await.unwrap();
    assert_eq!(
        left.properties.message_id().as_ref().unwrap().as_str(),
        after
    );
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_crashes_mid_message_is_restarted_and_the_message_requeued() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-crash").await;
    let mut fm = s.fm(&py_worker(&s, "on_error = \"requeue\"")).spawn();
    fm.wait_consuming().await;
    let crash = s.publish(&b, "crash", json!({})).await;
    let ack = s.publish(&b, "ack", json!({})).await;
    // crash (requeued), crash again (acked by the new worker), ack.
    wait_settled(&mut fm, 3).await;

    let seen = seen(&s);
    let tries = seen_of(&seen, &crash);
    assert_eq!(tries.len(), 2, "{seen:?}");
    assert_ne!(tries[0]["pid"], tries[1]["pid"], "a new process took over");
    assert_eq!(seen_of(&seen, &ack).len(), 1);
    let log = fm.stderr();
    assert!(
        log.contains(&format!(
            "exited with status 3 while handling message {crash}; returning message {crash} to the queue"
        )),
        "{log}"
    );
    assert!(log.contains(&format!(
        "worker 'python3 worker.py' (worker 0, pid {}) exited with status 3",
        tries[0]["pid"]
    )));
    assert!(log.contains("restarted"), "{log}");
    // The dead worker was reaped: it is not a zombie child of fm.
    assert_gone(tries[0]["pid"].as_u64().unwrap() as u32, fm.pid()).await;
    fm.kill("TERM");
    let out = fm.wait().await;
    out.assert_code(0);
    // Workers leave with fm.
    assert_gone(tries[1]["pid"].as_u64().unwrap() as u32, 0).await;
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_answers_garbage_fails_its_message_and_by_default_fm_exits_13() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-garbage").await;
    let id = s.publish(&b, "garbage", json!({})).await;
    let out = s.fm(&py_worker(&s, "")).run().await;
    out.assert_code(13);
    assert!(
        out.stderr
            .contains("answered something that is not a protocol line (")
            && out.stderr.contains(&format!(
                "): this is not a protocol line while handling message {id}"
            )),
        "{}",
        out.stderr
    );
    // Requeued, as any failure under on_error = "halt".
    b.wait_for_depth(&s.queue, 1).await;
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_answers_garbage_is_replaced_and_processing_goes_on() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-garbage-go-on").await;
    let mut fm = s.fm(&py_worker(&s, "on_error = \"requeue\"")).spawn();
    fm.wait_consuming().await;
    let id = s.publish(&b, "garbage", json!({})).await;
    wait_settled(&mut fm, 2).await;
    let seen = seen(&s);
    let tries = seen_of(&seen, &id);
    assert_eq!(tries.len(), 2);
    assert_ne!(tries[0]["pid"], tries[1]["pid"], "the worker was replaced");
    assert!(fm.stderr().contains("Successfully consumed message"));
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

/// Issue 17: a second answer to one message is that message's worker's fault. The next message,
/// which found the stream out of step, is not blamed: it goes to a new worker and is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_is_blamed_on_its_message_not_on_the_next() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-twice").await;
    let mut fm = s.fm(&py_worker(&s, "")).spawn();
    fm.wait_consuming().await;
    let twice = s.publish(&b, "twice", json!({})).await;
    wait_settled(&mut fm, 1).await;
    let next = s.publish(&b, "ack", json!({})).await;
    wait_settled(&mut fm, 2).await;
    let log = fm.stderr();
    assert!(
        log.contains(&format!(
            "wrote a second answer to message {twice} (one answer per message): "
        )),
        "{log}"
    );
    assert!(
        !log.contains(&format!("while handling message {next}")),
        "the next message is not blamed:\n{log}"
    );
    let seen = seen(&s);
    let tries = seen_of(&seen, &next);
    assert_eq!(tries.len(), 1, "handed once, to the new worker");
    assert_eq!(s.dead_lettered(&b, 0).await, Vec::<String>::new());
    assert_eq!(b.queue_depth(&s.queue).await, 0);
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_chatters_on_stdout_fails_and_cannot_go_on() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-banner").await;
    let id = s.publish(&b, "ack", json!({})).await;
    let out = s
        .fm(&py_worker(&s, "on_error = \"requeue\""))
        .env("FM_TEST_BANNER", "1")
        .run()
        .await;
    out.assert_code(13);
    assert!(
        out.stderr.contains(
            "wrote to stdout before it was given a message (stdout is for answers only; log to \
             stderr): worker ready to serve"
        ) || out.stderr.contains(&format!(
            "not a protocol line (expected value at line 1 column 1): worker ready to serve \
             while handling message {id}"
        )),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("failed 5 times in a row"));
    b.wait_for_depth(&s.queue, 1).await;
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_past_the_timeout_is_killed_and_replaced() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-timeout").await;
    let mut fm = s
        .fm(&py_worker(&s, "on_error = \"requeue\"\ntimeout = 1"))
        .spawn();
    fm.wait_consuming().await;
    let id = s.publish(&b, "hang", json!({})).await;
    wait_settled(&mut fm, 2).await;
    let seen = seen(&s);
    let tries = seen_of(&seen, &id);
    assert_eq!(tries.len(), 2);
    assert!(
        fm.stderr().contains(&format!(
            "did not answer within the 1.0 s timeout while handling message {id}"
        )),
        "{}",
        fm.stderr()
    );
    assert_gone(tries[0]["pid"].as_u64().unwrap() as u32, fm.pid()).await;
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_crashing_stops_fm_with_exit_13() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-crash-loop").await;
    let id = s.publish(&b, "crashalways", json!({})).await;
    let out = s.fm(&py_worker(&s, "on_error = \"requeue\"")).run().await;
    out.assert_code(13);
    assert!(
        out.stderr.contains(
            "worker 'python3 worker.py' failed 5 times in a row (last: worker 'python3 worker.py' \
             (worker 0, pid"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("exited with status 4 while handling message {id}"))
    );
    assert_eq!(seen_of(&seen(&s), &id).len(), 5);
    b.wait_for_depth(&s.queue, 1).await;
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_answer_follows_on_error() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-fail").await;
    let mut fm = s.fm(&py_worker(&s, "on_error = \"drop\"")).spawn();
    fm.wait_consuming().await;
    let id = s.publish(&b, "fail", json!({})).await;
    wait_settled(&mut fm, 1).await;
    assert_eq!(s.dead_lettered(&b, 1).await, [id.as_str()]);
    assert!(fm.stderr().contains(&format!(
        "failed on message {id}: ValueError: bad data; dropping message {id}"
    )));
    // A worker that reports a failure is fine: it is not restarted.
    let again = s.publish(&b, "ack", json!({})).await;
    wait_settled(&mut fm, 2).await;
    let seen = seen(&s);
    assert_eq!(
        seen_of(&seen, &id)[0]["pid"],
        seen_of(&seen, &again)[0]["pid"]
    );
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test]
async fn a_worker_that_cannot_start_stops_fm_at_start_with_exit_1() {
    // No broker needed: workers start before fm connects.
    let out = Fm::new()
        .config_toml(
            "amqp_url = \"amqp://localhost:1/\"\n[callback]\n\
             command = [\"/nonexistent/fm-worker\"]\nmode = \"worker\"\n",
        )
        .arg("consume")
        .run()
        .await;
    out.assert_code(1);
    assert!(
        out.stderr
            .contains("worker 'fm-worker': cannot run '/nonexistent/fm-worker': no such file"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_one_per_slot_and_stop_with_fm() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "worker-slots").await;
    let mut fm = s.fm(&py_worker(&s, "concurrency = 3")).spawn();
    fm.wait_consuming().await;
    let log = fm.stderr();
    let started = log
        .lines()
        .find(|l| l.contains("started 3 worker 'python3 worker.py' processes (pids "))
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    let pids: Vec<u32> = started
        .rsplit_once("(pids ")
        .unwrap()
        .1
        .trim_end_matches(')')
        .split(", ")
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    for _ in 0..6 {
        s.publish(&b, "ack", json!({})).await;
    }
    wait_settled(&mut fm, 6).await;
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    // Their stdin closed, the workers exited; none is left behind.
    for pid in pids {
        assert_gone(pid, 0).await;
    }
    s.cleanup(&b).await;
}
