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
    #[arg(
        long = "config",
        visible_alias = "conf",
        global = true,
        value_name = "PATH"
    )]
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
    /// Publish messages: one given on the command line, or a file of record-format lines.
    Publish(PublishArgs),
    /// Consume messages and write each as one record-format JSON line.
    Record(RecordArgs),
    /// Publish what `fm publish --spool` put in the spool, in order, until stopped: the
    /// long-running service of fm-relay@.service.
    Relay(RelayArgs),
    /// Ask an RPC server: publish a request with reply_to and a correlation id, wait for the
    /// matching reply, print it (one request, or a file of them).
    Call(CallArgs),
    /// Check the configuration, callback, broker, queues and exchanges `fm consume` would use,
    /// without consuming; exit with the status consume would exit with.
    Check(ConsumeArgs),
    /// Print a shell completion script on stdout.
    Completions(CompletionsArgs),
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
    /// A Python callback in a file, "path/to/file.py:callable" (fedora-messaging's flag; the
    /// file is executed, not imported). Takes precedence over --callback.
    #[arg(long, value_name = "FILE:CALLABLE")]
    pub callback_file: Option<String>,
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
            callback: self
                .callback_file
                .as_deref()
                .map(absolute_callback_file)
                .or_else(|| self.callback.clone()),
        }
    }
}

/// `file.py:callable` with the file made absolute, so the shim finds it whatever its working
/// folder.
fn absolute_callback_file(spec: &str) -> String {
    match spec.rsplit_once(':') {
        Some((file, callable)) => match std::path::absolute(file) {
            Ok(path) => format!("{}:{callable}", path.display()),
            Err(_) => spec.to_owned(),
        },
        None => spec.to_owned(),
    }
}

/// `fm publish`: one message (`--topic`, `--body`…) or a FILE of record-format lines, as
/// `fedora-messaging publish` reads them.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["file", "topic"])))]
pub struct PublishArgs {
    /// A file of messages, one JSON object per line as `fm record` writes them ("-" for stdin).
    #[arg(value_name = "FILE", conflicts_with = "topic")]
    pub file: Option<PathBuf>,
    /// The exchange to publish to (default: publish_exchange from the configuration).
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    /// Publish one message with this topic (instead of reading a FILE).
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// The body of that message, a JSON object (default: read from stdin when it is not a
    /// terminal).
    #[arg(long, value_name = "JSON", requires = "topic")]
    pub body: Option<String>,
    /// A header of that message: NAME=TEXT, or NAME:=JSON for a number, boolean… (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", requires = "topic")]
    pub headers: Vec<String>,
    /// The severity of that message: debug, info, warning, error, or 10, 20, 30, 40
    /// (default: info).
    #[arg(long, value_name = "LEVEL", requires = "topic")]
    pub severity: Option<String>,
    /// The AMQP priority of that message (default: publish_priority from the configuration).
    #[arg(long, value_name = "N", requires = "topic")]
    pub priority: Option<u8>,
    /// The schema header of that message (default: base.message).
    #[arg(long, value_name = "NAME", requires = "topic")]
    pub schema: Option<String>,
    /// Skip invalid lines and messages the broker returns or rejects, instead of stopping at
    /// the first one (the exit status still reports them).
    #[arg(long)]
    pub keep_going: bool,
    /// Write every message that was not published (refused, not confirmed, or not sent
    /// because publishing stopped) to this file, in the record format and input order, ready
    /// to publish again (created even when empty).
    #[arg(long, value_name = "FILE")]
    pub failed: Option<PathBuf>,
    /// How long to wait for the broker: to connect, and to confirm each message (seconds,
    /// more than 0 and at most 86400).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub timeout: std::time::Duration,
    /// Publish without the mandatory flag: a message no queue receives is accepted silently,
    /// as fedora-messaging does, instead of failing with exit status 121.
    #[arg(long)]
    pub allow_unroutable: bool,
    /// Write the messages durably into the spool folder DIR and return at once, broker up or
    /// down, for `fm relay` to publish (default DIR: [spool] directory from the
    /// configuration; write FILE before --spool, or --spool=DIR, when FILE follows).
    #[arg(
        long,
        value_name = "DIR",
        num_args = 0..=1,
        conflicts_with_all = ["failed", "transaction", "timeout"]
    )]
    pub spool: Option<Option<PathBuf>>,
    /// Publish every message of FILE in one AMQP transaction: all of them reach the broker, or
    /// none does (exit status 125 when rolled back).
    #[arg(long, requires = "file", conflicts_with_all = ["failed", "keep_going"])]
    pub transaction: bool,
}

