//! The fedora-messaging peer: its CLI from the test venv ([`Peer`]), the configuration both it
//! and fm read, and helpers for the record files they write.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::util::{self, Broker};

/// fedora-messaging's CLI from the test venv, with configuration files in a folder of its own.
pub struct Peer {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Peer {
    pub fn new(b: &Broker) -> Peer {
        let bin = b
            .venv_python()
            .parent()
            .expect("the venv has a bin folder")
            .join("fedora-messaging");
        assert!(
            bin.is_file(),
            "{} is missing: run scripts/test",
            bin.display()
        );
        Peer {
            dir: tempfile::tempdir().expect("creating a temporary folder"),
            bin,
        }
    }

    /// Writes a file into the peer's folder.
    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("writing a peer file");
        path
    }

    fn command(&self, conf: &Path, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--conf")
            .arg(conf)
            .args(args)
            .current_dir(self.dir.path())
            .env("PYTHONPATH", self.dir.path())
            .env_remove("FEDORA_MESSAGING_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `fedora-messaging --conf CONF ARGS...` to its end (at most a minute).
    pub async fn run(&self, conf: &Path, args: &[&str]) -> std::process::Output {
        let child = self
            .command(conf, args)
            .spawn()
            .expect("starting fedora-messaging");
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("fedora-messaging {args:?} did not finish within 60 s"))
            .expect("waiting for fedora-messaging")
    }

    /// Starts `fedora-messaging consume` with a callback that appends, per message, one JSON
    /// line with what a Python callback sees: topic, id, body, headers, severity, priority,
    /// queue. Returns the process and the file it writes.
    pub fn consume(&self, conf: &Path) -> (tokio::process::Child, PathBuf) {
        self.file(
            "fm_peer.py",
            r#"import json, os

def callback(message):
    seen = {"topic": message.topic, "id": message.id, "body": message.body,
            "headers": message._headers, "severity": message.severity,
            "priority": message.priority, "queue": message.queue}
    with open(os.environ["FM_PEER_OUT"], "a", encoding="utf-8") as f:
        f.write(json.dumps(seen, sort_keys=True) + "\n")
"#,
        );
        let out = self.dir.path().join("consumed.jsonl");
        let child = self
            .command(conf, &["consume", "--callback", "fm_peer:callback"])
            .env("FM_PEER_OUT", &out)
            .spawn()
            .expect("starting fedora-messaging consume");
        (child, out)
    }
}

/// A configuration (for fm and fedora-messaging alike) with one durable queue bound to
/// `exchange` with `#`, publishing to `exchange` by default.
pub fn queue_config(b: &Broker, exchange: &str, queue: &str) -> String {
    format!(
        r##"amqp_url = "{url}"
publish_exchange = "{exchange}"

[client_properties]
app = "fm tests"

[queues."{queue}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
queue = "{queue}"
exchange = "{exchange}"
routing_keys = ["#"]
"##,
        url = b.url()
    )
}

/// A topic exchange and a durable queue bound to it with `#`.
pub async fn exchange_and_queue(b: &Broker, name: &str) -> (String, String) {
    let (exchange, queue) = (
        b.unique(&format!("{name}-ex")),
        b.unique(&format!("{name}-q")),
    );
    b.declare_topic_exchange(&exchange).await;
    b.declare_queue(&queue).await;
    b.bind(&queue, &exchange, "#").await;
    (exchange, queue)
}

/// The lines of a file.
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `id` of each record line.
pub fn ids_of(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["id"].as_str().expect("every line has an id").to_owned()
        })
        .collect()
}

/// Waits until `path` has `n` lines; panics after a minute.
pub async fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    util::eventually(Duration::from_secs(60), async || {
        let have = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<String> = have.lines().map(str::to_owned).collect();
        match got.len() {
            len if len >= n => Ok(got),
            len => Err(format!(
                "{} has {len} lines, expected {n}:\n{have}",
                path.display()
            )),
        }
    })
    .await
}
