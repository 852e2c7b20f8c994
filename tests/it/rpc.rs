//! Request/reply (issue 13): `fm call` against `fm consume` with every kind of callback, both
//! against programs we did not write (pika's direct reply-to client, RabbitMQ's RPC tutorial
//! server), and the faults: a server gone before it answers, a client gone before its reply, a
//! server connection closed under 1,000 pipelined calls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures_lite::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::util::callbacks::{Setup, wait_settled};
use crate::util::{self, Broker, Fm, FmOutput, FmProcess};

/// A file in `tests/fixtures/rpc`.
fn fixture(name: &str) -> PathBuf {
    util::repo_root().join("tests/fixtures/rpc").join(name)
}

/// A client of our own: a channel consuming (no-ack) from the direct reply-to pseudo-queue,
/// before it publishes, as RabbitMQ requires.
async fn direct_reply_to_client(
    b: &Broker,
) -> (lapin::Connection, lapin::Channel, lapin::Consumer) {
    let conn = b.connect().await;
    let channel = conn.create_channel().await.unwrap();
    let replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, channel, replies)
}

/// Publishes `body` to the Setup's queue (topic `QUEUE.rpc`) with `props`, on `channel`.
async fn request(channel: &lapin::Channel, s: &Setup, body: &[u8], props: BasicProperties) {
    channel
        .basic_publish(
            "amq.topic".into(),
            format!("{}.rpc", s.queue).as_str().into(),
            BasicPublishOptions::default(),
            body,
            props
                .with_content_encoding("utf-8".into())
                .with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap();
}

/// `fm call ARGS` with a configuration that names the test broker.
fn call(b: &Broker, args: &[&str]) -> Fm {
    Fm::new()
        .config_toml(&format!("amqp_url = \"{}\"\n", b.url()))
        .arg("call")
        .args(args)
}

/// `fm call --routing-key QUEUE.rpc --body BODY`: the server's queue is bound with `QUEUE.#`.
async fn ask(b: &Broker, s: &Setup, body: &Value) -> FmOutput {
    let key = format!("{}.rpc", s.queue);
    call(
        b,
        &[
            "--routing-key",
            &key,
            "--body",
            &body.to_string(),
            "--timeout",
            "20",
        ],
    )
    .run()
    .await
}

/// The reply `fm call` printed, as JSON.
fn reply(out: &FmOutput) -> Value {
    out.assert_code(0);
    serde_json::from_str(out.stdout.trim_end())
        .unwrap_or_else(|e| panic!("the reply is not JSON ({e}): {:?}", out.stdout))
}

/// A test's queue ([`Setup`]) served by `fm consume` with `callback` (the `[callback]` lines)
/// and `tables`, consuming.
async fn server(b: &Broker, name: &str, callback: &str, tables: &str) -> (Setup, FmProcess) {
    let s = Setup::new(b, name).await;
    let mut fm = s.fm(&s.fm_config(callback, tables)).spawn();
    fm.wait_consuming().await;
    (s, fm)
}

/// Stops the server (SIGTERM: exit 0) and deletes its queues; returns its output.
async fn stop(b: &Broker, s: &Setup, fm: FmProcess) -> FmOutput {
    fm.kill("TERM");
    let output = fm.wait().await;
    output.assert_code(0);
    s.cleanup(b).await;
    output
}

/// The `[callback]` lines of the worker fixture (mode = "worker"), then `extra`.
fn worker(extra: &str) -> String {
    let worker = fixture("worker.py");
    let python = util::callbacks::python3();
    command(
        &[&python, worker.to_str().unwrap()],
        &format!("mode = \"worker\"\n{extra}"),
    )
}

/// The `[callback]` lines of the exec fixture with reply = "stdout", then `extra`.
fn exec(extra: &str) -> String {
    let exec = fixture("exec.sh");
    command(
        &[exec.to_str().unwrap()],
        &format!("reply = \"stdout\"\n{extra}"),
    )
}

/// `[callback]` lines for a command (exec or worker mode).
fn command(argv: &[&str], extra: &str) -> String {
    format!(
        "command = {}\n{extra}",
        serde_json::to_string(argv).unwrap()
    )
}

fn python_callback(b: &Broker, attr: &str) -> String {
    format!(
        "python = \"{}:{attr}\"\ninterpreter = \"{}\"",
        fixture("callbacks.py").display(),
        b.venv_python().display()
    )
}

/// The attribute store (plugins/attrs) answers, and a message without reply_to (a `set`
/// published by a fedora-messaging publisher) is handled as before: carried out and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_answers_and_a_message_without_reply_to_is_handled_as_before() {
    let Some(b) = util::broker() else { return };
    let plugin = util::plugin_path("attrs");
    let (s, mut fm) = server(
        &b,
        "rpc-plugin",
        &format!("plugin = \"{}\"", plugin.display()),
        "[consumer_config]\nattrs = {seed = \"kept\"}\n",
    )
    .await;
    s.publish(
        &b,
        "set",
        json!({"op": "set", "key": "a", "value": [1, "ü"]}),
    )
    .await;
    wait_settled(&mut fm, 1).await;
    let out = ask(&b, &s, &json!({"op": "get", "key": "a"})).await;
    assert_eq!(reply(&out), json!({"ok": true, "value": [1, "ü"]}));
    let out = ask(&b, &s, &json!({"op": "query", "prefix": ""})).await;
    assert_eq!(
        reply(&out),
        json!({"ok": true, "attrs": {"a": [1, "ü"], "seed": "kept"}})
    );
    stop(&b, &s, fm).await;
}

