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
use std::sync::Arc;
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
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

/// The most bytes of encoded bodies in flight at once, whatever their number: a window of
/// 1,000 messages of 16 MiB would hold 16 GB. The first message in flight goes whatever its
/// size. The confirmed messages kept to match late returns are bounded the same way.
pub const WINDOW_BYTES: usize = 32 << 20;

/// The progress bar appears only when publishing takes longer than this, so a short file
/// leaves no trace on the terminal.
const SHOW_PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// The longest fm waits for the broker to acknowledge closing the channel or connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many message ids an error lists before saying "and N more".
const IDS_SHOWN: usize = 20;

mod failed;
mod input;
mod pipeline;
mod progress;
mod report;
mod spooled;
mod transaction;

use failed::FailedFile;
pub(crate) use input::ReadAhead;
use input::{Item, Read, Source};
pub use input::{parse_header, parse_line, parse_severity};
use pipeline::InFlight;
pub(crate) use pipeline::{
    Carries, InFlightQueue, Outgoing, Recent, close, connection_lost, loss_text, open_channel,
    return_reason, soft_error,
};
use progress::Progress;
use report::plural;

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
    in_flight: InFlightQueue<InFlight>,
    /// The last confirmed messages, for returns that come after their confirm.
    recent: Recent<Outgoing>,
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

impl Publisher {
    /// A publisher with nothing read or sent yet: mandatory publishing, no topic prefix, stop
    /// at the first failure (the callers change what their arguments say).
    fn new(
        connector: Connector,
        exchange: ShortString,
        timeout: Duration,
        input_name: String,
        input: mpsc::Receiver<Read>,
        shutdown: Shutdown,
        progress: Progress,
    ) -> Publisher {
        Publisher {
            connector,
            exchange,
            topic_prefix: String::new(),
            timeout,
            keep_going: false,
            mandatory: true,
            input_name,
            input,
            shutdown,
            progress,
            line: 0,
            bytes: 0,
            read: 0,
            retry: VecDeque::new(),
            in_flight: InFlightQueue::new(),
            recent: Recent::new(),
            returned: HashMap::new(),
            failed: Vec::new(),
            invalid: Vec::new(),
            published: 0,
            stop: None,
            input_done: false,
            last_id: None,
        }
    }
}

/// The exchange to publish to: `given` on the command line, else the configuration's
/// `publish_exchange`; a name AMQP cannot carry is bad usage (exit 2).
pub(crate) fn exchange(config: &Config, given: Option<&str>) -> anyhow::Result<ShortString> {
    let exchange = given.unwrap_or(&config.publish_exchange);
    ShortString::try_new(exchange).map_err(|_| {
        Exit::new(
            code::USAGE,
            anyhow!("the exchange name is longer than 255 bytes: {exchange:.40}…"),
        )
    })
}

