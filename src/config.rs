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
/// The Python interpreter used for Python callbacks unless `[callback] interpreter` says otherwise.
pub const DEFAULT_PYTHON: &str = "python3";

/// Every top-level key fm reads: fedora-messaging's, then fm's own.
pub const VALID_KEYS: &[&str] = &[
    "amqp_url",
    "client_properties",
    "publish_exchange",
    "topic_prefix",
    "publish_priority",
    "passive_declares",
    "exchanges",
    "queues",
    "bindings",
    "qos",
    "callback",
    "monitoring",
    "consumer_config",
    "tls",
    "log_config",
    "connection_timeout",
    "shutdown_timeout",
];

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

/// `callback` (a string) or `[callback]` (a table, fm): what handles each message.
#[derive(Debug, Clone, PartialEq)]
pub struct CallbackConfig {
    /// `None`: no callback configured (`consume` then needs `--callback`).
    pub kind: Option<CallbackKind>,
    /// How many messages are handled at once, across all queues (fm); fedora-messaging handles one per queue.
    pub concurrency: usize,
    /// Per-message time limit for command and Python callbacks (fm).
    pub timeout: Option<Duration>,
    /// What an unexpected callback failure does (fm); `Halt` is fedora-messaging's behaviour.
    pub on_error: OnError,
    /// Drop a message redelivered more than this many times (fm poison-message guard).
    pub max_redeliveries: Option<u32>,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            kind: None,
            concurrency: 1,
            timeout: None,
            on_error: OnError::Halt,
            max_redeliveries: None,
        }
    }
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

/// fedora-messaging's `consume`/`record` command-line overrides (`_consume` in `cli.py`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--app-name`: sets `client_properties.app`.
    pub app_name: Option<String>,
    /// `--queue-name`: consume from this queue only, with the settings of the `""` queue.
    pub queue_name: Option<String>,
    /// `--routing-key` (repeatable): replaces the routing keys of every binding.
    pub routing_keys: Vec<String>,
    /// `--exchange`: replaces the exchange of every binding.
    pub exchange: Option<String>,
    /// `--callback`: replaces the callback (see [`parse_callback_string`]).
    pub callback: Option<String>,
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

    /// Apply fedora-messaging's `consume`/`record` overrides (`--app-name`, `--queue-name`,
    /// `--exchange`, `--routing-key`, `--callback`), as its `_consume` does.
    pub fn apply_overrides(&mut self, o: &Overrides) -> anyhow::Result<()> {
        let names = o
            .queue_name
            .iter()
            .chain(&o.exchange)
            .chain(&o.routing_keys);
        if let Some(long) = names.into_iter().find(|n| n.len() > MAX_NAME_BYTES) {
            return Err(Exit::new(
                code::USAGE,
                anyhow::anyhow!("'{long}' is longer than AMQP's 255 bytes"),
            ));
        }
        if let Some(app) = &o.app_name {
            self.client_properties
                .insert("app".to_owned(), Value::from(app.as_str()));
        }
        if let Some(name) = &o.queue_name {
            // fedora-messaging takes the settings of the `""` queue (and fails with a KeyError
            // when the file has none); fm also accepts a file with exactly one queue.
            let settings = match self.queues.iter().find(|(n, _)| n.is_empty()) {
                Some((_, q)) => q.clone(),
                None if self.queues.len() == 1 => self.queues[0].1.clone(),
                None => {
                    let names: Vec<String> =
                        self.queues.iter().map(|(n, _)| format!("'{n}'")).collect();
                    return Err(usage(format!(
                        "--queue-name {name}: {} defines {} queues ({}) and none named \"\", so \
                         fm cannot tell which settings to use; add a [queues.\"\"] table with \
                         the settings for '{name}', or name the queue in the file instead",
                        self.origin(),
                        self.queues.len(),
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        },
                    )));
                }
            };
            self.queues = vec![(name.clone(), settings)];
            let mut bindings = std::mem::take(&mut self.bindings);
            bindings.append(&mut self.ignored_bindings);
            for b in &mut bindings {
                b.queue = name.clone();
            }
            self.bindings = bindings;
        }
        if (o.exchange.is_some() || !o.routing_keys.is_empty()) && self.bindings.is_empty() {
            tracing::warn!(
                "--exchange and --routing-key change existing bindings, and {} has none",
                self.origin()
            );
        }
        for b in self.bindings.iter_mut().chain(&mut self.ignored_bindings) {
            if let Some(exchange) = &o.exchange {
                b.exchange = exchange.clone();
            }
            if !o.routing_keys.is_empty() {
                b.routing_keys = o.routing_keys.clone();
            }
        }
        if let Some(cb) = &o.callback {
            let mut kind = parse_callback_string(cb)
                .map_err(|e| Exit::new(code::USAGE, e.context("--callback")))?;
            // Keep a configured interpreter when only the Python target changes.
            if let (
                CallbackKind::Python { interpreter, .. },
                Some(CallbackKind::Python {
                    interpreter: configured,
                    ..
                }),
            ) = (&mut kind, &self.callback.kind)
            {
                *interpreter = configured.clone();
            }
            if self.callback.timeout.is_some() && matches!(kind, CallbackKind::Plugin { .. }) {
                return Err(usage(format!(
                    "--callback {cb}: {} sets [callback] timeout, which a plugin cannot honour \
                     (it runs in-process); remove the timeout or use a command callback",
                    self.origin()
                )));
            }
            self.callback.kind = Some(kind);
        }
        Ok(())
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

/// Parse a `callback` string (the config's `callback = "…"` or `--callback`):
/// `package.module:attribute` is a Python callback, a path ending in `.so` a native plugin.
pub fn parse_callback_string(s: &str) -> anyhow::Result<CallbackKind> {
    let s = s.trim();
    if s.ends_with(".so") {
        return Ok(CallbackKind::Plugin {
            path: PathBuf::from(s),
        });
    }
    if s.contains(':') {
        check_python_target(s)?;
        return Ok(CallbackKind::Python {
            target: s.to_owned(),
            interpreter: PathBuf::from(DEFAULT_PYTHON),
        });
    }
    Err(anyhow!(
        "callback '{s}' is neither a Python callback ('package.module:attribute') nor a plugin \
         (a path ending in .so); to run a command, use a [callback] table with \
         command = [\"/path/to/program\", \"arg\"]"
    ))
}

/// A Python callback must be `module.path:attribute`: dotted identifiers, one colon, one
/// identifier after it (fedora-messaging does `getattr(module, attribute)`).
fn check_python_target(s: &str) -> anyhow::Result<()> {
    fn identifier(s: &str) -> bool {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    }
    let ok = match s.rsplit_once(':') {
        // fedora-messaging's --callback-file form: a Python file and a name in it.
        Some((file, attr)) if file.ends_with(".py") => identifier(attr),
        Some((module, attr)) => module.split('.').all(identifier) && identifier(attr),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "python callback '{s}' must look like 'package.module:attribute' (Python \
             identifiers separated by dots, one colon, one attribute name) or \
             'path/to/file.py:attribute'"
        ))
    }
}

