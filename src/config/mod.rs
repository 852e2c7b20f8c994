//! The configuration file: fedora-messaging's TOML, loaded unchanged, plus fm's own keys.
//!
//! fm must run from the files fedora-messaging users already have (`/etc/fedora-messaging/*.toml`),
//! so this module follows fedora-messaging's `config.py` (version 3.9.1) rule by rule:
//!
//! - lookup order `--config`/`--conf`, then `$FEDORA_MESSAGING_CONF`, then
//!   `/etc/fedora-messaging/config.toml` (a missing `/etc` file means the defaults);
//! - top-level keys are lower-cased, and unknown ones are rejected;
//! - a table in the file **replaces** the default table (no deep merge), so a file with a
//!   `[queues.x]` table has no `""` queue;
//! - queues need all of `durable`, `auto_delete`, `exclusive` and `arguments`;
//! - `client_properties` may not change `product`, `information` or `version`;
//! - a non-empty `[monitoring]` table needs a `port`;
//! - `exchanges` are accepted but never declared by `consume` (fedora-messaging 2.0.0, #171).
//!
//! Where fedora-messaging would fail later with a Python `KeyError`, fm decides instead, and the
//! sample `config/fm.toml` documents each choice: missing keys of `[qos]` and `[tls]` take their
//! defaults; bindings whose queue is not declared are dropped with a warning (fedora-messaging
//! drops them silently); `amqp_url` may be an array of fail-over URLs; `[callback]` may be a table
//! that selects a native plugin, a command or a Python callback.
//!
//! Loading is "parse, then validate": the file is parsed with spans kept (so every error can
//! name the file, line and column), fixed-shape tables go through small serde structs with
//! `deny_unknown_fields`, and the result is the typed [`Config`]. Nothing downstream sees TOML.
//! Every error carries exit code 2 (`code::USAGE`), as a bad `--conf` does in fedora-messaging.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use tracing::level_filters::LevelFilter;

use crate::amqp::url::redact;
use crate::error::{Exit, code};
use crate::limits;

mod callback;
mod overrides;
mod parse;
mod sections;

pub use callback::parse_callback_string;
pub use overrides::Overrides;
use parse::{Parser, line_col};
pub use sections::{python_level_name, python_level_number};

/// The environment variable that names the configuration file (fedora-messaging's).
pub const ENV_CONF: &str = "FEDORA_MESSAGING_CONF";
/// The file read when neither `--config` nor `$FEDORA_MESSAGING_CONF` names one.
pub const DEFAULT_PATH: &str = "/etc/fedora-messaging/config.toml";
/// The default broker URL, fedora-messaging's verbatim.
pub const DEFAULT_AMQP_URL: &str = "amqp://?connection_attempts=3&retry_delay=5";
/// `client_properties.product`: fm's name, sent to the broker (reserved).
pub const PRODUCT: &str = "fm";
/// `client_properties.information`: where fm comes from (reserved).
pub const INFORMATION: &str = "fm, a fast fedora-messaging compatible consumer (https://github.com/fedora-infra/fedora-messaging)";
/// `client_properties.version` (reserved).
pub const VERSION: &str = concat!("fm-", env!("CARGO_PKG_VERSION"));
/// `client_properties.app` when the file does not set it.
pub const DEFAULT_APP: &str = "Unknown";
/// The Python interpreter used for Python callbacks unless `[callback] interpreter` says
/// otherwise and fm was not started from a virtualenv (see
/// [`default_interpreter`](crate::callback::python::default_interpreter)).
pub const DEFAULT_PYTHON: &str = "python3";

/// Every top-level key fm reads: fedora-messaging's, then fm's own.
pub const VALID_KEYS: [&str; parse::TOP_LEVEL.len()] = parse::top_level_names();

/// The longest queue, exchange or routing-key name AMQP carries (a short string).
const MAX_NAME_BYTES: usize = 255;

