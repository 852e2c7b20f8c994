//! Issue 17: what a publisher (anyone who can publish to a bound topic) or a broken callback can
//! do to a consumer, and why it never stops fm. After each hostile message the next good one is
//! consumed and fm is still running.

use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use lapin::types::FieldTable;
use serde_json::json;

use crate::util::callbacks::{Setup, wait_settled};
use crate::util::recorder::{Extra, config, consuming, dead_letter_to, out_file, wait_for_lines};
use crate::util::{self, Fm};

/// A NUL byte cannot go into a command's environment (`FM_TOPIC`, `FM_MESSAGE_ID`); AMQP allows
/// it in a routing key and a message id. Such a message is the message's fault: dropped (here
/// dead-lettered) with a line naming it, and the command runs for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_the_topic_or_id_drops_only_that_message_in_exec_mode() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-nul").await;
    let command = serde_json::to_string(&[crate::util::callbacks::fixture("exec.sh")]).unwrap();
    let mut fm = s
        .fm(&s.fm_config(&format!("command = {command}"), ""))
        .spawn();
    fm.wait_consuming().await;

    let body = json!({"n": 1});
    let nul_topic = format!("{}.x\0y.ack", s.queue);
    b.publish_json(
        "amq.topic",
        &nul_topic,
        &body,
        FieldTable::default(),
        "id-topic",
    )
    .await;
    let topic = format!("{}.ack", s.queue);
    b.publish_json("amq.topic", &topic, &body, FieldTable::default(), "id\0nul")
        .await;
    let good = s.publish(&b, "ack", json!({"n": 2})).await;
    wait_settled(&mut fm, 3).await;

    let log = fm.stderr();
    assert!(
        log.contains("message id-topic: its topic contains a NUL byte"),
        "{log}"
    );
    assert!(
        log.contains("message id\\x00nul: its id contains a NUL byte"),
        "the id is named, its NUL escaped:\n{log}"
    );
    assert!(s.out(&format!("{good}.stdin")).is_file(), "{log}");
    assert_eq!(s.dead_lettered(&b, 2).await, ["id-topic", "id\0nul"]);
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

/// A topic carrying a newline and a whole forged log line stays on the line of the event that
/// logs it: control characters are written escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_forged_in_a_topic_stays_on_its_own_line() {
    let Some(b) = util::broker() else { return };
    let queue = util::unique("forge");
    let (_keep, out) = out_file();
    let mut proc = consuming(&config(b.url(), &queue, &out, Extra::default())).await;
    let forged = "2026-11-26T00:00:00.000000Z ERROR fm::consume: forged";
    let topic = format!("{queue}.x\n{forged}\r\u{1b}[2J.ack");
    b.publish_json(
        "amq.topic",
        &topic,
        &json!({}),
        FieldTable::default(),
        "id\nforged",
    )
    .await;
    wait_for_lines(&proc, &out, 1).await;
    proc.wait_for_stderr("Successfully consumed message").await;
    let log = proc.stderr();
    assert!(
        log.lines().all(|l| !l.starts_with(forged)),
        "a forged line:\n{log}"
    );
    assert!(
        log.contains(&format!("x\\n{forged}\\r\\x1b[2J.ack")),
        "the topic is logged escaped:\n{log}"
    );
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    b.delete_queue(&queue).await;
}

/// fm(1) promises an exit once `shutdown_timeout` has passed, even when a plugin's `handle`
/// never returns: the plugin's own shutdown is then skipped (it could free what the call uses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_returns_does_not_keep_fm_from_exiting() {
    let Some(b) = util::broker() else { return };
    let queue = util::unique("hang");
    let (_keep, out) = out_file();
    let extra = Extra {
        top: "shutdown_timeout = 1",
        ..Extra::default()
    };
    let mut proc = consuming(&config(b.url(), &queue, &out, extra)).await;
    b.publish_fedora("amq.topic", &format!("{queue}.hang"), &json!({}))
        .await;
    wait_for_lines(&proc, &out, 1).await; // the plugin records, then hangs
    proc.kill("TERM");
    proc.wait_for_stderr("did not finish within shutdown_timeout")
        .await;
    let output = proc.wait().await;
    output.assert_code(0);
    assert!(
        output
            .stderr
            .contains("a handle call is still running; not calling its shutdown"),
        "{}",
        output.stderr
    );
    // The message was never settled: the broker keeps it for the next consumer.
    b.wait_for_depth(&queue, 1).await;
    b.delete_queue(&queue).await;
}

