//! Python callbacks under fm, compared with `fedora-messaging consume` (3.9.1, from the venv
//! scripts/test prepares) on the same messages: callbacks no one here wrote
//! (`fedora_messaging.example:printer`), a class that reads `consumer_config`, and `Nack`,
//! `Drop`, `HaltConsumer` and other exceptions raised from Python.
//!
//! Each comparison publishes a batch of messages (fixed ids and headers), lets fm consume them,
//! resets the queues, publishes the very same batch again and lets fedora-messaging consume it,
//! then compares what each printed, what the callback recorded, how the process exited and what
//! was left in the queue and its dead-letter queue. The callbacks of our own are in
//! `tests/fixtures/callbacks/fm_test_callbacks.py` and know nothing about fm.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lapin::types::{AMQPValue, LongString};
use serde_json::{Value, json};

use crate::util::callbacks::{Setup, fixture, settled};
use crate::util::{self, Broker, Fm, field_table};

/// Who consumes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Runner {
    Fm,
    FedoraMessaging,
}

/// A message of a batch: the topic's last word, the body, a fixed id.
struct Msg {
    action: &'static str,
    body: Value,
    id: String,
}

fn msg(action: &'static str, body: Value) -> Msg {
    Msg {
        action,
        body,
        id: uuid::Uuid::new_v4().to_string(),
    }
}

/// How one consumer run went.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// What the callback recorded (`consumer_config.out`), one JSON value per line.
    calls: Vec<Value>,
    /// Ids left in the queue, in order.
    left: Vec<String>,
    /// Ids dead-lettered.
    dropped: Vec<String>,
}

/// The venv's python and fedora-messaging script.
fn venv(b: &Broker) -> (PathBuf, PathBuf) {
    let python = b.venv_python();
    let script = python.parent().unwrap().join("fedora-messaging");
    assert!(
        script.is_file(),
        "{} is missing: scripts/test installs fedora-messaging into the venv",
        script.display()
    );
    (python, script)
}

/// The config for `runner`: the same queue, qos (prefetch 1, so both see messages in the same
/// order), consumer_config and log_config (fedora-messaging's log on stderr, so stdout is the
/// callback's alone); only the callback setting differs.
fn config(
    b: &Broker,
    s: &Setup,
    runner: Runner,
    target: &str,
    interpreter: &Path,
    out: &Path,
) -> String {
    let callback = match runner {
        _ if is_callback_file(target) => String::new(),
        Runner::Fm => String::new(),
        Runner::FedoraMessaging => format!("callback = \"{target}\"\n"),
    };
    let table = match runner {
        _ if is_callback_file(target) => String::new(),
        Runner::Fm => format!(
            "\n[callback]\npython = \"{target}\"\ninterpreter = \"{}\"\n",
            interpreter.display()
        ),
        Runner::FedoraMessaging => String::new(),
    };
    format!(
        r#"amqp_url = "{url}"
{callback}{table}{queues}
[consumer_config]
out = "{out}"
greeting = "hello from the config"
limits = [1, 2.5, "three"]

[consumer_config.nested]
key = "välue"

[log_config]
version = 1
disable_existing_loggers = false

[log_config.formatters.simple]
format = "[%(name)s %(levelname)s] %(message)s"

[log_config.handlers.console]
class = "logging.StreamHandler"
formatter = "simple"
stream = "ext://sys.stderr"

[log_config.loggers.fedora_messaging]
level = "INFO"
propagate = false
handlers = ["console"]

[log_config.root]
level = "WARNING"
handlers = ["console"]
"#,
        url = b.url(),
        queues = s.queue_tables(1),
        out = out.display(),
    )
}

