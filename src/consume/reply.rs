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
//! A reply nobody can receive any more (the client left: its direct reply-to pseudo-queue is
//! gone, so the broker returns the reply as unroutable) is logged once, and the request is
//! still acked: answering it again would not reach anyone either. A reply the broker refuses
//! (a nack) or that cannot be sent (the channel is gone) is an error: the request goes back to
//! the queue, to be answered again.
//!
//! [`Outcome::Reply`]: crate::callback::Outcome::Reply

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};

use crate::amqp::errors;
use crate::message::Received;

/// The content type of a reply that is JSON; other replies have none ("sent as given").
const JSON: &str = "application/json";

/// The session's reply channel, in confirm mode.
pub(super) struct Replier {
    channel: Channel,
}

impl Replier {
    /// Open the reply channel on `conn`.
    pub(super) async fn open(conn: &lapin::Connection) -> anyhow::Result<Replier> {
        let channel = conn.create_channel().await.map_err(errors::describe)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(errors::describe)?;
        Ok(Replier { channel })
    }

    /// Publish `body` as the reply to `request` (which has a `reply_to`) and wait for the
    /// broker's confirm. `Ok` once the broker took it, whether or not a client received it
    /// (an unroutable reply is logged here); `Err` when it was refused or could not be sent.
    pub(super) async fn send(&self, request: &Received, body: &[u8]) -> anyhow::Result<()> {
        let to = request.reply_to.as_deref().unwrap_or_default();
        let routing_key = ShortString::try_new(to)
            .map_err(|_| anyhow::anyhow!("its reply_to is longer than 255 bytes"))?;
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
            // reply's: the log line names the returned reply by its own routing key and
            // correlation id, so each unroutable reply is logged once, by whoever sees it.
            Confirmation::Ack(returned) => {
                if let Some(r) = returned {
                    let props = &r.delivery.properties;
                    tracing::warn!(
                        "the reply to {:?} (correlation id {}) could not be delivered ({} {}): \
                         the client is gone; the request is acked all the same",
                        r.delivery.routing_key.as_str(),
                        props
                            .correlation_id()
                            .as_ref()
                            .map_or("<none>".into(), |c| format!("{:?}", c.as_str())),
                        r.reply_code,
                        r.reply_text.as_str(),
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

/// The properties of the reply to `request`: its correlation id (its message id when it has
/// none), and `application/json` in UTF-8 only when the reply is JSON.
fn properties(request: &Received, body: &[u8]) -> BasicProperties {
    let mut props = BasicProperties::default();
    let correlation = request
        .correlation_id
        .as_deref()
        .or(request.message.id.as_deref());
    if let Some(id) = correlation.and_then(|c| ShortString::try_new(c).ok()) {
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
