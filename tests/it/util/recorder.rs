//! The recorder test plugin (`tests/fixtures/plugins/recorder.c`, built with `cc` at test time)
//! and the fm set-up the consume and fault tests share around it: the plugin writes one JSON
//! line per message to the file `consumer_config.out` names, then answers according to the
//! topic's last word (see the plugin's source).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{self, Fm, FmProcess};

/// The built recorder plugin.
pub fn plugin() -> PathBuf {
    util::build_c_plugin(&util::repo_root().join("tests/fixtures/plugins/recorder.c"))
}

/// What a test changes in [`config`].
pub struct Extra<'a> {
    /// Top-level keys (`passive_declares = true`…).
    pub top: &'a str,
    /// More `[callback]` keys (`concurrency = 8`, `max_redeliveries = 3`…).
    pub callback: &'a str,
    /// The queue's declare-time arguments, inside `{}`.
    pub queue_args: &'a str,
    /// `[qos] prefetch_count`.
    pub prefetch: u16,
}

impl Default for Extra<'_> {
    fn default() -> Self {
        Extra {
            top: "",
            callback: "",
            queue_args: "",
            prefetch: 10,
        }
    }
}

/// Queue arguments (for [`Extra::queue_args`]) that dead-letter through the default exchange
/// straight into the queue `dlq`.
pub fn dead_letter_to(dlq: &str) -> String {
    format!("\"x-dead-letter-exchange\" = \"\", \"x-dead-letter-routing-key\" = \"{dlq}\"")
}

/// fm consuming the durable queue `queue`, bound to amq.topic with `queue.#`, through the
/// recorder writing to `out`.
pub fn config(url: &str, queue: &str, out: &Path, extra: Extra) -> String {
    format!(
        r#"
amqp_url = "{url}"
{top}

[callback]
plugin = "{plugin}"
{callback}

[queues."{queue}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{{queue_args}}}

[[bindings]]
queue = "{queue}"
exchange = "amq.topic"
routing_keys = ["{queue}.#"]

[qos]
prefetch_count = {prefetch}

[consumer_config]
out = "{out}"
"#,
        top = extra.top,
        callback = extra.callback,
        queue_args = extra.queue_args,
        prefetch = extra.prefetch,
        plugin = plugin().display(),
        out = out.display(),
    )
}

/// fm consuming with the config `toml`, once its consumer is registered with the broker.
pub async fn consuming(toml: &str) -> FmProcess {
    let mut proc = Fm::new().config_toml(toml).arg("consume").spawn();
    proc.wait_consuming().await;
    proc
}

/// A file for the recorder's lines, in a folder that outlives the fm run.
pub fn out_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("out.jsonl");
    (dir, out)
}

/// The lines the recorder wrote to `out` so far.
pub fn recorded(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

/// The recorder's lines once there are at least `n`; after [`util::TIMEOUT`] the test fails,
/// showing `proc`'s log.
pub async fn wait_for_lines(proc: &FmProcess, out: &Path, n: usize) -> Vec<Value> {
    util::eventually(util::TIMEOUT, async || {
        let lines = recorded(out);
        match lines.len() {
            got if got >= n => Ok(lines),
            got => Err(format!(
                "only {got} of {n} lines recorded\n--- fm's stderr:\n{}",
                proc.stderr()
            )),
        }
    })
    .await
}
