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
//!   reason of a halt or a failure); an `ack` may carry the reply to a request, `"reply"` (a
//!   JSON value) or `"reply_text"` (text sent as it is), see `answer.rs`;
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
//!
//! The rooms: this file is the pool (slots, restarts, giving up), `process.rs` one worker
//! process and its pipes, `answer.rs` the answer line.

mod answer;
mod process;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Outcome;
use super::exec::{describe_status, find_program, on_failure, program_name};
use crate::config::{CallbackConfig, OnError};
use crate::error::{Exit, code};
use crate::message::Received;
use crate::shutdown::Shutdown;
use process::Worker;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
