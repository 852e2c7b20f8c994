//! `fm publish`: put messages on the bus — one described on the command line, or a file of
//! record-format lines as `fedora-messaging publish` reads them — wire-compatible with
//! fedora-messaging (see [`crate::message`]).
//!
//! fedora-messaging publishes one message, waits for its confirm, then reads the next line: a
//! round trip per message. fm pipelines instead: up to [`WINDOW`] messages are in flight on one
//! channel in confirm mode, and confirms are matched as they come, so a large file takes
//! seconds. What must not change is the guarantee. A message counts as published only once
//! the broker confirmed it (`basic.ack`) and did not return it (every message is sent
//! `mandatory`, so one that no queue receives comes back). Every other message is reported
//! by id and, with `--failed FILE`, written out in the record format, ready to publish again:
//! nothing is silently lost (the "persist messages that failed to send" wish of PDC's
//! messaging design).
//!
//! What happens to a message, and the exit status it leads to (fedora-messaging's, from its
//! `cli.py`: `EREMOTEIO` and `ECONNREFUSED`):
//!
//! | what happened | exit | publishing |
//! |---|---|---|
//! | confirmed and not returned | 0 | goes on |
//! | an invalid line (not JSON, not a message, bad header…) | 2 | stops, unless `--keep-going` |
//! | returned as unroutable, or nacked | 121 | stops, unless `--keep-going` |
//! | the broker closed the channel (403 refused, 404 no such exchange…) | 121 | stops |
//! | not confirmed within `--timeout` | 111 | stops |
//! | no connection within `--timeout` (at start, or after a loss) | 111 | stops |
//! | the broker refused the login | 1 | stops |
//! | reading the input failed, or SIGINT/SIGTERM | 1 | stops |
//!
//! With pipelining "the first failure" is fuzzy, so when several kinds happened the exit
//! status is the first that applies of 121, 111, 1, 2.
//!
//! A lost connection is re-established (within `--timeout`) and the unconfirmed messages are
//! sent again with the same ids, as fedora-messaging's publish retries on a new connection;
//! a consumer may then see a message twice (at-least-once), never zero times.
//!
//! When fm stops early it still waits for the confirms of what is in flight. With
//! `--failed`, it then reads the rest of the input so that the file holds every message that
//! was not published, in input order; without it, it says at which line it stopped.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, ErrorKind, PublisherConfirm};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::amqp::{Connected, Connector, errors};
use crate::cli::PublishArgs;
use crate::config::Config;
use crate::error::{Exit, code};
use crate::limits;
use crate::message::{self, Message};
use crate::shutdown::{self, Shutdown};

/// The most messages in flight (sent, not yet confirmed) at once. Large enough to keep the
/// broker busy over a slow link, small enough to bound memory and what a lost connection
/// leaves to resend.
pub const WINDOW: usize = 1000;

/// The progress bar appears only when publishing takes longer than this, so a short file
/// leaves no trace on the terminal.
const SHOW_PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// The longest fm waits for the broker to acknowledge closing the channel or connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many message ids an error lists before saying "and N more".
const IDS_SHOWN: usize = 20;

/// Build the one message `--topic` describes, as fedora-messaging's `Message(...)` would.
async fn adhoc_message(config: &Config, args: &PublishArgs) -> anyhow::Result<Message> {
    let usage = |e: anyhow::Error| Exit::new(code::USAGE, e);
    let topic = args.topic.clone().unwrap_or_default();
    if topic.is_empty() {
        return Err(usage(anyhow!("--topic must not be empty")));
    }
    let body_text = match &args.body {
        Some(b) => b.clone(),
        None if std::io::stdin().is_terminal() => {
            return Err(usage(anyhow!(
                "no body: pass --body '{{\"key\": \"value\"}}' or pipe the JSON body on \
                 standard input"
            )));
        }
        None => {
            let mut text = String::new();
            tokio::io::stdin()
                .read_to_string(&mut text)
                .await
                .context("reading the body from standard input")
                .map_err(usage)?;
            text
        }
    };
    let body = crate::json::parse(&body_text)
        .map_err(|e| usage(anyhow!("the body is not valid JSON: {e}")))?;
    if !body.is_object() {
        return Err(usage(anyhow!(
            "the body must be a JSON object ({{...}}), not {}",
            body.type_name()
        )));
    }
    let mut headers = Map::new();
    for h in &args.headers {
        let (name, value) = parse_header(h).map_err(|e| usage(anyhow!("--header {h}: {e}")))?;
        headers.insert(name, value);
    }
    let severity = match &args.severity {
        Some(s) => parse_severity(s).map_err(|e| usage(anyhow!("--severity {s}: {e}")))?,
        None => message::INFO,
    };
    let schema = args.schema.as_deref().unwrap_or(message::BASE_SCHEMA);
    let priority = args.priority.or(config.publish_priority).map(i64::from);
    let msg = Message::new_outgoing(topic, body, headers, schema, severity, priority);
    msg.validate().map_err(|e| usage(anyhow!("{e}")))?;
    Ok(msg)
}

/// `NAME=TEXT` (a string header) or `NAME:=JSON` (any JSON value: a number, a boolean…).
pub fn parse_header(arg: &str) -> Result<(String, Value), String> {
    let (name, value) = arg
        .split_once('=')
        .ok_or("expected NAME=VALUE (or NAME:=JSON)")?;
    let (name, value) = match name.strip_suffix(':') {
        Some(name) => (
            name,
            serde_json::from_str(value).map_err(|e| format!("the value is not JSON: {e}"))?,
        ),
        None => (name, Value::from(value)),
    };
    if name.is_empty() {
        return Err("the header name is empty".into());
    }
    Ok((name.to_owned(), value))
}

/// A severity name (fedora-messaging's constants, any case) or its number.
pub fn parse_severity(s: &str) -> Result<i64, String> {
    let level = match s.to_ascii_lowercase().as_str() {
        "debug" => message::DEBUG,
        "info" => message::INFO,
        "warning" | "warn" => message::WARNING,
        "error" => message::ERROR,
        other => other.parse().map_err(|_| String::new()).unwrap_or(-1),
    };
    if message::SEVERITIES.contains(&level) {
        Ok(level)
    } else {
        Err("use debug, info, warning, error, or 10, 20, 30, 40".into())
    }
}

