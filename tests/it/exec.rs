//! Per-message commands (`[callback] command`, `mode = "exec"`), against a real broker with real
//! processes: every exit-status path, `on_error`, a timeout that must leave no process behind, a
//! program killed by a signal, one that never reads stdin, and a message full of shell
//! metacharacters that must reach the program byte for byte.
//!
//! The program is `tests/fixtures/callbacks/exec.sh`; the last word of the topic says what it
//! does. Dropped messages are dead-lettered to a queue of the test's own, so "dropped" can be
//! told apart from "acked".
//!
//! The helpers at the end are shared with `worker`, `python` and `concurrency`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::callbacks::{Setup, assert_gone, fixture, wait_settled};
use crate::util::{self, Fm};

fn exec_sh() -> String {
    fixture("exec.sh").display().to_string()
}

/// A config running `exec.sh` (plus `args`) with the `[callback]` lines `settings` and the
/// extra `tables`.
fn exec_config(s: &Setup, args: &[&str], settings: &str, tables: &str) -> String {
    let mut argv = vec![exec_sh()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let callback = format!(
        "command = {}\n{settings}",
        serde_json::to_string(&argv).unwrap()
    );
    s.fm_config(&callback, tables)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_0_acks_65_drops_and_75_requeues() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-status").await;
    let mut fm = s.fm(&exec_config(&s, &[], "", "")).spawn();
    fm.wait_consuming().await;

    let ack = s.publish(&b, "ack", json!({"n": 1})).await;
    let drop = s.publish(&b, "drop", json!({"n": 2})).await;
    let tempfail = s.publish(&b, "tempfail", json!({"n": 3})).await;
    // ack, drop, tempfail (requeued), tempfail again (acked).
    wait_settled(&mut fm, 4).await;

    assert!(s.out("").join(format!("{ack}.stdin")).is_file());
    assert_eq!(s.dead_lettered(&b, 1).await, [drop]);
    assert_eq!(
        s.read(&format!("{tempfail}.deliveries")),
        "false\ntrue\n",
        "75 requeues the message; the second delivery is marked redelivered"
    );
    assert_eq!(b.queue_depth(&s.queue).await, 0);
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_failing_command_requeues_and_exits_13() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-halt").await;
    let mut fm = s.fm(&exec_config(&s, &[], "", "")).spawn();
    fm.wait_consuming().await;
    let id = s.publish(&b, "status", json!({})).await;

    let out = fm.wait().await;
    out.assert_code(13);
    assert!(
        out.stderr.contains(&format!(
            "the callback failed on message {id} (topic {}.status): 'exec.sh' exited with status 3",
            s.queue
        )),
        "{}",
        out.stderr
    );
    // fedora-messaging's failure path: the message goes back to the queue.
    b.wait_for_depth(&s.queue, 1).await;
    assert!(s.dead_lettered(&b, 0).await.is_empty());
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_drop_other_statuses_and_signals_drop_the_message() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-drop").await;
    let mut fm = s
        .fm(&exec_config(&s, &[], "on_error = \"drop\"", ""))
        .spawn();
    fm.wait_consuming().await;

    let status = s.publish(&b, "status", json!({})).await;
    let signal = s.publish(&b, "signal", json!({})).await;
    let ack = s.publish(&b, "ack", json!({})).await;
    wait_settled(&mut fm, 3).await;

    assert_eq!(
        s.dead_lettered(&b, 2).await,
        [status.clone(), signal.clone()]
    );
    let err = fm.stderr();
    assert!(
        err.contains(&format!(
            "'exec.sh' exited with status 3; dropping message {status}"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "'exec.sh' was killed by signal 9 (SIGKILL); dropping message {signal}"
        )),
        "{err}"
    );
    assert!(
        s.out("").join(format!("{ack}.stdin")).is_file(),
        "consuming went on"
    );
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_requeue_a_failure_returns_the_message() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-requeue").await;
    let mut fm = s
        .fm(&exec_config(&s, &[], "on_error = \"requeue\"", ""))
        .spawn();
    fm.wait_consuming().await;

    let id = s.publish(&b, "failonce", json!({})).await;
    wait_settled(&mut fm, 2).await;
    assert_eq!(s.read(&format!("{id}.deliveries")), "false\ntrue\n");
    assert!(fm.stderr().contains(&format!(
        "'exec.sh' exited with status 3; returning message {id} to the queue"
    )));
    assert!(s.dead_lettered(&b, 0).await.is_empty());
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_past_its_timeout_is_killed_with_its_children() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-timeout").await;
    let config = exec_config(&s, &[], "timeout = 1\non_error = \"drop\"", "");
    let mut fm = s.fm(&config).spawn();
    fm.wait_consuming().await;

    let started = Instant::now();
    let id = s.publish(&b, "hang", json!({})).await;
    wait_settled(&mut fm, 1).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed after {took:?}, before the timeout"
    );
    // No upper bound of our own: never killed, the program would run 300 s, and wait_settled
    // gives up after util::TIMEOUT.
    assert!(fm.stderr().contains(&format!(
        "'exec.sh' did not finish within the 1.0 s timeout and was killed; dropping message {id}"
    )));
    assert_eq!(s.dead_lettered(&b, 1).await, [id.as_str()]);

    // The program and the `sleep` it started are gone: fm reaped the program (no zombie left),
    // and the `sleep` died with its process group.
    let pid: u32 = s.read(&format!("{id}.pid")).trim().parse().unwrap();
    let grandchild: u32 = s.read(&format!("{id}.grandchild")).trim().parse().unwrap();
    assert_gone(pid, fm.pid()).await;
    assert_gone(grandchild, fm.pid()).await;
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_never_reads_stdin_is_fine() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-ignore").await;
    let mut fm = s.fm(&exec_config(&s, &[], "", "")).spawn();
    fm.wait_consuming().await;

    // Far more than a pipe holds: fm's write fails with EPIPE once the program exits.
    let ignored = s
        .publish(&b, "ignore", json!({"blob": "x".repeat(300_000)}))
        .await;
    let after = s.publish(&b, "ack", json!({"after": true})).await;
    wait_settled(&mut fm, 2).await;
    assert!(s.out("").join(format!("{ignored}.done")).is_file());
    assert!(s.out("").join(format!("{after}.stdin")).is_file());
    let err = fm.stderr();
    assert_eq!(
        err.matches("Successfully consumed message").count(),
        2,
        "both acked:\n{err}"
    );
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_reaches_the_program_byte_for_byte_with_its_environment() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-bytes").await;
    let args = ["$HOME;ls", "a b", "*", "'\"`id`\""];
    let config = exec_config(&s, &args, "", "[consumer_config]\nkey = \"välue\"");
    let mut fm = s.fm(&config).spawn();
    fm.wait_consuming().await;

    let nasty = "$(touch pwned); `touch pwned2`; echo 'single' \"double\" | cat > /dev/null && \
                 rm -rf ./nothing ; ${HOME} * ? [a-z] ~ # ! \\ \t\n\r\u{1b} end";
    let body = json!({"unicode": "héllo ✓ 🎉", "cmd": nasty, "n": [1, 2.5, null, true]});
    let id = s.publish(&b, "ack", body).await;
    wait_settled(&mut fm, 1).await;

    // The record-format line, as Python's json.dumps(..., ensure_ascii=False, sort_keys=True)
    // writes it, then a newline.
    let q = |v: &str| serde_json::to_string(v).unwrap();
    let topic = format!("{}.ack", s.queue);
    let want = format!(
        "{{\"body\": {{\"cmd\": {cmd}, \"n\": [1, 2.5, null, true], \"unicode\": \"héllo ✓ 🎉\"}}, \
         \"headers\": {{\"fedora_messaging_schema\": \"base.message\", \"fedora_messaging_severity\": 20, \
         \"priority\": 0, \"sent-at\": \"2026-01-02T03:04:05+00:00\"}}, \"id\": {id}, \"priority\": 0, \
         \"queue\": {queue}, \"topic\": {topic}}}\n",
        cmd = q(nasty),
        id = q(&id),
        queue = q(&s.queue),
        topic = q(&topic),
    );
    assert_eq!(s.read(&format!("{id}.stdin")), want);
    assert_eq!(
        s.read(&format!("{id}.args")),
        args.iter().map(|a| format!("{a}\n")).collect::<String>()
    );
    let env = s.read(&format!("{id}.env"));
    for var in [
        format!("FM_TOPIC={topic}"),
        format!("FM_MESSAGE_ID={id}"),
        format!("FM_QUEUE={}", s.queue),
        "FM_EXCHANGE=amq.topic".into(),
        "FM_SEVERITY=20".into(),
        "FM_PRIORITY=0".into(),
        "FM_REDELIVERED=false".into(),
        r#"FM_CONSUMER_CONFIG={"key":"välue"}"#.into(),
    ] {
        assert!(env.lines().any(|l| l == var), "{var} missing from\n{env}");
    }
    // Nothing was run through a shell.
    for dir in [fm.dir(), &s.out("")] {
        assert!(!dir.join("pwned").exists() && !dir.join("pwned2").exists());
    }
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_goes_to_the_log_line_by_line_tagged_with_the_message_id() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-talk").await;
    let mut fm = s.fm(&exec_config(&s, &[], "", "")).spawn();
    fm.wait_consuming().await;
    let id = s.publish(&b, "talk", json!({})).await;
    wait_settled(&mut fm, 1).await;
    fm.kill("TERM");
    let out = fm.wait().await;
    out.assert_code(0);
    for (stream, text) in [("stdout", "to stdout from"), ("stderr", "to stderr from")] {
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(&format!("exec.sh {stream}: {text} {id}")))
            .unwrap_or_else(|| panic!("no {stream} line in the log:\n{}", out.stderr));
        assert!(line.contains(&format!("message_id={id}")), "{line}");
    }
    assert!(
        !out.stdout.contains("to stdout from"),
        "the program's stdout is not fm's"
    );
    s.cleanup(&b).await;
}

#[tokio::test]
async fn a_program_that_cannot_run_stops_fm_at_start_with_exit_1() {
    // No broker needed: fm checks the program before connecting.
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("handler.sh");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    for (program, why) in [
        ("/nonexistent/fm-test-handler".to_owned(), "no such file"),
        ("fm-test-no-such-program".to_owned(), "not found in PATH"),
        (not_executable.display().to_string(), "not executable"),
    ] {
        let config = format!(
            "amqp_url = \"amqp://localhost:1/\"\n[callback]\ncommand = [{}]\n",
            serde_json::to_string(&program).unwrap()
        );
        let out = Fm::new().config_toml(&config).arg("consume").run().await;
        out.assert_code(1);
        assert!(
            out.stderr.contains(&format!(
                "[callback] command: cannot run '{program}': {why}"
            )),
            "{}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Shared with worker.rs, python.rs and concurrency.rs.