/// `fm publish`: publish what the arguments say, wait for every confirm, report.
pub async fn run(config: &Config, args: &PublishArgs) -> anyhow::Result<u8> {
    let exchange = exchange(config, args.exchange.as_deref())?;
    if let Some(dir) = &args.spool {
        let dir = crate::spool::directory(dir.as_deref(), config)?;
        return spooled::run(config, args, dir, exchange).await;
    }
    let connector = Connector::new(config)?;
    if args.transaction {
        return transaction::run(config, args, exchange, connector).await;
    }
    let (source, input_name) = Source::from_args(config, args).await?;
    let failed_file = match &args.failed {
        Some(path) => Some(FailedFile::create(path).await?),
        None => None,
    };
    let shutdown = Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let progress = Progress::new(&source);
    let input = source.spawn_reader(input_name.clone());
    let mut publisher = Publisher {
        topic_prefix: config.topic_prefix.clone(),
        keep_going: args.keep_going,
        mandatory: !args.allow_unroutable,
        ..Publisher::new(
            connector,
            exchange,
            args.timeout,
            input_name,
            input,
            shutdown,
            progress,
        )
    };
    publisher.publish_all().await;
    publisher.progress.finish();
    publisher.report(failed_file).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::errors::NO_ROUTE;

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

    /// A publisher that never connects, to check how outcomes are reported.
    fn publisher() -> Publisher {
        let (_tx, rx) = mpsc::channel(1);
        let progress = Progress {
            bar: None,
            started: Instant::now(),
            shown: false,
            last: Instant::now(),
        };
        Publisher {
            keep_going: true,
            input_done: true,
            ..Publisher::new(
                Connector::new(&Config::default()).unwrap(),
                ShortString::from("amq.topic"),
                Duration::from_secs(30),
                "in.jsonl".into(),
                rx,
                Shutdown::new(),
                progress,
            )
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

    /// The window is 1,000 messages or 32 MiB of bodies, whichever is reached first; a
    /// message larger than the whole window still goes, alone.
    #[test]
    fn the_window_counts_messages_and_bytes() {
        use pipeline::window_has_room;
        assert!(window_has_room(0, 0, 1 << 30), "alone, any size goes");
        assert!(!window_has_room(1, 16 << 20, 17 << 20));
        assert!(window_has_room(1, 16 << 20, 16 << 20));
        assert!(window_has_room(WINDOW - 1, 200 * (WINDOW - 1), 200));
        assert!(!window_has_room(WINDOW, 200 * WINDOW, 200));
    }

    /// Confirmed messages are kept for late returns without their encoded bodies, and no more
    /// of them than a window holds.
    #[tokio::test]
    async fn confirmed_messages_are_kept_a_window_long() {
        let mut p = publisher();
        for seq in 1..=(WINDOW as u64 + 5) {
            p.settle(outgoing(seq), Confirmation::Ack(None));
        }
        assert_eq!(p.recent.iter().count(), WINDOW);
        assert_eq!(p.recent.iter().next().map(|o| o.id()), Some("id-6"));
        assert!(p.recent.iter().all(|o| o.body.is_empty() && o.size == 2));
        assert_eq!(p.recent.bytes(), 2 * WINDOW);

        // Big ones: as many as fit in WINDOW_BYTES, but always the last one.
        let mut p = publisher();
        let big = |seq: u64, size: usize| {
            let mut out = outgoing(seq);
            out.size = size;
            out
        };
        p.settle(big(1, WINDOW_BYTES / 2), Confirmation::Ack(None));
        p.settle(big(2, WINDOW_BYTES / 2), Confirmation::Ack(None));
        p.settle(big(3, WINDOW_BYTES / 2), Confirmation::Ack(None));
        let ids: Vec<&str> = p.recent.iter().map(|o| o.id()).collect();
        assert_eq!(ids, ["id-2", "id-3"]);
        p.settle(big(4, 2 * WINDOW_BYTES), Confirmation::Ack(None));
        let ids: Vec<&str> = p.recent.iter().map(|o| o.id()).collect();
        assert_eq!(ids, ["id-4"]);
        // A late return still finds it, and its bytes leave the count.
        p.settle(outgoing(5), Confirmation::Ack(Some(returned("id-4"))));
        assert_eq!(p.failed.len(), 1);
        assert_eq!(p.recent.bytes(), 2, "only id-5 is left");
    }

    /// The reader parses ahead of the publisher by at most READ_AHEAD_BYTES (8 MiB) of lines,
    /// and reads on as the publisher takes them.
    #[tokio::test]
    async fn the_reader_reads_ahead_by_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.jsonl");
        let text = "x".repeat(3 << 20);
        let line = format!("{{\"topic\": \"t\", \"body\": {{\"t\": \"{text}\"}}}}\n");
        std::fs::write(&path, line.repeat(6)).unwrap();
        let mut rx = Source::open(&path)
            .await
            .unwrap()
            .spawn_reader("big".into());
        // Two 3 MiB lines fit in 8 MiB, a third does not: the reader waits.
        let settled = async {
            while rx.len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .expect("the reader sends two lines");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rx.len(), 2, "no third line is parsed before one is taken");
        // Taking lines lets it go on, to the end.
        let mut lines = 0;
        while let Some(read) = rx.recv().await {
            assert!(matches!(read.item, Item::Message { .. }));
            lines += 1;
        }
        assert_eq!(lines, 6);
    }
}
