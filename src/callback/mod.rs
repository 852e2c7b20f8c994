//! Callbacks: what fm hands each message to, and what they answer.
//!
//! Every kind of callback (a native plugin, a per-message command, a long-lived worker, a
//! Python callback run through the bundled shim) answers with an [`Outcome`], which the consume
//! loop maps onto the broker exactly as fedora-messaging maps a Python callback's result. Any
//! of them may also answer a request with a reply ([`Outcome::Reply`]), which the consume
//! loop publishes to the request's `reply_to` before acking it (`consume/reply.rs`).

pub mod abi;
pub mod exec;
pub mod plugin;
pub mod python;
pub mod record;
pub mod worker;

/// What a callback decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: `basic_ack`.
    Ack,
    /// Handled, with an answer to a request (issue 13): the body is published to the
    /// message's `reply_to` (confirmed, mandatory), then the message is acked exactly as for
    /// [`Outcome::Ack`]. For a message without `reply_to` it is [`Outcome::Ack`]: the reply is
    /// not sent anywhere. Only an ack carries a reply: a callback that fails sends none.
    Reply(Vec<u8>),
    /// Not now: `basic_nack(requeue = true)` (fedora-messaging's `Nack`).
    Nack,
    /// Never: `basic_nack(requeue = false)`, dead-lettered if the queue has a DLX
    /// (fedora-messaging's `Drop`).
    Drop,
    /// Stop consuming (fedora-messaging's `HaltConsumer`): ack this message, or requeue it if
    /// `requeue`, then stop cleanly and exit with `exit_code`.
    Halt {
        exit_code: i32,
        requeue: bool,
        reason: Option<String>,
    },
    /// An unexpected failure: the message and every prefetched one go back to the queue and
    /// fm exits 13 (fedora-messaging's "any other exception").
    Fail(String),
}

use std::sync::Arc;

use crate::config::{CallbackKind, CommandMode, Config};
use crate::error::{Exit, code};
use crate::message::Received;
use crate::shutdown::Shutdown;

/// How the consume loop calls a callback (see [`Handler::dispatch`]).
#[derive(Clone)]
pub enum Dispatch {
    /// Awaited on a task of the async runtime ([`Handler::handle`]).
    Task,
    /// Called on the consume loop's own thread: a native plugin, which blocks.
    Thread(Arc<plugin::Plugin>),
}

impl Dispatch {
    /// Call the plugin on this thread, which must be one of fm's own, never one of the async
    /// runtime's; a panic that crossed the plugin boundary fails the message.
    pub fn call_here(plugin: &plugin::Plugin, msg: &Received) -> Outcome {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plugin.handle(msg)))
            .unwrap_or_else(|_| Outcome::Fail("the plugin call failed: it panicked".into()))
    }
}

/// The configured callback, ready to take messages.
///
/// An enum rather than a trait object: the kinds are few and known, and a `match` keeps the
/// per-message path free of boxing.
pub enum Handler {
    /// A native plugin (`callback = "/path/lib.so"` or `[callback] plugin = …`).
    Plugin(Arc<plugin::Plugin>),
    /// `fm record`: write each message as a record-file line (see [`crate::record`]).
    Record(Arc<record::Recorder>),
    /// A program run per message (`[callback] command = […]`, `mode = "exec"`).
    Exec(Arc<exec::Exec>),
    /// Long-lived programs fed messages on stdin (`mode = "worker"`).
    Worker(Arc<worker::Pool>),
    /// A fedora-messaging Python callback run by the bundled shim, one per slot.
    Python {
        target: String,
        pool: Arc<worker::Pool>,
    },
}