/// The whole, validated configuration. Built by [`Config::load`] or [`Config::from_toml_str`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from (`None`: the defaults, or text given directly).
    pub path: Option<PathBuf>,
    /// Broker URLs, tried in order (fm: `amqp_url` may be an array). Never empty.
    pub amqp_urls: Vec<String>,
    /// How long one connection attempt (TCP + TLS + AMQP handshake) may take (fm).
    pub connection_timeout: Duration,
    /// How long a graceful stop waits for in-flight messages before giving up (fm).
    pub shutdown_timeout: Duration,
    /// Sent to the broker in `connection.start-ok`; `app`, `product`, `information` and
    /// `version` are always present.
    pub client_properties: Map<String, Value>,
    /// The exchange `publish` sends to.
    pub publish_exchange: String,
    /// Prepended (with a `.`) to the topic of published messages.
    pub topic_prefix: String,
    /// The priority of published messages, for queues with `x-max-priority`.
    pub publish_priority: Option<u8>,
    /// Declare queues passively (they must exist), as Fedora's locked-down `/pubsub` vhost needs.
    pub passive_declares: bool,
    /// Exchanges, in file order: validated but never declared by `consume`, like
    /// fedora-messaging since 2.0.0.
    pub exchanges: Vec<(String, Exchange)>,
    /// Queues to declare and consume from, in file order. `""` is a server-named queue.
    pub queues: Vec<(String, Queue)>,
    /// Bindings whose queue is in `queues`, in file order.
    pub bindings: Vec<Binding>,
    /// Bindings whose queue is not in `queues`: fedora-messaging ignores them, and so does fm
    /// (with a warning at load), but `--queue-name` re-targets every binding, these included.
    pub ignored_bindings: Vec<Binding>,
    /// `basic.qos` for every consumer channel.
    pub qos: Qos,
    /// What each message is handed to, and how.
    pub callback: CallbackConfig,
    /// The HTTP `/live` and `/ready` endpoints; `None` when disabled.
    pub monitoring: Option<Monitoring>,
    /// Opaque settings for the callback (`[consumer_config]`).
    pub consumer_config: Map<String, Value>,
    /// Certificates for `amqps://` URLs.
    pub tls: Tls,
    /// Log levels taken from the Python `dictConfig` table `[log_config]`.
    pub log_config: LogConfig,
    /// `[spool]` (fm): where `fm publish --spool` writes and `fm relay` reads.
    pub spool: Spool,
}

/// `[spool]`: the local store-and-forward spool of `fm publish --spool` and `fm relay`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spool {
    /// The spool folder; `None`: `--spool DIR` must name one.
    pub directory: Option<PathBuf>,
}

/// An exchange from `[exchanges.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// The exchange type (`type` in the file): `topic`, `direct`, `fanout`, `headers`.
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub arguments: Map<String, Value>,
}

/// A queue from `[queues.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    /// `x-` arguments of `queue.declare` (`x-max-priority`, `x-queue-type`, …).
    pub arguments: Map<String, Value>,
}

/// One `[[bindings]]` entry: one `queue.bind` per routing key.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The queue to bind; `""` (the default) is the server-named queue.
    pub queue: String,
    pub exchange: String,
    pub routing_keys: Vec<String>,
    /// Arguments of `queue.bind` (for headers exchanges); fm addition, default empty.
    pub arguments: Map<String, Value>,
}

/// `[qos]`: `basic.qos` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos {
    pub prefetch_size: u32,
    pub prefetch_count: u16,
}

/// `[monitoring]`: where to serve `/live` and `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitoring {
    /// The address to listen on; `""` means all interfaces.
    pub address: String,
    pub port: u16,
}

/// `[tls]`: the CA to trust and the client certificate (SASL EXTERNAL when both are set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub ca_cert: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
}

/// The log levels of `[log_config]`, a Python `logging.config.dictConfig` dictionary.
///
/// Only levels are honoured (`root.level` and `loggers.NAME.level`); formatters, handlers and
/// the rest are accepted and ignored. The Python logger names are kept as written:
/// `crate::logging` maps them onto fm's tracing targets.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// `root.level`; WARNING when not set (Python's default).
    pub root: LevelFilter,
    /// `loggers.NAME.level`, in file order. Loggers set to `NOTSET` (inherit) are left out.
    pub loggers: Vec<(String, LevelFilter)>,
}