/// exec mode with `reply = "stdout"`: the command's output is the reply; a command that exits
/// 65 sends none, and the request is dropped (dead-lettered) as any message would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_command_answers_with_its_stdout_and_a_failure_sends_nothing() {
    let Some(b) = util::broker() else { return };
    let (s, fm) = server(&b, "rpc-exec", &exec(""), "").await;
    let out = ask(&b, &s, &json!({"op": "get"})).await;
    let got = reply(&out);
    assert_eq!(got["echo"]["body"], json!({"op": "get"}));
    assert_eq!(got["echo"]["topic"], format!("{}.rpc", s.queue));
    failing_request_sends_no_reply(&b, &s).await;
    stop(&b, &s, fm).await;
}

/// A request the callback fails on: no reply (fm call times out, 124) and the request is
/// dropped, dead-lettered to the Setup's DLQ.
async fn failing_request_sends_no_reply(b: &Broker, s: &Setup) {
    let key = format!("{}.rpc", s.queue);
    let out = call(
        b,
        &[
            "--routing-key",
            &key,
            "--body",
            r#"{"op": "fail"}"#,
            "--timeout",
            "2",
        ],
    )
    .run()
    .await;
    out.assert_code(124);
    assert!(
        out.stderr.contains("no reply within 2.0 s (--timeout)"),
        "{}",
        out.stderr
    );
    assert_eq!(s.dead_lettered(b, 1).await.len(), 1);
}

/// worker mode: `"reply"` in the answer line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_answers_with_the_reply_of_its_answer_line() {
    let Some(b) = util::broker() else { return };
    let (s, fm) = server(&b, "rpc-worker", &worker(""), "").await;
    let out = ask(&b, &s, &json!({"n": 7})).await;
    assert_eq!(reply(&out), json!({"echo": {"n": 7}}));
    failing_request_sends_no_reply(&b, &s).await;
    stop(&b, &s, fm).await;
}

/// A fedora-messaging callback's return value is the reply, JSON-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_callback_answers_with_its_return_value() {
    let Some(b) = util::broker() else { return };
    let (s, fm) = server(&b, "rpc-python", &python_callback(&b, "answer"), "").await;
    let out = ask(&b, &s, &json!({"q": "ü"})).await;
    assert_eq!(
        reply(&out),
        json!({"echo": {"q": "ü"}, "topic": format!("{}.rpc", s.queue)})
    );
    failing_request_sends_no_reply(&b, &s).await;
    stop(&b, &s, fm).await;
}