/// Parse one line of a record file into a message ready to publish, as fedora-messaging's
/// `loads` + `load_message` do: only `topic` and `body` are required; `id`, `headers` (with
/// `sent-at`), `queue` and `priority` are kept; the missing headers are filled in.
///
/// Lines are split on `\n` only (a trailing `\r` is dropped). fedora-messaging splits each
/// line again with Python's `splitlines()`, which also breaks on U+2028 and other separators
/// that its own `record` writes unescaped inside strings; fm reads such lines whole.
pub fn parse_line(raw: &[u8]) -> Result<Message, String> {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = std::str::from_utf8(raw)
        .map_err(|e| format!("the line is not UTF-8 (byte {})", e.valid_up_to() + 1))?;
    if text.trim().is_empty() {
        return Err(
            "the line is empty: every line must hold one JSON object (remove blank lines)".into(),
        );
    }
    let record = crate::json::parse(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let mut msg = Message::from_record(record)?;
    msg.prepare_for_publish();
    Ok(msg)
}

/// One message ready to go out, encoded once.
struct Outgoing {
    /// Its position among the messages read (1-based): orders the `--failed` file.
    seq: u64,
    /// Its input line (0: the command line).
    line: usize,
    /// The message, for the record line written to `--failed`.
    message: Message,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    /// Sent at least once (on a connection that may since have been lost).
    sent: bool,
}

impl Outgoing {
    fn new(
        seq: u64,
        line: usize,
        message: Message,
        topic_prefix: &str,
    ) -> Result<Outgoing, String> {
        let key = message.routing_key(topic_prefix);
        let routing_key = ShortString::try_new(key.as_str())
            .map_err(|_| format!("the routing key is longer than 255 bytes: {key:.40}…"))?;
        let properties = message.amqp_properties()?;
        Ok(Outgoing {
            seq,
            line,
            body: message.encoded_body(),
            routing_key,
            properties,
            message,
            sent: false,
        })
    }

    fn id(&self) -> &str {
        self.message.id.as_deref().unwrap_or("<none>")
    }

    /// "message ID (line N)", for errors.
    fn describe(&self) -> String {
        if self.line == 0 {
            format!("message {}", self.id())
        } else {
            format!("message {} (line {})", self.id(), self.line)
        }
    }
}

/// A message sent and waiting for its confirm.
struct InFlight {
    out: Outgoing,
    confirm: PublisherConfirm,
    deadline: Instant,
}

/// Why a message was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Returned, nacked, or its channel closed by the broker.
    Refused,
    /// Sent, but not confirmed: no confirm in time, or the connection lost.
    Unconfirmed,
    /// Never sent, because publishing stopped first.
    NotSent,
}

/// Why publishing stopped early.
struct Stop {
    code: u8,
    reason: String,
    /// Stopped by a signal: the rest of the input is not read, even for `--failed`.
    interrupted: bool,
}

/// What the input yields, in order.
enum Item {
    Message {
        line: usize,
        message: Box<Message>,
    },
    Invalid {
        line: usize,
        reason: String,
    },
    /// Reading failed (exit 1); nothing follows.
    Error(anyhow::Error),
}

/// An item and how far into the input it was (bytes, for the progress bar).
struct Read {
    item: Item,
    bytes: u64,
}

/// Where the messages come from, before reading starts.
enum Source {
    /// The one message from the command line.
    One(Message),
    /// A record file, or standard input.
    Lines {
        reader: Pin<Box<dyn AsyncBufRead + Send>>,
        /// A regular file's size, for the progress bar.
        size: Option<u64>,
    },
}

impl Source {
    /// Open FILE, or standard input for `-`. A file that cannot be opened is a usage error
    /// (exit 2), as with fedora-messaging's `click.File`.
    ///
    /// FILE may be as large as it likes (it is streamed), but it must be a regular file or a
    /// pipe (`fm publish <(producer)`), which end: a directory, a device (`/dev/zero` would be
    /// read forever) or a socket is refused with what it is.
    async fn open(path: &Path) -> anyhow::Result<Source> {
        if path.as_os_str() == "-" {
            return Ok(Source::Lines {
                reader: Box::pin(tokio::io::BufReader::new(tokio::io::stdin())),
                size: None,
            });
        }
        if let Ok(meta) = tokio::fs::metadata(path).await {
            use std::os::unix::fs::FileTypeExt as _;
            let file_type = meta.file_type();
            if !file_type.is_file() && !file_type.is_fifo() {
                return Err(Exit::new(
                    code::USAGE,
                    anyhow!(
                        "cannot publish {}: it is {}, not a file of messages (give a regular \
                         file, a pipe, or - for standard input)",
                        path.display(),
                        limits::kind(&file_type)
                    ),
                ));
            }
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Exit::new(code::USAGE, anyhow!("cannot open {}: {e}", path.display())))?;
        let size = file
            .metadata()
            .await
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        Ok(Source::Lines {
            reader: Box::pin(tokio::io::BufReader::with_capacity(1 << 16, file)),
            size,
        })
    }

    /// Read and parse in a task of its own, ahead of the publisher, so that waiting for a
    /// slow producer on standard input never delays settling confirms, and parsing runs in
    /// parallel with publishing. The channel bounds how far it reads ahead.
    fn spawn_reader(self, name: String) -> mpsc::Receiver<Read> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut reader = match self {
                Source::One(message) => {
                    let item = Item::Message {
                        line: 0,
                        message: Box::new(message),
                    };
                    let _ = tx.send(Read { item, bytes: 0 }).await;
                    return;
                }
                Source::Lines { reader, .. } => reader,
            };
            let mut buf = Vec::new();
            let (mut line, mut bytes) = (0usize, 0u64);
            loop {
                buf.clear();
                let item = match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        line += 1;
                        bytes += n as u64;
                        match parse_line(&buf) {
                            Ok(message) => Item::Message {
                                line,
                                message: Box::new(message),
                            },
                            Err(reason) => Item::Invalid { line, reason },
                        }
                    }
                    Err(e) => Item::Error(anyhow!("reading {name} after line {line}: {e}")),
                };
                let last = matches!(item, Item::Error(_));
                if tx.send(Read { item, bytes }).await.is_err() || last {
                    return;
                }
            }
        });
        rx
    }
}