impl Default for LogConfig {
    /// fedora-messaging's default: root WARNING, `fedora_messaging` INFO.
    fn default() -> Self {
        LogConfig {
            root: LevelFilter::WARN,
            loggers: vec![("fedora_messaging".to_owned(), LevelFilter::INFO)],
        }
    }
}

/// The most messages handled at once. Each slot is a thread (plugins), a process (worker mode)
/// or a process per message (exec mode): 65,535 once started as many processes (issue 17), and
/// a thousand is already more than a callback waiting on a database or a web service needs.
pub const MAX_CONCURRENCY: usize = 1024;

impl CallbackConfig {
    /// How many messages of one queue may be handled at once: `queue_concurrency` within
    /// `concurrency`.
    pub fn per_queue(&self) -> usize {
        let all = self.concurrency.max(1);
        self.queue_concurrency.map_or(all, |n| n.clamp(1, all))
    }
}

/// `callback` (a string) or `[callback]` (a table, fm): what handles each message.
#[derive(Debug, Clone, PartialEq)]
pub struct CallbackConfig {
    /// `None`: no callback configured (`consume` then needs `--callback`).
    pub kind: Option<CallbackKind>,
    /// How many messages are handled at once, across all queues (fm); fedora-messaging handles one per queue.
    pub concurrency: usize,
    /// How many messages of one queue are handled at once (fm), within `concurrency`; `None`: no
    /// limit of its own. `1` gives fedora-messaging's model: each queue in order, queues side by
    /// side.
    pub queue_concurrency: Option<usize>,
    /// Per-message time limit for command and Python callbacks (fm).
    pub timeout: Option<Duration>,
    /// What an unexpected callback failure does (fm); `Halt` is fedora-messaging's behaviour.
    pub on_error: OnError,
    /// Drop a message redelivered more than this many times (fm poison-message guard).
    pub max_redeliveries: Option<u32>,
    /// What a delivery whose body is not a JSON object becomes (`[callback] body`, fm).
    pub body: BodyMode,
    /// What exec mode does with a command's standard output (`[callback] reply`, fm).
    pub stdout: ExecStdout,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            kind: None,
            concurrency: 1,
            queue_concurrency: None,
            timeout: None,
            on_error: OnError::Halt,
            max_redeliveries: None,
            body: BodyMode::Json,
            stdout: ExecStdout::Log,
        }
    }
}

/// What fm does with a delivery whose body is not a JSON object (`[callback] body`).
///
/// fedora-messaging drops such a message; a request from a client that is not
/// fedora-messaging (a pika program sending `b"Marco"`) is one (issue 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyMode {
    /// fedora-messaging's rule: the body must be UTF-8 JSON holding an object, or the message
    /// is dropped (`"json"`, the default).
    #[default]
    Json,
    /// Hand it to the callback as the bytes it is (`"bytes"`): see `fm-callbacks(7)` for what
    /// each kind of callback then sees.
    Bytes,
}

/// What exec mode does with a command's standard output (`[callback] reply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecStdout {
    /// Log it line by line (the default).
    #[default]
    Log,
    /// Capture it (up to [`crate::callback::exec::MAX_REPLY`] bytes) and, on exit status 0,
    /// send it as the reply to a request (`reply = "stdout"`).
    Reply,
}

/// The kinds of callback fm can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackKind {
    /// A native plugin (`.so`) implementing `include/fm_plugin.h`, loaded in-process.
    Plugin { path: PathBuf },
    /// A program run per message (`Exec`) or kept running and fed messages (`Worker`).
    Command {
        argv: Vec<String>,
        mode: CommandMode,
    },
    /// A fedora-messaging Python callback `package.module:attribute`, run by fm's worker shim.
    Python {
        target: String,
        interpreter: PathBuf,
    },
}