/// Publishes `batch` as fedora-messaging would, with fixed ids and headers (so a second publish
/// is the same messages again).
async fn publish(b: &Broker, s: &Setup, batch: &[Msg]) {
    for m in batch {
        let headers = field_table([
            (
                "fedora_messaging_schema",
                AMQPValue::LongString("base.message".into()),
            ),
            ("fedora_messaging_severity", AMQPValue::LongLongInt(30)),
            (
                "sent-at",
                AMQPValue::LongString("2026-03-04T05:06:07+00:00".into()),
            ),
            ("priority", AMQPValue::LongLongInt(0)),
            ("custom", AMQPValue::LongString(LongString::from("välue ✓"))),
        ]);
        b.publish_json(
            "amq.topic",
            &format!("{}.{}", s.queue, m.action),
            &m.body,
            headers,
            &m.id,
        )
        .await;
    }
}

/// Runs `runner` with `target` on the queue until it has settled `settle` messages (then
/// SIGTERM) or exits by itself; returns what happened and resets the queues.
async fn run(
    b: &Broker,
    s: &Setup,
    runner: Runner,
    target: &str,
    interpreter: &Path,
    settle: usize,
) -> Run {
    let (_, script) = venv(b);
    let mut run = match runner {
        Runner::Fm => Fm::new(),
        // Its stdout is block-buffered in a pipe; fm flushes after every message.
        Runner::FedoraMessaging => Fm::new().program(&script).env("PYTHONUNBUFFERED", "1"),
    };
    // The calls are read after the run, whose own folder goes with it.
    let keep = tempfile::tempdir().unwrap();
    let out = keep.path().join("calls.jsonl");
    run = run
        .config_toml(&config(b, s, runner, target, interpreter, &out))
        .arg("consume")
        .env("PYTHONPATH", fixture(""));
    if is_callback_file(target) {
        // fedora-messaging's --callback-file; fm's [callback] interpreter has no flag, so
        // fm runs the file with the venv's python found first on PATH.
        let path = format!(
            "{}:{}",
            interpreter.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run = run.arg("--callback-file").arg(target).env("PATH", path);
    }
    let mut consumer = run.spawn();
    let ended = util::eventually(Duration::from_secs(60), async || {
        if consumer.wait_timeout(Duration::ZERO).await.is_some() {
            return Ok(());
        }
        let log = consumer.stderr();
        match settled(&log) {
            n if n < settle => Err(format!(
                "{runner:?} settled {n} of {settle} messages:\n{log}"
            )),
            _ => {
                consumer.kill("TERM");
                Ok(())
            }
        }
    });
    ended.await;
    let result = consumer.wait_within(Duration::from_secs(30)).await;
    let calls = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let left = b.drain_ids(&s.queue).await;
    // Both runners log each drop (fedora-messaging's words) just before nacking it.
    let drops = result
        .stderr
        .matches("Consumer requested message id")
        .count();
    let dropped = s.dead_lettered(b, drops as u32).await;
    Run {
        code: result.code(),
        stdout: result.stdout,
        stderr: result.stderr,
        calls,
        left,
        dropped,
    }
}

/// `path/file.py:name`: a callback given with `--callback-file`.
fn is_callback_file(target: &str) -> bool {
    target
        .rsplit_once(':')
        .is_some_and(|(f, _)| f.ends_with(".py"))
}

/// Runs the batch under fm, then the same batch under fedora-messaging, and checks that both
/// did the same; returns fm's run.
async fn compare(b: &Broker, s: &Setup, target: &str, batch: &[Msg], settle: usize) -> Run {
    let (python, _) = venv(b);
    publish(b, s, batch).await;
    let fm = run(b, s, Runner::Fm, target, &python, settle).await;
    publish(b, s, batch).await;
    let py = run(b, s, Runner::FedoraMessaging, target, &python, settle).await;
    let both = format!(
        "\n=== fm stderr:\n{}\n=== fedora-messaging stderr:\n{}",
        fm.stderr, py.stderr
    );
    assert_eq!(fm.code, py.code, "exit codes differ{both}");
    assert_eq!(fm.stdout, py.stdout, "stdout differs{both}");
    assert_eq!(
        fm.calls, py.calls,
        "the callback did not see the same{both}"
    );
    assert_eq!(
        fm.left, py.left,
        "different messages left in the queue{both}"
    );
    assert_eq!(fm.dropped, py.dropped, "different messages dropped{both}");
    fm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedora_messaging_example_printer_prints_what_fedora_messaging_consume_prints() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-printer").await;
    let batch = [
        msg(
            "a",
            json!({"name": "wörld ✓ 🎉", "nested": {"z": [1, 2.5, null], "a": true}}),
        ),
        msg("b.c", json!({"shell": "$(id) `id` 'q' \"dq\" \\ \t"})),
        msg("d", json!({})),
    ];
    let fm = compare(&b, &s, "fedora_messaging.example:printer", &batch, 3).await;
    assert_eq!(fm.code, Some(0));
    for m in &batch {
        assert!(
            fm.stdout
                .contains(&format!("Id: {}\nTopic: {}.{}\n", m.id, s.queue, m.action))
        );
    }
    // str(message) escapes non-ASCII, as json.dumps does by default.
    assert!(
        fm.stdout
            .contains(r#""name": "w\u00f6rld \u2713 \ud83c\udf89""#),
        "{}",
        fm.stdout
    );
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_file_runs_as_with_fedora_messagings_callback_file_flag() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-file").await;
    let batch = [msg("one", json!({"n": 1})), msg("two", json!({"n": 2}))];
    let target = format!("{}:ConfigReader", fixture("fm_test_callbacks.py").display());
    let fm = compare(&b, &s, &target, &batch, 2).await;
    assert_eq!(fm.code, Some(0));
    assert_eq!(fm.calls.len(), 2);
    assert_eq!(fm.calls[1]["body"], json!({"n": 2}));
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_reading_consumer_config_sees_the_table() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-config").await;
    let batch = [msg("one", json!({"n": 1})), msg("two", json!({"n": 2}))];
    let fm = compare(&b, &s, "fm_test_callbacks:ConfigReader", &batch, 2).await;
    assert_eq!(fm.calls.len(), 2);
    let call = &fm.calls[0];
    assert_eq!(call["greeting"], "hello from the config");
    assert_eq!(call["limits"], json!([1, 2.5, "three"]));
    assert_eq!(call["id"], batch[0].id.as_str());
    assert_eq!(call["queue"], s.queue.as_str());
    assert_eq!(call["class"], "Message");
    assert_eq!(call["severity"], 30);
    assert_eq!(call["body"], json!({"n": 1}));
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_drop_and_halt_act_as_under_fedora_messaging() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-actions").await;
    let batch = [
        msg("nack", json!({})),
        msg("drop", json!({})),
        msg("halt", json!({})),
        msg("after", json!({})),
    ];
    let fm = compare(&b, &s, "fm_test_callbacks:actions", &batch, usize::MAX).await;
    assert_eq!(fm.code, Some(7), "HaltConsumer(exit_code=7)");
    let seen: Vec<(&str, bool)> = fm
        .calls
        .iter()
        .map(|c| (c["action"].as_str().unwrap(), c["first"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("nack", true),
            ("nack", false),
            ("drop", true),
            ("halt", true)
        ],
        "Nack returns the message, which comes back once"
    );
    assert_eq!(fm.dropped, [batch[1].id.clone()], "Drop dead-letters it");
    assert_eq!(
        fm.left,
        [batch[3].id.clone()],
        "the halted message is acked, the next one stays"
    );
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_with_requeue_and_unexpected_exceptions_act_as_under_fedora_messaging() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-halt-requeue").await;
    let batch = [msg("halt_requeue", json!({}))];
    let fm = compare(&b, &s, "fm_test_callbacks:actions", &batch, usize::MAX).await;
    assert_eq!(fm.code, Some(3));
    assert_eq!(
        fm.left,
        [batch[0].id.clone()],
        "HaltConsumer(requeue=True) requeues"
    );

    let batch = [msg("error", json!({})), msg("after", json!({}))];
    let fm = compare(&b, &s, "fm_test_callbacks:actions", &batch, usize::MAX).await;
    assert_eq!(fm.code, Some(13));
    assert_eq!(
        fm.left,
        [batch[0].id.clone(), batch[1].id.clone()],
        "the failed message and the prefetched ones go back"
    );
    // The traceback is in fm's log, at error level.
    let traceback = fm
        .stderr
        .lines()
        .find(|l| {
            l.contains("ERROR")
                && l.contains(
                    "fm::callback: fm_test_callbacks:actions: ValueError: this callback is broken",
                )
        })
        .unwrap_or_else(|| panic!("no traceback in the log:\n{}", fm.stderr));
    assert!(traceback.contains("message_id="), "{traceback}");
    assert!(fm.stderr.contains("Traceback (most recent call last):"));
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coroutine_callback_runs_as_under_fedora_messaging() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-async").await;
    let batch = [
        msg("nack", json!({})),
        msg("drop", json!({})),
        msg("ok", json!({})),
    ];
    let fm = compare(&b, &s, "fm_test_callbacks:async_actions", &batch, 4).await;
    assert_eq!(fm.calls.len(), 4);
    assert_eq!(fm.dropped, [batch[1].id.clone()]);
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fedora_messaging_the_callback_gets_a_plain_message() {
    let Some(b) = util::broker() else { return };
    let system = Path::new("/usr/bin/python3");
    let has_fedora_messaging = std::process::Command::new(system)
        .args(["-c", "import fedora_messaging"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success());
    if has_fedora_messaging.unwrap_or(true) {
        util::skip("needs a /usr/bin/python3 without fedora_messaging");
        return;
    }
    let s = Setup::new(&b, "py-plain").await;
    let batch = [
        msg("a", json!({"k": ["v", 1, {"x": null}]})),
        msg("b", json!({"é": "✓"})),
    ];
    publish(&b, &s, &batch).await;
    let plain = run(&b, &s, Runner::Fm, "plain_callbacks:printer", system, 2).await;
    publish(&b, &s, &batch).await;
    let (python, _) = venv(&b);
    let real = run(
        &b,
        &s,
        Runner::Fm,
        "fedora_messaging.example:printer",
        &python,
        2,
    )
    .await;
    assert_eq!(plain.code, Some(0), "{}", plain.stderr);
    assert_eq!(
        plain.stdout, real.stdout,
        "str(message) is the same without fedora-messaging"
    );
    s.cleanup(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_cannot_be_loaded_stops_fm_at_start_like_fedora_messaging() {
    let Some(b) = util::broker() else { return };
    let s = Setup::new(&b, "py-load").await;
    let (python, _) = venv(&b);
    for (target, code, says) in [
        (
            "no_such_module_here:cb",
            1,
            "Failed to import the callback module (No module named 'no_such_module_here'); is \
             it installed for ",
        ),
        (
            "fm_test_callbacks:missing",
            1,
            "Unable to import fm_test_callbacks:missing",
        ),
        (
            "fm_test_callbacks:json",
            2,
            "Callback must be a class that implements __call__ or a function.",
        ),
    ] {
        let fm = run(&b, &s, Runner::Fm, target, &python, usize::MAX).await;
        let py = run(&b, &s, Runner::FedoraMessaging, target, &python, usize::MAX).await;
        assert_eq!(fm.code, Some(code), "{target}:\n{}", fm.stderr);
        assert_eq!(
            py.code,
            Some(code),
            "{target} under fedora-messaging:\n{}",
            py.stderr
        );
        assert!(
            fm.stderr
                .contains(&format!("python callback '{target}' cannot start: {says}")),
            "{}",
            fm.stderr
        );
        assert!(
            !fm.stderr.contains("Successfully registered"),
            "fm stopped before consuming"
        );
    }
    s.cleanup(&b).await;
}
