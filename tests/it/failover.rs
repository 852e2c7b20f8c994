//! Several brokers, the URL's options, and credentials in messages (issue 5).
//!
//! - `amqp_url = [dead, live]` connects every time, trying the URLs in random order;
//! - a running consumer whose broker stops moves over to the next broker of the list and goes
//!   on consuming (two private nodes of the test's own: stopping the shared node would cut
//!   every test running in parallel);
//! - pika's URL options are honoured (`heartbeat`, `connection_attempts`, `retry_delay`);
//! - a password never appears in fm's output, even in failures.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::recorder;
use crate::util::{self, Broker, Fm};

/// A URL nothing listens on: a loopback port that was just free (never another address).
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("amqp://guest:guest@127.0.0.1:{port}/%2F")
}

/// A consumer of the durable queue `queue` (bound to `amq.topic` with `QUEUE.#`) at the URLs
/// `urls` (a TOML array), through the recorder plugin writing to `out`.
fn config(urls: &[String], queue: &str, out: &Path) -> String {
    let plugin = util::build_c_plugin(&util::repo_root().join("tests/fixtures/plugins/recorder.c"));
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        r#"
amqp_url = [{urls}]
callback = "{plugin}"
connection_timeout = 5

[queues."{queue}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
queue = "{queue}"
exchange = "amq.topic"
routing_keys = ["{queue}.#"]

[consumer_config]
out = "{out}"
"#,
        urls = urls.join(", "),
        plugin = plugin.display(),
        out = out.display(),
    )
}

/// `[dead, live]` in the configuration: fm connects on every run, whichever URL it draws
/// first. Runs until both orders were seen (the chance of never seeing one in 20 runs is 2^-19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_in_the_list_is_skipped_every_time() {
    let Some(b) = util::broker() else { return };
    let dead = dead_url();
    let queue = b.unique("failover-dead");
    let (mut dead_first, mut live_first) = (0, 0);
    for _ in 0..20 {
        let fm = Fm::new();
        let out = fm.dir().join("out.jsonl");
        let mut proc = fm
            .config_toml(&config(&[dead.clone(), b.url().to_owned()], &queue, &out))
            .arg("consume")
            .spawn();
        proc.wait_consuming().await;
        let stderr = proc.stderr();
        if stderr.contains("cannot connect") {
            assert!(
                stderr.contains("cannot connect to 127.0.0.1:")
                    && stderr.contains("connection refused"),
                "{stderr}"
            );
            dead_first += 1;
        } else {
            live_first += 1;
        }
        proc.kill("TERM");
        proc.wait().await.assert_code(0);
        if dead_first > 0 && live_first > 0 {
            break;
        }
    }
    assert!(
        dead_first > 0 && live_first > 0,
        "the URLs were not tried in random order: dead first {dead_first} times, live first \
         {live_first} times"
    );
    b.delete_queue(&queue).await;
}

/// Every URL dead: exit 14, and the error lists each URL with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_broker_is_dead_each_is_named() {
    let Some(b) = util::broker() else { return };
    let (one, two) = (dead_url(), dead_url());
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let output = fm
        .config_toml(&config(
            &[one.clone(), two.clone()],
            &b.unique("all-dead"),
            &out,
        ))
        .arg("consume")
        .run()
        .await;
    output.assert_code(14);
    let last = output
        .stderr
        .lines()
        .rfind(|l| l.starts_with("fm: "))
        .unwrap();
    assert!(
        last.starts_with("fm: cannot connect to any of the 2 brokers in amqp_url ("),
        "{last}"
    );
    for url in [one, two] {
        let shown = url.replace("guest:guest@", "guest:***@");
        assert!(
            last.contains(&format!("{shown}: cannot connect to 127.0.0.1:")),
            "{last}"
        );
    }
}

