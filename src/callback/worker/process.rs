//! One worker process: started with its pipes (or the Python shim's socket), its stderr
//! logged line by line, fed one message at a time and read for one answer, stopped or killed
//! with its process group.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::answer::Answer;
use super::{
    LAST_WORDS, MAX_ANSWER, STOP_GRACE, Shared, Spec, StartError, Transport, Trouble, pid_text,
};
use crate::callback::Outcome;
use crate::callback::exec::{
    Tail, describe_status, forward_lines, kill_group, read_line_capped, trim_eol,
};
use crate::error::code;
use crate::message::Received;

/// One running worker process.
pub(super) struct Worker {
    pub(super) child: Child,
    pub(super) pid: Option<u32>,
    /// Messages go here (stdin, or our end of the socket); `None` once closed.
    input: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Answers come from here.
    output: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    /// The message being (or last) handled, for the stderr tag.
    current: Arc<Mutex<Option<String>>>,
    /// Forwards stderr to the log; ends at end of file.
    stderr: Option<JoinHandle<()>>,
    tail: Tail,
    /// The process was waited for: no group to kill any more.
    pub(super) reaped: bool,
}

impl Worker {
    pub(super) async fn start(spec: &Spec, index: usize) -> Result<Worker, StartError> {
        let mut cmd = Command::new(&spec.argv[0]);
        cmd.args(&spec.argv[1..])
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("FM_WORKER_INDEX", index.to_string())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let (input, output): (
            Box<dyn AsyncWrite + Send + Unpin>,
            Option<Box<dyn AsyncRead + Send + Unpin>>,
        ) = match spec.transport {
            Transport::Pipes => {
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
                (Box::new(tokio::io::sink()), None)
            }
            Transport::Socket => {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                    .map_err(|e| StartError::new(format!("cannot create a socket pair: {e}")))?;
                ours.set_nonblocking(true)
                    .map_err(|e| StartError::new(format!("cannot set up the socket: {e}")))?;
                let ours = tokio::net::UnixStream::from_std(ours)
                    .map_err(|e| StartError::new(format!("cannot set up the socket: {e}")))?;
                cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
                    .stdout(Stdio::inherit());
                let (read, write) = ours.into_split();
                (Box::new(write), Some(Box::new(read)))
            }
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| StartError::new(format!("cannot run '{}': {e}", spec.argv[0])))?;
        // `cmd` holds the child's end of the socket: close it, so that fm sees end of file
        // when the worker goes.
        drop(cmd);
        let pid = child.id();
        let (input, output) = match spec.transport {
            Transport::Pipes => {
                let stdin = child.stdin.take().expect("stdin is piped");
                let stdout = child.stdout.take().expect("stdout is piped");
                (
                    Box::new(stdin) as Box<dyn AsyncWrite + Send + Unpin>,
                    Box::new(stdout) as Box<dyn AsyncRead + Send + Unpin>,
                )
            }
            Transport::Socket => (input, output.expect("the socket was set up")),
        };
        let current: Arc<Mutex<Option<String>>> = Arc::default();
        let tail = Tail::default();
        let stderr = child.stderr.take().map(|pipe| {
            let (current, tail) = (Arc::clone(&current), tail.clone());
            let name = spec.label.clone();
            let leveled = spec.leveled_stderr;
            tokio::spawn(forward_lines(pipe, move |line| {
                tail.push(line);
                let id = current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                    .unwrap_or_else(|| "-".into());
                log_stderr(&name, index, pid, &id, line, leveled);
            }))
        });
        let mut worker = Worker {
            child,
            pid,
            input: Some(input),
            output: BufReader::new(output),
            current,
            stderr,
            tail,
            reaped: false,
        };
        if let Some(limit) = spec.handshake {
            worker.handshake(limit).await?;
        }
        Ok(worker)
    }