/// The `--failed` file: created (truncated) before anything is sent, so a path that cannot
/// be written fails at once, and an empty file means every message was published.
struct FailedFile {
    path: std::path::PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
}

impl FailedFile {
    async fn create(path: &Path) -> anyhow::Result<FailedFile> {
        let file = tokio::fs::File::create(path).await.map_err(|e| {
            Exit::new(
                code::USAGE,
                anyhow!("cannot create --failed file {}: {e}", path.display()),
            )
        })?;
        Ok(FailedFile {
            path: path.to_owned(),
            file: tokio::io::BufWriter::new(file),
        })
    }

    async fn write(&mut self, msg: &Message) -> std::io::Result<()> {
        let mut line = msg.record_line();
        line.push('\n');
        self.file.write_all(line.as_bytes()).await
    }

    async fn close(mut self) -> std::io::Result<()> {
        self.file.flush().await?;
        self.file.get_ref().sync_all().await
    }
}

/// The progress bar: for a file (or a pipe), on a terminal, once publishing has taken a
/// while.
struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    shown: bool,
    /// Updates are throttled: the loop runs once per message and confirm.
    last: Instant,
}

/// How often the progress bar is updated.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

impl Progress {
    fn new(source: &Source) -> Progress {
        let template = |t: &str| ProgressStyle::with_template(t).expect("the template is valid");
        let bar = match source {
            Source::Lines { size, .. } if std::io::stderr().is_terminal() => Some(match size {
                Some(size) => {
                    ProgressBar::with_draw_target(Some(*size), ProgressDrawTarget::hidden())
                        .with_style(template(
                            "{bar:40} {percent:>3}% {msg} ({elapsed}, {eta} left)",
                        ))
                }
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                    .with_style(template("{spinner} {msg} ({elapsed})")),
            }),
            _ => None,
        };
        let now = Instant::now();
        Progress {
            bar,
            started: now,
            shown: false,
            last: now,
        }
    }