impl fmt::Display for CallbackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallbackKind::Plugin { path } => write!(f, "plugin {}", path.display()),
            CallbackKind::Command { argv, mode } => {
                let mode = match mode {
                    CommandMode::Exec => "exec",
                    CommandMode::Worker => "worker",
                };
                write!(f, "command ({mode}) {}", argv.join(" "))
            }
            CallbackKind::Python { target, .. } => write!(f, "python {target}"),
        }
    }
}

/// How a command callback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommandMode {
    /// One process per message.
    #[default]
    Exec,
    /// One long-lived process reading messages on stdin.
    Worker,
}

/// What fm does when a callback fails unexpectedly (crashes, times out, answers garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// fedora-messaging's behaviour: requeue this and every prefetched message, exit 13.
    #[default]
    Halt,
    /// Requeue this message (`basic.nack requeue=true`) and go on.
    Requeue,
    /// Drop this message (`basic.nack requeue=false`, dead-lettered if set up) and go on.
    Drop,
}

impl Default for Config {
    /// fedora-messaging's `DEFAULTS`, with fm's values for the reserved client properties.
    fn default() -> Self {
        Config {
            path: None,
            amqp_urls: vec![DEFAULT_AMQP_URL.to_owned()],
            connection_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            client_properties: with_reserved_properties(Map::new()),
            publish_exchange: "amq.topic".to_owned(),
            topic_prefix: String::new(),
            publish_priority: None,
            passive_declares: false,
            exchanges: vec![(
                "amq.topic".to_owned(),
                Exchange {
                    kind: "topic".to_owned(),
                    durable: true,
                    auto_delete: false,
                    arguments: Map::new(),
                },
            )],
            queues: vec![(
                String::new(),
                Queue {
                    durable: false,
                    auto_delete: true,
                    exclusive: true,
                    arguments: Map::new(),
                },
            )],
            bindings: vec![Binding {
                queue: String::new(),
                exchange: "amq.topic".to_owned(),
                routing_keys: vec!["#".to_owned()],
                arguments: Map::new(),
            }],
            ignored_bindings: Vec::new(),
            qos: Qos {
                prefetch_size: 0,
                prefetch_count: 10,
            },
            callback: CallbackConfig::default(),
            monitoring: None,
            consumer_config: Map::new(),
            tls: Tls::default(),
            log_config: LogConfig::default(),
            spool: Spool::default(),
        }
    }
}

/// Add `app` (if missing) and fm's reserved `product`, `information` and `version`.
fn with_reserved_properties(mut props: Map<String, Value>) -> Map<String, Value> {
    props
        .entry("app")
        .or_insert_with(|| Value::from(DEFAULT_APP));
    for (key, value) in reserved_properties() {
        props.entry(key).or_insert_with(|| Value::from(value));
    }
    props
}

fn reserved_properties() -> [(&'static str, &'static str); 3] {
    [
        ("product", PRODUCT),
        ("information", INFORMATION),
        ("version", VERSION),
    ]
}

