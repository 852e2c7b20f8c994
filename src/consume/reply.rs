//! The reply to a request (issue 13): RabbitMQ's request/reply convention, which pika, the
//! Java, Go and JS clients speak (<https://www.rabbitmq.com/docs/direct-reply-to>).
//!
//! A delivery that carries `reply_to` and gets a reply from its callback ([`Outcome::Reply`])
//! has the reply published to the default exchange with routing key = `reply_to`, the
//! request's `correlation_id` copied (its `message_id` when it has none), `mandatory`, on a
//! channel of the session in confirm mode; only once the broker confirmed it is the request
//! acked ([`super::delivery`]). So a crash between the two can send a reply twice (the
//! request comes again), never lose the request: at-least-once, like every delivery.
//!
//! A reply nobody can receive any more (the client left) is logged once per client, and the
//! request is still acked: answering it again would not reach anyone either. For a reply
//! queue of the classic kind, the broker returning the reply as unroutable says so. For a
//! direct reply-to name (`amq.rabbitmq.reply-to.…`) it does not: RabbitMQ returns every
//! mandatory publish to such a name, delivered or not (the "not a queue" caveat of its direct
//! reply-to guide, seen with 3.10), and a client that got its reply may leave before any check
//! after it. So fm asks the broker *before* publishing, as that guide advises: a passive
//! declare of the name on a channel of its own (404: the client is gone, nothing is sent), at
//! most once a second per name ([`PROBE_EVERY`]), which is one extra round trip per client and
//! second. A reply the broker refuses (a nack) or that cannot be sent (the channel is gone) is
//! an error: the request goes back to the queue, to be answered again.
//!
//! [`Outcome::Reply`]: crate::callback::Outcome::Reply

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::amqp::errors;
use crate::message::Received;

/// The content type of a reply that is JSON; other replies have none ("sent as given").
const JSON: &str = "application/json";

/// The prefix of RabbitMQ's direct reply-to names.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to.";

/// How long a direct reply-to client found present is taken to still be there: the most
/// often fm asks the broker about one client.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The most client names remembered (present or gone); past it the oldest knowledge goes.
const REMEMBERED: usize = 4096;

/// The session's reply channel, in confirm mode.
pub(super) struct Replier {
    channel: Channel,
    clients: Clients,
}

/// What fm knows of the direct reply-to clients it answered.
struct Clients {
    conn: Arc<Connection>,
    /// The channel probes are made on, while it lives (a 404 closes it).
    probes: tokio::sync::Mutex<Option<Channel>>,
    /// Name → when it was last found present.
    present: Mutex<HashMap<String, Instant>>,
    /// Names found gone (each logged once).
    gone: Mutex<HashSet<String>>,
}

impl Replier {
    /// Open the reply channel on `conn`.
    pub(super) async fn open(conn: &Arc<Connection>) -> anyhow::Result<Replier> {
        let channel = conn.create_channel().await.map_err(errors::describe)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(errors::describe)?;
        Ok(Replier {
            channel,
            clients: Clients {
                conn: Arc::clone(conn),
                probes: tokio::sync::Mutex::new(None),
                present: Mutex::new(HashMap::new()),
                gone: Mutex::new(HashSet::new()),
            },
        })
    }

    /// Publish `body` as the reply to `request` (which has a `reply_to`) and wait for the
    /// broker's confirm. `Ok` once the broker took it, whether or not a client received it
    /// (an unroutable reply is logged here); `Err` when it was refused or could not be sent.
    pub(super) async fn send(&self, request: &Received, body: &[u8]) -> anyhow::Result<()> {
        let to = request.reply_to.as_deref().unwrap_or_default();
        let routing_key = ShortString::try_new(to)
            .map_err(|_| anyhow::anyhow!("its reply_to is longer than 255 bytes"))?;
        let direct = to.starts_with(DIRECT_REPLY_TO);
        if direct && self.clients.gone(to, request).await {
            return Ok(());
        }
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties(request, body),
            )
            .await
            .map_err(errors::describe)?;
        match confirm.await.map_err(errors::describe)? {
            // lapin hands a return to whichever confirm completes next, which may be another
            // reply's: the returned reply is named by its own routing key and correlation id.
            Confirmation::Ack(returned) => {
                // A return to a direct reply-to name says nothing (see the module docs).
                if let Some(r) = returned
                    && !r.delivery.routing_key.as_str().starts_with(DIRECT_REPLY_TO)
                {
                    self.clients.log_gone(
                        r.delivery.routing_key.as_str(),
                        r.delivery
                            .properties
                            .correlation_id()
                            .as_ref()
                            .map(|c| c.as_str()),
                        &format!("{} {}", r.reply_code, r.reply_text.as_str()),
                    );
                }
                Ok(())
            }
            Confirmation::Nack(_) => Err(anyhow::anyhow!("the broker refused the reply (nack)")),
            Confirmation::NotRequested => Ok(()),
        }
    }

    /// Close the channel (the session is ending).
    pub(super) async fn close(&self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "fm stopping".into()).await;
        }
    }
}

