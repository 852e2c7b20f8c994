//! The command line, with clap. Flag names follow fedora-messaging's CLI so that unit files and
//! scripts keep working: `--conf` is accepted as well as `--config`, before or after the
//! subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

/// fm: a fast consumer runner for AMQP message buses, compatible with fedora-messaging.
#[derive(Debug, Parser)]
#[command(name = "fm", version, about, propagate_version = true)]
pub struct Cli {
    /// The configuration file (default: $FEDORA_MESSAGING_CONF, then
    /// /etc/fedora-messaging/config.toml).
    #[arg(long = "config", visible_alias = "conf", global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// More log output (repeat for more).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Less log output (repeat for less).
    #[arg(short = 'q', long = "quiet", action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `-v` count minus `-q` count.
    pub fn verbosity(&self) -> i8 {
        i8::try_from(i16::from(self.verbose) - i16::from(self.quiet)).unwrap_or(0)
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume messages and hand each to the callback.
    Consume(ConsumeArgs),
}

/// The consume overrides fedora-messaging's `consume` accepts.
#[derive(Debug, Args, Clone, Default)]
pub struct ConsumeOptions {
    /// The application name sent to the broker (client_properties.app).
    #[arg(long, value_name = "NAME")]
    pub app_name: Option<String>,
    /// Consume from this queue instead (it gets the settings of the config's "" queue).
    #[arg(long, value_name = "NAME")]
    pub queue_name: Option<String>,
    /// Bind with this routing key instead (repeatable).
    #[arg(long = "routing-key", value_name = "KEY")]
    pub routing_keys: Vec<String>,
    /// Bind to this exchange instead.
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
}

/// `fm consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The callback: "package.module:attr" (Python), or a path ending in .so (a plugin).
    #[arg(long, value_name = "CALLBACK")]
    pub callback: Option<String>,
    #[command(flatten)]
    pub options: ConsumeOptions,
}

impl ConsumeArgs {
    /// The configuration overrides these flags ask for.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            app_name: self.options.app_name.clone(),
            queue_name: self.options.queue_name.clone(),
            routing_keys: self.options.routing_keys.clone(),
            exchange: self.options.exchange.clone(),
            callback: self.callback.clone(),
        }
    }
}