impl Handler {
    /// Build the callback the configuration names: load the plugin, start the workers…
    /// Errors say what is wrong and carry the exit code (1 for a plugin that cannot be
    /// loaded, 2 for a configuration that cannot work). `shutdown` is what workers that keep
    /// crashing stop.
    pub async fn build(config: &Config, shutdown: &Shutdown) -> anyhow::Result<Handler> {
        let concurrency = config.callback.concurrency;
        match &config.callback.kind {
            None => Err(Exit::new(
                code::USAGE,
                anyhow::anyhow!(
                    "no callback configured: set `callback` in {} or pass --callback",
                    config
                        .path
                        .as_deref()
                        .map_or("the configuration file".into(), |p| p.display().to_string())
                ),
            )),
            Some(CallbackKind::Plugin { path }) => {
                let path = path.clone();
                let json = config.consumer_config_json();
                let plugin =
                    tokio::task::spawn_blocking(move || plugin::Plugin::load(&path, &json))
                        .await??;
                if concurrency > 1 && !plugin.thread_safe() {
                    return Err(Exit::new(
                        code::USAGE,
                        anyhow::anyhow!(
                            "plugin '{}' is not thread-safe (it does not set \
                             FM_PLUGIN_THREAD_SAFE), so it cannot run with [callback] \
                             concurrency = {concurrency}; set concurrency = 1",
                            plugin.name()
                        ),
                    ));
                }
                tracing::info!(
                    plugin = plugin.name(),
                    version = plugin.version(),
                    "plugin loaded"
                );
                Ok(Handler::Plugin(Arc::new(plugin)))
            }
            Some(CallbackKind::Command {
                argv,
                mode: CommandMode::Exec,
            }) => Ok(Handler::Exec(Arc::new(exec::Exec::new(config, argv)?))),
            Some(CallbackKind::Command {
                argv,
                mode: CommandMode::Worker,
            }) => {
                let spec = worker::Spec::command(argv, config.consumer_config_json());
                let pool = worker::Pool::start(spec, &config.callback, shutdown.clone()).await?;
                Ok(Handler::Worker(Arc::new(pool)))
            }
            Some(CallbackKind::Python {
                target,
                interpreter,
            }) => {
                let pool = python::start(config, target, interpreter, shutdown.clone()).await?;
                Ok(Handler::Python {
                    target: target.clone(),
                    pool: Arc::new(pool),
                })
            }
        }
    }

    /// A short description for log lines ("callback=…").
    pub fn describe(&self) -> String {
        match self {
            Handler::Plugin(p) => format!("plugin:{}", p.name()),
            Handler::Record(r) => r.describe(),
            Handler::Exec(e) => e.describe(),
            Handler::Worker(w) => format!("worker:{}", w.describe()),
            Handler::Python { target, .. } => target.clone(),
        }
    }

    /// Where the consume loop calls this callback. A native plugin blocks the thread it runs
    /// on, so each concurrency slot gets a thread of its own that calls the plugin right where
    /// a delivery arrives: handing every message to a blocking-pool thread and back cost two
    /// thread wake-ups per message, half of fm's CPU time with a no-op plugin (BENCHMARKS.md).
    /// Every other callback is awaited on a task ([`Handler::handle`]).
    pub fn dispatch(&self) -> Dispatch {
        match self {
            Handler::Plugin(p) => Dispatch::Thread(Arc::clone(p)),
            _ => Dispatch::Task,
        }
    }

    /// Hand one message to the callback. Never runs the callback on the async runtime's
    /// threads, so heartbeats and other deliveries keep flowing.
    pub async fn handle(&self, msg: Arc<Received>) -> Outcome {
        match self {
            Handler::Record(r) => r.handle(msg).await,
            Handler::Exec(e) => e.handle(&msg).await,
            Handler::Worker(pool) | Handler::Python { pool, .. } => pool.handle(msg).await,
            Handler::Plugin(p) => {
                let p = Arc::clone(p);
                tokio::task::spawn_blocking(move || p.handle(&msg))
                    .await
                    .unwrap_or_else(|e| Outcome::Fail(format!("the plugin call failed: {e}")))
            }
        }
    }

    /// Stop the callback (the plugin's `shutdown`, workers' exit). Called once at exit.
    pub async fn shutdown(&self) {
        match self {
            Handler::Record(r) => r.finish().await,
            Handler::Exec(_) => {}
            Handler::Worker(pool) | Handler::Python { pool, .. } => pool.shutdown().await,
            Handler::Plugin(p) => {
                let p = Arc::clone(p);
                let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
            }
        }
    }
}
