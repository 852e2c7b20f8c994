//! The pipeline: up to [`WINDOW`] messages in flight on one channel in confirm mode, confirms
//! and returns matched as they come, a lost connection re-established and the unconfirmed
//! messages sent again.

use super::*;

/// One message ready to go out, encoded once.
pub(crate) struct Outgoing {
    /// Its position among the messages read (1-based): orders the `--failed` file.
    pub(crate) seq: u64,
    /// Its input line (0: the command line).
    pub(crate) line: usize,
    /// The message, for the record line written to `--failed`.
    pub(crate) message: Message,
    pub(crate) routing_key: ShortString,
    pub(crate) body: Vec<u8>,
    /// The encoded body's size, which counts against the window (kept when the body is
    /// dropped after the confirm).
    pub(crate) size: usize,
    pub(crate) properties: BasicProperties,
    /// Sent at least once (on a connection that may since have been lost).
    pub(crate) sent: bool,
}

impl Outgoing {
    /// Send it to `exchange` on `channel` (its confirm comes back through the returned
    /// future when the channel is in confirm mode).
    pub(crate) async fn publish(
        &self,
        channel: &Channel,
        exchange: &ShortString,
        options: BasicPublishOptions,
    ) -> lapin::Result<PublisherConfirm> {
        channel
            .basic_publish(
                exchange.clone(),
                self.routing_key.clone(),
                options,
                &self.body,
                self.properties.clone(),
            )
            .await
    }

    pub(crate) fn new(
        seq: u64,
        line: usize,
        message: Message,
        topic_prefix: &str,
    ) -> Result<Outgoing, String> {
        let key = message.routing_key(topic_prefix);
        let routing_key = ShortString::try_new(key.as_str())
            .map_err(|_| format!("the routing key is longer than 255 bytes: {key:.40}…"))?;
        let properties = message.amqp_properties()?;
        let body = message.encoded_body();
        Ok(Outgoing {
            seq,
            line,
            size: body.len(),
            body,
            routing_key,
            properties,
            message,
            sent: false,
        })
    }

    pub(crate) fn id(&self) -> &str {
        self.message.id.as_deref().unwrap_or("<none>")
    }

    /// "message ID (line N)", for errors.
    pub(crate) fn describe(&self) -> String {
        if self.line == 0 {
            format!("message {}", self.id())
        } else {
            format!("message {} (line {})", self.id(), self.line)
        }
    }
}

/// Whether a message of `size` bytes may join `count` messages of `bytes` in flight: the
/// window is [`WINDOW`] messages and [`WINDOW_BYTES`], but one message always goes.
pub(crate) fn window_has_room(count: usize, bytes: usize, size: usize) -> bool {
    count == 0 || (count < WINDOW && bytes + size <= WINDOW_BYTES)
}

/// The messages sent and waiting for their confirm, oldest first, with the sizes of their
/// bodies added up: the window that [`window_has_room`] bounds.
pub(crate) struct InFlightQueue<T> {
    items: VecDeque<T>,
    bytes: usize,
}