/// Two private nodes, both in the URL list. fm consumes from whichever it drew; that node
/// stops; fm reconnects through the list to the other one, declares its queue there and goes
/// on consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_moves_to_the_next_broker_when_its_broker_stops() {
    let Some(b) = util::broker() else { return };
    // Both nodes boot at once (a boot is mostly waiting).
    let (first, second) = tokio::join!(
        tokio::task::spawn_blocking({
            let b = util::broker().unwrap();
            move || b.extra_node("fo-a")
        }),
        tokio::task::spawn_blocking(move || b.extra_node("fo-b")),
    );
    let nodes = [first.unwrap(), second.unwrap()];
    let queue = util::unique("moves-over");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let urls: Vec<String> = nodes.iter().map(|n| n.url().to_owned()).collect();
    let mut proc = fm
        .config_toml(&config(&urls, &queue, &out))
        .arg("consume")
        .spawn();
    proc.wait_consuming().await;

    let shown = |n: &Broker| n.url().replace("guest:guest@", "guest:***@");
    let stderr = proc.stderr();
    let (live, other) = if stderr.contains(&format!("connected broker={}", shown(&nodes[0]))) {
        (&nodes[0], &nodes[1])
    } else {
        assert!(
            stderr.contains(&format!("connected broker={}", shown(&nodes[1]))),
            "{stderr}"
        );
        (&nodes[1], &nodes[0])
    };
    live.publish_fedora(
        "amq.topic",
        &format!("{queue}.ack"),
        &serde_json::json!({"n": 1}),
    )
    .await;
    assert_eq!(
        recorder::wait_for_lines(&proc, &out, 1).await[0]["body"]["n"],
        1
    );

    live.stop_node().await;
    proc.wait_for_stderr(&format!("connected broker={}", shown(other)))
        .await;
    proc.wait_for_stderr_count(util::CONSUMING, 2).await;
    assert!(
        other.queue_exists(&queue).await,
        "fm declared its queue on the new broker"
    );
    other
        .publish_fedora(
            "amq.topic",
            &format!("{queue}.ack"),
            &serde_json::json!({"n": 2}),
        )
        .await;
    assert_eq!(
        recorder::wait_for_lines(&proc, &out, 2).await[1]["body"]["n"],
        2
    );

    proc.kill("TERM");
    proc.wait().await.assert_code(0);
}

/// The URL's `heartbeat` reaches the broker: the node lists the connection's heartbeat
/// timeout as the URL asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_urls_heartbeat_is_negotiated() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("heartbeat");
    let app = b.unique("hb-app");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let url = format!("{}?heartbeat=7", b.url());
    let config =
        config(&[url], &queue, &out) + &format!("\n[client_properties]\napp = \"{app}\"\n");
    let mut proc = fm.config_toml(&config).arg("consume").spawn();
    proc.wait_consuming().await;
    let listed = b
        .rabbitmqctl(&["-q", "list_connections", "timeout", "client_properties"])
        .await;
    let line = listed
        .lines()
        .find(|l| l.contains(&format!("{{\"app\",\"{app}\"}}")))
        .unwrap_or_else(|| panic!("fm's connection is not listed:\n{listed}"));
    assert!(
        line.starts_with("7\t"),
        "heartbeat timeout is not 7 s: {line}"
    );
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    b.delete_queue(&queue).await;
}

/// `connection_attempts` and `retry_delay` from the URL: three attempts, spaced, then exit 14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_attempts_and_retry_delay_are_honoured() {
    let Some(b) = util::broker() else { return };
    let url = format!("{}?connection_attempts=3&retry_delay=0.5", dead_url());
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let started = Instant::now();
    let output = fm
        .config_toml(&config(&[url], &b.unique("attempts"), &out))
        .arg("consume")
        .run()
        .await;
    output.assert_code(14);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "two 0.5 s pauses: {:?}",
        started.elapsed()
    );
    for attempt in 1..=3 {
        assert!(
            output.stderr.contains(&format!("attempt={attempt}")),
            "{}",
            output.stderr
        );
    }
    assert!(!output.stderr.contains("attempt=4"), "{}", output.stderr);
}

/// A refused password: exit 15, the message says what to check, and the password shows
/// nowhere in fm's output (the URL is shown with `***`). A second URL in the list, dead, with
/// a password of its own: hidden too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_fms_output() {
    let Some(b) = util::broker() else { return };
    let secret = "s3cret-Pa55";
    let wrong = format!("amqp://guest:{secret}@localhost:{}/%2F", b.amqp_port());
    let dead = dead_url().replace("guest:guest@", &format!("fm:{secret}2@"));
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let output = fm
        .config_toml(&config(&[wrong, dead], &b.unique("secret"), &out))
        .arg("-v")
        .arg("consume")
        .run()
        .await;
    output.assert_code(15);
    assert!(
        !output.stderr.contains(secret),
        "the password leaked:\n{}",
        output.stderr
    );
    assert!(
        !output.stdout.contains(secret),
        "the password leaked:\n{}",
        output.stdout
    );
    let last = output
        .stderr
        .lines()
        .rfind(|l| l.starts_with("fm: "))
        .unwrap();
    assert!(
        last.contains(&format!(
            "amqp://guest:***@localhost:{}/%2F: the broker refused the login (403 ACCESS_REFUSED",
            b.amqp_port()
        )),
        "{last}"
    );
    assert!(
        last.contains("check the user name (\"guest\") and password in amqp_url"),
        "{last}"
    );
    assert!(last.contains("amqp://fm:***@127.0.0.1:"), "{last}");
}