    /// Wait for the `{"ready": true}` line.
    async fn handshake(&mut self, limit: Duration) -> Result<(), StartError> {
        #[derive(Deserialize)]
        struct Ready {
            ready: bool,
            #[serde(default)]
            error: Option<String>,
            #[serde(default)]
            exit_code: Option<u8>,
        }
        let mut line = Vec::new();
        let read = tokio::time::timeout(
            limit,
            read_line_capped(&mut self.output, &mut line, MAX_ANSWER),
        )
        .await;
        let refusal = match read {
            Err(_) => {
                self.kill().await;
                format!("it did not say it was ready within {} s", limit.as_secs())
            }
            Ok(Err(e)) => format!("reading from it failed: {e}"),
            Ok(Ok(0)) => {
                let status = self.reap_within(STOP_GRACE).await;
                let tail = self.stderr_tail().await;
                format!(
                    "it {status} before it was ready{}",
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(":\n{tail}")
                    }
                )
            }
            Ok(Ok(_)) => match serde_json::from_slice::<Ready>(&line) {
                Ok(Ready { ready: true, .. }) => return Ok(()),
                Ok(Ready {
                    error, exit_code, ..
                }) => {
                    self.reap_within(STOP_GRACE).await;
                    return Err(StartError {
                        text: error.unwrap_or_else(|| "it said it is not ready".into()),
                        code: exit_code.unwrap_or(code::FAILURE),
                    });
                }
                Err(e) => format!(
                    "its first line is not {{\"ready\": …}} ({e}): {}",
                    trim_eol(&String::from_utf8_lossy(&line))
                ),
            },
        };
        self.kill().await;
        Err(StartError::new(refusal))
    }

    /// Send one message and read the answer. `Err` is a failure of the worker itself (it
    /// died, answered garbage or too late): the caller kills it.
    pub(super) async fn handle(
        &mut self,
        msg: &Received,
        shared: &Shared,
    ) -> Result<Outcome, Trouble> {
        let id = msg.id_for_log();
        // Anything already waiting on its output was not asked for: a banner printed on stdout,
        // or a second answer to the last message. The stream is out of step, and this message
        // is not to blame: it has not been sent yet.
        self.out_of_step().await?;
        // The id stays until the next message: stderr lines arrive on their own pipe, often
        // just after the answer they belong with.
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(id.to_owned());
        let line = self.exchange(msg, shared.timeout).await?;
        let answer: Answer = serde_json::from_slice(&line).map_err(|e| {
            format!(
                "answered something that is not a protocol line ({e}): {:.200}",
                trim_eol(&String::from_utf8_lossy(&line))
            )
        })?;
        Ok(answer.outcome(shared.on_error, id, &shared.spec.what)?)
    }

    /// `Err` when output is waiting that no message asked for. Polled once, not under a zero
    /// timeout: a timer only fires on the runtime's next millisecond tick, which cost every
    /// message a millisecond (scripts/bench: 800 → 7,000 messages/s).
    async fn out_of_step(&mut self) -> Result<(), Trouble> {
        let Some(ready) = futures_lite::future::poll_once(self.output.fill_buf()).await else {
            return Ok(());
        };
        let previous = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Err(match ready {
            Ok([]) => Trouble::Worker("closed its output".into()),
            Ok(early) => {
                let early = String::from_utf8_lossy(
                    early.split(|&b| b == b'\n').next().unwrap_or_default(),
                );
                let early = trim_eol(&early);
                Trouble::OutOfStep(match previous {
                    Some(previous) => format!(
                        "wrote a second answer to message {previous} (one answer per message): \
                         {early:.200}"
                    ),
                    None => format!(
                        "wrote to stdout before it was given a message (stdout is for answers \
                         only; log to stderr): {early:.200}"
                    ),
                })
            }
            Err(e) => Trouble::Worker(format!("could not be read from ({e})")),
        })
    }

    async fn exchange(
        &mut self,
        msg: &Received,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, String> {
        let mut line = Vec::with_capacity(msg.record.len() + 1);
        line.extend_from_slice(msg.record.as_bytes());
        line.push(b'\n');
        let input = self.input.as_mut().ok_or("has its input closed")?;
        let send = async {
            input.write_all(&line).await?;
            input.flush().await
        };
        let deadline = timeout.map(crate::limits::deadline_in);
        let too_late = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(too_late);
        tokio::select! {
            sent = send => sent.map_err(|e| format!("could not be sent the message ({e})"))?,
            _ = &mut too_late => return Err(timed_out(timeout)),
        }
        let read = read_answer(&mut self.output);
        tokio::pin!(read);
        let exited = tokio::select! {
            r = &mut read => match r {
                // End of file: it is most likely exiting; say how, if it does soon.
                Ok(line) if line.is_empty() => {
                    return Err(match tokio::time::timeout(LAST_WORDS, self.child.wait()).await {
                        Ok(status) => {
                            self.reaped = true;
                            exit_text(status)
                        }
                        Err(_) => "closed its output".into(),
                    });
                }
                r => return answered(r),
            },
            _ = &mut too_late => return Err(timed_out(timeout)),
            status = self.child.wait() => status,
        };
        self.reaped = true;
        // It exited: it may have answered just before.
        match tokio::time::timeout(LAST_WORDS, &mut read).await {
            Ok(Ok(line)) if !line.is_empty() => answered(Ok(line)),
            _ => Err(exit_text(exited)),
        }
    }

    /// Close stdin, wait for the worker to exit, kill it if it does not.
    pub(super) async fn stop(mut self, spec: &Spec) {
        self.input = None;
        if self.reaped {
            return;
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(_) => self.reaped = true,
            Err(_) => {
                tracing::warn!(
                    "{} (pid {}) did not exit within {} s of its input closing; killing it",
                    spec.what,
                    pid_text(self.pid),
                    STOP_GRACE.as_secs()
                );
                self.kill().await;
            }
        }
    }

    /// SIGKILL the worker's process group and reap it.
    pub(super) async fn kill(&mut self) {
        if !self.reaped {
            kill_group(self.pid);
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            self.reaped = true;
        }
    }

    /// Wait (bounded) for the worker to exit; describes how it did.
    async fn reap_within(&mut self, limit: Duration) -> String {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.reaped = true;
                describe_status(status)
            }
            Ok(Err(e)) => format!("could not be waited for ({e})"),
            Err(_) => {
                self.kill().await;
                "closed its output".into()
            }
        }
    }

    /// What it wrote to stderr last, once its stderr is drained (bounded).
    async fn stderr_tail(&mut self) -> String {
        if let Some(task) = self.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        self.tail.text()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker abandoned mid-way (fm stopping, a start that failed elsewhere): take its
        // process group with it. `kill_on_drop` and tokio's orphan reaper do the rest.
        if !self.reaped && matches!(self.child.try_wait(), Ok(None)) {
            kill_group(self.pid);
        }
    }
}

