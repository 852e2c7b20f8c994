//! `fm record FILE`: consume like `fm consume` and write every message as one record-file
//! line, exactly as `fedora-messaging record` does (`json.dumps(m, ensure_ascii=False,
//! sort_keys=True)`, see [`crate::message::Message::record_line`]), so the file can be
//! replayed with `fm publish` or `fedora-messaging publish`.
//!
//! Recording is consuming with a fixed callback, so it is a [`Handler`]: it inherits
//! everything `fm consume` does — the `--app-name` (default "recorder"), `--queue-name`,
//! `--exchange` and `--routing-key` overrides, validation of incoming messages,
//! reconnection, the graceful stop on SIGTERM/SIGINT and the exit codes 10–15.
//!
//! Where fm is stricter than fedora-messaging, so that a recording loses nothing:
//! - a message is acked only after its line is written and flushed to the file (or
//!   standard output); fedora-messaging writes to a buffered file and acks at once, so a
//!   crash loses the buffered lines;
//! - a write that fails (disk full, closed pipe) requeues the message and exits 1;
//!   fedora-messaging acks it and exits 1, losing it;
//! - messages are recorded one at a time (`[callback] concurrency` is forced to 1), so the
//!   lines are in delivery order.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::callback::{Handler, Outcome};
use crate::cli::RecordArgs;
use crate::config::Config;
use crate::error::{Exit, code};
use crate::message::Received;

/// `fm record`: open the output, then consume until `--limit`, a signal or an error.
///
/// `config` already has the command-line overrides applied.
pub async fn run(mut config: Config, args: &RecordArgs, verbosity: i8) -> anyhow::Result<u8> {
    config.callback.concurrency = 1;
    let recorder = Recorder::create(&args.file, args.limit)?;
    if recorder.bar.is_some() {
        // The bar replaces the per-message INFO lines, which would break it up.
        crate::logging::init(&config.log_config, verbosity.saturating_sub(1));
    }
    crate::consume_with_handler(Arc::new(config), Handler::Record(Arc::new(recorder))).await
}

/// Writes each message as one line and says when `--limit` is reached.
pub struct Recorder {
    out: Mutex<Output>,
    /// The file name, or "standard output".
    name: String,
    limit: Option<u64>,
    /// With `--limit`, on a terminal.
    bar: Option<ProgressBar>,
}

struct Output {
    sink: Sink,
    /// Lines written.
    count: u64,
    /// A write failed: nothing more is written (the line may be half there).
    broken: bool,
}

enum Sink {
    File(File),
    Stdout(std::io::Stdout),
}

impl Sink {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            // One `write` per line (or a few for very long lines), no user-space buffer:
            // once this returns, the line is in the kernel and survives a crash of fm.
            Sink::File(f) => f.write_all(line),
            Sink::Stdout(s) => {
                let mut s = s.lock();
                s.write_all(line)?;
                s.flush()
            }
        }
    }
}

impl Recorder {
    /// Create (truncate) FILE, or use standard output for `-`. A file that cannot be created
    /// is a usage error (exit 2), as with fedora-messaging's `click.File("w")`.
    pub fn create(path: &Path, limit: Option<u64>) -> anyhow::Result<Recorder> {
        let (sink, name) = if path.as_os_str() == "-" {
            (
                Sink::Stdout(std::io::stdout()),
                "standard output".to_owned(),
            )
        } else {
            let file = File::create(path).map_err(|e| {
                Exit::new(
                    code::USAGE,
                    anyhow!("cannot create {}: {e}", path.display()),
                )
            })?;
            (Sink::File(file), path.display().to_string())
        };
        let bar = match limit {
            Some(n) if std::io::stderr().is_terminal() => Some(
                ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()).with_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} messages ({elapsed})")
                        .expect("the template is valid"),
                ),
            ),
            _ => None,
        };
        Ok(Recorder {
            out: Mutex::new(Output {
                sink,
                count: 0,
                broken: false,
            }),
            name,
            limit,
            bar,
        })
    }

    /// For log lines: "record:FILE".
    pub fn describe(&self) -> String {
        format!("record:{}", self.name)
    }

    /// Write one message, off the async runtime's threads.
    pub async fn handle(self: &Arc<Self>, msg: Arc<Received>) -> Outcome {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.write(&msg))
            .await
            .unwrap_or_else(|e| Outcome::Halt {
                exit_code: i32::from(code::FAILURE),
                requeue: true,
                reason: Some(format!("the record writer failed: {e}")),
            })
    }

    /// Write the line, flush it, and say what to do with the message: ack it, or halt
    /// (after the limit, or on a write error, which requeues it).
    pub fn write(&self, msg: &Received) -> Outcome {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let reached = self.limit.is_some_and(|limit| out.count >= limit);
        if reached || out.broken {
            // Another queue's consumer got here after the limit or a failure: the message
            // goes back to its queue, unrecorded.
            return Outcome::Halt {
                exit_code: i32::from(if out.broken { code::FAILURE } else { code::OK }),
                requeue: true,
                reason: None,
            };
        }
        let mut line = Vec::with_capacity(msg.record.len() + 1);
        line.extend_from_slice(msg.record.as_bytes());
        line.push(b'\n');
        if let Err(e) = out.sink.write_line(&line) {
            out.broken = true;
            return Outcome::Halt {
                exit_code: i32::from(code::FAILURE),
                requeue: true,
                reason: Some(format!(
                    "unable to save messages to {}: {e}; message {} was put back in its queue",
                    self.name,
                    msg.id_for_log()
                )),
            };
        }
        out.count += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        match self.limit {
            Some(limit) if out.count >= limit => Outcome::Halt {
                exit_code: 0,
                requeue: false,
                reason: Some(format!(
                    "recorded {limit} message{} (--limit)",
                    if limit == 1 { "" } else { "s" }
                )),
            },
            _ => Outcome::Ack,
        }
    }

    /// At exit: clear the bar and sync a file to disk.
    pub async fn finish(self: &Arc<Self>) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || {
            let out = this.out.lock().unwrap_or_else(|e| e.into_inner());
            if let Sink::File(f) = &out.sink
                && let Err(e) = f.sync_all()
            {
                tracing::warn!("syncing {} to disk: {e}", this.name);
            }
            tracing::info!(
                "recorded {} message{} to {}",
                out.count,
                if out.count == 1 { "" } else { "s" },
                this.name
            );
        })
        .await;
    }
}