/// A native plugin that crashes fm (a segfault) on one message: fm dies with it, and its
/// supervisor (systemd; here the test) starts it again. The attempts journal in the state
/// folder counts the crashes, so after `max_redeliveries` the message is dropped with a line
/// naming it, and fm goes on; the other messages, prefetched while it crashed, are never
/// counted against (on a quorum queue the broker's `x-delivery-count` would have).
async fn a_crashing_message_is_dropped_after_max_redeliveries_crashes(quorum: bool) {
    let Some(b) = util::broker() else { return };
    let queue = util::unique(if quorum { "crash-quorum" } else { "crash" });
    let dlq = util::unique("crash-dlq");
    b.declare_queue(&dlq).await;
    let (_keep, out) = out_file();
    let state = tempfile::tempdir().unwrap();
    let args = dead_letter_to(&dlq)
        + if quorum {
            ", \"x-queue-type\" = \"quorum\""
        } else {
            ""
        };
    let cfg = config(
        b.url(),
        &queue,
        &out,
        Extra {
            callback: "max_redeliveries = 2",
            queue_args: &args,
            ..Extra::default()
        },
    );
    let fm = || {
        Fm::new()
            .config_toml(&cfg)
            .env("STATE_DIRECTORY", state.path())
            .arg("consume")
            .spawn()
    };
    let mut first = fm();
    first.wait_consuming().await;
    let crash = b
        .publish_fedora("amq.topic", &format!("{queue}.crash"), &json!({}))
        .await;
    let mut innocent = Vec::new();
    for n in 0..5 {
        innocent.push(
            b.publish_fedora("amq.topic", &format!("{queue}.ack"), &json!({ "n": n }))
                .await,
        );
    }

    // Three crashes (the first attempt and two more), then a run that drops the message.
    let mut proc = first;
    let mut crashes = 0;
    loop {
        let crashed = util::eventually(util::TIMEOUT, async || {
            if let Some(status) = proc.wait_timeout(Duration::from_millis(20)).await {
                assert_eq!(
                    status.signal(),
                    Some(11),
                    "fm died of the segfault: {status}"
                );
                return Ok(true);
            }
            match proc.stderr().contains("without being settled") {
                true => Ok(false),
                false => Err(format!(
                    "fm neither crashed nor dropped:\n{}",
                    proc.stderr()
                )),
            }
        })
        .await;
        if !crashed {
            break;
        }
        crashes += 1;
        assert!(crashes <= 3, "a crash loop: fm crashed {crashes} times");
        proc = fm();
    }
    assert_eq!(crashes, 3);
    assert!(
        proc.stderr().contains(&format!(
            "message {crash} (topic {queue}.crash) was handed to the callback 3 times without \
             being settled"
        )),
        "{}",
        proc.stderr()
    );
    let lines = wait_for_lines(&proc, &out, 3 + innocent.len()).await;
    let handled = |id: &str| lines.iter().filter(|l| l["record"]["id"] == id).count();
    assert_eq!(
        handled(&crash),
        3,
        "handed to the plugin 3 times, then dropped"
    );
    for id in &innocent {
        assert!(handled(id) >= 1, "{id} was handled");
    }
    b.wait_for_depth(&dlq, 1).await;
    let dead = b.get(&dlq).await.expect("the dead-lettered message");
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(crash.as_str()),
        "only the crashing message is dead-lettered"
    );
    b.wait_for_depth(&queue, 0).await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    b.delete_queue(&queue).await;
    b.delete_queue(&dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_message_on_a_classic_queue_stops_looping() {
    a_crashing_message_is_dropped_after_max_redeliveries_crashes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_message_on_a_quorum_queue_is_the_only_one_dropped() {
    a_crashing_message_is_dropped_after_max_redeliveries_crashes(true).await;
}

/// Idle connections to the monitoring port once took a file descriptor each, without limit,
/// until exec mode could not start its command (exit 13). Now at most 64 are served at once
/// (more wait in the kernel's backlog), and a command that cannot start for want of descriptors
/// is a passing condition: the message goes back to the queue and is handled once descriptors
/// are free again. fm runs with a limit of 60 descriptors here, set from outside with prlimit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_delays_exec_mode_without_failing_it() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "exec-fds").await;
    let command = serde_json::to_string(&[crate::util::callbacks::fixture("exec.sh")]).unwrap();
    let config = s.fm_config(
        &format!("command = {command}"),
        "[monitoring]\naddress = \"127.0.0.1\"\nport = 0\n",
    );
    let mut fm = s.fm(&config).spawn();
    fm.wait_consuming().await;
    let addr = fm.monitor_addr().await;
    let limited = std::process::Command::new("prlimit")
        .args(["--nofile=60:60", "--pid", &fm.pid().to_string()])
        .status()
        .expect("running prlimit");
    assert!(limited.success(), "prlimit failed");

    // 100 idle clients: fm takes 64 of them, fewer if its descriptors run out first.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let id = s.publish(&b, "ack", json!({})).await;
    fm.wait_for_stderr(&format!(
        "for message {id}: Too many open files (os error 24); returning the message to the \
         queue and pausing 1 s"
    ))
    .await;
    assert!(!s.out(&format!("{id}.stdin")).exists());

    // The clients leave: descriptors are free again, and the message is handled.
    drop(idle);
    util::eventually(util::TIMEOUT, async || {
        match s.out(&format!("{id}.stdin")).is_file() {
            true => Ok(()),
            false => Err(format!("message {id} never handled:\n{}", fm.stderr())),
        }
    })
    .await;
    wait_settled(&mut fm, 2).await; // the requeue, then the ack
    fm.kill("TERM");
    fm.wait().await.assert_code(0);
    s.cleanup(&b).await;
}

/// SIGHUP (the terminal fm ran in closed) once ended fm at once, with no log line and no
/// drain. It now stops fm the way SIGTERM does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_stops_gracefully() {
    let Some(b) = util::broker() else { return };
    let queue = util::unique("hup");
    let (_keep, out) = out_file();
    let proc = consuming(&config(b.url(), &queue, &out, Extra::default())).await;
    proc.kill("HUP");
    let output = proc.wait().await;
    output.assert_code(0);
    assert!(
        output
            .stderr
            .contains("received SIGHUP: finishing in-flight messages, then stopping"),
        "{}",
        output.stderr
    );
    b.delete_queue(&queue).await;
}