/// `fm call FILE`: one JSON line per reply, with the request's line and correlation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_requests_gets_one_line_per_reply() {
    let Some(b) = util::broker() else { return };
    let plugin = util::plugin_path("attrs");
    let callback = format!("plugin = \"{}\"", plugin.display());
    let (s, fm) = server(&b, "rpc-file", &callback, "").await;
    let key = format!("{}.rpc", s.queue);
    let requests = (1..=50)
        .map(|i| json!({"op": "set", "key": format!("k{i}"), "value": i}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let run = call(&b, &["-", "--routing-key", &key, "--in-flight", "8"]).stdin(requests);
    let out = run.run().await;
    out.assert_code(0);
    let lines = replies_by_line(&out.stdout);
    assert_eq!(lines.len(), 50, "{}", out.stdout);
    assert!(lines.values().all(|r| r["reply"] == json!({"ok": true})));
    let ids: std::collections::HashSet<&str> = lines
        .values()
        .map(|r| r["correlation_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 50, "a fresh correlation id per request");
    stop(&b, &s, fm).await;
}

/// `fm call FILE`'s output: line number → reply object; panics on a line answered twice.
fn replies_by_line(stdout: &str) -> HashMap<u64, Value> {
    let mut by_line = HashMap::new();
    for text in stdout.lines() {
        let reply: Value = serde_json::from_str(text).unwrap();
        let line = reply["line"].as_u64().unwrap();
        assert!(
            by_line.insert(line, reply).is_none(),
            "line {line} printed twice"
        );
    }
    by_line
}

/// Exit codes: 121 when no queue is bound, 111 when the broker is unreachable, 2 for a body
/// that is not a JSON object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fm_call_exits_121_unroutable_111_unreachable_2_invalid() {
    let Some(b) = util::broker() else { return };
    let key = util::unique("rpc-nobody");
    let out = call(&b, &["--routing-key", &key, "--body", "{}"])
        .run()
        .await;
    out.assert_code(121);
    assert!(
        out.stderr.contains("returned as unroutable"),
        "{}",
        out.stderr
    );
    let out = Fm::new()
        .config_toml("amqp_url = \"amqp://guest:guest@127.0.0.1:1/%2F\"\n")
        .args([
            "call",
            "--routing-key",
            "k",
            "--body",
            "{}",
            "--timeout",
            "5",
        ])
        .run()
        .await;
    out.assert_code(111);
    let out = call(&b, &["--routing-key", "k", "--body", "[1]"])
        .run()
        .await;
    out.assert_code(2);
    assert!(
        out.stderr.contains("the body must be a JSON object"),
        "{}",
        out.stderr
    );
    let out = call(&b, &["--routing-key", "k"]).run().await;
    out.assert_code(2);
}

/// pika's direct reply-to client sends b"Marco" (not a fedora-messaging message) to an fm
/// server configured with `body = "bytes"`; each kind of callback answers "Polo", sent as
/// given (no JSON content type).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_direct_reply_to_client_gets_polo_from_every_kind_of_callback() {
    let Some(b) = util::broker() else { return };
    let kinds = [
        exec("body = \"bytes\""),
        worker("body = \"bytes\""),
        format!("{}\nbody = \"bytes\"", python_callback(&b, "polo")),
    ];
    for callback in kinds {
        let (s, fm) = server(&b, "rpc-pika-client", &callback, "").await;
        let client = std::process::Command::new(b.venv_python())
            .arg(fixture("direct_reply_to_client.py"))
            .arg(b.url())
            .arg(&s.queue)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&client.stdout);
        assert!(
            client.status.success(),
            "{callback}: {}\n{}\nfm:\n{}",
            stdout,
            String::from_utf8_lossy(&client.stderr),
            fm.stderr()
        );
        assert_eq!(
            stdout.trim_end(),
            "RPC Client got reply: None Polo",
            "{callback}"
        );
        stop(&b, &s, fm).await;
    }
}

/// `fm call --raw` against RabbitMQ's RPC tutorial server (pika): fib(30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fm_call_asks_the_rabbitmq_tutorial_rpc_server() {
    let Some(b) = util::broker() else { return };
    let queue = util::unique("rpc-tutorial");
    let mut server = tokio::process::Command::new(b.venv_python())
        .arg(fixture("rpc_server.py"))
        .arg(b.url())
        .arg(&queue)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut ready = String::new();
    tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .await
    .unwrap();
    assert_eq!(ready.trim_end(), "ready");
    let out = call(
        &b,
        &[
            "--raw",
            "--exchange",
            "",
            "--routing-key",
            &queue,
            "--body",
            "30",
        ],
    )
    .run()
    .await;
    out.assert_code(0);
    assert_eq!(out.stdout, "832040\n");
    server.kill().await.unwrap();
    b.delete_queue(&queue).await;
}

