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
//! - messages are handled one at a time unless `[callback] concurrency` says otherwise (slots
//!   shared by all queues; `queue_concurrency` caps what one queue takes); the callback never
//!   runs on the runtime's threads, so heartbeats flow during a long callback.
//!
//! Unlike fedora-messaging (its issues #208, #221, #574), a lost connection is never the end:
//! fm reconnects with capped, jittered exponential backoff, declares everything again and
//! goes on. Acks for deliveries of a dead channel are dropped — the broker delivers those
//! messages again (at-least-once). Only the documented fatal cases end the process.

//!
//! The rooms: this file holds the process's life (reconnect until stopped), `session.rs` one
//! connection's life (declare, register a consumer per queue, run their loops, drain),
//! `delivery.rs` one message's life (decode, redelivery limit, callback, settle), and
//! `reply.rs` the reply to a request (publish it with confirm and mandatory, then ack).

mod delivery;
mod reply;
mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::Semaphore;

use crate::amqp::backoff::Backoff;
use crate::amqp::{Connected, Connector};
use crate::attempts::Attempts;
use crate::callback::Handler;
use crate::config::Config;
use crate::error::{Exit, code};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

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
    let mut backoff = Backoff::default();
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
                wait_or_stop(&ctx.shutdown, backoff.pause()).await;
                continue;
            }
        };
        first = false;
        let started = Instant::now();
        let end = session::run(&ctx, &connected, &permits).await;
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
                let delay = backoff.after_loss(started.elapsed());
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
pub(crate) enum End {
    /// A stop was asked for and in-flight messages were drained.
    Stopped,
    /// The connection or a channel was lost: reconnect.
    Lost(anyhow::Error),
    /// A documented fatal error: exit with its code.
    Fatal(anyhow::Error),
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