impl Clients {
    /// Whether direct reply-to client `name` is gone (logged once): known present within
    /// [`PROBE_EVERY`], else asked. When the broker cannot be asked, the reply is sent.
    async fn gone(&self, name: &str, request: &Received) -> bool {
        if self.lock_gone().contains(name) {
            return true;
        }
        let known = self
            .lock_present()
            .get(name)
            .is_some_and(|at| at.elapsed() < PROBE_EVERY);
        if known {
            return false;
        }
        match self.probe(name).await {
            Some(true) => {
                self.log_gone(name, correlation_id(request), "404 NOT_FOUND");
                true
            }
            Some(false) => {
                let mut present = self.lock_present();
                if present.len() >= REMEMBERED {
                    present.retain(|_, at| at.elapsed() < PROBE_EVERY);
                }
                present.insert(name.to_owned(), Instant::now());
                false
            }
            None => false,
        }
    }

    /// Ask the broker whether direct reply-to client `name` is still there: a passive declare
    /// succeeds while it consumes, and fails with 404 (closing the channel) once it is gone.
    /// `None` when the question could not be asked.
    async fn probe(&self, name: &str) -> Option<bool> {
        let mut probes = self.probes.lock().await;
        let channel = match probes.take() {
            Some(c) if c.status().connected() => c,
            _ => self.conn.create_channel().await.ok()?,
        };
        let declared = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => {
                *probes = Some(channel);
                Some(false)
            }
            Err(err) => Some(errors::reply_code(&errors::describe(err)) == Some(errors::NOT_FOUND)),
        }
    }

    /// Log, once per client, that a reply cannot be delivered.
    fn log_gone(&self, name: &str, correlation_id: Option<&str>, why: &str) {
        let mut gone = self.lock_gone();
        if gone.len() >= REMEMBERED {
            gone.clear();
        }
        if !gone.insert(name.to_owned()) {
            return;
        }
        tracing::warn!(
            "the reply to {name:?} (correlation id {}) cannot be delivered ({why}): the client \
             is gone; its request is acked all the same (logged once per client)",
            correlation_id.map_or("<none>".into(), |c| format!("{c:?}")),
        );
    }

    fn lock_present(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.present.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_gone(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.gone.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The correlation id a reply to `request` carries: its own, or else its message id.
fn correlation_id(request: &Received) -> Option<&str> {
    request
        .correlation_id
        .as_deref()
        .or(request.message.id.as_deref())
}

/// The properties of the reply to `request`: its correlation id (its message id when it has
/// none), and `application/json` in UTF-8 only when the reply is JSON.
fn properties(request: &Received, body: &[u8]) -> BasicProperties {
    let mut props = BasicProperties::default();
    if let Some(id) = correlation_id(request).and_then(|c| ShortString::try_new(c).ok()) {
        props = props.with_correlation_id(id);
    }
    if is_json(body) {
        props = props
            .with_content_type(JSON.into())
            .with_content_encoding("utf-8".into());
    }
    props
}

/// Whether `body` is one JSON document (of any type).
pub(crate) fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn request(correlation_id: Option<&str>, id: Option<&str>) -> Received {
        let message = Message {
            topic: "rpc".into(),
            id: id.map(str::to_owned),
            headers: Default::default(),
            body: serde_json::json!({}).into(),
            queue: Some("q".into()),
            priority: None,
        };
        Received {
            record: message.record_line(),
            message,
            exchange: String::new(),
            redelivered: false,
            raw_body: b"{}".to_vec(),
            reply_to: Some("amq.rabbitmq.reply-to.x".into()),
            correlation_id: correlation_id.map(str::to_owned),
            raw: false,
        }
    }

    #[test]
    fn the_reply_carries_the_correlation_id_or_else_the_message_id() {
        let props = properties(&request(Some("c-1"), Some("m-1")), b"{}");
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "c-1");
        let props = properties(&request(None, Some("m-1")), b"{}");
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "m-1");
        assert!(
            properties(&request(None, None), b"{}")
                .correlation_id()
                .is_none()
        );
    }

    #[test]
    fn only_json_replies_say_they_are_json() {
        let props = properties(&request(None, None), br#"{"value": 1}"#);
        assert_eq!(props.content_type().as_ref().unwrap().as_str(), JSON);
        assert_eq!(props.content_encoding().as_ref().unwrap().as_str(), "utf-8");
        for json in [&b"42"[..], b"\"Polo\"", b" [1, 2] ", b"null"] {
            assert!(is_json(json));
        }
        for bytes in [&b"Polo"[..], b"", b"{", b"1 2", b"\xff"] {
            assert!(!is_json(bytes));
            assert!(
                properties(&request(None, None), bytes)
                    .content_type()
                    .is_none()
            );
        }
    }
}
