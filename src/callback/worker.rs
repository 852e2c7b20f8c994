//! Long-lived workers: `[callback] command = [...]` with `mode = "worker"`, and the Python shim.
//!
//! Starting a process per message costs milliseconds; a worker is started once per concurrency
//! slot and fed messages, one at a time, over a line protocol (documented in
//! `fm-callbacks(7)`):
//!
//! - fm writes one record-format JSON line per message to the worker's stdin;
//! - the worker answers with one JSON object on one line on stdout:
//!   `{"result": "ack"|"nack"|"drop"|"halt"|"fail", "exit_code": N, "requeue": bool,
//!   "error": "…"}`. Only `result` is required and other keys are ignored. `halt` stops fm
//!   with `exit_code` (default 0), requeueing the message if `requeue` (default false); `fail`
//!   is an unexpected failure, handled per `[callback] on_error`; `error` is logged (it is the
//!   reason of a halt or a failure);
//! - one message is in flight per worker, so stdout carries answers and nothing else: a line
//!   that is not an answer, or output written before a message was sent, is a protocol error;
//! - stderr goes to fm's log, line by line, tagged with the worker and the message it is on;
//! - the environment is fm's plus `FM_WORKER_INDEX` (0 to N-1) and `FM_CONSUMER_CONFIG` (the
//!   `[consumer_config]` table as JSON); each worker leads a process group of its own;
//! - at shutdown fm closes stdin: the worker should exit then. One still running after
//!   [`STOP_GRACE`] is killed.
//!
//! A worker that exits, breaks the protocol, or does not answer within `[callback] timeout`
//! has failed its message (handled per `on_error`); its process group is killed and it is
//! restarted after a pause that doubles with each failure in a row. After [`MAX_FAILURES`]
//! failures in a row (no answer in between) fm gives up: it stops with exit 13, naming the last
//! failure. A worker that cannot be started at all (program not found) stops fm at start with
//! exit 1.
//!
//! The Python shim ([`super::python`]) is a worker too, with two differences the [`Spec`]
//! carries: it talks over a Unix socket on its stdin (so its stdout stays fm's stdout, where a
//! callback's `print` belongs), and it first says whether the callback could be loaded, so
//! that an import error stops fm at start (exit 1) as it stops `fedora-messaging consume`.
//!
//! Each slot is a task that owns its process: it waits for a job, for its worker to die, or for
//! the pool to close, whichever comes first, so a worker dying while idle is noticed and
//! replaced at once rather than on the next message.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::anyhow;
use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Outcome;
use super::exec::{
    Tail, describe_status, find_program, forward_lines, kill_group, on_failure, program_name,
    read_line_capped, trim_eol,
};
use crate::config::{CallbackConfig, OnError};
use crate::error::{Exit, code};
use crate::message::Received;
use crate::shutdown::Shutdown;

/// Failures in a row (start failures, crashes, bad answers, timeouts) after which fm stops.
pub const MAX_FAILURES: u32 = 5;
/// The pause before the first restart; it doubles with every failure in a row.
const RESTART_DELAY: Duration = Duration::from_millis(100);
/// The longest pause before a restart.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(5);
/// How long a worker may take to exit once its stdin is closed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest answer line accepted; a longer one is garbage.
const MAX_ANSWER: usize = 1024 * 1024;
/// After a worker exited mid-message, how long fm still waits for an answer it may have
/// written just before exiting.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// How the protocol reaches the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Messages on stdin, answers on stdout (command workers).
    Pipes,
    /// One Unix socket as stdin, both ways; stdout is inherited from fm (the Python shim).
    Socket,
}

/// How to start one worker process.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Where the protocol goes.
    pub transport: Transport,
    /// Wait this long at start for a `{"ready": true}` line (the Python shim).
    pub handshake: Option<Duration>,
    /// Stderr lines may start with a Python level name (`ERROR `, `INFO `…) that sets the log
    /// level of the line.
    pub leveled_stderr: bool,
    /// What this is, for messages: "worker 'prog'", "python callback 'pkg.mod:fn'".
    pub what: String,
    /// What its stderr lines are prefixed with in the log: the program, the Python target.
    pub label: String,
}

impl Spec {
    /// A command worker (`mode = "worker"`).
    pub fn command(argv: &[String], consumer_config: String) -> Spec {
        Spec {
            what: format!("worker '{}'", short_command(argv)),
            label: program_name(&argv[0]),
            argv: argv.to_vec(),
            env: vec![("FM_CONSUMER_CONFIG".into(), consumer_config)],
            transport: Transport::Pipes,
            handshake: None,
            leveled_stderr: false,
        }
    }
}

