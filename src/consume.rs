//! The consume loop: deliveries → callback → ack/nack, reconnection, and the graceful stop.
//!
//! Semantics are fedora-messaging's (`twisted/consumer.py`), so a consumer moved to fm behaves
//! the same on the bus:
//! - one consumer per queue, each on its own channel, with `basic_qos(prefetch_count,
//!   prefetch_size)` and a UUID4 consumer tag;
//! - a message that is not UTF-8, not JSON, not a JSON object, or whose headers fail the base
//!   schema is dropped (`nack`, no requeue) with a log line naming it; so is one the AMQP parser
//!   had to repair (a routing key, id or header name that is not UTF-8, headers nested too
//!   deep: `message::damage`), instead of losing the connection over it (issue 17);
//! - callback outcomes: ack, `Nack` → requeue, `Drop` → nack without requeue, `Halt` → ack or
//!   requeue then stop with its exit code, any other failure → requeue it and every
//!   prefetched message, exit 13;
//! - messages are handled one at a time unless `[callback] concurrency` says otherwise; the
//!   callback never runs on the runtime's threads, so heartbeats flow during a long callback.
//!
//! Unlike fedora-messaging (its issues #208, #221, #574), a lost connection is never the end:
//! fm reconnects with capped, jittered exponential backoff, declares everything again and
//! goes on. Acks for deliveries of a dead channel are dropped — the broker delivers those
//! messages again (at-least-once). Only the documented fatal cases end the process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, message::Delivery};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::declare::{self, DeclaredQueue};
use crate::amqp::{Connected, Connector, errors};
use crate::attempts::{Attempts, Verdict};
use crate::callback::{Dispatch, Handler, Outcome};
use crate::config::Config;
use crate::error::{Exit, code};
use crate::message::Received;
use crate::shutdown::Shutdown;
use crate::stats::{Counter, Stats};

/// The first pause before reconnecting; doubled after each failure, up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest pause between two reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A connection that lived this long was healthy: the backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// What the consume loop needs, shared by every task it starts.
pub struct Context {
    /// The validated configuration (with CLI overrides applied).
    pub config: Arc<Config>,
    /// The callback.
    pub handler: Arc<Handler>,
    /// Counters for monitoring.
    pub stats: Arc<Stats>,
    /// The process-wide stop.
    pub shutdown: Shutdown,
    /// The attempts per message, for `max_redeliveries`.
    pub attempts: Attempts,
}

/// What fm logs once a queue's consumer is registered, fedora-messaging's words: from then on
/// a message published to the queue reaches fm. Tests and operators wait for this line.
pub const REGISTERED: &str = "Successfully registered AMQP consumer";

/// What fm logs once a message is acked, fedora-messaging's words.
pub const CONSUMED: &str = "Successfully consumed message";

/// Consume with a ready callback until `shutdown` (a signal, a halt, a failure) or a fatal
/// error, then shut the callback down: what `fm consume` and `fm record` run. The caller
/// decides what stops it (`fm` installs the signal handlers on `shutdown`; a test may trigger
/// it itself).
pub async fn serve(
    config: Arc<Config>,
    handler: Handler,
    shutdown: Shutdown,
) -> anyhow::Result<u8> {
    let handler = Arc::new(handler);
    let stats = Arc::new(Stats::default());
    let monitor = match &config.monitoring {
        Some(m) => Some(crate::monitor::start(m, Arc::clone(&stats)).await?),
        None => None,
    };
    let targets = config.amqp_urls.iter().map(|u| crate::amqp::url::redact(u));
    let notifier = crate::notify::start(
        Arc::clone(&stats),
        shutdown.clone(),
        targets.collect::<Vec<_>>().join(", "),
    );
    let queues: Vec<&str> = config
        .queues
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    let attempts = Attempts::open(
        config.callback.max_redeliveries,
        crate::attempts::state_folder(|name| std::env::var(name).ok()).as_deref(),
        &crate::attempts::config_id(&queues),
    );
    let ctx = Arc::new(Context {
        config,
        handler: Arc::clone(&handler),
        stats,
        shutdown,
        attempts,
    });
    let result = run(ctx).await;
    if let Some(notifier) = notifier {
        notifier.finish().await;
    }
    handler.shutdown().await;
    drop(monitor);
    result
}