fn exit_text(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => describe_status(status),
        Err(e) => format!("could not be waited for ({e})"),
    }
}

fn timed_out(timeout: Option<Duration>) -> String {
    format!(
        "did not answer within the {:.1} s timeout",
        timeout.unwrap_or_default().as_secs_f64()
    )
}

async fn read_answer<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    read_line_capped(reader, &mut line, MAX_ANSWER).await?;
    Ok(line)
}

fn answered(read: std::io::Result<Vec<u8>>) -> Result<Vec<u8>, String> {
    match read {
        Ok(line) if line.is_empty() => Err("closed its output".into()),
        Ok(line) if line.last() != Some(&b'\n') => Err(format!(
            "answered a line longer than {MAX_ANSWER} bytes or without its newline"
        )),
        Ok(line) => Ok(line),
        Err(e) => Err(format!("could not be read from ({e})")),
    }
}

/// Log one stderr line of worker `index`. With `leveled`, a leading Python level name (`DEBUG`,
/// `INFO`, `WARNING`, `ERROR`, `CRITICAL`, then a space) sets the level and is removed.
fn log_stderr(name: &str, index: usize, pid: Option<u32>, id: &str, line: &str, leveled: bool) {
    let (level, text) = if leveled {
        split_level(line)
    } else {
        (tracing::Level::INFO, line)
    };
    let pid = pid.unwrap_or_default();
    match level {
        tracing::Level::ERROR => {
            tracing::error!(target: "fm::callback", worker = index, pid, message_id = %id, "{name}: {text}")
        }
        tracing::Level::WARN => {
            tracing::warn!(target: "fm::callback", worker = index, pid, message_id = %id, "{name}: {text}")
        }
        tracing::Level::DEBUG => {
            tracing::debug!(target: "fm::callback", worker = index, pid, message_id = %id, "{name}: {text}")
        }
        _ => {
            tracing::info!(target: "fm::callback", worker = index, pid, message_id = %id, "{name}: {text}")
        }
    }
}

fn split_level(line: &str) -> (tracing::Level, &str) {
    for (prefix, level) in [
        ("CRITICAL ", tracing::Level::ERROR),
        ("ERROR ", tracing::Level::ERROR),
        ("WARNING ", tracing::Level::WARN),
        ("INFO ", tracing::Level::INFO),
        ("DEBUG ", tracing::Level::DEBUG),
    ] {
        if let Some(rest) = line.strip_prefix(prefix) {
            return (level, rest);
        }
    }
    (tracing::Level::INFO, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_level_prefixes_set_the_level() {
        assert_eq!(
            split_level("ERROR x: boom"),
            (tracing::Level::ERROR, "x: boom")
        );
        assert_eq!(
            split_level("WARNING py.warnings: w"),
            (tracing::Level::WARN, "py.warnings: w")
        );
        assert_eq!(
            split_level("Traceback (most recent call last):"),
            (tracing::Level::INFO, "Traceback (most recent call last):")
        );
    }
}