fn usage(msg: String) -> anyhow::Error {
    Exit::new(code::USAGE, anyhow!(msg))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before, |i| &before[i + 1..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// A value of the parsed document, with its position in the text.
type Item<'a> = Spanned<DeValue<'a>>;

/// The validator: holds the text (for line numbers) and the file's name (for messages).
struct Parser<'t> {
    text: &'t str,
    origin: String,
}

impl<'t> Parser<'t> {
    /// An error at `span`: "FILE: line L, column C: MSG", exit code 2.
    fn err(&self, span: Range<usize>, msg: impl fmt::Display) -> anyhow::Error {
        let (line, col) = line_col(self.text, span.start);
        usage(format!("{}: line {line}, column {col}: {msg}", self.origin))
    }

    /// Deserialize a fixed-shape value with serde; errors are located and prefixed by `what`
    /// and, inside a table, by the key whose value is wrong.
    fn de<T: Deserialize<'t>>(&self, what: &str, v: &Item<'t>) -> anyhow::Result<T> {
        T::deserialize(ValueDeserializer::from(v.clone())).map_err(|e| {
            let span = e.span().unwrap_or(v.span());
            let key = v.get_ref().as_table().and_then(|t| {
                t.iter()
                    .find(|(_, value)| value.span().contains(&span.start))
                    .map(|(key, _)| key.get_ref())
            });
            match key {
                Some(key) => self.err(span, format!("{what} {key}: {}", e.message())),
                None => self.err(span, format!("{what}: {}", e.message())),
            }
        })
    }

    fn table<'v>(&self, what: &str, v: &'v Item<'t>) -> anyhow::Result<&'v DeTable<'t>> {
        v.get_ref().as_table().ok_or_else(|| {
            self.err(
                v.span(),
                format!("{what} must be a table, not a {}", v.get_ref().type_str()),
            )
        })
    }

    /// An open table (`client_properties`, `consumer_config`, `arguments`) as JSON.
    fn json_table(&self, what: &str, v: &Item<'t>) -> anyhow::Result<Map<String, Value>> {
        let mut map = Map::new();
        for (key, entry) in self.table(what, v)? {
            let value: toml::Value = self.de(what, entry)?;
            let json = toml_to_json(value)
                .map_err(|e| self.err(entry.span(), format!("{what} {}: {e}", key.get_ref())))?;
            map.insert(key.get_ref().to_string(), json);
        }
        Ok(map)
    }

    fn parse(&self) -> anyhow::Result<Config> {
        let doc = DeTable::parse(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.err(span, format!("invalid TOML: {}", e.message().trim_end()))
        })?;
        let mut config = Config::default();
        let mut seen: Vec<(String, Cow<'_, str>)> = Vec::new();
        let mut all_bindings: Option<Vec<Binding>> = None;
        for (key, value) in doc.get_ref() {
            // fedora-messaging lower-cases top-level keys (`config[key.lower()] = …`).
            let name = key.get_ref().to_lowercase();
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                return Err(self.err(
                    key.span(),
                    format!(
                        "configuration key '{}' repeats '{first}' (top-level keys are not case \
                         sensitive); keep one of them",
                        key.get_ref()
                    ),
                ));
            }
            seen.push((name.clone(), key.get_ref().clone()));
            match name.as_str() {
                "amqp_url" => config.amqp_urls = self.amqp_urls(value)?,
                "connection_timeout" => {
                    config.connection_timeout = self.seconds("connection_timeout", value, false)?
                }
                "shutdown_timeout" => {
                    config.shutdown_timeout = self.seconds("shutdown_timeout", value, true)?
                }
                "client_properties" => config.client_properties = self.client_properties(value)?,
                "publish_exchange" => {
                    config.publish_exchange = self.de("publish_exchange", value)?
                }
                "topic_prefix" => config.topic_prefix = self.de("topic_prefix", value)?,
                "publish_priority" => {
                    let p: i64 = self.de("publish_priority", value)?;
                    config.publish_priority = Some(u8::try_from(p).map_err(|_| {
                        self.err(
                            value.span(),
                            format!("publish_priority must be between 0 and 255, not {p}"),
                        )
                    })?);
                }
                "passive_declares" => {
                    config.passive_declares = self.de("passive_declares", value)?
                }
                "exchanges" => config.exchanges = self.exchanges(value)?,
                "queues" => config.queues = self.queues(value)?,
                "bindings" => all_bindings = Some(self.bindings(value)?),
                "qos" => config.qos = self.qos(value)?,
                "callback" => config.callback = self.callback(value)?,
                "monitoring" => config.monitoring = self.monitoring(value)?,
                "consumer_config" => {
                    config.consumer_config = self.json_table("[consumer_config]", value)?
                }
                "tls" => config.tls = self.tls(value)?,
                "log_config" => config.log_config = self.log_config(value)?,
                _ => {
                    return Err(self.err(
                        key.span(),
                        format!(
                            "unknown configuration key '{}'; valid keys are: {}",
                            key.get_ref(),
                            VALID_KEYS.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(bindings) = all_bindings {
            // fedora-messaging binds only queues it declared, silently; fm says so.
            let (used, ignored): (Vec<_>, Vec<_>) = bindings
                .into_iter()
                .partition(|b| config.queues.iter().any(|(q, _)| *q == b.queue));
            for b in &ignored {
                tracing::warn!(
                    "{}: the binding of queue '{}' to exchange '{}' is ignored: there is no \
                     [queues.\"{}\"] table (fedora-messaging ignores it too)",
                    self.origin,
                    b.queue,
                    b.exchange,
                    b.queue
                );
            }
            config.bindings = used;
            config.ignored_bindings = ignored;
        } else {
            let (used, ignored): (Vec<_>, Vec<_>) = std::mem::take(&mut config.bindings)
                .into_iter()
                .partition(|b| config.queues.iter().any(|(q, _)| *q == b.queue));
            // The default binding is for the default `""` queue: with queues of the file's
            // own and no bindings, fedora-messaging binds nothing, and neither does fm.
            config.bindings = used;
            config.ignored_bindings = ignored;
        }
        Ok(config)
    }

    fn amqp_urls(&self, v: &Item<'t>) -> anyhow::Result<Vec<String>> {
        let urls: Vec<Spanned<String>> = match v.get_ref() {
            DeValue::String(_) => vec![self.de("amqp_url", v)?],
            DeValue::Array(items) => {
                if items.is_empty() {
                    return Err(self.err(
                        v.span(),
                        "amqp_url is an empty array; give at least one amqp:// or amqps:// URL",
                    ));
                }
                items
                    .iter()
                    .map(|i| self.de("amqp_url", i))
                    .collect::<anyhow::Result<_>>()?
            }
            other => {
                return Err(self.err(
                    v.span(),
                    format!(
                        "amqp_url must be a string or an array of strings, not a {}",
                        other.type_str()
                    ),
                ));
            }
        };
        urls.into_iter()
            .map(|u| {
                let lower = u.get_ref().to_ascii_lowercase();
                if lower.starts_with("amqp://") || lower.starts_with("amqps://") {
                    // Parsed here too, so that a bad URL (a query option out of bounds, a raw
                    // '@' or '/' in the password) is located like every other error.
                    crate::amqp::url::parse(u.get_ref())
                        .map_err(|e| self.err(u.span(), format!("amqp_url: {e:#}")))?;
                    Ok(u.into_inner())
                } else {
                    Err(self.err(
                        u.span(),
                        format!(
                            "amqp_url '{}' must start with amqp:// or amqps://",
                            redact(u.get_ref())
                        ),
                    ))
                }
            })
            .collect()
    }

    /// A number of seconds (see [`limits::seconds`]); `what` names the key in errors, which
    /// quote the value as written (`1e19`, `nan`).
    fn seconds(&self, what: &str, v: &Item<'t>, zero_ok: bool) -> anyhow::Result<Duration> {
        let secs: f64 = self.de(what, v)?;
        limits::seconds(secs, zero_ok).map_err(|requirement| {
            let written = self.text.get(v.span()).unwrap_or_default().trim();
            self.err(
                v.span(),
                format!("{what} must be {requirement}, not {written}"),
            )
        })
    }

    fn client_properties(&self, v: &Item<'t>) -> anyhow::Result<Map<String, Value>> {
        let props = self.json_table("[client_properties]", v)?;
        // These identify the client to broker admins; fedora-messaging forbids changing them.
        for (key, expected) in reserved_properties() {
            if let Some(value) = props.get(key)
                && value.as_str() != Some(expected)
            {
                let span = self
                    .table("[client_properties]", v)?
                    .get(key)
                    .map_or(v.span(), Spanned::span);
                return Err(self.err(
                    span,
                    format!(
                        "\"{key}\" is a reserved keyword in client_properties; remove it \
                         (fm sends {key} = \"{expected}\")"
                    ),
                ));
            }
        }
        Ok(with_reserved_properties(props))
    }

    fn exchanges(&self, v: &Item<'t>) -> anyhow::Result<Vec<(String, Exchange)>> {
        // Unlike queues, fedora-messaging never reads these (it does not declare exchanges),
        // so every setting may be left out. `arguments` is checked here and converted by
        // `json_table`, like every open table.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawExchange {
            #[serde(rename = "type")]
            kind: Option<String>,
            durable: Option<bool>,
            auto_delete: Option<bool>,
            #[serde(rename = "arguments")]
            _arguments: Option<serde::de::IgnoredAny>,
        }
        let mut out = Vec::new();
        for (name, entry) in self.table("exchanges", v)? {
            let what = format!("[exchanges.\"{}\"]", name.get_ref());
            let table = self.table(&what, entry)?;
            let raw: RawExchange = self.de(&what, entry)?;
            let arguments = match table.get("arguments") {
                Some(a) => self.json_table(&format!("{what} arguments"), a)?,
                None => Map::new(),
            };
            out.push((
                name.get_ref().to_string(),
                Exchange {
                    kind: raw.kind.unwrap_or_else(|| "topic".to_owned()),
                    durable: raw.durable.unwrap_or(true),
                    auto_delete: raw.auto_delete.unwrap_or(false),
                    arguments,
                },
            ));
        }
        Ok(out)
    }

    fn queues(&self, v: &Item<'t>) -> anyhow::Result<Vec<(String, Queue)>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawQueue {
            durable: bool,
            auto_delete: bool,
            exclusive: bool,
            #[serde(rename = "arguments")]
            _arguments: serde::de::IgnoredAny,
        }
        let mut out = Vec::new();
        for (name, entry) in self.table("queues", v)? {
            let what = format!("[queues.\"{}\"]", name.get_ref());
            let table = self.table(&what, entry)?;
            let missing: Vec<&str> = ["durable", "auto_delete", "exclusive", "arguments"]
                .into_iter()
                .filter(|k| !table.contains_key(*k))
                .collect();
            if !missing.is_empty() {
                return Err(self.err(
                    entry.span(),
                    format!(
                        "queue '{}' is missing {}; every queue needs durable, auto_delete, \
                         exclusive and arguments (use arguments = {{}} for none)",
                        name.get_ref(),
                        missing.join(", ")
                    ),
                ));
            }
            let raw: RawQueue = self.de(&what, entry)?;
            if name.get_ref().len() > MAX_NAME_BYTES {
                return Err(self.err(
                    name.span(),
                    format!(
                        "queue name '{}' is longer than AMQP's 255 bytes",
                        name.get_ref()
                    ),
                ));
            }
            let arguments = self.json_table(&format!("{what} arguments"), &table["arguments"])?;
            out.push((
                name.get_ref().to_string(),
                Queue {
                    durable: raw.durable,
                    auto_delete: raw.auto_delete,
                    exclusive: raw.exclusive,
                    arguments,
                },
            ));
        }
        Ok(out)
    }

    fn bindings(&self, v: &Item<'t>) -> anyhow::Result<Vec<Binding>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawBinding {
            queue: Option<String>,
            exchange: String,
            routing_keys: Vec<String>,
            #[serde(rename = "arguments")]
            _arguments: Option<serde::de::IgnoredAny>,
        }
        let Some(items) = v.get_ref().as_array() else {
            return Err(self.err(
                v.span(),
                format!(
                    "bindings must be an array of tables ([[bindings]] sections), not a {}",
                    v.get_ref().type_str()
                ),
            ));
        };
        let mut out = Vec::new();
        for (i, entry) in items.iter().enumerate() {
            let what = format!("binding #{}", i + 1);
            let table = self.table(&what, entry)?;
            let missing: Vec<&str> = ["exchange", "routing_keys"]
                .into_iter()
                .filter(|k| !table.contains_key(*k))
                .collect();
            if !missing.is_empty() {
                return Err(self.err(
                    entry.span(),
                    format!(
                        "{what} is missing {}; every binding needs exchange and routing_keys",
                        missing.join(", ")
                    ),
                ));
            }
            if !table["routing_keys"].get_ref().is_array() {
                return Err(self.err(
                    table["routing_keys"].span(),
                    format!(
                        "{what}: routing_keys must be an array of strings, like [\"#\"], not a {}",
                        table["routing_keys"].get_ref().type_str()
                    ),
                ));
            }
            let raw: RawBinding = self.de(&what, entry)?;
            let names = raw
                .queue
                .iter()
                .chain([&raw.exchange])
                .chain(&raw.routing_keys);
            if let Some(long) = names.into_iter().find(|n| n.len() > MAX_NAME_BYTES) {
                return Err(self.err(
                    entry.span(),
                    format!("{what}: '{long}' is longer than AMQP's 255 bytes"),
                ));
            }
            let arguments = match table.get("arguments") {
                Some(a) => self.json_table(&format!("{what} arguments"), a)?,
                None => Map::new(),
            };
            out.push(Binding {
                queue: raw.queue.unwrap_or_default(),
                exchange: raw.exchange,
                routing_keys: raw.routing_keys,
                arguments,
            });
        }
        Ok(out)
    }

    fn qos(&self, v: &Item<'t>) -> anyhow::Result<Qos> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawQos {
            prefetch_size: Option<Spanned<i64>>,
            prefetch_count: Option<Spanned<i64>>,
        }
        self.table("[qos]", v)?;
        let raw: RawQos = self.de("[qos]", v)?;
        // fm: a missing key takes its default (fedora-messaging would fail with a KeyError).
        let default = Config::default().qos;
        let range = |key: &str, n: &Spanned<i64>, max: i64| {
            if (0..=max).contains(n.get_ref()) {
                Ok(*n.get_ref())
            } else {
                Err(self.err(
                    n.span(),
                    format!(
                        "[qos] {key} must be between 0 and {max}, not {}",
                        n.get_ref()
                    ),
                ))
            }
        };
        Ok(Qos {
            prefetch_size: match &raw.prefetch_size {
                Some(n) => range("prefetch_size", n, u32::MAX.into())? as u32,
                None => default.prefetch_size,
            },
            prefetch_count: match &raw.prefetch_count {
                Some(n) => range("prefetch_count", n, u16::MAX.into())? as u16,
                None => default.prefetch_count,
            },
        })
    }

    fn tls(&self, v: &Item<'t>) -> anyhow::Result<Tls> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawTls {
            ca_cert: Option<String>,
            certfile: Option<String>,
            keyfile: Option<String>,
        }
        self.table("[tls]", v)?;
        let raw: RawTls = self.de("[tls]", v)?;
        // An empty string means "not set", as it is falsy for fedora-messaging.
        let path = |s: Option<String>| s.filter(|s| !s.is_empty()).map(PathBuf::from);
        Ok(Tls {
            ca_cert: path(raw.ca_cert),
            certfile: path(raw.certfile),
            keyfile: path(raw.keyfile),
        })
    }

    fn monitoring(&self, v: &Item<'t>) -> anyhow::Result<Option<Monitoring>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawMonitoring {
            address: Option<String>,
            port: Option<Spanned<i64>>,
        }
        if self.table("[monitoring]", v)?.is_empty() {
            return Ok(None); // an empty table disables monitoring
        }
        let raw: RawMonitoring = self.de("[monitoring]", v)?;
        let Some(port) = raw.port else {
            return Err(self.err(
                v.span(),
                "the port must be defined in [monitoring] to activate it",
            ));
        };
        let port = u16::try_from(*port.get_ref()).map_err(|_| {
            self.err(
                port.span(),
                format!(
                    "[monitoring] port must be between 0 and 65535, not {}",
                    port.get_ref()
                ),
            )
        })?;
        Ok(Some(Monitoring {
            address: raw.address.unwrap_or_default(),
            port,
        }))
    }

    fn callback(&self, v: &Item<'t>) -> anyhow::Result<CallbackConfig> {
        if let DeValue::String(s) = v.get_ref() {
            let kind = parse_callback_string(s).map_err(|e| self.err(v.span(), e))?;
            return Ok(CallbackConfig {
                kind: Some(kind),
                ..CallbackConfig::default()
            });
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawCallback {
            plugin: Option<String>,
            command: Option<Vec<String>>,
            python: Option<String>,
            mode: Option<Spanned<String>>,
            interpreter: Option<Spanned<String>>,
            concurrency: Option<Spanned<i64>>,
            #[serde(rename = "timeout")]
            _timeout: Option<serde::de::IgnoredAny>,
            on_error: Option<Spanned<String>>,
            max_redeliveries: Option<Spanned<i64>>,
        }
        if !v.get_ref().is_table() {
            return Err(self.err(
                v.span(),
                format!(
                    "callback must be a string (\"package.module:attribute\" or \
                     \"/path/plugin.so\") or a [callback] table, not a {}",
                    v.get_ref().type_str()
                ),
            ));
        }
        let table = self.table("[callback]", v)?;
        let raw: RawCallback = self.de("[callback]", v)?;
        let at = |key: &str| table.get(key).map_or(v.span(), Spanned::span);

        let given: Vec<&str> = ["plugin", "command", "python"]
            .into_iter()
            .filter(|k| table.contains_key(*k))
            .collect();
        if given.len() > 1 {
            return Err(self.err(
                at(given[1]),
                format!(
                    "[callback] sets {}; choose exactly one of plugin, command and python",
                    given.join(" and ")
                ),
            ));
        }
        let kind = if let Some(path) = raw.plugin {
            if !path.ends_with(".so") {
                return Err(self.err(
                    at("plugin"),
                    format!("[callback] plugin '{path}' must be the path of a .so file"),
                ));
            }
            Some(CallbackKind::Plugin {
                path: PathBuf::from(path),
            })
        } else if let Some(argv) = raw.command {
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err(self.err(
                    at("command"),
                    "[callback] command must be a non-empty array: the program, then its \
                     arguments, like [\"/usr/bin/prog\", \"--flag\"]",
                ));
            }
            let mode = match raw.mode.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("exec") => CommandMode::Exec,
                Some("worker") => CommandMode::Worker,
                Some(other) => {
                    return Err(self.err(
                        at("mode"),
                        format!("[callback] mode '{other}' is unknown; use \"exec\" or \"worker\""),
                    ));
                }
            };
            Some(CallbackKind::Command { argv, mode })
        } else if let Some(target) = raw.python {
            check_python_target(&target).map_err(|e| self.err(at("python"), e))?;
            let interpreter = match &raw.interpreter {
                Some(i) if i.get_ref().is_empty() => {
                    return Err(self.err(i.span(), "[callback] interpreter is empty"));
                }
                Some(i) => PathBuf::from(i.get_ref()),
                None => PathBuf::from(DEFAULT_PYTHON),
            };
            Some(CallbackKind::Python {
                target,
                interpreter,
            })
        } else {
            None
        };
        if raw.mode.is_some() && !matches!(kind, Some(CallbackKind::Command { .. })) {
            return Err(self.err(
                at("mode"),
                "[callback] mode applies only to command callbacks",
            ));
        }
        if raw.interpreter.is_some() && !matches!(kind, Some(CallbackKind::Python { .. })) {
            return Err(self.err(
                at("interpreter"),
                "[callback] interpreter applies only to python callbacks",
            ));
        }

        let mut cb = CallbackConfig {
            kind,
            ..CallbackConfig::default()
        };
        if let Some(n) = raw.concurrency {
            cb.concurrency = usize::try_from(*n.get_ref())
                .ok()
                .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
                .ok_or_else(|| {
                    self.err(
                        n.span(),
                        format!(
                            "[callback] concurrency must be between 1 and {MAX_CONCURRENCY}, \
                             not {}",
                            n.get_ref()
                        ),
                    )
                })?;
        }
        if let Some(t) = table.get("timeout") {
            if matches!(cb.kind, Some(CallbackKind::Plugin { .. })) {
                return Err(self.err(
                    t.span(),
                    "[callback] timeout applies to command and python callbacks; a plugin runs \
                     in-process and cannot be interrupted",
                ));
            }
            cb.timeout = Some(self.seconds("[callback] timeout", t, false)?);
        }
        if let Some(e) = raw.on_error {
            cb.on_error = match e.get_ref().as_str() {
                "halt" => OnError::Halt,
                "requeue" => OnError::Requeue,
                "drop" => OnError::Drop,
                other => {
                    return Err(self.err(
                        e.span(),
                        format!(
                            "[callback] on_error '{other}' is unknown; use \"halt\", \"requeue\" \
                             or \"drop\""
                        ),
                    ));
                }
            };
        }
        if let Some(n) = raw.max_redeliveries {
            cb.max_redeliveries = Some(u32::try_from(*n.get_ref()).map_err(|_| {
                self.err(
                    n.span(),
                    format!(
                        "[callback] max_redeliveries must be 0 or more, not {}",
                        n.get_ref()
                    ),
                )
            })?);
        }
        Ok(cb)
    }

    /// The levels of a Python `dictConfig` table; everything else in it is ignored.
    fn log_config(&self, v: &Item<'t>) -> anyhow::Result<LogConfig> {
        let table = self.table("[log_config]", v)?;
        // The table replaces fedora-messaging's default, whose root is WARNING; a file's
        // dictConfig without `root` leaves Python's root logger at WARNING too.
        let mut out = LogConfig {
            root: LevelFilter::WARN,
            loggers: Vec::new(),
        };
        if let Some(root) = table.get("root") {
            let root = self.table("[log_config.root]", root)?;
            if let Some(level) = root.get("level") {
                // NOTSET on the root logger lets everything through.
                out.root = self
                    .python_level("[log_config.root] level", level)?
                    .unwrap_or(LevelFilter::TRACE);
            }
        }
        if let Some(loggers) = table.get("loggers") {
            for (name, logger) in self.table("[log_config.loggers]", loggers)? {
                let what = format!("[log_config.loggers.\"{}\"]", name.get_ref());
                if let Some(level) = self.table(&what, logger)?.get("level")
                    && let Some(level) = self.python_level(&format!("{what} level"), level)?
                {
                    out.loggers.push((name.get_ref().to_string(), level));
                }
            }
        }
        Ok(out)
    }

    /// A Python logging level (name or number) as a tracing filter; `None` for NOTSET.
    fn python_level(&self, what: &str, v: &Item<'t>) -> anyhow::Result<Option<LevelFilter>> {
        let bad = |shown: String| {
            self.err(
                v.span(),
                format!(
                    "{what} {shown} is not a Python logging level; use DEBUG, INFO, WARNING, \
                     ERROR or CRITICAL"
                ),
            )
        };
        match v.get_ref() {
            DeValue::String(s) => python_level_name(s).ok_or_else(|| bad(format!("'{s}'"))),
            DeValue::Integer(_) => {
                let n: i64 = self.de(what, v)?;
                python_level_number(n).ok_or_else(|| bad(n.to_string()))
            }
            other => Err(bad(format!("(a {})", other.type_str()))),
        }
    }
}

