//! Where the messages come from: the one message the command line describes, or a record file
//! (or standard input) read line by line on a task of its own.

use super::*;

/// Build the one message `--topic` describes, as fedora-messaging's `Message(...)` would.
pub(super) async fn adhoc_message(config: &Config, args: &PublishArgs) -> anyhow::Result<Message> {
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

/// What the input yields, in order.
pub(super) enum Item {
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
pub(super) struct Read {
    pub(super) item: Item,
    pub(super) bytes: u64,
    /// Its share of [`READ_AHEAD_BYTES`], given back when the item is dropped (taken into the
    /// publisher's window, or refused).
    pub(super) _budget: Option<OwnedSemaphorePermit>,
}

/// How many bytes of lines a reader parses ahead of what publishes them (`fm publish`'s input
/// reader, `fm relay`'s spool reader), besides the lines its channel holds: a file of 16 MiB
/// messages must not be read into memory faster than it is sent.
const READ_AHEAD_BYTES: usize = 8 << 20;

/// A reader's budget of [`READ_AHEAD_BYTES`]: each line parsed holds its share until the line is
/// taken (its permit dropped).
#[derive(Clone)]
pub(crate) struct ReadAhead(Arc<Semaphore>);

impl ReadAhead {
    pub(crate) fn new() -> ReadAhead {
        ReadAhead(Arc::new(Semaphore::new(READ_AHEAD_BYTES)))
    }

    /// Wait until a line of `len` bytes may be held. A line longer than the whole budget waits
    /// for all of it, and then goes, alone.
    pub(crate) async fn take(&self, len: usize) -> OwnedSemaphorePermit {
        let share = len.clamp(1, READ_AHEAD_BYTES) as u32;
        Arc::clone(&self.0)
            .acquire_many_owned(share)
            .await
            .expect("the budget is never closed")
    }
}

/// Where the messages come from, before reading starts.
pub(super) enum Source {
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
    /// What the arguments name: FILE, standard input (`-`), or the one message of the command
    /// line; with how to call it in messages.
    pub(super) async fn from_args(
        config: &Config,
        args: &PublishArgs,
    ) -> anyhow::Result<(Source, String)> {
        Ok(match &args.file {
            Some(path) if path.as_os_str() == "-" => {
                (Source::open(path).await?, "standard input".to_owned())
            }
            Some(path) => (Source::open(path).await?, path.display().to_string()),
            None => (
                Source::One(adhoc_message(config, args).await?),
                "the command line".to_owned(),
            ),
        })
    }

    /// Open FILE, or standard input for `-`. A file that cannot be opened is a usage error
    /// (exit 2), as with fedora-messaging's `click.File`.
    ///
    /// FILE may be as large as it likes (it is streamed), but it must be a regular file or a
    /// pipe (`fm publish <(producer)`), which end: a directory, a device (`/dev/zero` would be
    /// read forever) or a socket is refused with what it is.
    pub(super) async fn open(path: &Path) -> anyhow::Result<Source> {
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
    pub(super) fn spawn_reader(self, name: String) -> mpsc::Receiver<Read> {
        let (tx, rx) = mpsc::channel(256);
        let budget = ReadAhead::new();
        tokio::spawn(async move {
            let mut reader = match self {
                Source::One(message) => {
                    let item = Item::Message {
                        line: 0,
                        message: Box::new(message),
                    };
                    let read = Read {
                        item,
                        bytes: 0,
                        _budget: None,
                    };
                    let _ = tx.send(read).await;
                    return;
                }
                Source::Lines { reader, .. } => reader,
            };
            let mut buf = Vec::new();
            let (mut line, mut bytes) = (0usize, 0u64);
            loop {
                buf.clear();
                let read = reader.read_until(b'\n', &mut buf).await;
                let permit = budget.take(buf.len()).await;
                let item = match read {
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
                let read = Read {
                    item,
                    bytes,
                    _budget: Some(permit),
                };
                if tx.send(read).await.is_err() || last {
                    return;
                }
            }
        });
        rx
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
}