/// An ack sent on a connection the broker has closed (a lost heartbeat, here a closed
/// connection) never arrives: the message comes again. fm once logged it as consumed and
/// counted it as processed; now it says the ack failed, and the message is consumed when it
/// comes back. The command holds the message until the connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_ack_is_lost_is_not_reported_consumed() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "lost-ack").await;
    let app = util::unique("lost-ack-app");
    let command = serde_json::to_string(&[crate::util::callbacks::fixture("exec.sh")]).unwrap();
    let config = s.fm_config(
        &format!("command = {command}"),
        &format!("[client_properties]\napp = \"{app}\"\n"),
    );
    let mut fm = s.fm(&config).spawn();
    fm.wait_consuming().await;
    let id = s.publish(&b, "gate", json!({})).await;
    util::eventually(util::TIMEOUT, async || {
        match s.out(&format!("{id}.waiting")).exists() {
            true => Ok(()),
            false => Err(format!("the command never started:\n{}", fm.stderr())),
        }
    })
    .await;
    b.close_connection_of(&app, "the test cuts fm off").await;
    fm.wait_for_stderr("connection lost").await;
    std::fs::write(s.out(&format!("{id}.go")), "").unwrap();
    fm.wait_for_stderr("could not settle the message").await;
    // Delivered again on the new connection, and consumed this time.
    let consumed = format!(
        "Successfully consumed message from topic {}.gate (message id {id})",
        s.queue
    );
    fm.wait_for_stderr(&consumed).await;
    fm.kill("TERM");
    let output = fm.wait().await;
    output.assert_code(0);
    assert_eq!(
        output.stderr.matches(&consumed).count(),
        1,
        "consumed once, when its ack arrived:\n{}",
        output.stderr
    );
    s.cleanup(&b).await;
}
