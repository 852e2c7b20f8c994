//! Per-message commands: `[callback] command = ["/path/prog", "arg"]` with `mode = "exec"`.
//!
//! The answer to fedora-messaging's issue #155 ("a trigger tool", like the old `fedmsg-trigger`):
//! for every message fm runs the program, hands it the message, and reads its verdict from the
//! exit status. The contract (documented in `fm-callbacks(7)`):
//!
//! - The program is started directly, never through a shell, so nothing in a message (topic,
//!   body, headers) can be interpreted as shell syntax. It runs in a process group of its own,
//!   so that a timeout kills whatever it started too.
//! - Its stdin gets the message as one line of record-format JSON (what `fm record` writes),
//!   then end-of-file. A program that never reads stdin is fine: fm ignores the broken pipe.
//! - Its environment is fm's plus `FM_TOPIC`, `FM_MESSAGE_ID` (empty when the message has no
//!   id), `FM_QUEUE`, `FM_EXCHANGE`, `FM_SEVERITY` (10/20/30/40), `FM_PRIORITY` (0 when unset),
//!   `FM_REDELIVERED` (`true`/`false`) and `FM_CONSUMER_CONFIG` (the `[consumer_config]` table
//!   as JSON).
//! - Exit status 0 acks, 65 (`EX_DATAERR`) drops, 75 (`EX_TEMPFAIL`) requeues. Any other status,
//!   death by a signal, a program that cannot be started, or one still running after
//!   `[callback] timeout` seconds (its whole process group is then killed with SIGKILL) is a
//!   failure, handled as `[callback] on_error` says: `halt` (the default, fedora-messaging's
//!   failure path: requeue, exit 13), `requeue` or `drop`.
//! - Its stdout and stderr go to fm's log, line by line, tagged with the message id. With
//!   `[callback] reply = "stdout"`, the stdout of a program run for a request (a message with
//!   `reply_to`) is captured instead, up to [`MAX_REPLY`] bytes, and on exit status 0 sent as
//!   the reply (issue 13); more than that is a failure.
//! - A message whose body is not a JSON object, handed over under `[callback] body = "bytes"`,
//!   reaches stdin as the bytes it is (no record line, no newline), and `FM_RAW_BODY` is
//!   `true` (`false` otherwise).
//!
//! Every child is waited for, so none is left a zombie. The helpers shared with the long-lived
//! workers ([`super::worker`]) live here too: finding the program at start, reading output
//! line by line with a bound, killing a process group, and mapping a failure onto `on_error`.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{ChildStderr, ChildStdout, Command};

use super::Outcome;
use crate::config::{Config, ExecStdout, OnError};
use crate::error::{Exit, code};
use crate::message::Received;

/// `EX_DATAERR` from `sysexits.h`: the message is bad, drop it.
pub const EX_DATAERR: i32 = 65;
/// `EX_TEMPFAIL` from `sysexits.h`: try again later, requeue it.
pub const EX_TEMPFAIL: i32 = 75;

/// Longest line of child output logged as one line; longer ones are logged in pieces, so a
/// program writing megabytes without a newline cannot make fm buffer without bound.
pub(crate) const MAX_LOG_LINE: usize = 16 * 1024;
/// The largest reply a command may write to stdout under `reply = "stdout"` (1 MiB): a reply
/// is one AMQP message held in memory, not a stream.
pub const MAX_REPLY: usize = 1024 * 1024;
/// How long fm waits, after the program exited, for the rest of its output. Output held open
/// by a background process it left behind is still logged, just after the outcome.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// A per-message command, ready to run.
pub struct Exec {
    argv: Vec<String>,
    /// The program's file name, for log lines and errors.
    name: String,
    timeout: Option<Duration>,
    on_error: OnError,
    consumer_config: String,
    stdout: ExecStdout,
}

impl Exec {
    /// Check that the program can be run (exit 1 at start if not) and keep what each run needs.
    pub fn new(config: &Config, argv: &[String]) -> anyhow::Result<Exec> {
        let program = argv.first().map(String::as_str).unwrap_or_default();
        find_program(program).map_err(|e| {
            Exit::new(
                code::FAILURE,
                anyhow::anyhow!("[callback] command: cannot run '{program}': {e}"),
            )
        })?;
        Ok(Exec {
            argv: argv.to_vec(),
            name: program_name(program),
            timeout: config.callback.timeout,
            on_error: config.callback.on_error,
            consumer_config: config.consumer_config_json(),
            stdout: config.callback.stdout,
        })
    }