    fn update(&mut self, bytes: u64, published: u64) {
        let Some(bar) = &self.bar else { return };
        let now = Instant::now();
        if now < self.last + PROGRESS_EVERY {
            return;
        }
        self.last = now;
        if !self.shown && now >= self.started + SHOW_PROGRESS_AFTER {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        bar.set_position(bytes);
        bar.set_message(format!("{published} published"));
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// How one connection's publishing ended.
enum SessionEnd {
    /// Nothing more to send (done, or stopped).
    Done,
    /// The connection was lost: reconnect and send what is in `retry` again.
    Lost(anyhow::Error),
}

/// What woke the publishing loop. One exists at a time, briefly: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Event {
    Signal,
    Confirm(Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>),
    Input(Option<Read>),
}

struct Publisher {
    connector: Connector,
    exchange: ShortString,
    topic_prefix: String,
    timeout: Duration,
    keep_going: bool,
    mandatory: bool,
    /// The file name, "standard input" or "the command line", for messages.
    input_name: String,
    input: mpsc::Receiver<Read>,
    shutdown: Shutdown,
    progress: Progress,
    /// The last line read, and how many bytes.
    line: usize,
    bytes: u64,
    /// Messages read (valid or not): the next message's `seq` is this plus one.
    read: u64,
    /// To send before reading more: the first message (read before connecting), and those
    /// sent on a connection that was lost before they were confirmed.
    retry: VecDeque<Outgoing>,
    /// Sent, waiting for the broker's confirm, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The last confirmed messages. lapin hands a `basic.return` to whichever confirm
    /// completes next, which may be a later message's, so a return may name a message
    /// already taken as confirmed: they are kept [`WINDOW`] long to be found by id.
    recent: VecDeque<Outgoing>,
    /// Returns not matched to their message yet: message id → why.
    returned: HashMap<String, String>,
    /// Messages not published, and why.
    failed: Vec<(Outgoing, Failure, String)>,
    /// Invalid lines: (line, why).
    invalid: Vec<(usize, String)>,
    /// Messages confirmed and not returned (the last ones still sit in `recent`).
    published: u64,
    /// Why publishing stopped, when it did: the first reason wins.
    stop: Option<Stop>,
    input_done: bool,
    /// The id of the last message confirmed, printed for a message from the command line.
    last_id: Option<String>,
}

/// `fm publish`: publish what the arguments say, wait for every confirm, report.
pub async fn run(config: &Config, args: &PublishArgs) -> anyhow::Result<u8> {
    let exchange = args
        .exchange
        .clone()
        .unwrap_or_else(|| config.publish_exchange.clone());
    let exchange = ShortString::try_new(exchange.as_str()).map_err(|_| {
        Exit::new(
            code::USAGE,
            anyhow!("the exchange name is longer than 255 bytes: {exchange:.40}…"),
        )
    })?;
    let connector = Connector::new(config)?;
    let (source, input_name) = match &args.file {
        Some(path) if path.as_os_str() == "-" => {
            (Source::open(path).await?, "standard input".to_owned())
        }
        Some(path) => (Source::open(path).await?, path.display().to_string()),
        None => (
            Source::One(adhoc_message(config, args).await?),
            "the command line".to_owned(),
        ),
    };
    let failed_file = match &args.failed {
        Some(path) => Some(FailedFile::create(path).await?),
        None => None,
    };
    let shutdown = Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let progress = Progress::new(&source);
    let input = source.spawn_reader(input_name.clone());
    let mut publisher = Publisher {
        connector,
        exchange,
        topic_prefix: config.topic_prefix.clone(),
        timeout: args.timeout,
        keep_going: args.keep_going,
        mandatory: !args.allow_unroutable,
        input_name,
        input,
        shutdown,
        progress,
        line: 0,
        bytes: 0,
        read: 0,
        retry: VecDeque::new(),
        in_flight: VecDeque::new(),
        recent: VecDeque::new(),
        returned: HashMap::new(),
        failed: Vec::new(),
        invalid: Vec::new(),
        published: 0,
        stop: None,
        input_done: false,
        last_id: None,
    };
    publisher.publish_all().await;
    publisher.progress.finish();
    publisher.report(failed_file).await
}

impl Publisher {
    /// Connect, publish everything, reconnect after a loss, until done or stopped.
    async fn publish_all(&mut self) {
        // Wait for the first message before connecting, as fedora-messaging connects on the
        // first publish: an empty file, or a first line that is invalid, needs no broker.
        while self.retry.is_empty() && self.stop.is_none() && !self.input_done {
            let event = tokio::select! {
                biased;
                _ = self.shutdown.triggered() => Event::Signal,
                read = self.input.recv() => Event::Input(read),
            };
            self.handle(event);
        }
        if self.retry.is_empty() {
            return;
        }
        let Some(mut connected) = self.connect("the broker is unreachable").await else {
            return;
        };
        loop {
            let end = match open_channel(&connected).await {
                Ok(channel) => {
                    let end = self.session(&connected, &channel).await;
                    if matches!(end, SessionEnd::Done) {
                        let closing = channel.close(200, "fm publish done".into());
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                    }
                    end
                }
                Err(err) => SessionEnd::Lost(err),
            };
            let SessionEnd::Lost(err) = end else { break };
            close(&connected).await;
            if self.stop.is_some() {
                return;
            }
            tracing::warn!(
                broker = %connected.url,
                "connection lost ({err:#}); reconnecting to send {} unconfirmed message{} \
                 again (for up to {:.0} s, --timeout)",
                self.retry.len(),
                plural(self.retry.len() as u64),
                self.timeout.as_secs_f64()
            );
            let doing = format!("the connection to the broker was lost ({err:#})");
            match self.connect(&doing).await {
                Some(c) => connected = c,
                None => return,
            }
        }
        close(&connected).await;
    }

    /// Connect within `--timeout`, trying again until then. On failure, stop with 111 (or 1
    /// when the broker refused the login) and return `None`.
    async fn connect(&mut self, doing: &str) -> Option<Connected> {
        let deadline = limits::deadline_in(self.timeout);
        let mut last: Option<anyhow::Error> = None;
        loop {
            let attempt = tokio::select! {
                biased;
                _ = self.shutdown.triggered() => {
                    self.stop_by_signal();
                    return None;
                }
                r = tokio::time::timeout_at(deadline, self.connector.connect()) => r,
            };
            match attempt {
                Ok(Ok(connected)) => return Some(connected),
                // A refused login will not get better by trying again. fedora-messaging fails
                // at once too (an uncaught ConnectionException: exit 1).
                Ok(Err(err)) if crate::error::exit_code_of(&err) == code::PERMISSION => {
                    self.stop_with(code::FAILURE, format!("{err:#}"));
                    return None;
                }
                Ok(Err(err)) => last = Some(err),
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let why = last.map_or_else(
                    || "the attempt did not finish".to_owned(),
                    |e| format!("{e:#}"),
                );
                self.stop_with(
                    code::PUBLISH_TIMEOUT,
                    format!(
                        "{doing}: no connection within {:.0} s (--timeout): {why}",
                        self.timeout.as_secs_f64()
                    ),
                );
                return None;
            }
            tokio::time::sleep_until((now + Duration::from_secs(1)).min(deadline)).await;
        }
    }

    /// Publish on one channel until everything is confirmed, publishing stops, or the
    /// channel or the connection is lost.
    async fn session(&mut self, connected: &Connected, channel: &Channel) -> SessionEnd {
        let options = BasicPublishOptions {
            mandatory: self.mandatory,
            immediate: false,
        };
        loop {
            let room = self.in_flight.len() < WINDOW && self.stop.is_none();
            if room && let Some(out) = self.retry.pop_front() {
                let sent = channel
                    .basic_publish(
                        self.exchange.clone(),
                        out.routing_key.clone(),
                        options,
                        &out.body,
                        out.properties.clone(),
                    )
                    .await;
                match sent {
                    Ok(confirm) => {
                        let mut out = out;
                        out.sent = true;
                        tracing::debug!(
                            topic = out.message.topic.as_str(),
                            "sent {}",
                            out.describe()
                        );
                        self.in_flight.push_back(InFlight {
                            out,
                            confirm,
                            deadline: limits::deadline_in(self.timeout),
                        });
                    }
                    Err(err) => {
                        self.retry.push_front(out);
                        return self.abort(connected, channel, err).await;
                    }
                }
                continue;
            }
            let want_input = room && !self.input_done;
            if self.in_flight.is_empty() && !want_input {
                return SessionEnd::Done;
            }
            // The oldest confirm first (a failure stops publishing early), then the input.
            let event = {
                let in_flight = &mut self.in_flight;
                let input = &mut self.input;
                let shutdown = &self.shutdown;
                let watch_signal = self.stop.is_none();
                tokio::select! {
                    biased;
                    _ = shutdown.triggered(), if watch_signal => Event::Signal,
                    r = async {
                        let f = in_flight.front_mut().expect("checked: not empty");
                        tokio::time::timeout_at(f.deadline, &mut f.confirm).await
                    }, if !in_flight.is_empty() => Event::Confirm(r),
                    read = input.recv(), if want_input => Event::Input(read),
                }
            };
            if let Event::Confirm(result) = event {
                let front = self.in_flight.pop_front().expect("it was just polled");
                match result {
                    Ok(Ok(confirmation)) => self.settle(front.out, confirmation),
                    Ok(Err(err)) => {
                        self.in_flight.push_front(front);
                        return self.abort(connected, channel, err).await;
                    }
                    Err(_) => {
                        let reason = format!(
                            "the broker did not confirm {} within {:.0} s (--timeout)",
                            front.out.describe(),
                            self.timeout.as_secs_f64()
                        );
                        self.in_flight.push_front(front);
                        self.stop_with(code::PUBLISH_TIMEOUT, reason);
                        self.give_up_in_flight("not confirmed in time");
                        return SessionEnd::Done;
                    }
                }
            } else {
                self.handle(event);
            }
            self.progress.update(self.bytes, self.published);
        }
    }

    /// Take a signal or an input item (a message goes to `retry`, to be sent next).
    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal => self.stop_by_signal(),
            Event::Confirm(_) => unreachable!("confirms are settled by the session"),
            Event::Input(None) => self.input_done = true,
            Event::Input(Some(Read { item, bytes })) => {
                self.bytes = bytes;
                match item {
                    Item::Message { line, message } => {
                        self.line = line;
                        self.read += 1;
                        match Outgoing::new(self.read, line, *message, &self.topic_prefix) {
                            Ok(out) => self.retry.push_back(out),
                            Err(reason) => self.invalid_line(line, reason),
                        }
                    }
                    Item::Invalid { line, reason } => {
                        self.line = line;
                        self.read += 1;
                        self.invalid_line(line, reason);
                    }
                    Item::Error(err) => {
                        self.input_done = true;
                        self.stop_with(code::FAILURE, format!("{err:#}"));
                    }
                }
            }
        }
    }

