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
use crate::config::Config;
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

/// Declare every configured queue and apply every binding. `vhost` is only used in errors.
pub async fn declare(
    channel: &Channel,
    config: &Config,
    vhost: &str,
) -> anyhow::Result<Vec<DeclaredQueue>> {
    let mut declared = Vec::with_capacity(config.queues.len());
    for (name, queue) in &config.queues {
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
            .queue_declare(name.as_str().into(), options, args)
            .await
            .map_err(|e| {
                let err = errors::describe(e);
                let what = if config.passive_declares && errors::reply_code(&err) == Some(NOT_FOUND)
                {
                    format!(
                        "queue '{name}' does not exist in vhost '{vhost}' (passive_declares is \
                         on, so fm does not create it)"
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
        declared.push(DeclaredQueue {
            configured: name.clone(),
            name: q.name().as_str().to_owned(),
            ready: q.message_count(),
        });
    }
    for binding in &config.bindings {
        let Some(queue) = declared.iter().find(|q| q.configured == binding.queue) else {
            continue;
        };
        let args = super::arguments(&binding.arguments)
            .map_err(|e| Exit::new(code::USAGE, e.context("binding arguments")))?;
        for key in &binding.routing_keys {
            channel
                .queue_bind(
                    queue.name.as_str().into(),
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
                        queue.name, binding.exchange
                    )))
                })?;
        }
    }
    Ok(declared)
}

fn declaration_error(err: anyhow::Error) -> anyhow::Error {
    Exit::new(errors::declaration_exit(&err), err)
}
