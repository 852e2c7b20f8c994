//! `fm call`: the RPC client (issue 13). The server side is any `fm consume` whose callback
//! replies (`consume/reply.rs`), or any server that follows RabbitMQ's request/reply
//! convention (<https://www.rabbitmq.com/tutorials/tutorial-six-python>).
//!
//! Requests go out over RabbitMQ's direct reply-to
//! (<https://www.rabbitmq.com/docs/direct-reply-to>): fm consumes from the pseudo-queue
//! `amq.rabbitmq.reply-to` in no-ack mode *before* publishing, on the channel it publishes
//! from, and publishes each request with `reply_to = amq.rabbitmq.reply-to`, a fresh UUID4
//! `correlation_id` and `mandatory`, on a channel in confirm mode. Replies are matched to their
//! request by correlation id; one that matches nothing waiting (a second answer to a request,
//! which an at-least-once server may send) is ignored.
//!
//! A request is a fedora-messaging message (topic = the routing key, the body a JSON object)
//! unless `--raw`, which sends the bytes as they are, without properties but the two above.
//!
//! | what happened | exit |
//! |---|---|
//! | every request answered | 0 |
//! | no connection within `--timeout`, or the connection lost with requests unanswered | 111 |
//! | a request returned as unroutable (no queue bound), or refused by the broker | 121 |
//! | a reply that did not come within `--timeout` of its request | 124 |
//! | a request that is not valid (a body that is not a JSON object, without `--raw`) | 2 |
//!
//! With a FILE, every request is tried and each failure reported on stderr; the exit status is
//! the first that applies of 111, 121, 124, 2.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use futures_lite::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};
use serde_json::{Map, Value};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::amqp::{Connected, Connector, errors};
use crate::cli::CallArgs;
use crate::config::Config;
use crate::error::{Exit, code};
use crate::json;
use crate::limits;
use crate::message::{self, Message};
use crate::publish::{Outgoing, close, open_channel};

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How many invalid lines or unanswered requests a FILE run names on stderr before only
/// counting them.
const SHOWN: usize = 20;

/// `fm call`: send the requests, print the replies, exit as the module docs say.
pub async fn run(config: &Config, args: &CallArgs) -> anyhow::Result<u8> {
    let exchange = crate::publish::exchange(config, args.exchange.as_deref())?;
    let routing_key = ShortString::try_new(args.routing_key.as_str()).map_err(|_| {
        Exit::new(
            code::USAGE,
            anyhow!(
                "the routing key is longer than 255 bytes: {:.40}…",
                args.routing_key
            ),
        )
    })?;
    let build = Build {
        exchange,
        routing_key,
        raw: args.raw,
    };
    match (&args.body, &args.file) {
        (Some(body), _) => {
            let request = build
                .request(0, body.as_bytes())
                .map_err(|e| Exit::new(code::USAGE, anyhow!("--body: {e}")))?;
            one(config, args, &build, request).await
        }
        (None, Some(file)) => many(config, args, &build, file).await,
        (None, None) => unreachable!("clap requires FILE or --body"),
    }
}

/// What every request shares.
struct Build {
    exchange: ShortString,
    routing_key: ShortString,
    raw: bool,
}

/// One request, ready to publish.
struct Request {
    /// Its line in FILE (0: --body).
    line: usize,
    correlation_id: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Build {
    /// The request for `body` (a line of FILE, or --body).
    fn request(&self, line: usize, body: &[u8]) -> Result<Request, String> {
        let correlation_id = message::new_message_id();
        let (body, properties) = if self.raw {
            (body.to_vec(), BasicProperties::default())
        } else {
            let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_owned())?;
            let parsed = json::parse(text).map_err(|e| format!("not valid JSON: {e}"))?;
            let message = Message::new_outgoing(
                self.routing_key.to_string(),
                parsed,
                Map::new(),
                message::BASE_SCHEMA,
                message::INFO,
                None,
            );
            message.validate()?;
            let out = Outgoing::new(0, line, message, "")?;
            (out.body, out.properties)
        };
        let properties = properties
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.as_str().into());
        Ok(Request {
            line,
            correlation_id,
            body,
            properties,
        })
    }
}