/// `argv` for messages: paths shortened to their file names, at most 60 characters.
fn short_command(argv: &[String]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|a| {
            if a.contains('/') {
                program_name(a)
            } else {
                a.clone()
            }
        })
        .collect();
    let text = words.join(" ");
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// One message handed to a slot, and where its outcome goes.
struct Job {
    msg: Arc<Received>,
    reply: oneshot::Sender<Outcome>,
}

/// What the slots share.
struct Shared {
    spec: Spec,
    timeout: Option<Duration>,
    on_error: OnError,
    shutdown: Shutdown,
    /// Cancelled by [`Pool::shutdown`]: slots stop their workers and end.
    closing: CancellationToken,
    jobs: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    /// Failures since the last answer.
    failures: AtomicU32,
    /// Set once [`MAX_FAILURES`] was reached: no more restarts.
    gave_up: AtomicBool,
}

/// N workers, one per concurrency slot.
pub struct Pool {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    slots: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Start `config.concurrency` workers. A worker that cannot be started (program not found,
    /// a Python callback that does not import) stops fm at start with exit 1 (2 for a Python
    /// callback that is not callable, as fedora-messaging).
    pub async fn start(
        spec: Spec,
        config: &CallbackConfig,
        shutdown: Shutdown,
    ) -> anyhow::Result<Pool> {
        if let Err(e) = find_program(&spec.argv[0]) {
            return Err(Exit::new(
                code::FAILURE,
                anyhow!("{}: cannot run '{}': {e}", spec.what, spec.argv[0]),
            ));
        }
        let n = config.concurrency.max(1);
        let mut starting = tokio::task::JoinSet::new();
        for index in 0..n {
            let spec = spec.clone();
            starting.spawn(async move { (index, Worker::start(&spec, index).await) });
        }
        let mut workers: Vec<Option<Worker>> = (0..n).map(|_| None).collect();
        let mut refusal = None;
        while let Some(started) = starting.join_next().await {
            match started {
                Ok((index, Ok(worker))) => workers[index] = Some(worker),
                Ok((_, Err(e))) => {
                    refusal.get_or_insert(e);
                }
                Err(e) => {
                    refusal.get_or_insert(StartError::new(format!("starting it failed: {e}")));
                }
            }
        }
        if let Some(e) = refusal {
            // Dropping the others kills them.
            drop(workers);
            return Err(Exit::new(
                e.code,
                anyhow!("{} cannot start: {}", spec.what, e.text),
            ));
        }
        tracing::info!(
            "started {n} {}{} (pids {})",
            spec.what,
            if n == 1 { "" } else { " processes" },
            workers
                .iter()
                .flatten()
                .map(|w| w.pid.map_or("?".into(), |p| p.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        );

        let (tx, rx) = mpsc::channel(n);
        let shared = Arc::new(Shared {
            spec,
            timeout: config.timeout,
            on_error: config.on_error,
            shutdown,
            closing: CancellationToken::new(),
            jobs: tokio::sync::Mutex::new(rx),
            failures: AtomicU32::new(0),
            gave_up: AtomicBool::new(false),
        });
        let slots = workers
            .into_iter()
            .enumerate()
            .map(|(index, worker)| tokio::spawn(slot(Arc::clone(&shared), index, worker)))
            .collect();
        Ok(Pool {
            shared,
            jobs: tx,
            slots: Mutex::new(slots),
        })
    }

    /// What runs, for log lines.
    pub fn describe(&self) -> String {
        self.shared.spec.argv.join(" ")
    }

    /// Hand one message to the next free worker and wait for its outcome.
    pub async fn handle(&self, msg: Arc<Received>) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        if self.jobs.send(Job { msg, reply }).await.is_err() {
            return Outcome::Nack;
        }
        outcome.await.unwrap_or_else(|_| {
            Outcome::Fail(format!(
                "{} stopped before answering",
                self.shared.spec.what
            ))
        })
    }

    /// Stop every worker: close its stdin, give it [`STOP_GRACE`] to exit, then kill it.
    pub async fn shutdown(&self) {
        self.shared.closing.cancel();
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(PoisonError::into_inner));
        // They stop side by side: one deadline for all.
        let deadline = tokio::time::Instant::now() + STOP_GRACE + Duration::from_secs(1);
        for mut slot in slots {
            if tokio::time::timeout_at(deadline, &mut slot).await.is_err() {
                slot.abort(); // dropping its worker kills it
            }
        }
    }
}

/// Why a worker could not start, and the exit code that asks for.
struct StartError {
    text: String,
    code: u8,
}

impl StartError {
    fn new(text: String) -> StartError {
        StartError {
            text,
            code: code::FAILURE,
        }
    }
}

/// One slot's life: keep a worker running and feed it jobs.
async fn slot(shared: Arc<Shared>, index: usize, mut worker: Option<Worker>) {
    // A message that found its worker out of step, for the next one.
    let mut retry: Option<Job> = None;
    loop {
        let Some(mut w) = worker.take() else {
            if shared.gave_up.load(Ordering::Relaxed) {
                // fm is stopping: messages still coming go back to the queue.
                tokio::select! {
                    _ = shared.closing.cancelled() => return,
                    job = next_job(&shared) => match job {
                        Some(job) => {
                            let _ = job.reply.send(Outcome::Nack);
                        }
                        None => return,
                    },
                }
                continue;
            }
            let failures = shared.failures.load(Ordering::Relaxed);
            let delay = restart_delay(failures);
            tokio::select! {
                _ = shared.closing.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match Worker::start(&shared.spec, index).await {
                Ok(w) => {
                    tracing::info!(
                        worker = index,
                        pid = w.pid,
                        "{} restarted",
                        shared.spec.what
                    );
                    worker = Some(w);
                }
                Err(e) => shared.failed(format!(
                    "{} (worker {index}) could not be restarted: {}",
                    shared.spec.what, e.text
                )),
            }
            continue;
        };
        let job = match retry.take() {
            Some(job) => job,
            None => tokio::select! {
                biased;
                _ = shared.closing.cancelled() => {
                    w.stop(&shared.spec).await;
                    return;
                }
                status = w.child.wait() => {
                    let how = match status {
                        Ok(s) => describe_status(s),
                        Err(e) => format!("could not be waited for: {e}"),
                    };
                    w.reaped = true;
                    shared.failed(format!(
                        "{} (worker {index}, pid {}) {how} while idle",
                        shared.spec.what,
                        pid_text(w.pid)
                    ));
                    continue;
                }
                job = next_job(&shared) => match job {
                    Some(job) => job,
                    None => {
                        w.stop(&shared.spec).await;
                        return;
                    }
                },
            },
        };
        let id = job.msg.id_for_log().to_owned();
        match w.handle(&job.msg, &shared).await {
            Ok(outcome) => {
                shared.failures.store(0, Ordering::Relaxed);
                let _ = job.reply.send(outcome);
                worker = Some(w);
            }
            Err(Trouble::OutOfStep(reason)) => {
                // The worker's fault, not this message's (it was never sent): the next worker
                // gets it.
                w.kill().await;
                retry = Some(job);
                shared.failed(format!(
                    "{} (worker {index}, pid {}) {reason}",
                    shared.spec.what,
                    pid_text(w.pid)
                ));
            }
            Err(Trouble::Worker(reason)) => {
                w.kill().await;
                let reason = format!(
                    "{} (worker {index}, pid {}) {reason} while handling message {id}",
                    shared.spec.what,
                    pid_text(w.pid)
                );
                let _ = job
                    .reply
                    .send(on_failure(shared.on_error, &id, reason.clone()));
                shared.failed(reason);
            }
        }
    }
}

/// What went wrong with a worker while handling a message.
enum Trouble {
    /// The worker failed on the message (died, garbage, too late): the message's outcome
    /// follows `on_error`.
    Worker(String),
    /// Output was waiting before the message was sent (a banner, a second answer to the
    /// previous message): the message is not to blame and goes to the next worker.
    OutOfStep(String),
}

impl From<String> for Trouble {
    fn from(reason: String) -> Trouble {
        Trouble::Worker(reason)
    }
}

async fn next_job(shared: &Shared) -> Option<Job> {
    shared.jobs.lock().await.recv().await
}

fn restart_delay(failures: u32) -> Duration {
    RESTART_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RESTART_DELAY_MAX)
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "?".into(), |p| p.to_string())
}

