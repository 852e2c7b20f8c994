//! Everything that talks AMQP: connecting (URLs, TLS, failover), declaring queues and
//! bindings, and reading broker errors.

pub mod backoff;
pub mod connect;
pub mod declare;
pub mod errors;
pub mod tls;
pub mod url;

pub use connect::{Connected, Connector};

use lapin::types::FieldTable;
use serde_json::{Map, Value};

/// `arguments` tables from the config as an AMQP field table (pika's encoding).
pub fn arguments(args: &Map<String, Value>) -> anyhow::Result<FieldTable> {
    crate::message::json_to_field_table(args).map_err(|e| anyhow::anyhow!("bad arguments: {e}"))
}