/// Consume until a stop is asked for (signal, `Halt`, failure) or a fatal error.
///
/// Returns the exit code of a clean stop (0, or a `Halt`'s code 0); a stop with a non-zero
/// code comes back as an [`Exit`] error carrying its reason.
pub async fn run(ctx: Arc<Context>) -> anyhow::Result<u8> {
    let connector = Connector::new(&ctx.config)?;
    let permits = Arc::new(Semaphore::new(ctx.config.callback.concurrency.max(1)));
    let mut backoff = Backoff::new();
    let mut first = true;
    loop {
        let connected = tokio::select! {
            biased;
            _ = ctx.shutdown.triggered() => break,
            c = connector.connect() => c,
        };
        let connected = match connected {
            Ok(c) => c,
            // The first connection failing is fatal (exit 14, as fedora-messaging): the
            // configuration is probably wrong, and systemd restarts the unit later.
            Err(err) if first => return Err(err),
            Err(err) => {
                tracing::warn!("reconnecting failed: {err:#}");
                wait_or_stop(&ctx.shutdown, backoff.next()).await;
                continue;
            }
        };
        first = false;
        let started = Instant::now();
        let end = session(&ctx, &connected, &permits).await;
        ctx.stats.set_consuming(false);
        ctx.stats.set_broker(None);
        match end {
            End::Stopped => {
                close_connection(&connected).await;
                break;
            }
            End::Fatal(err) => {
                close_connection(&connected).await;
                return Err(err);
            }
            End::Lost(err) => {
                if ctx.shutdown.is_triggered() {
                    break;
                }
                Stats::bump(&ctx.stats.reconnects);
                if started.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next();
                tracing::warn!(
                    broker = %connected.url,
                    "connection lost: {err:#}; reconnecting in {:.1} s",
                    delay.as_secs_f64()
                );
                close_connection(&connected).await;
                wait_or_stop(&ctx.shutdown, delay).await;
            }
        }
    }
    match ctx.shutdown.reason() {
        None => Ok(code::OK),
        Some(stop) if stop.code == code::OK => Ok(code::OK),
        Some(stop) => Err(Exit::new(stop.code, anyhow!("{}", stop.reason))),
    }
}

/// How a session (one connection's life), or one consumer's loop in it, ended.
enum End {
    /// A stop was asked for and in-flight messages were drained.
    Stopped,
    /// The connection or a channel was lost: reconnect.
    Lost(anyhow::Error),
    /// A documented fatal error: exit with its code.
    Fatal(anyhow::Error),
}

/// Declare, register the consumers, run them until a stop or a loss.
async fn session(ctx: &Arc<Context>, connected: &Connected, permits: &Arc<Semaphore>) -> End {
    let conn = &connected.connection;
    let vhost = connected.vhost.as_str();
    ctx.stats.set_broker(Some(&connected.url));
    let queues = match declare_all(ctx, conn, vhost).await {
        Ok(q) => q,
        Err(err) => return classify(err),
    };

    let prefetch = effective_prefetch(&ctx.config);
    let mut consumers: Vec<(Channel, Consumer, DeclaredQueue)> = Vec::with_capacity(queues.len());
    for queue in queues {
        match register(ctx, conn, &queue, prefetch).await {
            Ok((channel, consumer)) => {
                ctx.stats.register_queue(&queue.name, &queue.configured);
                consumers.push((channel, consumer, queue));
            }
            Err(err) => return classify(err),
        }
    }
    ctx.stats.set_consuming(true);
    tracing::info!(
        broker = %connected.url,
        queues = %consumers.iter().map(|(_, _, q)| q.name.as_str()).collect::<Vec<_>>().join(", "),
        "consuming"
    );

    // `stop` ends every consumer loop: on shutdown, or when one of them sees the connection go.
    let stop = ctx.shutdown.token().child_token();
    let tracker = TaskTracker::new();
    let mut loops = tokio::task::JoinSet::new();
    for (channel, consumer, queue) in &consumers {
        let run = || {
            consume_loop(
                consumer.clone(),
                channel.clone(),
                Arc::from(queue.name.as_str()),
                Arc::clone(ctx),
                Arc::clone(permits),
                stop.clone(),
                tracker.clone(),
            )
        };
        if matches!(ctx.handler.dispatch(), Dispatch::Thread(_)) {
            for _ in 0..ctx.config.callback.concurrency.max(1) {
                loops.spawn(on_own_thread(run(), stop.clone()));
            }
        } else {
            loops.spawn(run());
        }
    }
    // systemd's watchdog is fed only while this tick finds these consumers healthy.
    let probed = consumers
        .iter()
        .map(|(c, _, q)| (c.clone(), q.name.clone()))
        .collect();
    crate::notify::start_health_tick(conn, probed, Arc::clone(&ctx.stats), stop.clone()).await;
    let mut end = None;
    while let Some(result) = loops.join_next().await {
        let this = match result {
            Ok(End::Stopped) => continue,
            Ok(end) => end,
            Err(join) => End::Fatal(anyhow!("a consumer task failed: {join}")),
        };
        stop.cancel();
        end.get_or_insert(this);
    }
    tracker.close();

    if let Some(end) = end {
        if let End::Fatal(err) = &end {
            // Let in-flight callbacks finish (their acks still count) before exiting.
            ctx.shutdown.trigger(code::FAILURE, format!("{err:#}"));
            drain(ctx, &consumers, &tracker).await;
        }
        return end;
    }
    // A stop was asked for: no new deliveries, let in-flight messages finish and be acked;
    // prefetched ones go back to the queue when the channels close.
    drain(ctx, &consumers, &tracker).await;
    End::Stopped
}