/// `fm call`: one request (`--body`) or a FILE of them, answered over RabbitMQ's direct
/// reply-to.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["file", "body"])))]
pub struct CallArgs {
    /// A file of requests, one body per line ("-" for stdin); each reply is printed as one JSON
    /// line with the request's line number and correlation id.
    #[arg(value_name = "FILE", conflicts_with = "body")]
    pub file: Option<PathBuf>,
    /// The routing key to publish the requests with (the key the server's queue is bound
    /// with, or its name with --exchange "").
    #[arg(long, value_name = "KEY")]
    pub routing_key: String,
    /// The body of one request: a JSON object (any text with --raw).
    #[arg(long, value_name = "BODY")]
    pub body: Option<String>,
    /// The exchange to publish to (default: publish_exchange from the configuration; "" is
    /// the default exchange, which routes by queue name).
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    /// Send each body as the bytes it is, not as a fedora-messaging message.
    #[arg(long)]
    pub raw: bool,
    /// How long to wait for the broker, and for each reply (seconds, more than 0 and at most
    /// 86400); a reply that does not come in time is exit status 124.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
    pub timeout: std::time::Duration,
    /// With FILE, how many requests may wait for their reply at once.
    #[arg(
        long,
        value_name = "N",
        default_value = "100",
        value_parser = clap::value_parser!(u16).range(1..=10_000)
    )]
    pub in_flight: u16,
}

/// `fm relay`: publish what is spooled.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The spool folder (default: [spool] directory from the configuration).
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
}

/// `fm record`: consume like `fm consume` and write each message as one JSON line.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The file to write ("-" for standard output); it is truncated first.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Stop after recording this many messages (exit status 0).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub options: ConsumeOptions,
}

impl RecordArgs {
    /// The configuration overrides these flags ask for; the application name defaults to
    /// "recorder", as in fedora-messaging.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            app_name: Some(
                self.options
                    .app_name
                    .clone()
                    .unwrap_or_else(|| "recorder".to_owned()),
            ),
            queue_name: self.options.queue_name.clone(),
            routing_keys: self.options.routing_keys.clone(),
            exchange: self.options.exchange.clone(),
            callback: None,
        }
    }
}

/// `--timeout`: a duration in seconds, whole or fractional ("30", "2.5"), with the bounds of
/// every duration fm reads ([`crate::limits::seconds`]). 0 is refused: there is no waiting for
/// a broker in no time.
fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    crate::limits::parse_seconds(s, false).map_err(|requirement| format!("must be {requirement}"))
}

/// `fm completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Write the completion script for `shell` to stdout, generated from the same definitions
/// that parse the command line, so it cannot fall behind.
pub fn print_completions(shell: clap_complete::Shell) {
    use clap::CommandFactory as _;
    clap_complete::generate(shell, &mut Cli::command(), "fm", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_timeout(value: &str) -> Result<std::time::Duration, String> {
        let flag = format!("--timeout={value}");
        match Cli::try_parse_from(["fm", "publish", "--topic", "t", flag.as_str()]) {
            Ok(cli) => match cli.command {
                Command::Publish(args) => Ok(args.timeout),
                other => panic!("{other:?}"),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn publish_timeout_is_seconds_from_a_millisecond_to_a_day() {
        assert_eq!(
            publish_timeout("2.5"),
            Ok(std::time::Duration::from_millis(2500))
        );
        assert_eq!(
            publish_timeout("86400"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        for bad in ["0", "-1", "1e19", "nan", "inf", "86401", "soon"] {
            let err = publish_timeout(bad).unwrap_err();
            assert!(
                err.contains(&format!(
                    "invalid value '{bad}' for '--timeout <SECONDS>': must be a number of \
                     seconds from 0.001 to 86400 (1 day)"
                )),
                "{err}"
            );
        }
    }
}
