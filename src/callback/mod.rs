//! Callbacks: what fm hands each message to, and what they answer.
//!
//! Every kind of callback (a native plugin, a per-message command, a long-lived worker, a
//! Python callback run through the bundled shim) answers with an [`Outcome`], which the consume
//! loop maps onto the broker exactly as fedora-messaging maps a Python callback's result.

/// What a callback decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: `basic_ack`.
    Ack,
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

pub mod abi;
pub mod plugin;

use std::sync::Arc;

use crate::config::{CallbackKind, Config};
use crate::error::{Exit, code};
use crate::message::Received;

/// The configured callback, ready to take messages.
///
/// An enum rather than a trait object: the kinds are few and known, and a `match` keeps the
/// per-message path free of boxing.
pub enum Handler {
    /// A native plugin (`callback = "/path/lib.so"` or `[callback] plugin = …`).
    Plugin(Arc<plugin::Plugin>),
}

impl Handler {
    /// Build the callback the configuration names: load the plugin, start the workers…
    /// Errors say what is wrong and carry the exit code (1 for a plugin that cannot be
    /// loaded, 2 for a configuration that cannot work).
    pub async fn build(config: &Config) -> anyhow::Result<Handler> {
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
            Some(other) => Err(Exit::new(
                code::USAGE,
                anyhow::anyhow!("callback {other:?} is not supported by this build"),
            )),
        }
    }

    /// A short description for log lines ("callback=…").
    pub fn describe(&self) -> String {
        match self {
            Handler::Plugin(p) => format!("plugin:{}", p.name()),
        }
    }

    /// Hand one message to the callback. Never runs the callback on the async runtime's
    /// threads, so heartbeats and other deliveries keep flowing.
    pub async fn handle(&self, msg: Arc<Received>) -> Outcome {
        match self {
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
            Handler::Plugin(p) => {
                let p = Arc::clone(p);
                let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
            }
        }
    }
}