    /// A short description for log lines.
    pub fn describe(&self) -> String {
        format!("exec:{}", self.argv.join(" "))
    }

    /// Run the program for one message and turn its exit status into an outcome.
    pub async fn handle(&self, msg: &Received) -> Outcome {
        let id = msg.id_for_log();
        let m = &msg.message;
        // An environment variable cannot hold a NUL byte, which AMQP allows in a routing key or
        // message id: the message's fault, not the command's (issue 17).
        let nul = [
            ("topic", m.topic.as_str()),
            ("id", m.id.as_deref().unwrap_or("")),
        ]
        .into_iter()
        .find(|(_, value)| value.contains('\0'));
        if let Some((what, _)) = nul {
            tracing::warn!(
                "message {id}: its {what} contains a NUL byte, which FM_{} cannot carry to a \
                 command; dropping it (dead-lettered if its queue has a dead-letter exchange)",
                if what == "id" { "MESSAGE_ID" } else { "TOPIC" }
            );
            return Outcome::Drop;
        }
        // The message goes in through a pipe fm fills before the program starts (see
        // `stdin_pipe`): what fits in the pipe's buffer needs no task and no epoll registration.
        let input = if msg.raw {
            msg.raw_body.clone()
        } else {
            let mut line = Vec::with_capacity(msg.record.len() + 1);
            line.extend_from_slice(msg.record.as_bytes());
            line.push(b'\n');
            line
        };
        let (stdin, rest) = match stdin_pipe(&input) {
            Ok(pipe) => pipe,
            Err(e) => return self.cannot_start(id, e).await,
        };
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env("FM_TOPIC", &m.topic)
            .env("FM_MESSAGE_ID", m.id.as_deref().unwrap_or_default())
            .env("FM_QUEUE", m.queue.as_deref().unwrap_or_default())
            .env("FM_EXCHANGE", &msg.exchange)
            .env("FM_SEVERITY", m.severity().to_string())
            .env("FM_PRIORITY", m.priority.unwrap_or(0).to_string())
            .env(
                "FM_REDELIVERED",
                if msg.redelivered { "true" } else { "false" },
            )
            .env("FM_CONSUMER_CONFIG", &self.consumer_config)
            .env("FM_RAW_BODY", if msg.raw { "true" } else { "false" })
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let spawned = cmd.spawn();
        // The command holds fm's copy of the stdin pipe's read end: closed now, so that a
        // program that exits without reading makes the writer's next write fail at once.
        drop(cmd);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return self.cannot_start(id, e).await,
        };
        let pid = child.id();
        // If this future is dropped before the program ends (fm abandoning in-flight messages
        // at shutdown_timeout), its whole group goes, not just the program.
        let mut guard = GroupGuard(pid);

