//! fm: a fast, drop-in consumer runner for AMQP 0-9-1 (RabbitMQ) message buses, compatible
//! with fedora-messaging's configuration files, wire format, record files and exit codes.
//!
//! # Layout
//! One room per concern; this file only declares them and dispatches the subcommands.
//! - [`cli`]: the command line (clap); [`run`] dispatches its subcommands.
//! - [`config`]: fedora-messaging TOML files: types and loading (`config/mod.rs`), the
//!   validator with its one table of top-level keys (`parse.rs`), the broker-side tables
//!   (`sections.rs`), the callback table (`callback.rs`), command-line overrides
//!   (`overrides.rs`).
//! - [`message`]: the message model, the AMQP wire format and the record-file line;
//!   [`json`]: JSON as Python reads and writes it (message bodies); [`time`]: calendar dates.
//! - [`amqp`]: URLs (the one redactor), connecting (TLS in `amqp/tls/`, failover), declaring
//!   queues and bindings, broker errors and reply codes, the reconnection backoff.
//! - [`consume`]: [`consume::serve`] runs a callback over the configured queues until its
//!   shutdown: the reconnect loop (`consume/mod.rs`), one connection's life (`session.rs`:
//!   declare, register, drain), one message's life (`delivery.rs`: decode, callback, settle);
//!   [`attempts`]: poison-message detection that survives crashes.
//! - [`callback`]: what messages are handed to (native plugins, commands, workers — the pool,
//!   a process, the answer line in `callback/worker/` — Python, and `fm record`'s recorder).
//! - [`publish`]: `fm publish`: input, pipeline, failed file, progress, report, the spooled
//!   and transactional variants (`publish/`); [`record`]: the `fm record` command.
//! - [`call`]: `fm call`, the RPC client: requests with a correlation id, replies over
//!   RabbitMQ's direct reply-to (the server side is `consume/reply.rs`).
//! - [`spool`]: the local store-and-forward spool of `fm publish --spool` (layout and naming,
//!   the durable enqueue, the ordered read); [`relay`]: `fm relay`, which publishes it.
//! - [`shutdown`]: the one stop path every loop listens to, a parameter of every long-running
//!   entry point; [`stats`]: shared counters.
//! - [`error`]: exit codes; only `main` turns an error into one.
//! - [`limits`]: the bounds on durations and files the configuration and command line name.
//! - [`logging`]: tracing to stderr (one event, one line), levels from `log_config`, `-v`/`-q`
//!   and `FM_LOG`.
//! - Operations: [`monitor`] (HTTP `/live`, `/ready`, `/metrics`), [`notify`] (systemd
//!   readiness, status and watchdog), [`check`] (`fm check`).

#![deny(unsafe_code)]

pub mod amqp;
pub mod attempts;
pub mod call;
pub mod callback;
pub mod check;
pub mod cli;
pub mod config;
pub mod consume;
pub mod error;
pub mod json;
pub mod limits;
pub mod logging;
pub mod message;
pub mod monitor;
pub mod notify;
pub mod publish;
pub mod record;
pub mod relay;
pub mod shutdown;
pub mod spool;
pub mod stats;
pub mod time;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{Cli, Command};
use crate::config::Config;

/// Run the command line: load the configuration, set up logging, do the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Run as a task, on the runtime's worker threads, not on this thread under `block_on`:
    // every wake-up of a future driven by `block_on` is a thread hand-off (a futex wake of
    // this thread), which cost `fm publish` one per message (scripts/bench).
    let code = runtime.block_on(async {
        tokio::spawn(dispatch(cli))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("fm failed: {e}")))
    });
    // Plugins and workers may still hold blocking threads (abandoned at shutdown_timeout), and
    // so may a read of standard input that will never end (an interrupted `fm publish -`): do
    // not wait for them, whether fm succeeded or not (dropping the runtime would wait forever).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(ExitCode::from(code?))
}

/// Raise the soft limit on open files to the hard one, as servers do: the soft default (1024)
/// is a leftover of `select(2)`, which fm does not use, and running out of descriptors stops
/// exec mode from starting its commands. Failing changes nothing, so it is not an error.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let verbosity = cli.verbosity();
    // Log from the start (the loader reports ignored bindings, defaults used…); the
    // configuration's levels replace these once it is loaded.
    logging::init_default(verbosity);
    if let Command::Completions(args) = &cli.command {
        // No configuration needed (or wanted: a broken one must not break completions).
        cli::print_completions(args.shell);
        return Ok(error::code::OK);
    }
    let mut config = Config::load(cli.config.as_deref())?;
    logging::init(&config.log_config, verbosity);
    match cli.command {
        Command::Consume(args) => {
            config.apply_overrides(&args.overrides())?;
            consume_with(Arc::new(config)).await
        }
        Command::Check(args) => {
            logging::init_check(&config.log_config, verbosity);
            config.apply_overrides(&args.overrides())?;
            check::run(&config).await
        }
        Command::Completions(_) => unreachable!("handled before loading the configuration"),
        Command::Publish(args) => publish::run(&config, &args).await,
        Command::Call(args) => call::run(&config, &args).await,
        Command::Relay(args) => relay::run(&config, &args).await,
        Command::Record(args) => {
            config.apply_overrides(&args.overrides())?;
            record::run(config, &args, verbosity).await
        }
    }
}

/// `fm consume`: build the callback, consume until stopped, shut the callback down.
async fn consume_with(config: Arc<Config>) -> anyhow::Result<u8> {
    // Made first: workers that keep crashing stop fm through it.
    let shutdown = shutdown::Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let handler = callback::Handler::build(&config, &shutdown).await?;
    consume::serve(config, handler, shutdown).await
}
