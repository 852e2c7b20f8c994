//! fm: a fast, drop-in consumer runner for AMQP 0-9-1 (RabbitMQ) message buses, compatible
//! with fedora-messaging's configuration files, wire format, record files and exit codes.
//!
//! # Layout
//! - [`cli`]: the command line (clap); [`run`] dispatches its subcommands.
//! - [`config`]: fedora-messaging TOML files, parsed raw and validated into [`config::Config`].
//! - [`message`]: the message model, the AMQP wire format and the record-file JSON.
//! - [`amqp`]: connecting (URLs, TLS, failover), declaring queues and bindings, broker errors.
//! - [`consume`]: deliveries → callback → ack/nack, reconnection, the graceful stop.
//! - [`callback`]: what messages are handed to (native plugins, commands, workers, Python).
//! - [`shutdown`]: the one stop path every loop listens to; [`stats`]: shared counters.
//! - [`error`]: exit codes; only `main` turns an error into one.
//! - [`logging`]: tracing to stderr, levels from `log_config`, `-v`/`-q` and `FM_LOG`.

#![deny(unsafe_code)]

pub mod amqp;
pub mod callback;
pub mod cli;
pub mod config;
pub mod consume;
pub mod error;
pub mod logging;
pub mod message;
pub mod shutdown;
pub mod stats;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{Cli, Command};
use crate::config::Config;

/// Run the command line: load the configuration, set up logging, do the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let code = runtime.block_on(dispatch(cli))?;
    // Plugins and workers may still hold blocking threads (abandoned at shutdown_timeout):
    // do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(ExitCode::from(code))
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let verbosity = cli.verbosity();
    let mut config = Config::load(cli.config.as_deref())?;
    logging::init(&config.log_config, verbosity);
    match cli.command {
        Command::Consume(args) => {
            config.apply_overrides(&args.overrides())?;
            consume_with(Arc::new(config)).await
        }
    }
}

/// `fm consume`: build the callback, consume until stopped, shut the callback down.
async fn consume_with(config: Arc<Config>) -> anyhow::Result<u8> {
    let handler = Arc::new(callback::Handler::build(&config).await?);
    let shutdown = shutdown::Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let ctx = Arc::new(consume::Context {
        config,
        handler: Arc::clone(&handler),
        stats: Arc::new(stats::Stats::default()),
        shutdown,
    });
    let result = consume::run(ctx).await;
    handler.shutdown().await;
    result
}