/// Connect within `--timeout` (exit 111 if not; 1 when the login is refused, as `fm publish`),
/// open a channel in confirm mode and consume the direct reply-to pseudo-queue on it.
async fn connect(
    config: &Config,
    timeout: Duration,
) -> anyhow::Result<(Connected, Channel, Consumer)> {
    let connector = Connector::new(config)?;
    let connected = connector.connect_within(timeout).await?;
    let channel = open_channel(&connected)
        .await
        .map_err(|e| Exit::new(code::PUBLISH_TIMEOUT, e))?;
    // Direct reply-to: consume (no-ack) before publishing, on the publishing channel.
    let replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(errors::describe)
        .context("consuming from amq.rabbitmq.reply-to (direct reply-to)")?;
    Ok((connected, channel, replies))
}

/// Why a request was not answered, in exit-status order (most serious first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    /// The connection was lost (or never made): 111.
    Lost,
    /// Returned as unroutable, or nacked: 121.
    Refused,
    /// No reply within `--timeout`: 124.
    TimedOut,
    /// Not a valid request: 2.
    Invalid,
}

impl Failure {
    fn code(self) -> u8 {
        match self {
            Failure::Lost => code::PUBLISH_TIMEOUT,
            Failure::Refused => code::PUBLISH_REFUSED,
            Failure::TimedOut => code::CALL_TIMEOUT,
            Failure::Invalid => code::USAGE,
        }
    }
}

/// A reply, matched to its request.
struct Answer {
    line: usize,
    correlation_id: String,
    /// From just before the request was published to the reply's arrival.
    round_trip: Duration,
    body: Vec<u8>,
}

/// What woke the loop of [`Calls::next`].
enum Event {
    Reply(Option<lapin::Result<lapin::message::Delivery>>),
    Confirm(String, lapin::Result<Confirmation>),
    Input(Option<Line>),
    Deadline,
}

/// A request's confirm, by correlation id.
type Confirmed = (String, lapin::Result<Confirmation>);
/// A line of FILE (its number and bytes), or why reading failed.
type Line = Result<(usize, Vec<u8>), String>;

/// Requests in flight on one channel, and what became of them.
struct Calls {
    channel: Channel,
    exchange: ShortString,
    routing_key: ShortString,
    timeout: Duration,
    /// Correlation id → line, and when it was sent, of the requests waiting for their reply.
    waiting: HashMap<String, (usize, Instant)>,
    /// When each request times out, in the order sent (every request has the same timeout).
    deadlines: VecDeque<(Instant, String)>,
    confirms: (
        mpsc::UnboundedSender<Confirmed>,
        mpsc::UnboundedReceiver<Confirmed>,
    ),
    /// (line, why) of every request not answered.
    failed: Vec<(usize, Failure, String)>,
}

impl Calls {
    fn new(channel: Channel, build: &Build, timeout: Duration) -> Calls {
        Calls {
            channel,
            exchange: build.exchange.clone(),
            routing_key: build.routing_key.clone(),
            timeout,
            waiting: HashMap::new(),
            deadlines: VecDeque::new(),
            confirms: mpsc::unbounded_channel(),
            failed: Vec::new(),
        }
    }

