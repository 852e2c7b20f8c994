//! Declaring (or passively checking) queues and binding them, as fedora-messaging does on
//! every (re)connection.
//!
//! Exchanges are not declared when consuming (fedora-messaging 2.0, its issue #171). Each
//! binding becomes one `queue_bind` per routing key; a binding to the server-named queue `""`
//! is pointed at the name the broker chose. A refusal ends fm with exit code 10 (15 when it
//! is a permission problem), naming the queue or exchange and the vhost.

use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};

use super::errors::{self, NOT_FOUND};
use crate::config::{Config, Queue};
use crate::error::{Exit, code};

/// A queue fm consumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredQueue {
    /// The name in the configuration (`""` for a server-named queue).
    pub configured: String,
    /// The name on the broker.
    pub name: String,
    /// Messages ready in it when declared.
    pub ready: u32,
}

/// Declare the configured queue `name` and apply the bindings to it (one `queue_bind` per
/// routing key). `vhost` is only used in
/// errors. Each queue can be declared on a channel of its own, all at once.
pub async fn declare_queue(
    channel: &Channel,
    config: &Config,
    (name, queue): (&str, &Queue),
    vhost: &str,
) -> anyhow::Result<DeclaredQueue> {
    let options = QueueDeclareOptions {
        passive: config.passive_declares,
        durable: queue.durable,
        exclusive: queue.exclusive,
        auto_delete: queue.auto_delete,
        nowait: false,
    };
    let args = super::arguments(&queue.arguments)
        .map_err(|e| Exit::new(code::USAGE, e.context(format!("queue '{name}'"))))?;
    let q = channel
        .queue_declare(name.into(), options, args)
        .await
        .map_err(|e| {
            let err = errors::describe(e);
            let what = if config.passive_declares && errors::reply_code(&err) == Some(NOT_FOUND) {
                format!(
                    "queue '{name}' does not exist in vhost '{vhost}' (passive_declares is on, \
                     so fm does not create it)"
                )
            } else {
                format!("cannot declare queue '{name}' in vhost '{vhost}'")
            };
            declaration_error(err.context(what))
        })?;
    tracing::debug!(
        queue = q.name().as_str(),
        messages = q.message_count(),
        "queue declared"
    );
    let declared = DeclaredQueue {
        configured: name.to_owned(),
        name: q.name().as_str().to_owned(),
        ready: q.message_count(),
    };
    for binding in config.bindings.iter().filter(|b| b.queue == name) {
        let args = super::arguments(&binding.arguments)
            .map_err(|e| Exit::new(code::USAGE, e.context("binding arguments")))?;
        for key in &binding.routing_keys {
            channel
                .queue_bind(
                    declared.name.as_str().into(),
                    binding.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    args.clone(),
                )
                .await
                .map_err(|e| {
                    let err = errors::describe(e);
                    let hint = if errors::reply_code(&err) == Some(NOT_FOUND) {
                        " (does the exchange exist?)"
                    } else {
                        ""
                    };
                    declaration_error(err.context(format!(
                        "cannot bind queue '{}' to exchange '{}' with routing key '{key}' in \
                         vhost '{vhost}'{hint}",
                        declared.name, binding.exchange
                    )))
                })?;
        }
    }
    Ok(declared)
}

fn declaration_error(err: anyhow::Error) -> anyhow::Error {
    Exit::new(errors::declaration_exit(&err), err)
}