    fn invalid_line(&mut self, line: usize, reason: String) {
        let what = self.where_(line);
        if self.keep_going {
            tracing::warn!("{what}: {reason}; skipped (--keep-going)");
        } else {
            self.stop_with(
                code::USAGE,
                format!(
                    "{what}: {reason}; nothing after it was sent (--keep-going skips such lines)"
                ),
            );
        }
        self.invalid.push((line, reason));
    }

    fn where_(&self, line: usize) -> String {
        if line == 0 {
            "the message".to_owned()
        } else {
            format!("line {line} of {}", self.input_name)
        }
    }

    /// Take the broker's answer about one message.
    fn settle(&mut self, out: Outgoing, confirmation: Confirmation) {
        match confirmation {
            Confirmation::Ack(returned) => {
                if let Some(r) = returned {
                    self.on_return(r);
                }
                match self.returned.remove(out.id()) {
                    Some(why) => self.refused(out, why),
                    None => {
                        self.published += 1;
                        self.last_id = out.message.id.clone();
                        self.recent.push_back(out);
                        if self.recent.len() > WINDOW {
                            self.recent.pop_front();
                        }
                    }
                }
            }
            Confirmation::Nack(returned) => {
                if let Some(r) = returned {
                    self.on_return(r);
                }
                let why = self.returned.remove(out.id()).unwrap_or_else(|| {
                    "the broker refused it (basic.nack: a queue limit, or an internal error)"
                        .to_owned()
                });
                self.refused(out, why);
            }
            // Only without confirm mode, which fm always selects.
            Confirmation::NotRequested => self.published += 1,
        }
    }

    /// A message came back (`basic.return`): find it by id among the confirmed messages,
    /// or remember it for when its confirm comes.
    fn on_return(&mut self, r: BasicReturnMessage) {
        let id = r
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let why = if r.reply_code == NO_ROUTE {
            format!(
                "returned as unroutable ({} {}): no queue is bound to exchange '{}' with a key \
                 matching '{}' (--allow-unroutable accepts such messages)",
                r.reply_code,
                r.reply_text.as_str(),
                r.delivery.exchange.as_str(),
                r.delivery.routing_key.as_str()
            )
        } else {
            format!(
                "returned by the broker ({} {})",
                r.reply_code,
                r.reply_text.as_str()
            )
        };
        if let Some(pos) = self.recent.iter().rposition(|o| o.id() == id) {
            let out = self.recent.remove(pos).expect("the position is valid");
            self.published -= 1;
            self.refused(out, why);
        } else {
            self.returned.insert(id, why);
        }
    }

    fn refused(&mut self, out: Outgoing, why: String) {
        let text = format!("{} was not published: {why}", out.describe());
        if !self.keep_going {
            self.stop_with(code::PUBLISH_REFUSED, text);
        } else if self.failed.is_empty() {
            tracing::warn!("{text}; going on (--keep-going)");
        } else {
            tracing::debug!("{text}");
        }
        self.failed.push((out, Failure::Refused, why));
    }

    /// Something went wrong on the channel. A broker refusal that closed the channel (403,
    /// 404…) stops publishing (121); a lost connection means reconnecting and sending the
    /// unconfirmed messages again.
    async fn abort(
        &mut self,
        connected: &Connected,
        channel: &Channel,
        first: lapin::Error,
    ) -> SessionEnd {
        // Every pending confirm fails with the channel; those confirmed before settle.
        let mut refusal = soft_error(&first);
        let mut pending = Vec::new();
        while let Some(mut f) = self.in_flight.pop_front() {
            match tokio::time::timeout_at(f.deadline, &mut f.confirm).await {
                Ok(Ok(confirmation)) => self.settle(f.out, confirmation),
                Ok(Err(err)) => {
                    refusal = refusal.or_else(|| soft_error(&err));
                    pending.push(f.out);
                }
                Err(_) => pending.push(f.out),
            }
        }
        let connection_up = connected.connection.status().connected();
        if refusal.is_none() && connection_up && !channel.status().connected() {
            refusal = Some(format!("the broker closed the channel ({first})"));
        }
        if let Some(refusal) = refusal {
            let text = match pending.first().or(self.retry.front()) {
                Some(out) => format!("the broker refused {}: {refusal}", out.describe()),
                None => format!("the broker refused a message: {refusal}"),
            };
            self.stop_with(code::PUBLISH_REFUSED, text);
            for out in pending {
                self.failed.push((out, Failure::Refused, refusal.clone()));
            }
            return SessionEnd::Done;
        }
        if connection_up {
            // Neither a refusal nor a loss: an error of fm's side. Stop rather than loop.
            self.stop_with(code::FAILURE, format!("publishing failed: {first}"));
            for out in pending {
                self.failed
                    .push((out, Failure::Unconfirmed, first.to_string()));
            }
            return SessionEnd::Done;
        }
        // Lost: the unconfirmed ones go first, in order, on the next connection.
        for out in pending.into_iter().rev() {
            self.retry.push_front(out);
        }
        SessionEnd::Lost(anyhow!("{}", loss_text(&first)))
    }

    /// Everything in flight is given up as unconfirmed.
    fn give_up_in_flight(&mut self, why: &str) {
        while let Some(f) = self.in_flight.pop_front() {
            self.failed
                .push((f.out, Failure::Unconfirmed, why.to_owned()));
        }
    }

    fn stop_with(&mut self, code: u8, reason: String) {
        if self.stop.is_none() {
            self.stop = Some(Stop {
                code,
                reason,
                interrupted: false,
            });
        }
    }

    fn stop_by_signal(&mut self) {
        if self.stop.is_none() {
            let why = self
                .shutdown
                .reason()
                .map_or("stopped".to_owned(), |r| r.reason.clone());
            self.stop = Some(Stop {
                code: code::FAILURE,
                reason: format!(
                    "interrupted ({why}) after line {} of {}",
                    self.line, self.input_name
                ),
                interrupted: true,
            });
        }
    }