/// Cancel the consumers, wait (bounded) for in-flight callbacks, close the channels.
async fn drain(
    ctx: &Context,
    consumers: &[(Channel, Consumer, DeclaredQueue)],
    tracker: &TaskTracker,
) {
    for (channel, consumer, _) in consumers {
        if let Err(err) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!("cancelling consumer {}: {err}", consumer.tag());
        }
    }
    let timeout = ctx.config.shutdown_timeout;
    // Callbacks running, not tracker.len(): a consume thread (see `on_own_thread`) counts in the
    // tracker until it sees the stop, even when idle.
    let running = Stats::get(&ctx.stats.in_flight);
    if running > 0 {
        tracing::info!(
            in_flight = running,
            "waiting up to {:.0} s for in-flight messages",
            timeout.as_secs_f64()
        );
    }
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "in-flight messages did not finish within shutdown_timeout ({:.0} s): abandoning \
             them; the broker will deliver them again",
            timeout.as_secs_f64()
        );
    }
    for (channel, _, _) in consumers {
        let _ = channel.close(200, "fm stopping".into()).await;
    }
}

async fn declare_all(
    ctx: &Context,
    conn: &lapin::Connection,
    vhost: &str,
) -> anyhow::Result<Vec<DeclaredQueue>> {
    let channel = conn.create_channel().await.map_err(errors::describe)?;
    let queues = declare::declare(&channel, &ctx.config, vhost).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(queues)
}

async fn register(
    ctx: &Context,
    conn: &lapin::Connection,
    queue: &DeclaredQueue,
    prefetch: u16,
) -> anyhow::Result<(Channel, Consumer)> {
    let channel = conn.create_channel().await.map_err(errors::describe)?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(errors::describe)?;
    let tag = uuid::Uuid::new_v4().to_string();
    let consumer = channel
        .basic_consume(
            queue.name.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            let err =
                errors::describe(e).context(format!("cannot consume from queue '{}'", queue.name));
            match errors::reply_code(&err) {
                Some(errors::ACCESS_REFUSED) => Exit::new(code::PERMISSION, err),
                Some(_) => Exit::new(code::REGISTRATION, err),
                None => err,
            }
        })?;
    tracing::info!(
        "{REGISTERED} Consumer(queue={}, callback={})",
        queue.name,
        ctx.handler.describe()
    );
    Ok((channel, consumer))
}

/// The prefetch count: the configured one, raised to the concurrency so every slot can work
/// (0 means "no limit" in AMQP and stays 0).
fn effective_prefetch(config: &Config) -> u16 {
    let count = config.qos.prefetch_count;
    let concurrency = u16::try_from(config.callback.concurrency).unwrap_or(u16::MAX);
    if count == 0 {
        0
    } else {
        count.max(concurrency)
    }
}

/// Errors carrying a broker reply code or an exit code are fatal; anything else (an I/O error,
/// a closed connection) is a loss to recover from.
fn classify(err: anyhow::Error) -> End {
    let has_exit = err.chain().any(|e| e.downcast_ref::<Exit>().is_some());
    if has_exit || errors::reply_code(&err).is_some() {
        End::Fatal(err)
    } else {
        End::Lost(err)
    }
}

/// Run a consume loop on a thread of its own, for a callback that blocks ([`Dispatch::Thread`]):
/// each delivery is then handled right where it arrived, with no hand-off to another thread and
/// back. The thread is a blocking-pool one, so it has the runtime's context. A stop does not
/// wait for the message in progress: the thread holds a tracker token while it works, so
/// [`drain`] waits for it, up to `shutdown_timeout`, as for the tasks of the async path.
async fn on_own_thread(
    run: impl Future<Output = End> + Send + 'static,
    stop: CancellationToken,
) -> End {
    let thread = tokio::task::spawn_blocking(move || futures_lite::future::block_on(run));
    tokio::select! {
        biased;
        end = thread => end.unwrap_or_else(|e| End::Fatal(anyhow!("a consumer thread failed: {e}"))),
        _ = stop.cancelled() => End::Stopped,
    }
}

