//! Running the `fm` binary: the [`Fm`] command builder, and [`FmProcess`] for one that runs
//! while the test watches its log.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// The `fm` binary cargo built for these tests.
pub fn fm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fm"))
}

/// A command line for `fm`, run in a temporary folder of its own:
/// `Fm::new().config_toml(&toml).arg("consume").spawn()`.
pub struct Fm {
    /// The program: the `fm` binary, or a peer run the same way ([`Fm::program`]).
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    config: Option<PathBuf>,
    stdin: Stdin,
    dir: tempfile::TempDir,
}

impl Default for Fm {
    fn default() -> Self {
        Self::new()
    }
}

impl Fm {
    /// `fm` with no arguments, `FEDORA_MESSAGING_CONF` removed from its environment (a test says
    /// which config it means) and `RUST_BACKTRACE=1`.
    pub fn new() -> Fm {
        Fm {
            program: fm_bin(),
            args: Vec::new(),
            envs: vec![
                ("FEDORA_MESSAGING_CONF".into(), None),
                ("RUST_BACKTRACE".into(), Some("1".into())),
            ],
            config: None,
            stdin: Stdin::Null,
            dir: tempfile::tempdir().expect("creating a temporary folder"),
        }
    }

    /// Runs `program` instead of fm, with the same folder, arguments and harness: for a peer
    /// that takes fm's command line (fedora-messaging's `fedora-messaging --conf F consume`).
    pub fn program(mut self, program: impl Into<PathBuf>) -> Fm {
        self.program = program.into();
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Fm {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Fm {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for fm.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Fm {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable for fm.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Fm {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Writes `toml` to `config.toml` in the run's folder and passes `--conf PATH` first.
    pub fn config_toml(mut self, toml: &str) -> Fm {
        let path = self.write_file("config.toml", toml);
        self.config = Some(path);
        self
    }

    /// The run's temporary folder (fm's working directory; removed when the run is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file into the run's folder and returns its path.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Bytes for fm's standard input (default: none, stdin is /dev/null).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Fm {
        self.stdin = Stdin::Bytes(bytes.into());
        self
    }

    /// Keeps fm's standard input open for the test to write to as it goes
    /// ([`FmProcess::write_stdin`], [`FmProcess::take_stdin`]).
    pub fn stdin_pipe(mut self) -> Fm {
        self.stdin = Stdin::Pipe;
        self
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        if let Some(config) = &self.config {
            cmd.arg("--conf").arg(config);
        }
        cmd.args(&self.args).current_dir(self.dir.path());
        for (key, value) in &self.envs {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.stdin(match self.stdin {
            Stdin::Null => Stdio::null(),
            Stdin::Bytes(_) | Stdin::Pipe => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        cmd
    }

    /// Starts fm; its output is collected as it comes (see [`FmProcess::stderr`]).
    pub fn spawn(self) -> FmProcess {
        let mut child = self.command().spawn().expect("starting the fm binary");
        let mut stdin = None;
        match &self.stdin {
            Stdin::Null => {}
            Stdin::Bytes(bytes) => {
                let bytes = bytes.clone();
                let mut pipe = child.stdin.take().expect("stdin is piped");
                tokio::spawn(async move {
                    let _ = pipe.write_all(&bytes).await;
                });
            }
            Stdin::Pipe => stdin = child.stdin.take(),
        }
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            tokio::spawn(collect(
                child.stdout.take().expect("stdout is piped"),
                Arc::clone(&stdout),
            )),
            tokio::spawn(collect(
                child.stderr.take().expect("stderr is piped"),
                Arc::clone(&stderr),
            )),
        ];
        FmProcess {
            pid: child.id().expect("fm is running"),
            child,
            stdin,
            stdout,
            stderr,
            readers,
            run: self,
        }
    }

    /// Runs fm to the end (at most [`TIMEOUT`]) and returns its status and output.
    pub async fn run(self) -> FmOutput {
        self.spawn().wait().await
    }
}

async fn collect(mut pipe: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        into.lock()
            .expect("output buffer")
            .extend_from_slice(&buf[..n]);
    }
}

/// What fm's standard input is.
enum Stdin {
    /// `/dev/null`.
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// A pipe the test writes to.
    Pipe,
}

/// A running fm. Killed (SIGKILL) if dropped while still running.
pub struct FmProcess {
    child: tokio::process::Child,
    pid: u32,
    /// fm's standard input, with [`Fm::stdin_pipe`].
    stdin: Option<tokio::process::ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Keeps the run's folder (config, files) alive as long as the process.
    run: Fm,
}

/// How an fm run ended.
#[derive(Debug)]
pub struct FmOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl FmOutput {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing both streams, unless fm exited with `code`.
    pub fn assert_code(&self, code: i32) -> &FmOutput {
        assert_eq!(
            self.status.code(),
            Some(code),
            "fm exited with {} instead of code {code}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

impl FmProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The run's folder (see [`Fm::dir`]).
    pub fn dir(&self) -> &Path {
        self.run.dir()
    }

    /// Sends a signal by name: `"TERM"`, `"INT"`, `"KILL"`, `"HUP"`...
    pub fn kill(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Writes `text` to fm's standard input (see [`Fm::stdin_pipe`]).
    pub async fn write_stdin(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open (Fm::stdin_pipe)");
        stdin
            .write_all(text.as_bytes())
            .await
            .expect("writing to fm");
        stdin.flush().await.expect("writing to fm");
    }

    /// Takes fm's standard input, for a task of the test's to write to.
    pub fn take_stdin(&mut self) -> tokio::process::ChildStdin {
        self.stdin.take().expect("stdin is open (Fm::stdin_pipe)")
    }

    /// Closes fm's standard input: the end of its input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Everything fm wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("output buffer")).into_owned()
    }

    /// Everything fm wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("output buffer")).into_owned()
    }

    /// Waits until stderr contains `needle` (fm logs to stderr); panics after [`TIMEOUT`] or when
    /// fm exits first, showing what it wrote.
    pub async fn wait_for_stderr(&mut self, needle: &str) {
        self.wait_for_count(needle, 1, true).await
    }

    /// Waits until stdout contains `needle`; like [`FmProcess::wait_for_stderr`].
    pub async fn wait_for_stdout(&mut self, needle: &str) {
        self.wait_for_count(needle, 1, false).await
    }

    /// Waits until stderr contains `needle` at least `count` times (the n-th reconnection...).
    pub async fn wait_for_stderr_count(&mut self, needle: &str, count: usize) {
        self.wait_for_count(needle, count, true).await
    }

    /// Where fm's monitoring listens, read from its log line (`[monitoring] port = 0` picks a free
    /// port).
    pub async fn monitor_addr(&mut self) -> std::net::SocketAddr {
        let listening = ::fm::monitor::LISTENING;
        self.wait_for_stderr(listening).await;
        let log = self.stderr();
        let rest = &log[log.find(listening).expect("the line is there") + listening.len()..];
        rest[..rest.find('/').expect("the address ends with /")]
            .parse()
            .expect("a socket address in the monitoring log line")
    }

    /// Waits until fm registered its consumers: from then on a published message reaches it.
    pub async fn wait_consuming(&mut self) {
        self.wait_for_stderr(CONSUMING).await
    }

    async fn wait_for_count(&mut self, needle: &str, count: usize, stderr: bool) {
        let seen = |p: &FmProcess| {
            let text = if stderr { p.stderr() } else { p.stdout() };
            text.matches(needle).count() >= count
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if seen(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // fm is gone: once its pipes are drained, the text is final.
                self.drain_pipes().await;
                assert!(
                    seen(self),
                    "fm exited ({status}) before printing {needle:?} {count} time(s)\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fm did not print {needle:?} {count} time(s) within {TIMEOUT:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads fm's output to its end (the pipes close when fm exits, unless a child of fm still
    /// holds them: so at most 5 s).
    async fn drain_pipes(&mut self) {
        for reader in std::mem::take(&mut self.readers) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }

    /// Waits up to `timeout` for fm to exit; `None` if it is still running.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Some(status.expect("waiting for fm")),
            Err(_) => None,
        }
    }

    /// Waits (at most [`TIMEOUT`]) for fm to exit and returns everything it wrote. Panics, with
    /// the output so far, if it does not exit.
    pub async fn wait(self) -> FmOutput {
        self.wait_within(TIMEOUT).await
    }

    /// [`FmProcess::wait`] with a limit of the test's.
    pub async fn wait_within(mut self, limit: Duration) -> FmOutput {
        let Some(status) = self.wait_timeout(limit).await else {
            let (out, err) = (self.stdout(), self.stderr());
            let _ = self.child.start_kill();
            panic!("fm did not exit within {limit:?}\n--- stdout:\n{out}\n--- stderr:\n{err}");
        };
        self.drain_pipes().await;
        FmOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}
