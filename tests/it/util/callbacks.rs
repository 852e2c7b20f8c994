//! The set-up the callback tests (exec, worker, Python, concurrency, resilience) share: a
//! queue that dead-letters to a queue of its own, the fixture programs in
//! `tests/fixtures/callbacks`, and waiting for fm to settle messages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;

use crate::util::{self, Broker, Fm, FmProcess, field_table};

/// A file in `tests/fixtures/callbacks`.
pub fn fixture(name: &str) -> PathBuf {
    util::repo_root()
        .join("tests/fixtures/callbacks")
        .join(name)
}

/// The Python that runs the plain (no fedora-messaging) fixtures.
pub fn python3() -> String {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".into()
    } else {
        "python3".into()
    }
}

/// A test's queue (durable, dead-lettering to `dlq`), its dead-letter queue and a folder for
/// the callback's evidence (`$FM_TEST_OUT`).
pub struct Setup {
    pub queue: String,
    pub dlq: String,
    pub url: String,
    out: tempfile::TempDir,
}

impl Setup {
    /// Declares and binds both queues, so messages may be published before fm starts.
    pub async fn new(b: &Broker, name: &str) -> Setup {
        let s = Setup {
            queue: util::unique(name),
            dlq: util::unique(&format!("{name}-dlq")),
            url: b.url().to_owned(),
            out: tempfile::tempdir().unwrap(),
        };
        b.declare_queue(&s.dlq).await;
        b.declare_queue_with(&s.queue, durable(), s.queue_arguments())
            .await;
        b.bind(&s.queue, "amq.topic", &format!("{}.#", s.queue))
            .await;
        s
    }

    fn queue_arguments(&self) -> FieldTable {
        field_table([
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from("")),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from(self.dlq.as_str())),
            ),
        ])
    }

    /// The queue, binding and qos tables of a config (fedora-messaging accepts them too).
    pub fn queue_tables(&self, prefetch: u16) -> String {
        format!(
            r#"
[queues."{queue}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{"x-dead-letter-exchange" = "", "x-dead-letter-routing-key" = "{dlq}"}}

[[bindings]]
queue = "{queue}"
exchange = "amq.topic"
routing_keys = ["{queue}.#"]

[qos]
prefetch_count = {prefetch}
prefetch_size = 0
"#,
            queue = self.queue,
            dlq = self.dlq,
        )
    }

    /// An fm config: the `[callback]` table's lines, then `tables` (e.g. `[consumer_config]`).
    pub fn fm_config(&self, callback: &str, tables: &str) -> String {
        format!(
            "amqp_url = \"{url}\"\n\n[callback]\n{callback}\n{queues}\n{tables}\n",
            url = self.url,
            queues = self.queue_tables(10),
        )
    }

    /// `fm consume` with `config`, and `$FM_TEST_OUT` set to the evidence folder.
    pub fn fm(&self, config: &str) -> Fm {
        Fm::new()
            .config_toml(config)
            .env("FM_TEST_OUT", self.out(""))
            .arg("consume")
    }

    /// The evidence folder, or a file in it.
    pub fn out(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }

    /// A file of the evidence folder ("" when missing).
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.out(name)).unwrap_or_default()
    }

    /// Publishes a fedora-messaging message with topic `QUEUE.action`; returns its id.
    pub async fn publish(&self, b: &Broker, action: &str, body: Value) -> String {
        b.publish_fedora("amq.topic", &format!("{}.{action}", self.queue), &body)
            .await
    }

    /// The ids of the `n` messages dead-lettered (taking them off the dead-letter queue), once
    /// there are `n`: the broker dead-letters a message a moment after fm's nack, which fm logs
    /// just before sending it.
    pub async fn dead_lettered(&self, b: &Broker, n: u32) -> Vec<String> {
        b.wait_for_depth(&self.dlq, n).await;
        b.drain_ids(&self.dlq).await
    }

    /// Deletes both queues.
    pub async fn cleanup(&self, b: &Broker) {
        b.delete_queue(&self.queue).await;
        b.delete_queue(&self.dlq).await;
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// How many messages fm has settled (acked, requeued, dropped): fm logs one of these lines, the
/// same as fedora-messaging's, for each.
pub fn settled(log: &str) -> usize {
    [
        "Successfully consumed message from topic",
        "Returning message id",
        "Consumer requested message id",
    ]
    .iter()
    .map(|phrase| log.matches(phrase).count())
    .sum()
}

/// Waits until fm has settled `n` messages; panics after 30 s or if fm exits first.
pub async fn wait_settled(fm: &mut FmProcess, n: usize) {
    util::eventually(util::TIMEOUT, async || {
        let log = fm.stderr();
        if settled(&log) >= n {
            return Ok(());
        }
        if let Some(status) = fm.wait_timeout(Duration::from_millis(20)).await {
            panic!(
                "fm exited ({status}) after settling {} of {n} messages:\n{log}",
                settled(&log)
            );
        }
        Err(format!(
            "fm settled only {} of {n} messages:\n{log}",
            settled(&log)
        ))
    })
    .await
}

/// Panics unless process `pid` is gone: absent, or a zombie that is not fm's child (this
/// machine's init may not reap orphans, but fm must reap its own children).
pub async fn assert_gone(pid: u32, fm_pid: u32) {
    util::eventually(util::TIMEOUT, async || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // "pid (comm) S ppid ...": the state and parent follow the last ')'.
        let fields = stat.as_deref().and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let mut it = rest.split(' ');
            Some((it.next()?.to_owned(), it.next()?.parse::<u32>().ok()?))
        });
        match fields {
            None => Ok(()),
            Some((state, ppid)) if state == "Z" && ppid != fm_pid => Ok(()),
            Some((state, ppid)) => Err(format!(
                "process {pid} is still there (state {state}, parent {ppid}, fm is {fm_pid})"
            )),
        }
    })
    .await
}