/// The server stops between the request and its reply: the client exits 124, cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_gone_before_it_answers_makes_the_client_exit_124() {
    let Some(b) = util::broker() else { return };
    let (s, fm) = server(&b, "rpc-server-gone", &exec(""), "").await;
    let key = format!("{}.rpc", s.queue);
    let client = call(
        &b,
        &[
            "--routing-key",
            &key,
            "--body",
            r#"{"op": "sleep"}"#,
            "--timeout",
            "3",
        ],
    )
    .spawn();
    util::eventually(util::TIMEOUT, async || match s.out("started").exists() {
        true => Ok(()),
        false => Err(format!(
            "the request never reached the command:\n{}",
            fm.stderr()
        )),
    })
    .await;
    fm.kill("KILL");
    let _ = fm.wait().await;
    let out = client.wait_within(Duration::from_secs(20)).await;
    out.assert_code(124);
    assert!(
        out.stderr
            .contains("the request was not answered: no reply within 3.0 s"),
        "{}",
        out.stderr
    );
    s.cleanup(&b).await;
}

/// The client leaves before its reply: the server logs it once, acks the request and keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_its_reply_is_logged_once_and_the_request_acked() {
    let Some(b) = util::broker() else { return };
    let (s, mut fm) = server(&b, "rpc-client-gone", &worker(""), "").await;
    {
        // A client that asks, then leaves before the worker (sleeping 1 s) answers.
        let (conn, channel, _replies) = direct_reply_to_client(&b).await;
        let props = BasicProperties::default().with_correlation_id("gone-1".into());
        request(&channel, &s, br#"{"sleep": 1}"#, props).await;
        fm.wait_for_stderr("Consuming message").await;
        conn.close(200, "the client leaves".into()).await.unwrap();
    }
    fm.wait_for_stderr("the client is gone").await;
    wait_settled(&mut fm, 1).await;
    // Still serving.
    let out = ask(&b, &s, &json!({"n": 2})).await;
    assert_eq!(reply(&out), json!({"echo": {"n": 2}}));
    let depth = b.queue_depth(&s.queue).await;
    let output = stop(&b, &s, fm).await;
    assert_eq!(
        output.stderr.matches("the client is gone").count(),
        1,
        "{}",
        output.stderr
    );
    assert!(
        output.stderr.contains("correlation id \"gone-1\""),
        "{}",
        output.stderr
    );
    assert_eq!(depth, 0, "the request was acked");
}

/// 1,000 pipelined calls while the server's connection is closed by the broker: every
/// request is answered (at least once; fm call prints each once), none is left unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_calls_survive_a_server_connection_close() {
    let Some(b) = util::broker() else { return };
    let app = util::unique("rpc-close-app");
    let tables = format!("[client_properties]\napp = \"{app}\"\n");
    let (s, mut fm) = server(&b, "rpc-close", &worker(""), &tables).await;
    let key = format!("{}.rpc", s.queue);
    let requests: String = (1..=1000)
        .map(|n| format!("{}\n", json!({"n": n, "sleep": 0.002})))
        .collect();
    let client = call(
        &b,
        &[
            "-",
            "--routing-key",
            &key,
            "--in-flight",
            "100",
            "--timeout",
            "60",
        ],
    )
    .stdin(requests)
    .spawn();
    util::eventually(util::TIMEOUT, async || {
        match client.stdout().lines().count() {
            n if n >= 200 => Ok(()),
            n => Err(format!("{n} replies so far:\n{}", fm.stderr())),
        }
    })
    .await;
    b.close_connection_of(&app, "the test cuts the server off")
        .await;
    fm.wait_for_stderr("connection lost").await;
    let out = client.wait_within(Duration::from_secs(90)).await;
    out.assert_code(0);
    let lines = replies_by_line(&out.stdout);
    assert_eq!(lines.len(), 1000, "every request answered");
    for (line, r) in &lines {
        assert_eq!(
            r["reply"]["echo"]["n"],
            json!(line),
            "the reply to line {line}"
        );
    }
    stop(&b, &s, fm).await;
}

/// A reply that is not JSON goes as given; the consumer reads it with its correlation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_carries_the_correlation_id_and_json_only_when_json() {
    let Some(b) = util::broker() else { return };
    let (s, fm) = server(&b, "rpc-props", &worker(""), "").await;
    let (conn, channel, mut replies) = direct_reply_to_client(&b).await;
    let props = BasicProperties::default().with_message_id("m-1".into());
    request(&channel, &s, br#"{"n": 1}"#, props).await;
    let delivery = tokio::time::timeout(util::TIMEOUT, replies.next())
        .await
        .expect("a reply")
        .unwrap()
        .unwrap();
    // No correlation id on the request: the message id stands in for it.
    let props = &delivery.properties;
    assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "m-1");
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(delivery.data, br#"{"echo":{"n":1}}"#);
    conn.close(200, "done".into()).await.unwrap();
    stop(&b, &s, fm).await;
}