        // What did not fit in the pipe goes in from a task of its own: a program may write a
        // lot before it reads (or never read at all), and the pipes must keep draining
        // meanwhile.
        let writer = rest.map(|(pipe, written)| {
            tokio::spawn(async move {
                let mut pipe = match tokio::net::unix::pipe::Sender::from_owned_fd(pipe) {
                    Ok(pipe) => pipe,
                    Err(e) => return tracing::debug!("writing the message to the command: {e}"),
                };
                match pipe.write_all(&input[written..]).await {
                    // The program exited or closed stdin without reading it all: its choice.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                    Err(e) => tracing::debug!("writing the message to the command: {e}"),
                    Ok(()) => {}
                }
                // Dropping the pipe closes it: the program sees end-of-file.
            })
        });
        // A request's stdout is its reply when `reply = "stdout"`: read whole, not logged.
        let capture = self.stdout == ExecStdout::Reply && msg.reply_to.is_some();
        let reply = if capture {
            child
                .stdout
                .take()
                .map(|stdout| tokio::spawn(read_reply(stdout)))
        } else {
            None
        };
        // stdout (unless taken as the reply) and stderr are read here, in this task, both at
        // once while the program runs: no task per stream.
        let output = forward_output(
            child.stdout.take(),
            child.stderr.take(),
            Arc::from(self.name.as_str()),
            Arc::from(id),
        );
        let mut output = Box::pin(output);
        let mut output_done = false;
        let wait = async {
            match self.timeout {
                None => Ok(child.wait().await),
                Some(limit) => tokio::time::timeout(limit, child.wait()).await,
            }
        };
        let waited = {
            let mut wait = std::pin::pin!(wait);
            loop {
                tokio::select! {
                    waited = &mut wait => break waited,
                    () = &mut output, if !output_done => output_done = true,
                }
            }
        };
        let abort_writer = || {
            if let Some(writer) = &writer {
                writer.abort();
            }
        };
        let status = match waited {
            Ok(status) => status,
            Err(_) => {
                // Kill the group first (its leader is not reaped yet, so its id is still
                // ours), then reap the leader.
                kill_group(pid);
                let _ = child.start_kill();
                let _ = child.wait().await;
                guard.0 = None;
                abort_writer();
                finish_output(output, output_done).await;
                return on_failure(
                    self.on_error,
                    id,
                    format!(
                        "'{}' did not finish within the {:.1} s timeout and was killed",
                        self.name,
                        self.timeout.unwrap_or_default().as_secs_f64()
                    ),
                );
            }
        };
        // Reaped: its id is no longer ours to kill.
        guard.0 = None;
        // A background process may still hold stdin open and not read: stop trying.
        abort_writer();
        finish_output(output, output_done).await;

        let reply = match reply {
            None => None,
            Some(task) => match tokio::time::timeout(OUTPUT_GRACE, task).await {
                Ok(Ok(Ok(bytes))) => Some(Ok(bytes)),
                Ok(Ok(Err(why))) => Some(Err(why)),
                Ok(Err(join)) => Some(Err(format!("reading its stdout failed: {join}"))),
                Err(_) => Some(Err(format!(
                    "its stdout was still open {:.0} s after it exited (a process it left \
                     behind holds it)",
                    OUTPUT_GRACE.as_secs_f64()
                ))),
            },
        };
        match status {
            Err(e) => on_failure(
                self.on_error,
                id,
                format!("waiting for '{}' failed: {e}", self.name),
            ),
            Ok(status) => match status.code() {
                Some(0) => match reply {
                    None => Outcome::Ack,
                    Some(Ok(bytes)) => Outcome::Reply(bytes),
                    Some(Err(why)) => on_failure(
                        self.on_error,
                        id,
                        format!("'{}' exited with status 0, but {why}", self.name),
                    ),
                },
                Some(EX_DATAERR) => Outcome::Drop,
                Some(EX_TEMPFAIL) => Outcome::Nack,
                _ => on_failure(
                    self.on_error,
                    id,
                    format!("'{}' {}", self.name, describe_status(status)),
                ),
            },
        }
    }
}

/// Read a command's stdout as its reply: all of it, up to [`MAX_REPLY`] bytes. What is written
/// past the bound is read and thrown away (the program must not block on a full pipe), and the
/// reply refused.
async fn read_reply(stdout: impl AsyncRead + Unpin) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt as _;
    let mut reply = Vec::new();
    let mut limited = stdout.take(MAX_REPLY as u64 + 1);
    limited
        .read_to_end(&mut reply)
        .await
        .map_err(|e| format!("reading its stdout failed: {e}"))?;
    if reply.len() > MAX_REPLY {
        let _ = tokio::io::copy(&mut limited.into_inner(), &mut tokio::io::sink()).await;
        return Err(format!(
            "it wrote more than {MAX_REPLY} bytes to stdout, the most a reply may be"
        ));
    }
    Ok(reply)
}

impl Exec {
    /// The program could not be started for message `id` (making its stdin pipe or spawning it
    /// failed with `e`).
    async fn cannot_start(&self, id: &str, e: io::Error) -> Outcome {
        if out_of_resources(&e) {
            // Not the command's fault nor the message's: fm is out of file descriptors or
            // processes (issue 17: idle monitoring connections once exhausted them). Back
            // off, and let the message come again.
            tracing::warn!(
                "cannot start '{}' for message {id}: {e}; returning the message to the \
                 queue and pausing {} s",
                self.argv[0],
                RESOURCE_PAUSE.as_secs()
            );
            tokio::time::sleep(RESOURCE_PAUSE).await;
            return Outcome::Nack;
        }
        on_failure(
            self.on_error,
            id,
            format!("cannot start '{}': {e}", self.argv[0]),
        )
    }
}

