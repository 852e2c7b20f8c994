//! The recorder of `fm record` as a callback: each message becomes one record-file line,
//! written and flushed before the message is acked (see [`crate::record`]).

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Outcome;
use crate::error::{Exit, code};
use crate::message::Received;

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
    /// (a missing folder, no permission, a full disk) is an I/O failure, exit 1, as fm(1)
    /// says and as a failed write is: the command line was well formed. (fedora-messaging's
    /// `click.File("w")` opens the file lazily, so it too fails on the first write, not with
    /// click's usage error.)
    pub fn create(path: &Path, limit: Option<u64>) -> anyhow::Result<Recorder> {
        let (sink, name) = if path.as_os_str() == "-" {
            (
                Sink::Stdout(std::io::stdout()),
                "standard output".to_owned(),
            )
        } else {
            let file = File::create(path).map_err(|e| {
                Exit::new(
                    code::FAILURE,
                    anyhow!(
                        "cannot create the record file {}: {}",
                        path.display(),
                        crate::limits::io_reason(&e)
                    ),
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

    /// Whether a progress bar shows the recording (with `--limit`, on a terminal).
    pub fn has_progress_bar(&self) -> bool {
        self.bar.is_some()
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
            // Only regular files can be synced (not /dev/null, a pipe, a terminal).
            if let Sink::File(f) = &out.sink
                && f.metadata().is_ok_and(|m| m.is_file())
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

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;

    fn received(n: u32) -> Arc<Received> {
        let mut delivery = lapin::message::Delivery::mock(
            u64::from(n),
            "amq.topic".into(),
            "org.example.t".into(),
            false,
            format!(r#"{{"n": {n}, "é": "ü"}}"#).into_bytes(),
        );
        delivery.properties = BasicProperties::default()
            .with_message_id(format!("id-{n}").as_str().into())
            .with_content_encoding("utf-8".into())
            .with_headers(
                crate::message::json_to_field_table(
                    serde_json::json!({"fedora_messaging_severity": 20,
                                       "fedora_messaging_schema": "base.message"})
                    .as_object()
                    .unwrap(),
                )
                .unwrap(),
            );
        Arc::new(
            Received::from_delivery(&mut delivery, "q", crate::config::BodyMode::Json).unwrap(),
        )
    }

    #[test]
    fn each_message_is_one_line_and_the_limit_halts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        let r = Recorder::create(&path, Some(2)).unwrap();
        assert_eq!(r.write(&received(1)), Outcome::Ack);
        // The line is in the file before the message is acked.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert!(matches!(
            r.write(&received(2)),
            Outcome::Halt {
                exit_code: 0,
                requeue: false,
                ..
            }
        ));
        // A message after the limit (another queue's) goes back unrecorded.
        assert!(matches!(
            r.write(&received(3)),
            Outcome::Halt {
                exit_code: 0,
                requeue: true,
                ..
            }
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            r#"{"body": {"n": 1, "é": "ü"}, "headers": {"fedora_messaging_schema": "base.message", "fedora_messaging_severity": 20}, "id": "id-1", "priority": 0, "queue": "q", "topic": "org.example.t"}"#
        );
    }

    #[test]
    fn a_file_that_cannot_be_created_exits_1_naming_it() {
        let err = Recorder::create(Path::new("/nonexistent/dir/x.jsonl"), None)
            .err()
            .expect("no such folder");
        assert_eq!(crate::error::exit_code_of(&err), code::FAILURE);
        assert_eq!(
            format!("{err:#}"),
            "cannot create the record file /nonexistent/dir/x.jsonl: no such file or directory"
        );
    }

    #[test]
    fn a_failed_write_requeues_and_exits_1() {
        if !Path::new("/dev/full").exists() {
            return;
        }
        let r = Recorder::create(Path::new("/dev/full"), None).unwrap();
        let Outcome::Halt {
            exit_code,
            requeue,
            reason,
        } = r.write(&received(1))
        else {
            panic!("a failed write halts");
        };
        assert_eq!((exit_code, requeue), (1, true));
        assert!(
            reason
                .unwrap()
                .contains("unable to save messages to /dev/full")
        );
        // Nothing more is written after a failure.
        assert!(matches!(
            r.write(&received(2)),
            Outcome::Halt {
                exit_code: 1,
                requeue: true,
                ..
            }
        ));
    }
}