impl Shared {
    /// Count a failure (`reason` names the worker); at [`MAX_FAILURES`] in a row, stop fm
    /// with exit 13.
    fn failed(&self, reason: String) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= MAX_FAILURES {
            if !self.gave_up.swap(true, Ordering::Relaxed) {
                let text = format!(
                    "{} failed {n} times in a row (last: {reason}); giving up",
                    self.spec.what
                );
                tracing::error!("{text}");
                self.shutdown.trigger(code::CALLBACK_FAILED, text);
            }
        } else if !self.closing.is_cancelled() {
            tracing::warn!(
                "{reason}; restarting it in {:.1} s",
                restart_delay(n).as_secs_f64()
            );
        }
    }
}

/// One running worker process.
struct Worker {
    child: Child,
    pid: Option<u32>,
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
    reaped: bool,
}

impl Worker {
    async fn start(spec: &Spec, index: usize) -> Result<Worker, StartError> {
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
    async fn handle(&mut self, msg: &Received, shared: &Shared) -> Result<Outcome, Trouble> {
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
    async fn stop(mut self, spec: &Spec) {
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
    async fn kill(&mut self) {
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

/// One answer line.
#[derive(Debug, Deserialize)]
struct Answer {
    result: String,
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    requeue: Option<bool>,
    #[serde(default)]
    error: Option<String>,
}

impl Answer {
    fn outcome(self, on_error: OnError, id: &str, what: &str) -> Result<Outcome, String> {
        let note = |verb: &str| {
            if let Some(e) = &self.error {
                tracing::info!("{what} {verb} message {id}: {e}");
            }
        };
        Ok(match self.result.as_str() {
            "ack" => {
                note("acked");
                Outcome::Ack
            }
            "nack" => {
                note("returned");
                Outcome::Nack
            }
            "drop" => {
                note("dropped");
                Outcome::Drop
            }
            "halt" => {
                let exit_code = self.exit_code.unwrap_or(0);
                Outcome::Halt {
                    exit_code: i32::try_from(exit_code).map_err(|_| {
                        format!("answered halt with exit_code {exit_code}, not a 32-bit integer")
                    })?,
                    requeue: self.requeue.unwrap_or(false),
                    reason: self.error,
                }
            }
            "fail" => on_failure(
                on_error,
                id,
                format!(
                    "{what} failed on message {id}: {}",
                    self.error.as_deref().unwrap_or("no reason given")
                ),
            ),
            other => {
                return Err(format!(
                    "answered result {other:?}; expected \"ack\", \"nack\", \"drop\", \"halt\" or \"fail\""
                ));
            }
        })
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

    fn outcome(line: &str, on_error: OnError) -> Result<Outcome, String> {
        let answer: Answer = serde_json::from_str(line).map_err(|e| e.to_string())?;
        answer.outcome(on_error, "id", "worker 'w'")
    }

    #[test]
    fn answers_map_onto_outcomes() {
        assert_eq!(
            outcome(r#"{"result": "ack"}"#, OnError::Halt),
            Ok(Outcome::Ack)
        );
        assert_eq!(
            outcome(r#"{"result": "nack", "error": "later"}"#, OnError::Halt),
            Ok(Outcome::Nack)
        );
        assert_eq!(
            outcome(r#"{"result": "drop", "extra": 1}"#, OnError::Halt),
            Ok(Outcome::Drop)
        );
        assert_eq!(
            outcome(
                r#"{"result": "halt", "exit_code": 7, "requeue": true, "error": "bye"}"#,
                OnError::Halt
            ),
            Ok(Outcome::Halt {
                exit_code: 7,
                requeue: true,
                reason: Some("bye".into())
            })
        );
        assert_eq!(
            outcome(r#"{"result": "halt"}"#, OnError::Halt),
            Ok(Outcome::Halt {
                exit_code: 0,
                requeue: false,
                reason: None
            })
        );
        assert!(matches!(
            outcome(r#"{"result": "fail", "error": "KeyError: 'x'"}"#, OnError::Halt),
            Ok(Outcome::Fail(e)) if e.contains("KeyError: 'x'")
        ));
        assert_eq!(
            outcome(r#"{"result": "fail"}"#, OnError::Drop),
            Ok(Outcome::Drop)
        );
    }

    #[test]
    fn anything_else_is_garbage() {
        assert!(
            outcome(r#"{"result": "maybe"}"#, OnError::Halt)
                .unwrap_err()
                .contains("\"maybe\"")
        );
        assert!(outcome(r#"{"result": 1}"#, OnError::Halt).is_err());
        assert!(outcome(r#"{"exit_code": 1}"#, OnError::Halt).is_err());
        assert!(outcome(r#"{"result": "halt", "exit_code": "7"}"#, OnError::Halt).is_err());
        assert!(
            outcome(
                r#"{"result": "halt", "exit_code": 99999999999}"#,
                OnError::Halt
            )
            .is_err()
        );
        assert!(outcome("ok", OnError::Halt).is_err());
        assert!(outcome("", OnError::Halt).is_err());
    }

    #[test]
    fn commands_are_named_short() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            short_command(&argv(&["/usr/bin/python3", "/srv/w/worker.py", "-v"])),
            "python3 worker.py -v"
        );
        assert_eq!(
            short_command(&argv(&["w", &"x".repeat(100)]))
                .chars()
                .count(),
            61
        );
    }

    #[test]
    fn restarts_back_off_up_to_a_cap() {
        assert_eq!(restart_delay(0), RESTART_DELAY);
        assert_eq!(restart_delay(1), RESTART_DELAY);
        assert_eq!(restart_delay(2), RESTART_DELAY * 2);
        assert_eq!(restart_delay(4), RESTART_DELAY * 8);
        assert_eq!(restart_delay(60), RESTART_DELAY_MAX);
    }

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