/// A Python level name, in any case (CRITICAL/FATAL map to ERROR, the most severe tracing has).
pub fn python_level_name(name: &str) -> Option<Option<LevelFilter>> {
    Some(Some(match name.trim().to_ascii_uppercase().as_str() {
        "NOTSET" => return Some(None),
        "DEBUG" => LevelFilter::DEBUG,
        "INFO" => LevelFilter::INFO,
        "WARNING" | "WARN" => LevelFilter::WARN,
        "ERROR" | "CRITICAL" | "FATAL" => LevelFilter::ERROR,
        _ => return None,
    }))
}

/// A Python numeric level: a logger at level `n` shows records of level `n` and above, so a
/// number between two named levels acts as the next named level up; 0 is NOTSET.
pub fn python_level_number(n: i64) -> Option<Option<LevelFilter>> {
    Some(Some(match n {
        0 => return Some(None),
        1..=10 => LevelFilter::DEBUG,
        11..=20 => LevelFilter::INFO,
        21..=30 => LevelFilter::WARN,
        31..=50 => LevelFilter::ERROR,
        51.. => LevelFilter::OFF,
        _ => return None,
    }))
}

/// Convert a TOML value to JSON: datetimes become their RFC 3339 text; non-finite floats,
/// which JSON cannot carry, are refused.
fn toml_to_json(v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => Value::Number(
            serde_json::Number::from_f64(f)
                .ok_or_else(|| format!("{f} cannot be represented in JSON; use a finite number"))?,
        ),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(toml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| Ok((k, toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fedora-messaging"
    );

    fn fixture(name: &str) -> PathBuf {
        let path = Path::new(FIXTURES).join(name);
        assert!(
            path.is_file(),
            "fixture {} is missing from the repository",
            path.display()
        );
        path
    }

    fn parse(text: &str) -> Config {
        Config::from_toml_str(text, Some(Path::new("test.toml")))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The error for `text`, checked to carry exit code 2 and to start with the file's name.
    fn error(text: &str) -> String {
        let err = Config::from_toml_str(text, Some(Path::new("test.toml")))
            .expect_err("the configuration should be refused");
        assert_eq!(exit_code_of(&err), code::USAGE, "{err:#}");
        let msg = format!("{err:#}");
        assert!(msg.starts_with("test.toml: "), "{msg}");
        msg
    }

    fn assert_contains(haystack: &str, needles: &[&str]) {
        for needle in needles {
            assert!(haystack.contains(needle), "{needle:?} not in {haystack:?}");
        }
    }

    fn str_prop<'a>(c: &'a Config, key: &str) -> &'a str {
        c.client_properties[key].as_str().unwrap()
    }

    // ---- fedora-messaging's own files -------------------------------------------------------

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

    // ---- fm's sample files ------------------------------------------------------------------

    #[test]
    fn the_reference_sample_documents_exactly_the_defaults() {
        let text = include_str!("../config/fm.toml");
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
            "plugin",
            "command",
            "mode",
            "python",
            "interpreter",
            "concurrency",
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
        let c = parse(include_str!("../config/demo.toml"));
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

    // ---- top-level keys ---------------------------------------------------------------------

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
    fn an_unknown_top_level_key_is_refused_and_the_valid_keys_listed() {
        let msg = error("amqp_url = \"amqp://\"\nprefetch = 3\n");
        assert_contains(
            &msg,
            &[
                "test.toml: line 2, column 1: unknown configuration key 'prefetch'; valid keys are: ",
            ],
        );
        for key in VALID_KEYS {
            assert!(msg.contains(key), "{key} not listed in {msg}");
        }
    }

    #[test]
    fn top_level_keys_are_not_case_sensitive_but_may_not_repeat() {
        let c = parse("AMQP_URL = \"amqps://h/%2F\"\n[QoS]\nprefetch_count = 3\n");
        assert_eq!(c.amqp_urls, ["amqps://h/%2F"]);
        assert_eq!(c.qos.prefetch_count, 3);
        let msg = error("amqp_url = \"amqp://a\"\nAmqp_Url = \"amqp://b\"\n");
        assert_contains(&msg, &["line 2", "'Amqp_Url' repeats 'amqp_url'"]);
    }

    #[test]
    fn amqp_url_may_be_an_array_of_fail_over_urls() {
        let c = parse("amqp_url = [\"amqps://a/%2F\", \"amqp://b:5672/%2F\"]");
        assert_eq!(c.amqp_urls, ["amqps://a/%2F", "amqp://b:5672/%2F"]);
        assert_contains(&error("amqp_url = []"), &["amqp_url is an empty array"]);
        assert_contains(
            &error("amqp_url = 5"),
            &["amqp_url must be a string or an array"],
        );
        assert_contains(
            &error("amqp_url = [\"amqp://a\", 5]"),
            &["amqp_url: invalid type"],
        );
    }

    #[test]
    fn a_url_that_is_not_amqp_is_refused_with_its_password_hidden() {
        let msg = error("amqp_url = [\"amqp://a\", \"http://user:s3cret@host/\"]");
        assert_contains(
            &msg,
            &[
                "line 1, column 25",
                "amqp_url 'http://user:***@host/' must start with amqp://",
            ],
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn amqp_urls_are_parsed_at_load_and_their_errors_located() {
        for (url, expected) in [
            (
                "amqp://u:s3cr3t@h/?socket_timeout=1e19",
                "line 2, column 12: amqp_url: invalid broker URL amqp://u:***@h/?socket_timeout=1e19: \
                 query parameter socket_timeout=\"1e19\" must be a number of seconds from 0.001 to \
                 86400 (1 day)",
            ),
            (
                "amqp:///user:s3cr3t@host/",
                "line 2, column 12: amqp_url: invalid broker URL amqp:///***@host/: it has an '@' \
                 after the host part",
            ),
            (
                "amqp://user:p@ss/w@host/",
                "invalid broker URL amqp://***@host/",
            ),
            (
                "amqps://user:pa/ss@host/",
                "invalid broker URL amqps://***@host/",
            ),
            (
                "amqp://u:s3cr3t@h/?retry_delay=nan",
                "retry_delay=\"nan\" must be",
            ),
        ] {
            let msg = error(&format!("topic_prefix = \"x\"\namqp_url = \"{url}\""));
            assert_contains(&msg, &[expected]);
            assert!(!msg.contains("s3cr3t") && !msg.contains("pa/ss") && !msg.contains("p@ss"));
        }
    }

    #[test]
    fn malformed_urls_are_refused_with_their_password_hidden() {
        for url in [
            "amqp:user:s3cr3t@host/%2F",
            "AMQP:user:s3cr3t@host/",
            "amqp:/user:s3cr3t@host/",
            "amqp//user:s3cr3t@host/",
            "amqpx://user:s3cr3t@host/",
            "user:s3cr3t@host",
        ] {
            let msg = error(&format!("amqp_url = \"{url}\""));
            assert_contains(
                &msg,
                &["line 1, column 12", "must start with amqp:// or amqps://"],
            );
            assert!(!msg.contains("s3cr3t"), "{msg}");
        }
    }

    #[test]
    fn timeouts_are_seconds_and_may_be_decimal() {
        let c = parse("connection_timeout = 2.5\nshutdown_timeout = 0");
        assert_eq!(c.connection_timeout, Duration::from_millis(2500));
        assert_eq!(c.shutdown_timeout, Duration::ZERO);
        assert_contains(
            &error("connection_timeout = 0"),
            &["connection_timeout must be a number of seconds from 0.001 to 86400 (1 day), not 0"],
        );
        assert_contains(
            &error("shutdown_timeout = -1"),
            &["shutdown_timeout must be a number of seconds from 0 to 86400 (1 day), not -1"],
        );
        // One day at most, and never a panic: huge, infinite and NaN values are refused.
        for (line, value) in [
            ("connection_timeout = 1e19", "1e19"),
            ("connection_timeout = 86400.5", "86400.5"),
            ("shutdown_timeout = inf", "inf"),
            ("shutdown_timeout = nan", "nan"),
            ("connection_timeout = -inf", "-inf"),
            ("connection_timeout = 1e-300", "1e-300"),
            (
                "connection_timeout = 9223372036854775807",
                "9223372036854775807",
            ),
        ] {
            let key = line.split(' ').next().unwrap();
            assert_contains(
                &error(line),
                &[
                    "test.toml: line 1, column ",
                    &format!("{key} must be a number of seconds from "),
                    &format!("to 86400 (1 day), not {value}"),
                ],
            );
        }
        let c = parse("connection_timeout = 86400\nshutdown_timeout = 86400.0");
        assert_eq!(c.connection_timeout, Duration::from_secs(86_400));
        assert_contains(
            &error("connection_timeout = \"10\""),
            &["connection_timeout: invalid type"],
        );
    }

    #[test]
    fn publish_settings_are_typed_and_ranged() {
        let c = parse(
            "publish_priority = 255\npublish_exchange = \"x\"\ntopic_prefix = \"org.example\"\n\
             passive_declares = true",
        );
        assert_eq!(c.publish_priority, Some(255));
        assert_eq!(c.publish_exchange, "x");
        assert_eq!(c.topic_prefix, "org.example");
        assert!(c.passive_declares);
        assert_contains(
            &error("publish_priority = 256"),
            &["publish_priority must be between 0 and 255, not 256"],
        );
        assert_contains(
            &error("passive_declares = \"yes\""),
            &["passive_declares: invalid type"],
        );
    }

    // ---- client_properties ------------------------------------------------------------------

    #[test]
    fn client_properties_keep_extra_keys_and_get_fms_identity() {
        let c = parse(
            "[client_properties]\nteam = \"infra\"\nport = 3\nwhen = 2024-01-02T03:04:05Z\n\
             product = \"fm\"",
        );
        assert_eq!(str_prop(&c, "team"), "infra");
        assert_eq!(c.client_properties["port"], 3);
        assert_eq!(str_prop(&c, "when"), "2024-01-02T03:04:05Z");
        assert_eq!(str_prop(&c, "app"), "Unknown");
        assert_eq!(str_prop(&c, "product"), "fm");
        assert_eq!(str_prop(&c, "information"), INFORMATION);
        assert_eq!(
            str_prop(&c, "version"),
            concat!("fm-", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn reserved_client_properties_may_not_change() {
        for key in ["product", "information", "version"] {
            let msg = error(&format!(
                "[client_properties]\napp = \"a\"\n{key} = \"mine\"\n"
            ));
            assert_contains(
                &msg,
                &[
                    "line 3, column 1",
                    &format!("\"{key}\" is a reserved keyword in client_properties"),
                ],
            );
        }
        assert_contains(
            &error("[client_properties]\nx = nan\n"),
            &["[client_properties] x: NaN cannot be represented in JSON"],
        );
    }

    // ---- queues, bindings, exchanges ---------------------------------------------------------

    #[test]
    fn queues_keep_file_order_and_their_arguments() {
        let c = parse(
            r#"
            [queues.zeta]
            durable = true
            auto_delete = false
            exclusive = false
            arguments = {"x-queue-type" = "quorum", "x-max-priority" = 10}
            [queues.alpha]
            durable = false
            auto_delete = true
            exclusive = true
            arguments = {}
            [[bindings]]
            queue = "zeta"
            exchange = "amq.topic"
            routing_keys = ["a.#", "b.*"]
            arguments = {"x-match" = "all"}
            "#,
        );
        let names: Vec<&str> = c.queues.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
        let args = &c.queues[0].1.arguments;
        assert_eq!(args["x-queue-type"], "quorum");
        assert_eq!(args["x-max-priority"], 10);
        assert_eq!(
            args.keys().collect::<Vec<_>>(),
            ["x-queue-type", "x-max-priority"]
        );
        assert_eq!(c.bindings[0].routing_keys, ["a.#", "b.*"]);
        assert_eq!(c.bindings[0].arguments["x-match"], "all");
        // The file's [queues] replaced the default "" queue, and the file's bindings the default.
        assert_eq!(c.bindings.len(), 1);
    }

    #[test]
    fn a_queue_missing_a_setting_is_refused_naming_the_queue_and_keys() {
        let msg = error("[queues.work]\ndurable = true\nexclusive = false\n");
        assert_contains(
            &msg,
            &["queue 'work' is missing auto_delete, arguments; every queue needs durable"],
        );
        assert_contains(
            &error(
                "[queues.w]\ndurable = 1\nauto_delete = false\nexclusive = false\narguments = {}",
            ),
            &[
                "line 2, column 11: [queues.\"w\"] durable: invalid type: integer `1`, expected a boolean",
            ],
        );
        assert_contains(
            &error(
                "[queues.w]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {}\nttl = 5",
            ),
            &["line 6", "[queues.\"w\"]: unknown field `ttl`"],
        );
        assert_contains(
            &error("queues = [1]"),
            &["queues must be a table, not a array"],
        );
        assert_contains(
            &error("[queues]\nw = 1"),
            &["[queues.\"w\"] must be a table"],
        );
    }

    #[test]
    fn names_longer_than_amqp_allows_are_refused() {
        let long = "q".repeat(256);
        let queue = format!(
            "[queues.{long}]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {{}}\n"
        );
        assert!(error(&queue).contains("longer than AMQP's 255 bytes"));
        let binding = format!("[[bindings]]\nexchange = \"e\"\nrouting_keys = [\"{long}\"]\n");
        assert!(error(&binding).contains("longer than AMQP's 255 bytes"));
    }

    #[test]
    fn bindings_need_an_exchange_and_an_array_of_routing_keys() {
        assert_contains(
            &error("[[bindings]]\nqueue = \"\"\n"),
            &["binding #1 is missing exchange, routing_keys"],
        );
        assert_contains(
            &error("[[bindings]]\nexchange = \"e\"\nrouting_keys = \"#\"\n"),
            &[
                "line 3, column 16",
                "binding #1: routing_keys must be an array of strings",
            ],
        );
        assert_contains(
            &error("[[bindings]]\nexchange = \"e\"\nrouting_keys = [\"#\"]\nqueues = \"x\""),
            &["binding #1: unknown field `queues`"],
        );
        assert_contains(
            &error("[bindings]\nexchange = \"e\""),
            &["bindings must be an array of tables"],
        );
        // A binding without a queue binds the server-named queue.
        let c = parse("[[bindings]]\nexchange = \"e\"\nrouting_keys = []");
        assert_eq!(c.bindings[0].queue, "");
        assert!(c.bindings[0].routing_keys.is_empty());
    }

    #[test]
    fn exchanges_are_validated_with_defaults_for_missing_settings() {
        let c = parse("[exchanges.logs]\ntype = \"fanout\"\n[exchanges.\"a.b\"]\n");
        assert_eq!(c.exchanges.len(), 2);
        assert_eq!(c.exchanges[0].0, "logs");
        assert_eq!(c.exchanges[0].1.kind, "fanout");
        assert_eq!(c.exchanges[1].0, "a.b");
        assert_eq!(c.exchanges[1].1.kind, "topic");
        assert!(c.exchanges[1].1.durable);
        assert_contains(
            &error("[exchanges.x]\nkind = \"topic\""),
            &["[exchanges.\"x\"]: unknown field `kind`"],
        );
    }

    // ---- qos, tls, monitoring ----------------------------------------------------------------

    #[test]
    fn qos_and_tls_keys_left_out_take_their_defaults() {
        let c = parse("[qos]\nprefetch_count = 1\n[tls]\nca_cert = \"/ca.pem\"\n");
        assert_eq!(
            c.qos,
            Qos {
                prefetch_size: 0,
                prefetch_count: 1
            }
        );
        assert_eq!(
            c.tls,
            Tls {
                ca_cert: Some("/ca.pem".into()),
                certfile: None,
                keyfile: None
            }
        );
        let c = parse("[qos]\nprefetch_size = 4294967295\n[tls]\ncertfile = \"\"");
        assert_eq!(c.qos.prefetch_count, 10);
        assert_eq!(c.qos.prefetch_size, u32::MAX);
        assert_eq!(c.tls.certfile, None);
    }

    #[test]
    fn qos_values_are_ranged_and_tables_reject_unknown_keys() {
        assert_contains(
            &error("[qos]\nprefetch_count = 65536"),
            &[
                "line 2, column 18",
                "[qos] prefetch_count must be between 0 and 65535, not 65536",
            ],
        );
        assert_contains(
            &error("[qos]\nprefetch_size = -1"),
            &["[qos] prefetch_size must be between 0 and 4294967295"],
        );
        assert_contains(
            &error("[qos]\nprefetch = 1"),
            &["[qos]: unknown field `prefetch`, expected `prefetch_size` or `prefetch_count`"],
        );
        assert_contains(
            &error("[tls]\ncafile = \"x\""),
            &["[tls]: unknown field `cafile`"],
        );
        assert_contains(&error("qos = 3"), &["[qos] must be a table, not a integer"]);
    }

    #[test]
    fn monitoring_is_off_when_empty_and_needs_a_port_otherwise() {
        assert_eq!(parse("[monitoring]\n").monitoring, None);
        assert_eq!(
            parse("[monitoring]\nport = 8070").monitoring,
            Some(Monitoring {
                address: String::new(),
                port: 8070
            })
        );
        assert_eq!(
            parse("[monitoring]\naddress = \"127.0.0.1\"\nport = 0").monitoring,
            Some(Monitoring {
                address: "127.0.0.1".into(),
                port: 0
            })
        );
        assert_contains(
            &error("[monitoring]\naddress = \"::1\"\n"),
            &["the port must be defined in [monitoring] to activate it"],
        );
        assert_contains(
            &error("[monitoring]\nport = 70000"),
            &["[monitoring] port must be between 0 and 65535"],
        );
        assert_contains(
            &error("[monitoring]\nport = 1\nhost = \"x\""),
            &["[monitoring]: unknown field `host`"],
        );
    }

    // ---- callbacks ---------------------------------------------------------------------------

    #[test]
    fn a_callback_string_is_a_python_target_or_a_plugin_path() {
        assert_eq!(
            parse_callback_string("pkg.mod:Consumer").unwrap(),
            CallbackKind::Python {
                target: "pkg.mod:Consumer".into(),
                interpreter: "python3".into()
            }
        );
        assert_eq!(
            parse_callback_string("/usr/lib/fm/libx.so").unwrap(),
            CallbackKind::Plugin {
                path: "/usr/lib/fm/libx.so".into()
            }
        );
        assert_eq!(
            parse_callback_string("target/debug/libfm_printer.so").unwrap(),
            CallbackKind::Plugin {
                path: "target/debug/libfm_printer.so".into()
            }
        );
        for bad in ["pkg.mod", "/usr/bin/prog", ""] {
            let msg = format!("{:#}", parse_callback_string(bad).unwrap_err());
            assert_contains(&msg, &["is neither a Python callback", "command = "]);
        }
        for bad in [
            "pkg.mod:",
            ":attr",
            "pkg..mod:a",
            "pkg.mod:a.b",
            "a:b:c",
            "1pkg:a",
            "pkg-x:a",
            "path/f.py:a.b",
        ] {
            let msg = format!("{:#}", parse_callback_string(bad).unwrap_err());
            assert_contains(&msg, &[&format!("python callback '{bad}' must look like")]);
        }
        // fedora-messaging's --callback-file form: a Python file and a name in it.
        assert!(matches!(
            parse_callback_string("/srv/cb/f.py:obj").unwrap(),
            CallbackKind::Python { target, .. } if target == "/srv/cb/f.py:obj"
        ));
        assert_contains(
            &error("callback = \"my_module\""),
            &["line 1, column 12", "callback 'my_module' is neither"],
        );
        assert_contains(&error("callback = 3"), &["callback must be a string"]);
    }

    #[test]
    fn a_callback_table_selects_a_plugin_a_command_or_python() {
        let c = parse("[callback]\nplugin = \"/p/libx.so\"\nconcurrency = 4\non_error = \"drop\"");
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Plugin {
                path: "/p/libx.so".into()
            })
        );
        assert_eq!(c.callback.concurrency, 4);
        assert_eq!(c.callback.on_error, OnError::Drop);

        let c = parse(
            "[callback]\ncommand = [\"/bin/cat\", \"-u\"]\ntimeout = 1.5\nmax_redeliveries = 3",
        );
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Command {
                argv: vec!["/bin/cat".into(), "-u".into()],
                mode: CommandMode::Exec
            })
        );
        assert_eq!(c.callback.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.callback.max_redeliveries, Some(3));
        assert_eq!(c.callback.on_error, OnError::Halt);

        let c = parse("[callback]\ncommand = [\"w\"]\nmode = \"worker\"\non_error = \"requeue\"");
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Command {
                argv: vec!["w".into()],
                mode: CommandMode::Worker
            })
        );
        assert_eq!(c.callback.on_error, OnError::Requeue);

        let c = parse(
            "[callback]\npython = \"a.b:c\"\ninterpreter = \"/venv/bin/python\"\ntimeout = 60",
        );
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Python {
                target: "a.b:c".into(),
                interpreter: "/venv/bin/python".into()
            })
        );
        assert_eq!(c.callback.timeout, Some(Duration::from_secs(60)));

        // Settings without a kind: the callback comes from --callback.
        let c = parse("[callback]\nconcurrency = 2");
        assert_eq!(c.callback.kind, None);
        assert_eq!(c.callback.concurrency, 2);
    }

    #[test]
    fn bad_callback_tables_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "plugin = \"/a.so\"\npython = \"a:b\"",
                "sets plugin and python; choose exactly one",
            ),
            (
                "command = [\"x\"]\npython = \"a:b\"",
                "sets command and python",
            ),
            (
                "plugin = \"/a.dll\"",
                "plugin '/a.dll' must be the path of a .so file",
            ),
            ("command = []", "command must be a non-empty array"),
            ("command = [\"\"]", "command must be a non-empty array"),
            (
                "command = \"/bin/x\"",
                "[callback] command: invalid type: string \"/bin/x\", expected a sequence",
            ),
            (
                "command = [\"x\"]\nmode = \"daemon\"",
                "mode 'daemon' is unknown; use \"exec\" or \"worker\"",
            ),
            (
                "python = \"a:b\"\nmode = \"worker\"",
                "mode applies only to command callbacks",
            ),
            (
                "plugin = \"/a.so\"\ninterpreter = \"python3\"",
                "interpreter applies only to python callbacks",
            ),
            (
                "python = \"a:b\"\ninterpreter = \"\"",
                "interpreter is empty",
            ),
            (
                "python = \"a/b.py\"",
                "python callback 'a/b.py' must look like",
            ),
            (
                "plugin = \"/a.so\"\ntimeout = 5",
                "a plugin runs in-process and cannot be interrupted",
            ),
            (
                "command = [\"x\"]\ntimeout = 0",
                "line 3, column 11: [callback] timeout must be a number of seconds from 0.001 to \
                 86400 (1 day), not 0",
            ),
            (
                "command = [\"x\"]\ntimeout = -2.5",
                "from 0.001 to 86400 (1 day), not -2.5",
            ),
            (
                "command = [\"x\"]\nmode = \"worker\"\ntimeout = 1e19",
                "line 4, column 11: [callback] timeout must be a number of seconds from 0.001 to \
                 86400 (1 day), not 1e19",
            ),
            (
                "python = \"a:b\"\ntimeout = nan",
                "[callback] timeout must be",
            ),
            (
                "command = [\"x\"]\ntimeout = \"10\"",
                "[callback] timeout: invalid type: string",
            ),
            (
                "command = [\"x\"]\nconcurrency = 0",
                "concurrency must be between 1 and 1024, not 0",
            ),
            (
                "command = [\"x\"]\non_error = \"ignore\"",
                "on_error 'ignore' is unknown",
            ),
            (
                "command = [\"x\"]\nmax_redeliveries = -1",
                "max_redeliveries must be 0 or more",
            ),
            (
                "command = [\"x\"]\nretries = 3",
                "[callback]: unknown field `retries`",
            ),
        ];
        for (body, expected) in cases {
            let msg = error(&format!("[callback]\n{body}\n"));
            assert_contains(&msg, &[expected]);
        }
    }

    // ---- log_config ---------------------------------------------------------------------------

    #[test]
    fn log_config_levels_are_read_and_the_rest_ignored() {
        let c = parse(
            r#"
            [log_config]
            version = 1
            [log_config.handlers.console]
            class = "logging.StreamHandler"
            [log_config.loggers.app]
            level = 10
            [log_config.loggers.quiet]
            level = "NOTSET"
            [log_config.loggers.nolevel]
            propagate = false
            "#,
        );
        assert_eq!(c.log_config.root, LevelFilter::WARN);
        assert_eq!(
            c.log_config.loggers,
            [("app".to_owned(), LevelFilter::DEBUG)]
        );
        assert_contains(
            &error("[log_config.root]\nlevel = \"LOUD\""),
            &["[log_config.root] level 'LOUD' is not a Python logging level"],
        );
        assert_contains(
            &error("[log_config.loggers.x]\nlevel = true"),
            &["[log_config.loggers.\"x\"] level (a boolean) is not a Python logging level"],
        );
    }

    // ---- overrides -----------------------------------------------------------------------------

    #[test]
    fn overrides_follow_fedora_messaging_consume() {
        let mut c = Config::default();
        c.apply_overrides(&Overrides {
            app_name: Some("my-app".into()),
            queue_name: Some("named".into()),
            routing_keys: vec!["a.b".into(), "c.#".into()],
            exchange: Some("ex".into()),
            callback: Some("/x/libp.so".into()),
        })
        .unwrap();
        assert_eq!(str_prop(&c, "app"), "my-app");
        // The named queue takes the settings of the "" queue.
        assert_eq!(
            c.queues,
            [("named".to_owned(), Config::default().queues[0].1.clone())]
        );
        assert_eq!(
            c.bindings,
            [Binding {
                queue: "named".into(),
                exchange: "ex".into(),
                routing_keys: vec!["a.b".into(), "c.#".into()],
                arguments: Map::new(),
            }]
        );
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Plugin {
                path: "/x/libp.so".into()
            })
        );

        let mut c = Config::default();
        c.apply_overrides(&Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn queue_name_retargets_ignored_bindings_too() {
        let mut c = Config::load(Some(&fixture("good_conf.toml"))).unwrap();
        c.apply_overrides(&Overrides {
            queue_name: Some("q".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(c.queues[0].0, "q");
        assert_eq!(c.bindings.len(), 1);
        assert_eq!(
            (
                c.bindings[0].queue.as_str(),
                c.bindings[0].exchange.as_str()
            ),
            ("q", "e")
        );
        assert!(c.ignored_bindings.is_empty());
    }

    #[test]
    fn queue_name_without_a_server_named_queue() {
        // One named queue: fm uses its settings (fedora-messaging would raise a KeyError).
        let one =
            "[queues.a]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {}\n";
        let mut c = parse(one);
        c.apply_overrides(&Overrides {
            queue_name: Some("b".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(c.queues.len(), 1);
        assert_eq!(c.queues[0].0, "b");
        assert!(c.queues[0].1.durable);

        let two = format!(
            "{one}[queues.z]\ndurable = true\nauto_delete = false\nexclusive = false\narguments = {{}}\n"
        );
        let mut c = parse(&two);
        let err = c
            .apply_overrides(&Overrides {
                queue_name: Some("b".into()),
                ..Overrides::default()
            })
            .unwrap_err();
        assert_eq!(exit_code_of(&err), code::USAGE);
        assert_contains(
            &format!("{err:#}"),
            &["--queue-name b: test.toml defines 2 queues ('a', 'z') and none named \"\""],
        );
    }

    #[test]
    fn a_callback_override_keeps_the_configured_interpreter_and_is_checked() {
        let mut c =
            parse("[callback]\npython = \"a:b\"\ninterpreter = \"/venv/python\"\ntimeout = 3");
        c.apply_overrides(&Overrides {
            callback: Some("c.d:e".into()),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(
            c.callback.kind,
            Some(CallbackKind::Python {
                target: "c.d:e".into(),
                interpreter: "/venv/python".into()
            })
        );
        for (bad, expected) in [
            ("nonsense", "--callback: callback 'nonsense' is neither"),
            ("/p.so", "which a plugin cannot honour"),
        ] {
            let err = c
                .apply_overrides(&Overrides {
                    callback: Some(bad.into()),
                    ..Overrides::default()
                })
                .unwrap_err();
            assert_eq!(exit_code_of(&err), code::USAGE);
            assert_contains(&format!("{err:#}"), &[expected]);
        }
    }

    // ---- lookup --------------------------------------------------------------------------------

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

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nxé=", 6), (2, 3));
        assert_eq!(line_col("é\nxé=", 5), (2, 2)); // inside a character: its start
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