impl Config {
    /// Find and load the configuration: `explicit` (`--config`), else `$FEDORA_MESSAGING_CONF`,
    /// else `/etc/fedora-messaging/config.toml`, which may be missing (then: the defaults).
    ///
    /// Errors carry exit code 2 and start with the file's name.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Config> {
        let env = std::env::var_os(ENV_CONF);
        Self::load_from(
            explicit,
            env.as_deref().map(Path::new),
            Path::new(DEFAULT_PATH),
        )
    }

    /// [`Config::load`] with the environment and the default path given, so tests need not
    /// touch the process environment or `/etc`.
    fn load_from(
        explicit: Option<&Path>,
        env: Option<&Path>,
        default_path: &Path,
    ) -> anyhow::Result<Config> {
        // An empty variable counts as unset, as an empty `--conf` value would be meaningless.
        let env = env.filter(|p| !p.as_os_str().is_empty());
        let (path, from) = match (explicit, env) {
            (Some(path), _) => (path, "--config"),
            (None, Some(path)) => (path, ENV_CONF),
            (None, None) => {
                if !default_path.exists() {
                    tracing::info!(
                        "the configuration file {} does not exist; using the defaults",
                        default_path.display()
                    );
                    return Ok(Config::default());
                }
                (default_path, "the default location")
            }
        };
        tracing::info!("loading configuration from {}", path.display());
        let bytes = limits::read_bounded(
            path,
            limits::MAX_FILE_BYTES,
            &format!("the configuration file (from {from})"),
        )
        .map_err(|e| usage(format!("{e:#}; give the path of a TOML configuration file")))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            usage(format!(
                "{}: line {}: the configuration file is not UTF-8 text",
                path.display(),
                line_col(
                    &String::from_utf8_lossy(&e.as_bytes()[..e.utf8_error().valid_up_to()]),
                    usize::MAX
                )
                .0
            ))
        })?;
        Self::from_toml_str(&text, Some(path))
    }

    /// Parse and validate configuration text. `origin` is the file it came from, used in error
    /// messages and kept in [`Config::path`].
    pub fn from_toml_str(text: &str, origin: Option<&Path>) -> anyhow::Result<Config> {
        let parser = Parser {
            text,
            origin: origin.map_or_else(
                || "configuration text".to_owned(),
                |p| p.display().to_string(),
            ),
        };
        let mut config = parser.parse()?;
        config.path = origin.map(Path::to_path_buf);
        Ok(config)
    }

    /// The `[consumer_config]` table as a JSON object, for callbacks.
    pub fn consumer_config_json(&self) -> String {
        Value::Object(self.consumer_config.clone()).to_string()
    }

    fn origin(&self) -> String {
        self.path.as_ref().map_or_else(
            || "the configuration".to_owned(),
            |p| p.display().to_string(),
        )
    }
}

/// An error of the configuration: exit code 2.
fn usage(msg: String) -> anyhow::Error {
    Exit::new(code::USAGE, anyhow!(msg))
}

