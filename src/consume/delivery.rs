//! One message's life: decode it (dropping what is not a valid message), apply the
//! redelivery limit, hand it to the callback as its [`Dispatch`] says, and settle it as the
//! outcome asks (ack, requeue, drop, halt, fail; a reply is published first, `reply.rs`).

use std::sync::Arc;
use std::time::Instant;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, message::Delivery};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::reply::Replier;
use super::{CONSUMED, Context};
use crate::attempts::Verdict;
use crate::callback::{Dispatch, Outcome};
use crate::error::code;
use crate::message::Received;
use crate::stats::Counter;

/// Decode, call the callback (as `dispatch` says), settle.
pub(super) async fn handle_delivery(
    mut delivery: Delivery,
    channel: Channel,
    queue: Arc<str>,
    ctx: Arc<Context>,
    permit: OwnedSemaphorePermit,
    dispatch: Dispatch,
    replier: Arc<Replier>,
) {
    let span = tracing::info_span!(
        "message",
        queue = &*queue,
        topic = delivery.routing_key.as_str(),
        message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map_or("<none>", |s| s.as_str()),
    );
    async move {
        let received =
            match Received::from_delivery(&mut delivery, &queue, ctx.config.callback.body) {
                Ok(r) => Arc::new(r),
                Err(invalid) => {
                    tracing::warn!("{invalid}; dropping it");
                    ctx.stats.count(&queue, Counter::Invalid);
                    settle(&channel, &delivery, Settle::Nack { requeue: false }).await;
                    return;
                }
            };
        ctx.stats.count(&queue, Counter::Received);
        let topic = received.message.topic.clone();
        let id = received.id_for_log().to_owned();
        let attempt = match ctx.attempts.begin(&received) {
            Verdict::Hand(key) => key,
            Verdict::Drop(failed) => {
                let max = ctx.config.callback.max_redeliveries.unwrap_or_default();
                tracing::warn!(
                    "message {id} (topic {topic}) was handed to the callback {failed} times \
                     without being settled (failed, requeued, timed out or crashed fm), more \
                     than max_redeliveries = {max}: dropping it (dead-lettered if queue \
                     '{queue}' has a dead-letter exchange)"
                );
                settle(&channel, &delivery, Settle::Nack { requeue: false }).await;
                ctx.stats.count(&queue, Counter::Dropped);
                return;
            }
        };
        tracing::info!("Consuming message from topic {topic} (message id {id})");
        let in_flight = ctx.stats.in_flight();
        let started = Instant::now();
        let outcome = match dispatch {
            Dispatch::Thread(plugin) => Dispatch::call_here(&plugin, &received),
            Dispatch::Task => ctx.handler.handle(Arc::clone(&received)).await,
        };
        ctx.stats.observe_callback(&queue, started.elapsed());
        drop(in_flight);
        let outcome = match outcome {
            Outcome::Reply(body) => match &received.reply_to {
                Some(to) => match replier.send(&received, &body).await {
                    Ok(()) => {
                        tracing::debug!("replied to message {id} ({} bytes to {to:?})", body.len());
                        Outcome::Ack
                    }
                    Err(err) => {
                        // The reply may or may not have gone out: answering again is the
                        // at-least-once side of that doubt.
                        tracing::warn!(
                            "could not send the reply to message {id}: {err:#}; returning the \
                             message to the queue to be answered again"
                        );
                        Outcome::Nack
                    }
                },
                None => {
                    tracing::debug!(
                        "the callback replied to message {id}, which has no reply_to: nothing \
                         to send"
                    );
                    Outcome::Ack
                }
            },
            other => other,
        };
        match outcome {
            Outcome::Reply(_) => unreachable!("a reply was sent and became an ack above"),
            Outcome::Ack => {
                // An ack on a channel that is gone (a lost heartbeat) never reached the broker:
                // the message comes again, so it was not consumed yet (settle logs why).
                let acked = settle(&channel, &delivery, Settle::Ack).await;
                ctx.attempts.end(attempt, acked);
                if acked {
                    ctx.stats.count(&queue, Counter::Processed);
                    tracing::info!("{CONSUMED} from topic {topic} (message id {id})");
                }
            }
            Outcome::Nack => {
                ctx.attempts.end(attempt, false);
                tracing::info!("Returning message id {id} to the queue");
                settle(&channel, &delivery, Settle::Nack { requeue: true }).await;
                ctx.stats.count(&queue, Counter::Rejected);
            }
            Outcome::Drop => {
                ctx.attempts.end(attempt, true);
                tracing::info!("Consumer requested message id {id} be dropped");
                settle(&channel, &delivery, Settle::Nack { requeue: false }).await;
                ctx.stats.count(&queue, Counter::Dropped);
            }
            Outcome::Halt {
                exit_code,
                requeue,
                reason,
            } => {
                ctx.attempts.end(attempt, !requeue);
                if requeue {
                    settle(&channel, &delivery, Settle::Nack { requeue: true }).await;
                    ctx.stats.count(&queue, Counter::Rejected);
                } else {
                    settle(&channel, &delivery, Settle::Ack).await;
                    ctx.stats.count(&queue, Counter::Processed);
                }
                let code = halt_code(exit_code);
                let reason = reason.unwrap_or_else(|| "the callback asked to halt".into());
                if code == 0 {
                    tracing::info!("Consumer indicated it wishes to halt: {reason}");
                } else {
                    tracing::error!("Consumer halted with non-zero exit code ({code}): {reason}");
                }
                ctx.shutdown.trigger(
                    code,
                    format!("consumer halted with exit code {code} on message {id}: {reason}"),
                );
            }
            Outcome::Fail(err) => {
                ctx.attempts.end(attempt, false);
                tracing::error!("the callback failed on message {id} (topic {topic}): {err}");
                settle(&channel, &delivery, Settle::Nack { requeue: true }).await;
                ctx.stats.count(&queue, Counter::Failed);
                ctx.shutdown.trigger(
                    code::CALLBACK_FAILED,
                    format!(
                        "the callback failed on message {id} (topic {topic}): {err}; the message \
                         and all prefetched ones were returned to the queue"
                    ),
                );
            }
        }
        drop(permit);
    }
    .instrument(span)
    .await
}

/// The exit code for `Halt(exit_code)`: process exit codes are 0..=255.
fn halt_code(exit_code: i32) -> u8 {
    u8::try_from(exit_code).unwrap_or_else(|_| {
        tracing::warn!("halt exit code {exit_code} is outside 0..=255; exiting with 1");
        code::FAILURE
    })
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nack { requeue: bool },
}

/// Ack or nack; false when that failed, which means the channel is gone: the broker delivers
/// the message again.
///
/// Sent on the delivery's channel directly rather than through `delivery.acker`, which takes a
/// detour through lapin's internal RPC task (a wake-up of a runtime thread, and a task spawned,
/// for every message); the frame and the outcome are the same.
async fn settle(channel: &Channel, delivery: &Delivery, how: Settle) -> bool {
    let tag = delivery.delivery_tag;
    let result = match how {
        Settle::Ack => channel.basic_ack(tag, BasicAckOptions::default()).await,
        Settle::Nack { requeue } => {
            channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        requeue,
                        multiple: false,
                    },
                )
                .await
        }
    };
    match result {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(
                "could not settle the message ({err}): its channel is gone, the broker will \
                 deliver it again"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halt_codes_outside_a_byte_become_1() {
        assert_eq!(halt_code(7), 7);
        assert_eq!(halt_code(0), 0);
        assert_eq!(halt_code(300), 1);
        assert_eq!(halt_code(-1), 1);
    }
}
