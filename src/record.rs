//! `fm record FILE`: consume like `fm consume` and write every message as one record-file
//! line, exactly as `fedora-messaging record` does (`json.dumps(m, ensure_ascii=False,
//! sort_keys=True)`, see [`crate::message::Message::record_line`]), so the file can be
//! replayed with `fm publish` or `fedora-messaging publish`.
//!
//! Recording is consuming with a fixed callback ([`Recorder`], a [`Handler`]): it inherits
//! everything `fm consume` does — the `--app-name` (default "recorder"), `--queue-name`,
//! `--exchange` and `--routing-key` overrides, validation of incoming messages,
//! reconnection, the graceful stop on SIGTERM/SIGINT and the exit codes 10–15.
//!
//! Where fm is stricter than fedora-messaging, so that a recording loses nothing:
//! - a message is acked only after its line is written and flushed to the file (or
//!   standard output); fedora-messaging writes to a buffered file and acks at once, so a
//!   crash loses the buffered lines;
//! - a write that fails (disk full, closed pipe) requeues the message and exits 1;
//!   fedora-messaging acks it and exits 1, losing it;
//! - messages are recorded one at a time (`[callback] concurrency` is forced to 1), so the
//!   lines are in delivery order.

use std::sync::Arc;

use anyhow::Context as _;

use crate::callback::Handler;
use crate::callback::record::Recorder;
use crate::cli::RecordArgs;
use crate::config::Config;
use crate::shutdown::{self, Shutdown};

/// `fm record`: open the output, then consume until `--limit`, a signal or an error.
///
/// `config` already has the command-line overrides applied.
pub async fn run(mut config: Config, args: &RecordArgs, verbosity: i8) -> anyhow::Result<u8> {
    config.callback.concurrency = 1;
    let recorder = Recorder::create(&args.file, args.limit)?;
    if recorder.has_progress_bar() {
        // The bar replaces the per-message INFO lines, which would break it up.
        crate::logging::init(&config.log_config, verbosity.saturating_sub(1));
    }
    let shutdown = Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let handler = Handler::Record(Arc::new(recorder));
    crate::consume::serve(Arc::new(config), handler, shutdown).await
}