#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;
    use crate::error::exit_code_of;

    #[test]
    fn the_example_config_of_fedora_messaging_loads() {
        let path = fixture("config.toml.example");
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.path.as_deref(), Some(path.as_path()));
        assert_eq!(c.amqp_urls, ["amqp://"]);
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Python {
                target: "fedora_messaging.example:printer".into(),
                interpreter: "python3".into()
            })
        );
        assert_eq!(str_prop(&c, "app"), "Example Application");
        assert_eq!(str_prop(&c, "product"), PRODUCT);
        assert_eq!(str_prop(&c, "version"), VERSION);
        assert_eq!(
            c.queues,
            [(
                "my_queue".to_owned(),
                Queue {
                    durable: true,
                    auto_delete: false,
                    exclusive: false,
                    arguments: Map::new()
                }
            )]
        );
        assert_eq!(c.bindings.len(), 1);
        assert_eq!(c.bindings[0].queue, "my_queue");
        assert_eq!(c.bindings[0].routing_keys, ["#"]);
        assert_eq!(c.exchanges[0].0, "amq.topic");
        assert_eq!(c.exchanges[0].1.kind, "topic");
        assert_eq!(
            c.qos,
            Qos {
                prefetch_size: 0,
                prefetch_count: 25
            }
        );
        assert_eq!(c.consumer_config["example_key"], "for my consumer");
        assert_eq!(
            c.consumer_config_json(),
            r#"{"example_key":"for my consumer"}"#
        );
        assert_eq!(
            c.tls,
            Tls {
                ca_cert: Some("/etc/fedora-messaging/cacert.pem".into()),
                certfile: Some("/etc/fedora-messaging/fedora-cert.pem".into()),
                keyfile: Some("/etc/fedora-messaging/fedora-key.pem".into()),
            }
        );
        assert_eq!(c.monitoring, None);
        assert_eq!(c.log_config.root, LevelFilter::ERROR);
        assert_eq!(
            c.log_config.loggers,
            [
                ("fedora_messaging".to_owned(), LevelFilter::INFO),
                ("twisted".to_owned(), LevelFilter::INFO),
                ("pika".to_owned(), LevelFilter::WARN),
            ]
        );
    }

    #[test]
    fn fedoras_public_broker_config_loads() {
        for path in [
            fixture("fedora.toml"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fedora.toml"),
        ] {
            let c = Config::load(Some(&path)).unwrap();
            assert_eq!(
                c.amqp_urls,
                ["amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub"],
                "{}",
                path.display()
            );
            // No [queues]: the default server-named queue, and bindings default to it.
            assert_eq!(c.queues, Config::default().queues);
            assert_eq!(c.bindings.len(), 1);
            assert_eq!(c.bindings[0].queue, "");
            assert_eq!(c.bindings[0].exchange, "amq.topic");
            assert_eq!(
                c.client_properties["app_contacts_email"],
                serde_json::json!(["admin@fedoraproject.org"])
            );
            assert_eq!(
                str_prop(&c, "app_url"),
                "https://github.com/fedora-infra/fedora-messaging"
            );
            assert_eq!(c.qos.prefetch_count, 25);
            assert_eq!(
                c.tls.certfile.as_deref(),
                Some(Path::new("/etc/fedora-messaging/fedora-cert.pem"))
            );
        }
    }

    #[test]
    fn the_minimal_good_config_loads_and_drops_the_binding_of_an_undeclared_queue() {
        let c = Config::load(Some(&fixture("good_conf.toml"))).unwrap();
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Python {
                target: "tests.unit.test_cli:echo".into(),
                interpreter: "python3".into()
            })
        );
        // Its binding names queue "q", which is not declared: fedora-messaging ignores it.
        assert!(c.bindings.is_empty());
        assert_eq!(c.ignored_bindings.len(), 1);
        assert_eq!(c.ignored_bindings[0].queue, "q");
        assert_eq!(c.ignored_bindings[0].exchange, "e");
        assert_eq!(c.queues, Config::default().queues);
    }

    #[test]
    fn a_toml_syntax_error_names_the_file_line_and_column() {
        let path = fixture("bad_conf.toml");
        let err = Config::load(Some(&path)).unwrap_err();
        assert_eq!(exit_code_of(&err), code::USAGE);
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!(
                "{}: line 1, column 20: invalid TOML",
                path.display()
            )),
            "{msg}"
        );
        let msg = error("a = 1\n\n  b = [1,\n");
        assert_contains(&msg, &["test.toml: line 3, column", "invalid TOML"]);
    }

    #[test]
    fn the_reference_sample_documents_exactly_the_defaults() {
        let text = include_str!("../../config/fm.toml");
        let c = parse(text);
        assert_eq!(c.amqp_urls, [DEFAULT_AMQP_URL]);
        assert_eq!(c.connection_timeout, Duration::from_secs(10));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.qos.prefetch_count, 10);
        assert_eq!(c.callback.on_error, OnError::Halt);
        let expected = Config {
            path: Some("test.toml".into()),
            ..Config::default()
        };
        assert_eq!(c, expected);
        // Every key fm reads is documented in it (set, or in a comment).
        let keys = VALID_KEYS.iter().chain(&[
            "prefetch_size",
            "prefetch_count",
            "ca_cert",
            "certfile",
            "keyfile",
            "address",
            "port",
            "directory",
            "plugin",
            "command",
            "mode",
            "python",
            "interpreter",
            "concurrency",
            "queue_concurrency",
            "timeout",
            "on_error",
            "max_redeliveries",
            "durable",
            "auto_delete",
            "exclusive",
            "arguments",
            "type",
            "queue",
            "exchange",
            "routing_keys",
        ]);
        for key in keys {
            assert!(
                text.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ', '[']);
                    [" =", "]", "."]
                        .iter()
                        .any(|end| l.starts_with(&format!("{key}{end}")))
                }),
                "config/fm.toml does not document {key}"
            );
        }
    }

    #[test]
    fn the_demo_config_consumes_demo_topics_with_the_printer_plugin() {
        let c = parse(include_str!("../../config/demo.toml"));
        assert_eq!(c.amqp_urls, ["amqp://localhost:5672/%2F"]);
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].0, "fm-demo");
        assert!(c.queues[0].1.durable);
        assert_eq!(c.bindings[0].routing_keys, ["demo.#"]);
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Plugin {
                path: "target/debug/libfm_printer.so".into()
            })
        );
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let c = Config::from_toml_str("", None).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.amqp_urls, ["amqp://?connection_attempts=3&retry_delay=5"]);
        assert_eq!(c.publish_exchange, "amq.topic");
        assert_eq!(c.publish_priority, None);
        assert_eq!(c.bindings[0].routing_keys, ["#"]);
        assert!(c.queues[0].1.exclusive && c.queues[0].1.auto_delete && !c.queues[0].1.durable);
        assert_eq!(str_prop(&c, "app"), "Unknown");
        assert_eq!(c.callback.kind, None);
    }

    #[test]
    fn lookup_prefers_the_explicit_path_then_the_environment_then_etc() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "topic_prefix = \"a\"").unwrap();
        std::fs::write(&b, "topic_prefix = \"b\"").unwrap();
        let missing = dir.path().join("missing.toml");

        let c = Config::load_from(Some(&a), Some(&b), &b).unwrap();
        assert_eq!(
            (c.topic_prefix.as_str(), c.path.as_deref()),
            ("a", Some(a.as_path()))
        );
        let c = Config::load_from(None, Some(&b), &a).unwrap();
        assert_eq!(c.topic_prefix, "b");
        let c = Config::load_from(None, None, &a).unwrap();
        assert_eq!(c.topic_prefix, "a");
        // An empty variable counts as unset.
        let c = Config::load_from(None, Some(Path::new("")), &a).unwrap();
        assert_eq!(c.topic_prefix, "a");
        // A missing default file means the defaults.
        assert_eq!(
            Config::load_from(None, None, &missing).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn an_explicit_or_environment_path_must_be_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        for (explicit, env, from) in [
            (Some(missing.as_path()), None, "--config"),
            (None, Some(missing.as_path()), "FEDORA_MESSAGING_CONF"),
            (Some(dir.path()), None, "--config"),
        ] {
            let err = Config::load_from(explicit, env, Path::new("/nonexistent")).unwrap_err();
            assert_eq!(exit_code_of(&err), code::USAGE);
            let path = explicit.or(env).unwrap();
            let why = if path.exists() {
                "is not a regular file: it is a directory"
            } else {
                "cannot be read: no such file or directory"
            };
            assert_eq!(
                format!("{err:#}"),
                format!(
                    "the configuration file (from {from}) {} {why}; give the path of a TOML \
                     configuration file",
                    path.display()
                )
            );
        }
        // A default path that exists but is not a file is an error too.
        let err = Config::load_from(None, None, dir.path()).unwrap_err();
        assert_contains(
            &format!("{err:#}"),
            &[
                "the configuration file (from the default location)",
                "is not a regular file",
            ],
        );
    }

    #[test]
    fn the_configuration_file_is_a_regular_file_of_at_most_1_mib() {
        let dir = tempfile::tempdir().unwrap();
        for (path, why) in [
            (
                Path::new("/dev/zero"),
                "is not a regular file: it is a character device",
            ),
            (
                Path::new("/dev/urandom"),
                "is not a regular file: it is a character device",
            ),
        ] {
            let err = Config::load_from(Some(path), None, Path::new("/nonexistent")).unwrap_err();
            assert_eq!(exit_code_of(&err), code::USAGE);
            assert_contains(&format!("{err:#}"), &[&path.display().to_string(), why]);
        }
        let big = dir.path().join("big.toml");
        std::fs::write(&big, format!("# {}\n", "x".repeat(1 << 20))).unwrap();
        let err = Config::load_from(Some(&big), None, Path::new("/nonexistent")).unwrap_err();
        assert_contains(&format!("{err:#}"), &["big.toml is larger than 1 MiB"]);
        let latin1 = dir.path().join("latin1.toml");
        std::fs::write(&latin1, b"topic_prefix = \"a\"\n# caf\xe9\n").unwrap();
        let err = Config::load_from(Some(&latin1), None, Path::new("/nonexistent")).unwrap_err();
        assert_contains(
            &format!("{err:#}"),
            &["latin1.toml: line 2: the configuration file is not UTF-8"],
        );
    }
}