impl<T: Carries> InFlightQueue<T> {
    pub(crate) fn new() -> InFlightQueue<T> {
        InFlightQueue {
            items: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Whether a message of `size` bytes may be sent now.
    pub(crate) fn has_room_for(&self, size: usize) -> bool {
        window_has_room(self.items.len(), self.bytes, size)
    }

    pub(crate) fn push(&mut self, item: T) {
        self.bytes += item.outgoing().size;
        self.items.push_back(item);
    }

    /// The oldest, out of the window.
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.bytes -= item.outgoing().size;
        Some(item)
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.items.front()
    }

    pub(crate) fn front_mut(&mut self) -> Option<&mut T> {
        self.items.front_mut()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

/// What carries a message being published: `fm publish`'s entries and `fm relay`'s (which add
/// the batch the message came from).
pub(crate) trait Carries {
    fn outgoing(&self) -> &Outgoing;
    fn outgoing_mut(&mut self) -> &mut Outgoing;
}

impl Carries for Outgoing {
    fn outgoing(&self) -> &Outgoing {
        self
    }
    fn outgoing_mut(&mut self) -> &mut Outgoing {
        self
    }
}

/// The last confirmed messages. lapin hands a `basic.return` to whichever confirm completes
/// next, which may be a later message's, so a return may name a message already taken as
/// confirmed: they are kept a window long ([`WINDOW`] messages and [`WINDOW_BYTES`] of the
/// bodies they had, but always the last one) to be found by id. Their encoded bodies go at
/// once: a message returned late is written out from its `message`.
pub(crate) struct Recent<T> {
    items: VecDeque<T>,
    /// The sizes of their bodies, added up.
    bytes: usize,
}

impl<T: Carries> Recent<T> {
    pub(crate) fn new() -> Recent<T> {
        Recent {
            items: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keep a confirmed message, letting the oldest go beyond a window.
    pub(crate) fn push(&mut self, mut item: T) {
        let out = item.outgoing_mut();
        out.body = Vec::new();
        self.bytes += out.size;
        self.items.push_back(item);
        while self.items.len() > 1 && (self.items.len() > WINDOW || self.bytes > WINDOW_BYTES) {
            let old = self.items.pop_front().expect("more than one");
            self.bytes -= old.outgoing().size;
        }
    }

    /// The latest kept message with this id, taken out.
    pub(crate) fn take(&mut self, id: &str) -> Option<T> {
        let pos = self.items.iter().rposition(|i| i.outgoing().id() == id)?;
        let item = self.items.remove(pos)?;
        self.bytes -= item.outgoing().size;
        Some(item)
    }

    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A message sent and waiting for its confirm.
pub(super) struct InFlight {
    pub(super) out: Outgoing,
    pub(super) confirm: PublisherConfirm,
    pub(super) deadline: Instant,
}

impl Carries for InFlight {
    fn outgoing(&self) -> &Outgoing {
        &self.out
    }
    fn outgoing_mut(&mut self) -> &mut Outgoing {
        &mut self.out
    }
}

impl Publisher {
    /// Connect, publish everything, reconnect after a loss, until done or stopped.
    pub(super) async fn publish_all(&mut self) {
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
    pub(super) async fn connect(&mut self, doing: &str) -> Option<Connected> {
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
    pub(super) async fn session(&mut self, connected: &Connected, channel: &Channel) -> SessionEnd {
        let options = BasicPublishOptions {
            mandatory: self.mandatory,
            immediate: false,
        };
        loop {
            let next = self.retry.front().map_or(0, |o| o.size);
            let room = self.in_flight.has_room_for(next) && self.stop.is_none();
            if room && let Some(out) = self.retry.pop_front() {
                let sent = out.publish(channel, &self.exchange, options).await;
                match sent {
                    Ok(confirm) => {
                        let mut out = out;
                        out.sent = true;
                        tracing::debug!(
                            topic = out.message.topic.as_str(),
                            "sent {}",
                            out.describe()
                        );
                        self.in_flight.push(InFlight {
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
                match result {
                    Ok(Ok(confirmation)) => {
                        let front = self.in_flight.pop_front().expect("it was just polled");
                        self.settle(front.out, confirmation);
                    }
                    Ok(Err(err)) => return self.abort(connected, channel, err).await,
                    Err(_) => {
                        let front = self.in_flight.front().expect("it was just polled");
                        let reason = format!(
                            "the broker did not confirm {} within {:.0} s (--timeout)",
                            front.out.describe(),
                            self.timeout.as_secs_f64()
                        );
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
    pub(super) fn handle(&mut self, event: Event) {
        match event {
            Event::Signal => self.stop_by_signal(),
            Event::Confirm(_) => unreachable!("confirms are settled by the session"),
            Event::Input(None) => self.input_done = true,
            Event::Input(Some(Read { item, bytes, .. })) => {
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

    pub(super) fn invalid_line(&mut self, line: usize, reason: String) {
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

    pub(super) fn where_(&self, line: usize) -> String {
        if line == 0 {
            "the message".to_owned()
        } else {
            format!("line {line} of {}", self.input_name)
        }
    }

    /// Take the broker's answer about one message.
    pub(super) fn settle(&mut self, out: Outgoing, confirmation: Confirmation) {
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
                        self.recent.push(out);
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
    pub(super) fn on_return(&mut self, r: BasicReturnMessage) {
        let (id, why) = return_reason(&r);
        if let Some(out) = self.recent.take(&id) {
            self.published -= 1;
            self.refused(out, why);
        } else {
            self.returned.insert(id, why);
        }
    }

    pub(super) fn refused(&mut self, out: Outgoing, why: String) {
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
    pub(super) async fn abort(
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
        let connection_up = connected.connection.status().connected() && !connection_lost(&first);
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
    pub(super) fn give_up_in_flight(&mut self, why: &str) {
        while let Some(f) = self.in_flight.pop_front() {
            self.failed
                .push((f.out, Failure::Unconfirmed, why.to_owned()));
        }
    }

    pub(super) fn stop_with(&mut self, code: u8, reason: String) {
        if self.stop.is_none() {
            self.stop = Some(Stop {
                code,
                reason,
                interrupted: false,
            });
        }
    }

    pub(super) fn stop_by_signal(&mut self) {
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
}

/// The id of a message the broker returned (`basic.return`), and why, in words.
pub(crate) fn return_reason(r: &BasicReturnMessage) -> (String, String) {
    let id = r
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    let mut why = errors::returned(r);
    if r.reply_code == errors::NO_ROUTE {
        why.push_str(" (--allow-unroutable accepts such messages)");
    }
    (id, why)
}

/// The reply of a broker refusal that closed the channel (403, 404, 406…), if that is what
/// this error is. Connection-level errors (320 CONNECTION_FORCED when the broker stops) are
/// not refusals: fm reconnects.
pub(crate) fn soft_error(err: &lapin::Error) -> Option<String> {
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

/// Whether `err` says the connection itself is gone (reset, closed, silent), whatever lapin's
/// connection status says yet: it is updated after the error reaches the publisher, so a
/// reset read as "the connection is up" would stop publishing as if fm had failed (exit 1)
/// instead of reconnecting.
pub(crate) fn connection_lost(err: &lapin::Error) -> bool {
    match err.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError => true,
        ErrorKind::ProtocolError(amqp) => matches!(amqp.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

/// What a lost connection looks like, in words: lapin reports a publish on a dead
/// connection as an "invalid channel state".
pub(crate) fn loss_text(err: &lapin::Error) -> String {
    match err.kind() {
        ErrorKind::InvalidChannelState(..) | ErrorKind::InvalidConnectionState(_) => {
            "the connection was closed (the broker stopped, or the network failed)".to_owned()
        }
        _ => errors::describe(err.clone()).to_string(),
    }
}

pub(crate) async fn open_channel(connected: &Connected) -> anyhow::Result<Channel> {
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
pub(crate) async fn close(connected: &Connected) {
    if connected.connection.status().connected() {
        let closing = connected.connection.close(200, "fm publish done".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reset socket is a lost connection even before lapin marks the connection down (a
    /// full run once saw exit 1 instead of a reconnect); fm's own errors are not.
    #[test]
    fn a_reset_or_closed_connection_is_a_loss_whatever_the_status_says() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(connection_lost(&lapin::Error::from(reset)));
        assert!(connection_lost(&lapin::Error::from(
            ErrorKind::MissingHeartbeatError
        )));
        assert!(!connection_lost(&lapin::Error::from(
            ErrorKind::FutureCompleted
        )));
        assert!(!connection_lost(&lapin::Error::from(
            ErrorKind::ChannelsLimitReached
        )));
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
}