    /// Publish one request (mandatory); its confirm comes back as an [`Event::Confirm`].
    async fn send(&mut self, request: Request) {
        let started = Instant::now();
        let sent = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                self.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &request.body,
                request.properties,
            )
            .await;
        match sent {
            Ok(confirm) => {
                let id = request.correlation_id.clone();
                let tx = self.confirms.0.clone();
                tokio::spawn(async move {
                    let _ = tx.send((id, confirm.await));
                });
                self.waiting
                    .insert(request.correlation_id.clone(), (request.line, started));
                self.deadlines
                    .push_back((limits::deadline_in(self.timeout), request.correlation_id));
            }
            Err(err) => self.failed.push((
                request.line,
                Failure::Lost,
                format!("{:#}", errors::describe(err)),
            )),
        }
    }

    /// Give up on the request with `correlation_id`, if it is still waiting.
    fn fail(&mut self, correlation_id: &str, failure: Failure, why: String) {
        if let Some((line, _)) = self.waiting.remove(correlation_id) {
            self.failed.push((line, failure, why));
        }
    }

    fn on_confirm(&mut self, id: &str, confirmation: lapin::Result<Confirmation>) {
        match confirmation {
            // lapin hands a return to whichever confirm completes next: the returned request
            // is found by its own correlation id.
            Ok(Confirmation::Ack(Some(returned))) => {
                let props = &returned.delivery.properties;
                let returned_id = props
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default();
                let mut why = errors::returned(&returned);
                if returned.reply_code == errors::NO_ROUTE {
                    why.push_str("; is the server running?");
                }
                self.fail(&returned_id, Failure::Refused, why);
            }
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {}
            Ok(Confirmation::Nack(_)) => {
                self.fail(id, Failure::Refused, "refused by the broker (nack)".into());
            }
            Err(err) => self.fail(id, Failure::Lost, format!("{:#}", errors::describe(err))),
        }
    }

    /// Time out the requests whose deadline passed.
    fn expire(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.deadlines.front() {
            if *deadline > now {
                break;
            }
            let (_, id) = self.deadlines.pop_front().expect("just looked");
            let why = format!(
                "no reply within {:.1} s (--timeout)",
                self.timeout.as_secs_f64()
            );
            self.fail(&id, Failure::TimedOut, why);
        }
    }

    /// The next deadline of a request still waiting (answered ones are dropped from the
    /// front).
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some((deadline, id)) = self.deadlines.front() {
            if self.waiting.contains_key(id) {
                return Some(*deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Wait for the next thing to happen: a reply, a confirm, the next input (when `input`
    /// is given: there is room for another request), or a deadline.
    async fn next(
        &mut self,
        replies: &mut Consumer,
        input: Option<&mut mpsc::Receiver<Line>>,
    ) -> Event {
        let deadline = self.next_deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let read = async {
            match input {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = replies.next() => Event::Reply(r),
            Some((id, c)) = self.confirms.1.recv() => Event::Confirm(id, c),
            _ = sleep => Event::Deadline,
            i = read => Event::Input(i),
        }
    }

    /// Handle a reply: the request it answers, and its body; `None` for one nobody waits for.
    fn on_reply(&mut self, delivery: lapin::message::Delivery) -> Option<Answer> {
        let id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default();
        match self.waiting.remove(&id) {
            Some((line, sent)) => Some(Answer {
                line,
                correlation_id: id,
                round_trip: sent.elapsed(),
                body: delivery.data,
            }),
            None => {
                tracing::debug!(
                    "a reply with correlation id {id:?} answers no request waiting: ignored"
                );
                None
            }
        }
    }

    /// The connection or channel is gone: every request still waiting fails.
    fn lose_all(&mut self, why: &str) {
        let ids: Vec<String> = self.waiting.keys().cloned().collect();
        for id in ids {
            self.fail(&id, Failure::Lost, why.to_owned());
        }
    }
}

/// One request (`--body`): print the reply's body on stdout.
async fn one(
    config: &Config,
    args: &CallArgs,
    build: &Build,
    request: Request,
) -> anyhow::Result<u8> {
    let (connected, channel, mut replies) = connect(config, args.timeout).await?;
    let mut calls = Calls::new(channel, build, args.timeout);
    calls.send(request).await;
    let mut answer = None;
    while answer.is_none() && !calls.waiting.is_empty() {
        match calls.next(&mut replies, None).await {
            Event::Reply(Some(Ok(delivery))) => answer = calls.on_reply(delivery),
            Event::Reply(_) => calls.lose_all("the connection to the broker was lost"),
            Event::Confirm(id, c) => calls.on_confirm(&id, c),
            Event::Deadline => calls.expire(Instant::now()),
            Event::Input(_) => {}
        }
    }
    close(&connected).await;
    if let Some(Answer { body, .. }) = answer {
        let mut out = std::io::stdout().lock();
        out.write_all(&body)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
            .context("writing the reply to standard output")?;
        return Ok(code::OK);
    }
    let (_, failure, why) =
        calls
            .failed
            .first()
            .cloned()
            .unwrap_or((0, Failure::Lost, "no reply".into()));
    Err(Exit::new(
        failure.code(),
        anyhow!("the request was not answered: {why}"),
    ))
}

/// A FILE of requests: up to `--in-flight` outstanding, replies printed as JSON lines.
async fn many(
    config: &Config,
    args: &CallArgs,
    build: &Build,
    file: &std::path::Path,
) -> anyhow::Result<u8> {
    let input = read_lines(file).await?;
    let mut input = input;
    let (connected, channel, mut replies) = connect(config, args.timeout).await?;
    let mut calls = Calls::new(channel, build, args.timeout);
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut input_done = false;
    let mut answered = 0u64;
    let mut invalid: Vec<(usize, String)> = Vec::new();
    let limit = usize::from(args.in_flight);
    let mut lost = false;
    while !(input_done || lost) || !calls.waiting.is_empty() {
        let room = !input_done && !lost && calls.waiting.len() < limit;
        let event = calls.next(&mut replies, room.then_some(&mut input)).await;
        match event {
            Event::Reply(Some(Ok(delivery))) => {
                if let Some(answer) = calls.on_reply(delivery) {
                    answered += 1;
                    writeln!(out, "{}", reply_line(&answer))
                        .context("writing a reply to standard output")?;
                    if calls.waiting.is_empty() {
                        out.flush().context("writing to standard output")?;
                    }
                }
            }
            Event::Reply(_) => {
                lost = true;
                calls.lose_all("the connection to the broker was lost");
            }
            Event::Confirm(id, c) => calls.on_confirm(&id, c),
            Event::Deadline => calls.expire(Instant::now()),
            Event::Input(None) => input_done = true,
            Event::Input(Some(Err(e))) => {
                input_done = true;
                invalid.push((0, e));
            }
            Event::Input(Some(Ok((line, body)))) => match build.request(line, &body) {
                Ok(request) => calls.send(request).await,
                Err(e) => invalid.push((line, e)),
            },
        }
    }
    out.flush().context("writing to standard output")?;
    close(&connected).await;
    report(&mut calls.failed, &invalid, answered)
}

/// One reply as the JSON line `fm call FILE` prints: the request's line and correlation id,
/// the round trip in milliseconds, and the reply as `"reply"` (a JSON value) when it is JSON,
/// else as `"reply_text"` (its text, invalid UTF-8 replaced).
fn reply_line(answer: &Answer) -> String {
    let mut obj = Map::new();
    obj.insert("line".into(), Value::from(answer.line));
    obj.insert(
        "correlation_id".into(),
        Value::from(answer.correlation_id.as_str()),
    );
    // Microseconds, as milliseconds with three decimals.
    let micros = u64::try_from(answer.round_trip.as_micros()).unwrap_or(u64::MAX);
    let ms =
        serde_json::Number::from_f64(micros as f64 / 1000.0).map_or(Value::Null, Value::Number);
    obj.insert("ms".into(), ms);
    match serde_json::from_slice::<Value>(&answer.body) {
        Ok(value) => obj.insert("reply".into(), value),
        Err(_) => obj.insert(
            "reply_text".into(),
            Value::from(String::from_utf8_lossy(&answer.body).into_owned()),
        ),
    };
    Value::Object(obj).to_string()
}

/// Say what was not answered, on stderr, and pick the exit status.
fn report(
    failed: &mut [(usize, Failure, String)],
    invalid: &[(usize, String)],
    answered: u64,
) -> anyhow::Result<u8> {
    if failed.is_empty() && invalid.is_empty() {
        return Ok(code::OK);
    }
    failed.sort_by_key(|(line, ..)| *line);
    for (line, why) in invalid.iter().take(SHOWN) {
        tracing::error!("line {line}: not a valid request: {why}");
    }
    for (line, _, why) in failed.iter().take(SHOWN) {
        tracing::error!("line {line}: {why}");
    }
    let worst = failed
        .iter()
        .map(|(_, f, _)| *f)
        .chain((!invalid.is_empty()).then_some(Failure::Invalid))
        .min()
        .expect("something failed");
    Err(Exit::new(
        worst.code(),
        anyhow!(
            "{answered} request{} answered, {} not answered, {} invalid",
            if answered == 1 { "" } else { "s" },
            failed.len(),
            invalid.len()
        ),
    ))
}

/// The lines of FILE ("-": standard input), numbered from 1, read by a task of their own;
/// blank lines are skipped. A read error ends the input.
async fn read_lines(file: &std::path::Path) -> anyhow::Result<mpsc::Receiver<Line>> {
    let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> =
        if file.as_os_str() == "-" {
            Box::new(tokio::io::stdin())
        } else {
            Box::new(tokio::fs::File::open(file).await.map_err(|e| {
                Exit::new(code::USAGE, anyhow!("cannot open {}: {e}", file.display()))
            })?)
        };
    let (tx, rx) = mpsc::channel(64);
    let name = file.display().to_string();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(reader);
        let mut number = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            let item = match lines.read_until(b'\n', &mut line).await {
                Ok(0) => return,
                Ok(_) => {
                    number += 1;
                    let body = line.strip_suffix(b"\n").unwrap_or(&line);
                    let body = body.strip_suffix(b"\r").unwrap_or(body);
                    if body.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    Ok((number, body.to_vec()))
                }
                Err(e) => Err(format!("reading {name}: {e}")),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(raw: bool) -> Build {
        Build {
            exchange: "".into(),
            routing_key: "rpc.attrs".into(),
            raw,
        }
    }

    #[test]
    fn a_request_asks_for_a_direct_reply_with_a_fresh_correlation_id() {
        let a = build(false)
            .request(3, br#"{"op": "get", "key": "a"}"#)
            .unwrap();
        let b = build(false)
            .request(4, br#"{"op": "get", "key": "a"}"#)
            .unwrap();
        assert_ne!(a.correlation_id, b.correlation_id);
        let props = &a.properties;
        assert_eq!(props.reply_to().as_ref().unwrap().as_str(), DIRECT_REPLY_TO);
        assert_eq!(
            props.correlation_id().as_ref().unwrap().as_str(),
            a.correlation_id
        );
        // A fedora-messaging message: its headers, content type and id.
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert!(props.message_id().is_some());
        assert_eq!(a.body, br#"{"op": "get", "key": "a"}"#);
        assert_eq!(a.line, 3);
        for bad in [&b"[1]"[..], b"Marco", b"\xff"] {
            assert!(build(false).request(1, bad).is_err());
        }
        // --raw: the bytes as they are.
        let raw = build(true).request(1, b"Marco").unwrap();
        assert_eq!(raw.body, b"Marco");
        assert!(raw.properties.content_type().is_none());
        assert!(raw.properties.headers().is_none());
    }

    #[test]
    fn reply_lines_hold_json_as_json_and_the_rest_as_text() {
        let answer = |body: &[u8]| Answer {
            line: 2,
            correlation_id: "c".into(),
            round_trip: Duration::from_micros(1250),
            body: body.to_vec(),
        };
        assert_eq!(
            reply_line(&answer(br#"{"value": [1, 2]}"#)),
            r#"{"line":2,"correlation_id":"c","ms":1.25,"reply":{"value":[1,2]}}"#
        );
        assert_eq!(
            reply_line(&answer(b"Polo")),
            r#"{"line":2,"correlation_id":"c","ms":1.25,"reply_text":"Polo"}"#
        );
    }

    #[test]
    fn the_most_serious_failure_decides_the_exit_code() {
        let code = |failed: &mut Vec<(usize, Failure, String)>, invalid: &[(usize, String)]| {
            report(failed, invalid, 1).map_err(|e| crate::error::exit_code_of(&e))
        };
        assert_eq!(code(&mut vec![], &[]), Ok(0));
        assert_eq!(code(&mut vec![], &[(1, "x".into())]), Err(2));
        let mut failed = vec![(2, Failure::TimedOut, "late".into())];
        assert_eq!(code(&mut failed, &[(1, "x".into())]), Err(124));
        failed.push((3, Failure::Refused, "unroutable".into()));
        assert_eq!(code(&mut failed, &[]), Err(121));
        failed.push((4, Failure::Lost, "lost".into()));
        assert_eq!(code(&mut failed, &[]), Err(111));
    }
}