/// Kills a process group when dropped, unless disarmed (`.0 = None`) once its leader is reaped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0.is_some() {
            kill_group(self.0);
        }
    }
}

/// The program's stdin: a pipe already holding as much of `input` as its buffer takes (64 KiB
/// by default on Linux, all of a usual message), with its write end closed when all of it
/// went in. Otherwise the write end comes back, non-blocking, with the number of bytes
/// written, for a task to write the rest while the program runs.
fn stdin_pipe(input: &[u8]) -> io::Result<(std::io::PipeReader, Option<(OwnedFd, usize)>)> {
    let (reader, mut writer) = std::io::pipe()?;
    rustix::io::ioctl_fionbio(&writer, true)?;
    let mut written = 0;
    while written < input.len() {
        match writer.write(&input[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok((reader, Some((OwnedFd::from(writer), written))));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((reader, None))
}

/// Log the program's stdout and stderr line by line, tagged with the message id, until both
/// are closed: one future for both streams, polled by the task that runs the program.
async fn forward_output(
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    name: Arc<str>,
    id: Arc<str>,
) {
    let log = |stream: &'static str| {
        let (name, id) = (Arc::clone(&name), Arc::clone(&id));
        move |line: &str| {
            tracing::info!(target: "fm::callback", message_id = %id, "{name} {stream}: {line}");
        }
    };
    let stdout = async {
        if let Some(pipe) = stdout {
            forward_lines(pipe, log("stdout")).await;
        }
    };
    let stderr = async {
        if let Some(pipe) = stderr {
            forward_lines(pipe, log("stderr")).await;
        }
    };
    tokio::join!(stdout, stderr);
}

/// After the program ended: wait up to [`OUTPUT_GRACE`] for the rest of its output; output held
/// open longer (by a background process it left behind) is still logged, from a task of its
/// own, just after the outcome.
async fn finish_output(
    mut output: Pin<Box<impl Future<Output = ()> + Send + 'static>>,
    done: bool,
) {
    if done {
        return;
    }
    if tokio::time::timeout(OUTPUT_GRACE, &mut output)
        .await
        .is_err()
    {
        tokio::spawn(output);
    }
}

/// What an unexpected failure of the callback does, as `[callback] on_error` says.
/// How long exec mode waits after fm ran out of file descriptors or processes.
const RESOURCE_PAUSE: Duration = Duration::from_secs(1);

/// Whether starting a process failed for want of file descriptors or processes (a condition of
/// fm's, which passes), rather than because of the program.
fn out_of_resources(e: &io::Error) -> bool {
    use rustix::io::Errno;
    e.raw_os_error().is_some_and(|raw| {
        [Errno::MFILE, Errno::NFILE, Errno::AGAIN, Errno::NOMEM]
            .iter()
            .any(|errno| errno.raw_os_error() == raw)
    })
}

pub(crate) fn on_failure(on_error: OnError, id: &str, reason: String) -> Outcome {
    match on_error {
        OnError::Halt => Outcome::Fail(reason),
        OnError::Requeue => {
            tracing::warn!(
                "{reason}; returning message {id} to the queue ([callback] on_error = \"requeue\")"
            );
            Outcome::Nack
        }
        OnError::Drop => {
            tracing::warn!("{reason}; dropping message {id} ([callback] on_error = \"drop\")");
            Outcome::Drop
        }
    }
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
pub(crate) fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => format!(
            "was killed by signal {sig} ({}){}",
            signal_name(sig),
            if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        ),
        None => format!("ended ({status})"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => "?",
    }
}

/// SIGKILL the process group led by `pid` (children are started as group leaders), so that a
/// killed program's own children go too.
pub(crate) fn kill_group(pid: Option<u32>) {
    let pid = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid
        && let Err(e) = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!("cannot kill process group {}: {e}", pid.as_raw_nonzero());
    }
}

/// The last file-name component of a program, for log lines.
pub(crate) fn program_name(program: &str) -> String {
    Path::new(program)
        .file_name()
        .map_or_else(|| program.to_owned(), |n| n.to_string_lossy().into_owned())
}

/// Find `program` the way `execvp` will: a name with a `/` is a path (relative to the working
/// directory), any other is looked up in `$PATH`. The error says what is wrong.
pub(crate) fn find_program(program: &str) -> Result<PathBuf, String> {
    fn check(path: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => "no such file".to_owned(),
            _ => e.to_string(),
        })?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err("not executable (chmod +x it)".into());
        }
        Ok(())
    }
    if program.is_empty() {
        return Err("the program is empty".into());
    }
    if program.contains('/') {
        let path = PathBuf::from(program);
        return check(&path).map(|()| path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut refusals = Vec::new();
    for dir in std::env::split_paths(&path) {
        let candidate = if dir.as_os_str().is_empty() {
            PathBuf::from(program)
        } else {
            dir.join(program)
        };
        match check(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e == "no such file" => {}
            Err(e) => refusals.push(format!("{}: {e}", candidate.display())),
        }
    }
    if refusals.is_empty() {
        Err(format!(
            "not found in PATH ({}); give its full path",
            path.to_string_lossy()
        ))
    } else {
        Err(refusals.join("; "))
    }
}

/// Read one line (up to and including `\n`) into `out`, at most `cap` bytes: a longer line
/// comes back in pieces. Returns the number of bytes read, 0 at end of file.
pub(crate) async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    cap: usize,
) -> io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(total);
        }
        let room = cap.saturating_sub(out.len()).max(1);
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ => {
                let take = buf.len().min(room);
                (take, take == room)
            }
        };
        out.extend_from_slice(&buf[..take]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

/// Hand every line of `reader` (newline and trailing `\r` removed, invalid UTF-8 replaced) to
/// `emit`, until end of file or a read error.
pub(crate) async fn forward_lines<R, F>(reader: R, mut emit: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(&str),
{
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_capped(&mut reader, &mut line, MAX_LOG_LINE).await {
            Ok(0) => return,
            Ok(_) => emit(trim_eol(&String::from_utf8_lossy(&line))),
            Err(e) => {
                tracing::debug!("reading the output of a callback process: {e}");
                return;
            }
        }
    }
}

/// `line` without its `\n` or `\r\n`.
pub(crate) fn trim_eol(line: &str) -> &str {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_suffix('\r').unwrap_or(line)
}

/// The last lines a process wrote to stderr, kept to explain why it failed to start.
#[derive(Clone, Default)]
pub(crate) struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    const LINES: usize = 20;

    pub(crate) fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == Self::LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }

    pub(crate) fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_come_in_pieces_and_short_ones_whole() {
        let data = b"abc\ndefghij\n\nxy".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut got = Vec::new();
        loop {
            let mut line = Vec::new();
            if read_line_capped(&mut r, &mut line, 5).await.unwrap() == 0 {
                break;
            }
            got.push(String::from_utf8(line).unwrap());
        }
        assert_eq!(got, ["abc\n", "defgh", "ij\n", "\n", "xy"]);
    }

    #[test]
    fn statuses_are_described_with_signal_names() {
        assert_eq!(
            describe_status(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn programs_are_found_like_execvp_finds_them() {
        assert_eq!(find_program("sh").unwrap().file_name().unwrap(), "sh");
        assert_eq!(find_program("/bin/sh").unwrap(), PathBuf::from("/bin/sh"));
        assert!(
            find_program("/nonexistent/prog")
                .unwrap_err()
                .contains("no such file")
        );
        assert!(
            find_program("fm-no-such-program-anywhere")
                .unwrap_err()
                .contains("not found in PATH")
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let script = script.to_str().unwrap();
        assert!(find_program(script).unwrap_err().contains("not executable"));
        std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_program(script).unwrap(), PathBuf::from(script));
        assert!(
            find_program(dir.path().to_str().unwrap())
                .unwrap_err()
                .contains("not a regular file")
        );
    }

    #[test]
    fn failures_follow_on_error() {
        assert_eq!(
            on_failure(OnError::Halt, "id", "boom".into()),
            Outcome::Fail("boom".into())
        );
        assert_eq!(
            on_failure(OnError::Requeue, "id", "boom".into()),
            Outcome::Nack
        );
        assert_eq!(
            on_failure(OnError::Drop, "id", "boom".into()),
            Outcome::Drop
        );
    }
}