    /// Write `--failed`, say what happened, and choose the exit code.
    async fn report(mut self, failed_file: Option<FailedFile>) -> anyhow::Result<u8> {
        // A return that never met its message (RabbitMQ returns before it confirms, so this
        // should not happen) is logged rather than dropped.
        for (id, why) in self.returned.drain() {
            tracing::warn!("message {id}: {why}");
        }
        // Messages still waiting to be sent (the first one when connecting failed, those to
        // send again after a loss).
        let retry: Vec<Outgoing> = self.retry.drain(..).collect();
        for out in retry {
            let kind = if out.sent {
                Failure::Unconfirmed
            } else {
                Failure::NotSent
            };
            self.failed
                .push((out, kind, "publishing stopped".to_owned()));
        }
        self.failed.sort_by_key(|(out, ..)| out.seq);
        let interrupted = self.stop.as_ref().is_some_and(|s| s.interrupted);
        let mut rest_ids: Vec<String> = Vec::new();
        let mut rest = 0u64;
        let mut saved_to = None;
        if let Some(mut file) = failed_file {
            let path = file.path.clone();
            let result: anyhow::Result<()> = async {
                for (out, ..) in &self.failed {
                    file.write(&out.message).await?;
                }
                // The rest of the input, never sent, so that the file completes the set.
                // A signal stops this too (standard input may be a terminal or a long pipe).
                if !interrupted {
                    loop {
                        let read = tokio::select! {
                            biased;
                            _ = self.shutdown.triggered() => break,
                            read = self.input.recv() => read,
                        };
                        let Some(Read { item, .. }) = read else {
                            self.input_done = true;
                            break;
                        };
                        match item {
                            Item::Message { line, message } => {
                                self.line = line;
                                self.read += 1;
                                rest += 1;
                                if rest_ids.len() < IDS_SHOWN {
                                    rest_ids.push(message.id.clone().unwrap_or_default());
                                }
                                file.write(&message).await?;
                            }
                            Item::Invalid { line, reason } => {
                                self.line = line;
                                self.read += 1;
                                tracing::warn!("{}: {reason}", self.where_(line));
                                self.invalid.push((line, reason));
                            }
                            Item::Error(err) => return Err(err),
                        }
                    }
                }
                file.close().await?;
                Ok(())
            }
            .await;
            result.with_context(|| {
                format!(
                    "writing the messages that were not published to {}",
                    path.display()
                )
            })?;
            saved_to = Some(path);
        }
        if saved_to.is_none() && !self.input_done && !interrupted {
            // Is there more input? A file's reader knows at once; do not wait on a pipe.
            if let Ok(None) =
                tokio::time::timeout(Duration::from_millis(100), self.input.recv()).await
            {
                self.input_done = true;
            }
        }
        let published = self.published;
        if self.stop.is_none() && self.failed.is_empty() && self.invalid.is_empty() {
            tracing::info!(
                "published {published} message{} to exchange '{}'",
                plural(published),
                self.exchange
            );
            if self.line == 0
                && let Some(id) = &self.last_id
            {
                // The id of a message from the command line, for scripts.
                println!("{id}");
            }
            return Ok(code::OK);
        }
        let (exit, headline) = self.outcome();
        let text = self.failure_text(headline, rest, &rest_ids, saved_to.as_deref());
        Err(Exit::new(exit, anyhow!("{text}")))
    }

    /// The exit code and the headline that goes with it: the most serious thing that
    /// happened, in this order: a message refused or returned (121), not confirmed (111),
    /// another failure (1), an invalid line (2). Pipelining makes "the first failure" fuzzy,
    /// so the order is by kind, not by time.
    fn outcome(&self) -> (u8, String) {
        let stopped = |c: u8| {
            self.stop
                .as_ref()
                .filter(|s| s.code == c)
                .map(|s| s.reason.clone())
        };
        let failed = |kind: Failure| {
            self.failed
                .iter()
                .find(|f| f.1 == kind)
                .map(|(out, _, why)| format!("{} was not published: {why}", out.describe()))
        };
        let invalid = || {
            self.invalid
                .first()
                .map(|(line, why)| format!("{}: {why}", self.where_(*line)))
        };
        [
            (code::PUBLISH_REFUSED, stopped(code::PUBLISH_REFUSED)),
            (code::PUBLISH_REFUSED, failed(Failure::Refused)),
            (code::PUBLISH_TIMEOUT, stopped(code::PUBLISH_TIMEOUT)),
            (code::FAILURE, stopped(code::FAILURE)),
            (code::PUBLISH_TIMEOUT, failed(Failure::Unconfirmed)),
            (code::USAGE, stopped(code::USAGE)),
            (code::USAGE, invalid()),
        ]
        .into_iter()
        .find_map(|(code, text)| text.map(|t| (code, t)))
        .unwrap_or((code::FAILURE, "some messages were not published".to_owned()))
    }

