//! One connection's life: declare everything, register a consumer per queue (each on its own
//! channel, with its prefetch), run their loops until a stop or a loss, then drain the
//! callbacks in flight before the channels close.

use std::sync::Arc;

use anyhow::anyhow;
use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::handle_delivery;
use super::reply::Replier;
use super::{Context, End, REGISTERED};
use crate::amqp::declare::{self, DeclaredQueue};
use crate::amqp::{Connected, errors};
use crate::callback::Dispatch;
use crate::config::Config;
use crate::error::{Exit, code};
use crate::stats::Stats;

/// Declare, register the consumers, run them until a stop or a loss.
pub(super) async fn run(
    ctx: &Arc<Context>,
    connected: &Connected,
    permits: &Arc<Semaphore>,
) -> End {
    let conn = &connected.connection;
    let vhost = connected.vhost.as_str();
    ctx.stats.set_broker(Some(&connected.url));
    let consumers = match set_up_all(ctx, conn, vhost).await {
        Ok(c) => c,
        Err(err) => return classify(err),
    };
    // Replies to requests go out on a channel of their own, in confirm mode (reply.rs).
    let replier = match Replier::open(&connected.connection).await {
        Ok(r) => Arc::new(r),
        Err(err) => return classify(err),
    };
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
    // `[callback] queue_concurrency` below `concurrency`: each queue has slots of its own too.
    let per_queue = ctx.config.callback.per_queue();
    let limited = per_queue < ctx.config.callback.concurrency.max(1);
    for (channel, consumer, queue) in &consumers {
        let own = limited.then(|| Arc::new(Semaphore::new(per_queue)));
        let run = || {
            consume_loop(
                consumer.clone(),
                channel.clone(),
                Arc::from(queue.name.as_str()),
                Arc::clone(ctx),
                Arc::clone(&replier),
                Shared {
                    slots: Slots {
                        all: Arc::clone(permits),
                        queue: own.clone(),
                    },
                    stop: stop.clone(),
                    tracker: tracker.clone(),
                },
            )
        };
        if matches!(ctx.handler.dispatch(), Dispatch::Thread(_)) {
            for _ in 0..per_queue {
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
            replier.close().await;
        }
        return end;
    }
    // A stop was asked for: no new deliveries, let in-flight messages finish and be acked;
    // prefetched ones go back to the queue when the channels close.
    drain(ctx, &consumers, &tracker).await;
    replier.close().await;
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

/// Declare every queue, bind it and register a consumer on it, each queue on its own channel
/// and all at once: one after the other, each queue's five round trips (channel, declare, bind,
/// QoS, consume) added up to 0.8 s before READY with 200 queues. The result is in the order of
/// the configuration; the first failure to come back is the error.
async fn set_up_all(
    ctx: &Arc<Context>,
    conn: &Arc<lapin::Connection>,
    vhost: &str,
) -> anyhow::Result<Vec<(Channel, Consumer, DeclaredQueue)>> {
    let prefetch = effective_prefetch(&ctx.config);
    let mut setting_up = tokio::task::JoinSet::new();
    for i in 0..ctx.config.queues.len() {
        let (ctx, conn, vhost) = (Arc::clone(ctx), Arc::clone(conn), vhost.to_owned());
        setting_up.spawn(async move {
            let (name, queue) = &ctx.config.queues[i];
            let set_up = async {
                let channel = conn.create_channel().await.map_err(errors::describe)?;
                let declared =
                    declare::declare_queue(&channel, &ctx.config, (name, queue), &vhost).await?;
                let consumer = register(&ctx, &channel, &declared, prefetch).await?;
                anyhow::Ok((channel, consumer, declared))
            };
            (i, set_up.await)
        });
    }
    let mut set_up: Vec<Option<(Channel, Consumer, DeclaredQueue)>> =
        ctx.config.queues.iter().map(|_| None).collect();
    while let Some(joined) = setting_up.join_next().await {
        let (i, result) = joined.map_err(|e| anyhow!("setting up a queue: {e}"))?;
        set_up[i] = Some(result?);
    }
    let consumers: Vec<_> = set_up.into_iter().flatten().collect();
    for (_, _, queue) in &consumers {
        ctx.stats.register_queue(&queue.name, &queue.configured);
    }
    Ok(consumers)
}

/// Set the QoS on `channel` and register the consumer of `queue`.
async fn register(
    ctx: &Context,
    channel: &Channel,
    queue: &DeclaredQueue,
    prefetch: u16,
) -> anyhow::Result<Consumer> {
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
    Ok(consumer)
}

/// The prefetch count: the configured one, raised to twice the concurrency a queue may use
/// (0 means "no limit" in AMQP and stays 0). With exactly as many messages prefetched as slots,
/// a slot that acks waits a broker round trip for its next message; a second message per slot
/// hides it: with a callback that waits 10 ms, prefetch 32 instead of 16 at concurrency 16 gave
/// 1,344 instead of 1,049 messages/s, and 128 instead of 64 at concurrency 64 gave 4,082
/// instead of 3,451 (issue 15, BENCHMARKS.md). At the default concurrency of 1, nothing changes.
fn effective_prefetch(config: &Config) -> u16 {
    let count = config.qos.prefetch_count;
    let concurrency = config.callback.per_queue();
    let wanted = if concurrency > 1 {
        concurrency.saturating_mul(2)
    } else {
        1
    };
    if count == 0 {
        0
    } else {
        count.max(u16::try_from(wanted).unwrap_or(u16::MAX))
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
/// back. The thread enters the runtime, so it has the runtime's context; it is not one of the
/// runtime's blocking pool, whose 512 threads a loop per queue per slot would outgrow (200
/// queues at concurrency 4, say: the loops past the 512th would wait for a thread that never
/// comes free, and their queues' messages would never be handled; issue 15). A stop does not
/// wait for the message in progress: the thread holds a tracker token while it works, so
/// [`drain`] waits for it, up to `shutdown_timeout`, as for the tasks of the async path.
async fn on_own_thread(
    run: impl Future<Output = End> + Send + 'static,
    stop: CancellationToken,
) -> End {
    let (done, thread) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("fm-consume".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            let _ = done.send(futures_lite::future::block_on(run));
        });
    if let Err(e) = spawned {
        return End::Fatal(anyhow!("cannot start a consumer thread: {e}"));
    }
    tokio::select! {
        biased;
        end = thread => end.unwrap_or_else(|_| End::Fatal(anyhow!("a consumer thread failed"))),
        _ = stop.cancelled() => End::Stopped,
    }
}

/// What every consume loop of a session shares.
struct Shared {
    /// The concurrency slots.
    slots: Slots,
    /// Ends the loops.
    stop: CancellationToken,
    /// The messages in flight, for the drain.
    tracker: TaskTracker,
}

/// The concurrency slots a queue's messages take: one of the process's, and one of the queue's
/// own when `[callback] queue_concurrency` gives it a smaller limit.
struct Slots {
    all: Arc<Semaphore>,
    queue: Option<Arc<Semaphore>>,
}

async fn consume_loop(
    mut consumer: Consumer,
    channel: Channel,
    queue: Arc<str>,
    ctx: Arc<Context>,
    replier: Arc<Replier>,
    shared: Shared,
) -> End {
    let Shared {
        slots,
        stop,
        tracker,
    } = shared;
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
        // The queue's own slot first, so that a queue at its limit holds none of the others'.
        let mut own = None;
        let permit = if matches!(next, Some(Ok(_))) {
            if let Some(mine) = &slots.queue {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return End::Stopped,
                    p = Arc::clone(mine).acquire_owned() => own = Some(p.expect("the semaphore is never closed")),
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return End::Stopped,
                p = Arc::clone(&slots.all).acquire_owned() => Some(p.expect("the semaphore is never closed")),
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
                    Arc::clone(&replier),
                );
                // The queue's slot is held until the message is settled.
                let handling = async move {
                    handling.await;
                    drop(own);
                };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_covers_two_messages_per_slot_and_the_default_is_untouched() {
        let mut config = Config::default();
        config.qos.prefetch_count = 10;
        assert_eq!(effective_prefetch(&config), 10, "concurrency 1");
        config.callback.concurrency = 4;
        assert_eq!(effective_prefetch(&config), 10);
        config.callback.concurrency = 64;
        assert_eq!(effective_prefetch(&config), 128);
        config.callback.queue_concurrency = Some(8);
        assert_eq!(effective_prefetch(&config), 16, "a queue's own limit");
        config.qos.prefetch_count = 0;
        assert_eq!(effective_prefetch(&config), 0, "no limit stays no limit");
    }
}