async fn consume_loop(
    mut consumer: Consumer,
    channel: Channel,
    queue: Arc<str>,
    ctx: Arc<Context>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> End {
    // On a thread of its own (`on_own_thread`), the loop handles each delivery itself.
    let dispatch = ctx.handler.dispatch();
    let own_thread = matches!(dispatch, Dispatch::Thread(_));
    loop {
        // Wait for a delivery first, then for a concurrency slot: a loop waiting on an idle
        // queue must not hold a slot the other queues' messages need. The delivery is already
        // prefetched (unacked) either way; one taken but never handled because of a stop goes
        // back to the queue when the channel closes. With concurrency 1, the next message is
        // still only handled once the previous one is done (fedora-messaging's serial
        // processing).
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return End::Stopped,
            d = consumer.next() => d,
        };
        // The thread's work counts as in flight from before it waits for a slot, so that a stop
        // racing with a delivery never closes the channel under a message being handled.
        let _working = own_thread.then(|| tracker.token());
        let permit = if matches!(next, Some(Ok(_))) {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return End::Stopped,
                p = Arc::clone(&permits).acquire_owned() => Some(p.expect("the semaphore is never closed")),
            }
        } else {
            None
        };
        match next {
            Some(Ok(delivery)) => {
                let handling = handle_delivery(
                    delivery,
                    channel.clone(),
                    Arc::clone(&queue),
                    Arc::clone(&ctx),
                    permit.expect("a slot is taken for every delivery"),
                    dispatch.clone(),
                );
                match dispatch {
                    Dispatch::Thread(_) => handling.await,
                    Dispatch::Task => {
                        tracker.spawn(handling);
                    }
                }
            }
            Some(Err(err)) => return lost_or_fatal(errors::describe(err), &queue),
            None if channel.status().connected() => {
                // The broker cancelled the consumer (the queue was deleted, …): exit 12.
                return End::Fatal(Exit::new(
                    code::CONSUMER_CANCELED,
                    anyhow!(
                        "the broker cancelled the consumer of queue '{queue}' (was the queue deleted?)"
                    ),
                ));
            }
            None => return End::Lost(anyhow!("the channel of queue '{queue}' was closed")),
        }
    }
}

fn lost_or_fatal(err: anyhow::Error, queue: &str) -> End {
    match errors::reply_code(&err) {
        Some(errors::ACCESS_REFUSED) => End::Fatal(Exit::new(
            code::PERMISSION,
            err.context(format!(
                "the broker refused access while consuming from '{queue}'"
            )),
        )),
        _ => End::Lost(err),
    }
}

/// Decode, call the callback (as `dispatch` says), settle.
async fn handle_delivery(
    mut delivery: Delivery,
    channel: Channel,
    queue: Arc<str>,
    ctx: Arc<Context>,
    permit: OwnedSemaphorePermit,
    dispatch: Dispatch,
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
        let received = match Received::from_delivery(&mut delivery, &queue) {
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
            Dispatch::Task => ctx.handler.handle(received).await,
        };
        ctx.stats.observe_callback(&queue, started.elapsed());
        drop(in_flight);
        match outcome {
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

async fn close_connection(connected: &Connected) {
    if connected.connection.status().connected() {
        let _ = connected.connection.close(200, "fm stopping".into()).await;
    }
}

async fn wait_or_stop(shutdown: &Shutdown, delay: Duration) {
    tokio::select! {
        _ = shutdown.triggered() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Capped exponential backoff with full jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_START,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    /// The next pause: uniformly between half and all of the current step, which doubles.
    fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first <= BACKOFF_START && first >= BACKOFF_START / 2);
        for _ in 0..20 {
            assert!(b.next() <= BACKOFF_MAX);
        }
        assert_eq!(b.next, BACKOFF_MAX);
        b.reset();
        assert!(b.next() <= BACKOFF_START);
    }

    #[test]
    fn halt_codes_outside_a_byte_become_1() {
        assert_eq!(halt_code(7), 7);
        assert_eq!(halt_code(0), 0);
        assert_eq!(halt_code(300), 1);
        assert_eq!(halt_code(-1), 1);
    }
}