    /// What went wrong, how many messages were not published, which ids, and where they are.
    fn failure_text(
        &self,
        headline: String,
        rest: u64,
        rest_ids: &[String],
        saved_to: Option<&Path>,
    ) -> String {
        let mut text = headline;
        if let Some(stop) = &self.stop
            && !text.starts_with(&stop.reason)
        {
            text.push_str(&format!("\npublishing stopped: {}", stop.reason));
        }
        let count = |kind| self.failed.iter().filter(|f| f.1 == kind).count() as u64;
        let not_sent = count(Failure::NotSent) + rest;
        let not_published = self.failed.len() as u64 + rest;
        let mut parts = Vec::new();
        for (n, what) in [
            (count(Failure::Refused), "refused or returned by the broker"),
            (count(Failure::Unconfirmed), "not confirmed"),
            (not_sent, "not sent"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if !self.invalid.is_empty() {
            let lines: Vec<String> = self
                .invalid
                .iter()
                .take(IDS_SHOWN)
                .map(|(l, _)| l.to_string())
                .collect();
            parts.push(format!(
                "{} invalid line{}: {}{}",
                self.invalid.len(),
                plural(self.invalid.len() as u64),
                lines.join(", "),
                more(self.invalid.len() as u64, lines.len())
            ));
        }
        // The counts, unless the first line already told the whole story (one message).
        if self.published > 0 || not_published + self.invalid.len() as u64 > 1 {
            text.push_str(&format!(
                "\n{} published, {not_published} not published",
                self.published
            ));
            if !parts.is_empty() {
                text.push_str(&format!(" ({})", parts.join("; ")));
            }
        }
        let ids: Vec<&str> = self
            .failed
            .iter()
            .map(|(o, ..)| o.id())
            .chain(rest_ids.iter().map(String::as_str))
            .take(IDS_SHOWN)
            .collect();
        if not_published > 1 || ids.first().is_some_and(|id| !text.contains(id)) {
            text.push_str(&format!(
                "\nnot published: {}{}",
                ids.join(", "),
                more(not_published, ids.len())
            ));
        }
        match saved_to {
            Some(path) if !self.input_done => text.push_str(&format!(
                "\nthe messages not published up to line {} are in {}; the rest of {} was not \
                 read",
                self.line,
                path.display(),
                self.input_name
            )),
            Some(path) if not_published > 0 => text.push_str(&format!(
                "\nthey are in {}: publish that file to send them",
                path.display()
            )),
            Some(_) => {}
            None if !self.input_done && self.line > 0 => text.push_str(&format!(
                "\nfm stopped after line {} of {}; pass --failed FILE to save what was not \
                 published",
                self.line, self.input_name
            )),
            None if not_published > 0 => {
                text.push_str("\npass --failed FILE to save them for publishing again")
            }
            None => {}
        }
        text
    }
}

/// ", and N more" when only `shown` of `total` were listed.
fn more(total: u64, shown: usize) -> String {
    let rest = total.saturating_sub(shown as u64);
    if rest > 0 {
        format!(", and {rest} more")
    } else {
        String::new()
    }
}

/// AMQP reply code 312 NO_ROUTE: a mandatory message no queue receives.
const NO_ROUTE: u16 = 312;

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The reply of a broker refusal that closed the channel (403, 404, 406…), if that is what
/// this error is. Connection-level errors (320 CONNECTION_FORCED when the broker stops) are
/// not refusals: fm reconnects.
fn soft_error(err: &lapin::Error) -> Option<String> {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(_) => {
                Some(format!("{} {}", amqp.get_id(), amqp.get_message().as_str()))
            }
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// What a lost connection looks like, in words: lapin reports a publish on a dead
/// connection as an "invalid channel state".
fn loss_text(err: &lapin::Error) -> String {
    match err.kind() {
        ErrorKind::InvalidChannelState(..) | ErrorKind::InvalidConnectionState(_) => {
            "the connection was closed (the broker stopped, or the network failed)".to_owned()
        }
        _ => errors::describe(err.clone()).to_string(),
    }
}

async fn open_channel(connected: &Connected) -> anyhow::Result<Channel> {
    let channel = connected
        .connection
        .create_channel()
        .await
        .map_err(errors::describe)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(errors::describe)?;
    Ok(channel)
}

/// Close the connection, without waiting long: a broker that blocks publishers (a memory
/// or disk alarm) stops reading, and would never answer.
async fn close(connected: &Connected) {
    if connected.connection.status().connected() {
        let closing = connected.connection.close(200, "fm publish done".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fedora-messaging"
    );

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    #[test]
    fn the_good_fixture_parses_keeping_id_and_sent_at() {
        let msg = parse_line(&fixture("good_msg_dump.txt")).unwrap();
        assert_eq!(msg.topic, "test_topic");
        assert_eq!(
            msg.id.as_deref(),
            Some("273ed91d-b8b5-487a-9576-95b9fbdf3eec")
        );
        assert_eq!(msg.headers["sent-at"], "2018-11-18T10:11:41+00:00");
        assert_eq!(msg.priority, Some(0));
    }

    #[test]
    fn the_bad_fixtures_are_refused_with_a_reason() {
        let err = parse_line(&fixture("invalid_msg_dump.txt")).unwrap_err();
        assert!(err.contains("body must be a JSON object"), "{err}");
        let err = parse_line(&fixture("msg_without_topic_dump.txt")).unwrap_err();
        assert!(err.contains("'topic' is a required property"), "{err}");
        let err = parse_line(&fixture("wrong_json_msg_dump.txt")).unwrap_err();
        assert!(
            err.starts_with("not valid JSON: EOF while parsing a list"),
            "{err}"
        );
        assert!(!err.contains("line 1"), "{err}");
    }

    #[test]
    fn blank_and_non_utf8_lines_are_refused() {
        assert!(parse_line(b"\n").unwrap_err().contains("the line is empty"));
        assert!(
            parse_line(b"  \r\n")
                .unwrap_err()
                .contains("the line is empty")
        );
        assert!(
            parse_line(b"{\"topic\": \"\xff\"}\n")
                .unwrap_err()
                .contains("not UTF-8")
        );
    }

    #[test]
    fn lines_may_end_with_crlf_or_nothing_and_keep_unicode_separators() {
        let msg =
            parse_line(b"{\"topic\": \"t\", \"body\": {\"k\": \"a\xe2\x80\xa8b\"}}\r\n").unwrap();
        assert_eq!(msg.body, json!({"k": "a\u{2028}b"}).into());
        let msg = parse_line(br#"{"topic": "t", "body": {}}"#).unwrap();
        assert_eq!(msg.topic, "t");
        // A new UUID4 id and a sent-at are given to a line without them.
        assert!(msg.id.is_some());
        assert!(msg.headers.contains_key("sent-at"));
    }

    #[test]
    fn headers_are_text_unless_given_as_json() {
        assert_eq!(parse_header("a=b=c").unwrap(), ("a".into(), json!("b=c")));
        assert_eq!(parse_header("n:=5").unwrap(), ("n".into(), json!(5)));
        assert_eq!(parse_header("f:=true").unwrap(), ("f".into(), json!(true)));
        assert_eq!(parse_header("e=").unwrap(), ("e".into(), json!("")));
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("=x").is_err());
        assert!(parse_header("j:={").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn severities_by_name_or_number() {
        assert_eq!(parse_severity("debug"), Ok(10));
        assert_eq!(parse_severity("INFO"), Ok(20));
        assert_eq!(parse_severity("warning"), Ok(30));
        assert_eq!(parse_severity("Error"), Ok(40));
        assert_eq!(parse_severity("40"), Ok(40));
        assert!(parse_severity("21").is_err());
        assert!(parse_severity("loud").is_err());
    }

    #[test]
    fn outgoing_applies_the_topic_prefix_and_refuses_long_routing_keys() {
        let msg = parse_line(br#"{"topic": "app.event", "body": {}}"#).unwrap();
        let out = Outgoing::new(1, 1, msg.clone(), "org.fedoraproject.prod.").unwrap();
        assert_eq!(out.routing_key.as_str(), "org.fedoraproject.prod.app.event");
        assert_eq!(out.body, b"{}");
        let mut long = msg;
        long.topic = "x".repeat(300);
        let err = Outgoing::new(1, 1, long, "").err().expect("refused");
        assert!(err.contains("longer than 255"), "{err}");
    }

    /// A publisher that never connects, to check how outcomes are reported.
    fn publisher() -> Publisher {
        let (_tx, rx) = mpsc::channel(1);
        Publisher {
            connector: Connector::new(&Config::default()).unwrap(),
            exchange: ShortString::from("amq.topic"),
            topic_prefix: String::new(),
            timeout: Duration::from_secs(30),
            keep_going: true,
            mandatory: true,
            input_name: "in.jsonl".into(),
            input: rx,
            shutdown: Shutdown::new(),
            progress: Progress {
                bar: None,
                started: Instant::now(),
                shown: false,
                last: Instant::now(),
            },
            line: 0,
            bytes: 0,
            read: 0,
            retry: VecDeque::new(),
            in_flight: VecDeque::new(),
            recent: VecDeque::new(),
            returned: HashMap::new(),
            failed: Vec::new(),
            invalid: Vec::new(),
            published: 0,
            stop: None,
            input_done: true,
            last_id: None,
        }
    }

    fn outgoing(seq: u64) -> Outgoing {
        let line = format!(r#"{{"topic": "t", "body": {{}}, "id": "id-{seq}"}}"#);
        Outgoing::new(seq, seq as usize, parse_line(line.as_bytes()).unwrap(), "").unwrap()
    }

    #[tokio::test]
    async fn a_record_file_must_be_a_regular_file_or_a_pipe() {
        let dir = tempfile::tempdir().unwrap();
        for (path, what) in [
            (Path::new("/dev/zero"), "a character device"),
            (Path::new("/dev/urandom"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let err = Source::open(path).await.err().expect("refused");
            assert_eq!(crate::error::exit_code_of(&err), code::USAGE);
            assert_eq!(
                format!("{err:#}"),
                format!(
                    "cannot publish {}: it is {what}, not a file of messages (give a regular \
                     file, a pipe, or - for standard input)",
                    path.display()
                )
            );
        }
        let file = dir.path().join("in.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        assert!(Source::open(&file).await.is_ok());
        assert!(Source::open(Path::new("-")).await.is_ok());
    }

    #[tokio::test]
    async fn the_most_serious_failure_decides_the_exit_code() {
        let mut p = publisher();
        p.invalid_line(1, "not valid JSON".into());
        assert_eq!(
            p.outcome(),
            (2, "line 1 of in.jsonl: not valid JSON".into())
        );
        p.failed.push((
            outgoing(2),
            Failure::Unconfirmed,
            "not confirmed in time".into(),
        ));
        assert_eq!(p.outcome().0, 111);
        p.failed
            .push((outgoing(3), Failure::Refused, "312 NO_ROUTE".into()));
        assert_eq!(
            p.outcome(),
            (
                121,
                "message id-3 (line 3) was not published: 312 NO_ROUTE".into()
            )
        );
    }

    #[tokio::test]
    async fn the_report_counts_and_lists_what_was_not_published() {
        let mut p = publisher();
        p.published = 5;
        for seq in 1..=25 {
            p.failed
                .push((outgoing(seq), Failure::Refused, "312 NO_ROUTE".into()));
        }
        let (_, headline) = p.outcome();
        let text = p.failure_text(headline, 2, &["id-26".into(), "id-27".into()], None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "message id-1 (line 1) was not published: 312 NO_ROUTE"
        );
        assert_eq!(
            lines[1],
            "5 published, 27 not published (25 refused or returned by the broker; 2 not sent)"
        );
        assert!(
            lines[2].starts_with("not published: id-1, id-2, "),
            "{}",
            lines[2]
        );
        assert!(lines[2].ends_with("id-20, and 7 more"), "{}", lines[2]);
        assert_eq!(
            lines[3],
            "pass --failed FILE to save them for publishing again"
        );
    }

    fn returned(id: &str) -> BasicReturnMessage {
        let mut delivery =
            lapin::message::Delivery::mock(0, "ex".into(), "t".into(), false, b"{}".to_vec());
        delivery.properties = BasicProperties::default().with_message_id(id.into());
        BasicReturnMessage {
            delivery,
            reply_code: NO_ROUTE,
            reply_text: "NO_ROUTE".into(),
        }
    }

    /// lapin hands a `basic.return` to whichever confirm completes next, which may be another
    /// message's: the returned message is found by id, before or after its own confirm.
    #[tokio::test]
    async fn returns_are_matched_to_their_message_by_id() {
        let mut p = publisher();
        // The return of 1 comes with the confirm of 2, after 1 was taken as published.
        p.settle(outgoing(1), Confirmation::Ack(None));
        p.settle(outgoing(2), Confirmation::Ack(Some(returned("id-1"))));
        // The return of 4 comes with the confirm of 3, before 4's own confirm.
        p.settle(outgoing(3), Confirmation::Ack(Some(returned("id-4"))));
        p.settle(outgoing(4), Confirmation::Ack(None));
        assert_eq!(p.published, 2);
        let failed: Vec<&str> = p.failed.iter().map(|(o, ..)| o.id()).collect();
        assert_eq!(failed, ["id-1", "id-4"]);
        assert!(p.failed[0].2.contains("312 NO_ROUTE"), "{}", p.failed[0].2);
        assert!(p.returned.is_empty());
        assert!(p.stop.is_none(), "--keep-going goes on");

        // Without --keep-going, the first refusal stops publishing with 121.
        let mut p = publisher();
        p.keep_going = false;
        p.settle(outgoing(1), Confirmation::Nack(None));
        assert_eq!(p.stop.as_ref().map(|s| s.code), Some(121));
    }
}
