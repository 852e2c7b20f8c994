//! Logging: tracing to stderr, with levels taken from fedora-messaging's `[log_config]`.
//!
//! fedora-messaging configures Python's `logging` with `dictConfig(log_config)`. fm cannot run
//! Python's handlers and formatters, but it honours the part users actually tune, the levels:
//! `root.level` and `loggers.NAME.level`. Python logger names map onto fm's tracing targets:
//!
//! | Python logger | tracing target |
//! |---|---|
//! | `fedora_messaging` | `fm` (fm itself) |
//! | `pika`, `twisted`, `amqp` | `lapin` and `amq_protocol` (the AMQP client); the most verbose of the three wins |
//! | any other name, e.g. `example_printer` or `pkg.mod` | `fm::callback::example_printer`, `fm::callback::pkg::mod` (what callbacks log under, see [`callback_target`]) |
//!
//! Sub-loggers of fedora-messaging's own libraries (`fedora_messaging.twisted`, `pika.channel`)
//! have no counterpart in fm and are ignored. `-v` raises fm's level one step per flag
//! (INFO → DEBUG → TRACE) and `-q` lowers it (WARN → ERROR → off). `FM_LOG`, in `EnvFilter`
//! syntax (`info,lapin=debug`), replaces all of this when set, for debugging.
//!
//! Output goes to stderr, with colours only on a terminal, and without timestamps when
//! `JOURNAL_STREAM` says stderr is the systemd journal (which stamps lines itself). One event is
//! one line, always: control characters in what an event carries (a topic, a message id, a
//! command's output: anyone who can publish chooses them) are written escaped (`OneLine`).
//!
//! The subscriber is installed once, by [`init_default`] before the configuration is read (so
//! loading can log), and [`init`] then swaps in the configured levels through a reload handle.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogConfig;

/// The environment variable whose `EnvFilter` directives replace the configured levels.
pub const ENV_LOG: &str = "FM_LOG";

/// fm's own tracing target (the crate name).
const FM_TARGET: &str = "fm";
/// Python loggers of the AMQP stack fedora-messaging uses, and the crates that do that job in fm.
const AMQP_LOGGERS: &[&str] = &["pika", "twisted", "amqp"];
const AMQP_TARGETS: &[&str] = &["lapin", "amq_protocol"];

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Start logging with fedora-messaging's default levels, before any configuration is loaded.
pub fn init_default(verbosity: i8) {
    init(&LogConfig::default(), verbosity);
}

/// Log with the levels of `log_config`, adjusted by `verbosity` (+1 per `-v`, -1 per `-q`),
/// unless `FM_LOG` is set. The first call installs the subscriber, later calls change its levels.
pub fn init(log_config: &LogConfig, verbosity: i8) {
    install(log_config, verbosity, directives);
}

/// [`init`] for `fm check`, whose report on stdout names every problem it finds: lapin's own
/// error for a channel the broker closed — above all `404 NOT_FOUND` for a queue that does not
/// exist yet, which `fm check` expects and reports as a note — would only repeat the report
/// (or contradict it), so see [`check_directives`].
pub fn init_check(log_config: &LogConfig, verbosity: i8) {
    install(log_config, verbosity, check_directives);
}

/// The [`directives`] of `fm check`: lapin's channel target off, unless `FM_LOG` or
/// `[log_config]` (a `pika`, `twisted` or `amqp` logger) asks for the AMQP client's logs.
pub fn check_directives(log_config: &LogConfig, verbosity: i8, fm_log: Option<&str>) -> String {
    let wanted = directives(log_config, verbosity, fm_log);
    let asked = fm_log.is_some_and(|s| !s.trim().is_empty())
        || log_config
            .loggers
            .iter()
            .any(|(name, _)| AMQP_LOGGERS.contains(&name.as_str()));
    if asked {
        wanted
    } else {
        format!("{wanted},lapin::channel=off")
    }
}

fn install(
    log_config: &LogConfig,
    verbosity: i8,
    directives: fn(&LogConfig, i8, Option<&str>) -> String,
) {
    let fm_log = std::env::var(ENV_LOG).ok();
    let wanted = directives(log_config, verbosity, fm_log.as_deref());
    let (filter, bad_env) = match EnvFilter::try_new(&wanted) {
        Ok(filter) => (filter, None),
        Err(e) => {
            // Only FM_LOG can be malformed: the configured directives are built from
            // sanitised names. Fall back to the configuration and say so once installed.
            let fallback = directives(log_config, verbosity, None);
            (EnvFilter::new(fallback), Some(e))
        }
    };
    if let Some(handle) = HANDLE.get() {
        if let Err(e) = handle.reload(filter) {
            eprintln!("fm: cannot change the log levels: {e}");
        }
    } else {
        let (filter, handle) = reload::Layer::new(filter);
        let journal = std::env::var_os("JOURNAL_STREAM").is_some();
        let ansi =
            !journal && std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
        let installed = tracing_subscriber::registry()
            .with(filter)
            // lapin logs every frame at TRACE, the login frame (and its password) included:
            // never let those through, whatever FM_LOG says.
            .with(tracing_subscriber::filter::filter_fn(|meta| {
                *meta.level() != tracing::Level::TRACE
                    || !AMQP_TARGETS.iter().any(|t| meta.target().starts_with(t))
            }))
            .with(journal.then(|| stderr_layer(ansi).without_time()))
            .with((!journal).then(|| stderr_layer(ansi)))
            .try_init();
        // A subscriber installed by someone else (a test harness) stays; fm then just logs
        // through it.
        if installed.is_ok() {
            let _ = HANDLE.set(handle);
        }
    }
    static WARNED: OnceLock<()> = OnceLock::new();
    if let Some(e) = bad_env
        && WARNED.set(()).is_ok()
    {
        tracing::warn!("ignoring {ENV_LOG}={wanted:?}: {e}; using the configured log levels");
    }
}

/// A formatting layer writing to stderr.
fn stderr_layer<S>(
    ansi: bool,
) -> fmt::Layer<S, fmt::format::DefaultFields, fmt::format::Format, OneLine>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fmt::layer().with_writer(OneLine { ansi }).with_ansi(ansi)
}

/// The writer of every log line: one event is one line, whatever it carries. Message data in a
/// log line (a topic, a message id, a command's output) comes from anyone who can publish, and
/// a newline or a terminal control in it could forge log lines (`…\n2026-…Z ERROR fm::consume:
/// …`) or rewrite the terminal; so every control character but the event's final newline (and
/// tabs, and the formatter's own colour codes on a terminal) is written escaped, as `\n`, `\r`,
/// `\x1b`, `\u{85}`...
#[derive(Clone, Copy)]
struct OneLine {
    ansi: bool,
}

impl<'a> fmt::MakeWriter<'a> for OneLine {
    type Writer = OneLine;

    fn make_writer(&'a self) -> OneLine {
        *self
    }
}

impl std::io::Write for OneLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::stderr()
            .lock()
            .write_all(&one_line(buf, self.ansi))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `event` (one formatted log event) with its control characters escaped; see [`OneLine`].
fn one_line(event: &[u8], ansi: bool) -> Cow<'_, [u8]> {
    let (body, end) = match event.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (event, &b""[..]),
    };
    let text = String::from_utf8_lossy(body);
    let clean = |c: char| !c.is_control() || c == '\t' || (ansi && c == '\x1b');
    if text.chars().all(clean) && matches!(text, Cow::Borrowed(_)) {
        return Cow::Borrowed(event);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if clean(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.extend(c.escape_unicode()),
        }
    }
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(end);
    Cow::Owned(bytes)
}

/// The `EnvFilter` directives for `log_config` and `verbosity`, or `fm_log` when it is set
/// and not blank.
pub fn directives(log_config: &LogConfig, verbosity: i8, fm_log: Option<&str>) -> String {
    if let Some(env) = fm_log.filter(|s| !s.trim().is_empty()) {
        return env.to_owned();
    }
    let level = |name: &str| {
        log_config
            .loggers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, l)| *l)
    };
    let mut out = vec![level_name(log_config.root).to_owned()];

    // A Python logger without its own level inherits the root's; so does fm.
    let fm = level("fedora_messaging").unwrap_or(log_config.root);
    out.push(format!("{FM_TARGET}={}", level_name(adjust(fm, verbosity))));

    // fm reports every connection, channel and publish failure itself, in words that name the
    // broker, queue or message; lapin's own lines repeat them. Unless the file asks for pika's
    // (or twisted's) level, only lapin's errors are shown.
    let amqp = AMQP_LOGGERS
        .iter()
        .filter_map(|n| level(n))
        .max()
        .unwrap_or(LevelFilter::ERROR);
    for target in AMQP_TARGETS {
        out.push(format!("{target}={}", level_name(amqp)));
    }
    // A returned (unroutable) message is reported by `fm publish` with its id; lapin's warning
    // dumps the whole message.
    out.push("lapin::returned_messages=error".to_owned());

    for (name, level) in &log_config.loggers {
        if name == "fedora_messaging" || AMQP_LOGGERS.contains(&name.as_str()) {
            continue;
        }
        let top = name.split('.').next().unwrap_or_default();
        if top == "fedora_messaging" || AMQP_LOGGERS.contains(&top) {
            continue; // a sub-logger of a library fm replaces: nothing in fm logs as it
        }
        out.push(format!("{}={}", callback_target(name), level_name(*level)));
    }
    out.join(",")
}

/// The tracing target for a callback's Python logger `name`: `fm::callback::` followed by the
/// name with dots as `::` (so Python's logger hierarchy becomes a target prefix hierarchy) and
/// any character an `EnvFilter` target cannot hold replaced by `_`.
pub fn callback_target(name: &str) -> String {
    let parts: Vec<String> = name
        .split('.')
        .map(|part| {
            part.chars()
                .map(|c| {
                    if c.is_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .collect();
    format!("{FM_TARGET}::callback::{}", parts.join("::"))
}

/// Move `level` `steps` steps towards TRACE (positive) or off (negative).
pub fn adjust(level: LevelFilter, steps: i8) -> LevelFilter {
    const ORDER: [LevelFilter; 6] = [
        LevelFilter::OFF,
        LevelFilter::ERROR,
        LevelFilter::WARN,
        LevelFilter::INFO,
        LevelFilter::DEBUG,
        LevelFilter::TRACE,
    ];
    let at = ORDER.iter().position(|l| *l == level).unwrap_or(3) as i32;
    ORDER[(at + i32::from(steps)).clamp(0, 5) as usize]
}

fn level_name(level: LevelFilter) -> &'static str {
    match level {
        LevelFilter::OFF => "off",
        LevelFilter::ERROR => "error",
        LevelFilter::WARN => "warn",
        LevelFilter::INFO => "info",
        LevelFilter::DEBUG => "debug",
        _ => "trace",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, python_level_name, python_level_number};

    fn log_config(toml: &str) -> LogConfig {
        Config::from_toml_str(toml, None).unwrap().log_config
    }

    fn escaped(event: &str, ansi: bool) -> String {
        String::from_utf8(one_line(event.as_bytes(), ansi).into_owned()).unwrap()
    }

    /// Issue 17: a publisher cannot forge a log line with a newline in a topic or message id.
    #[test]
    fn an_event_is_one_line_whatever_it_carries() {
        let forged = "INFO fm: Consuming message from topic a\n2026-11-26T00:00:00Z ERROR fm: \
                      forged\r\u{1b}[2Jb (message id \u{0}x\u{7f}\u{85})\n";
        assert_eq!(
            escaped(forged, false),
            "INFO fm: Consuming message from topic a\\n2026-11-26T00:00:00Z ERROR fm: forged\\r\
             \\x1b[2Jb (message id \\x00x\\x7f\\u{85})\n"
        );
        // Tabs, non-ASCII text and the formatter's own colours on a terminal stay as they are.
        let plain = "\u{1b}[32m INFO\u{1b}[0m fm: caf\u{e9}\tok\n";
        assert_eq!(escaped(plain, true), plain);
        assert!(matches!(one_line(plain.as_bytes(), true), Cow::Borrowed(_)));
        assert_eq!(
            escaped(plain, false),
            "\\x1b[32m INFO\\x1b[0m fm: caf\u{e9}\tok\n"
        );
    }

    #[test]
    fn without_log_config_root_is_warn_and_fm_info() {
        assert_eq!(
            directives(&LogConfig::default(), 0, None),
            "warn,fm=info,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
    }

    #[test]
    fn fm_check_silences_lapins_channel_errors_unless_asked_for() {
        assert_eq!(
            check_directives(&LogConfig::default(), 0, None),
            "warn,fm=info,lapin=error,amq_protocol=error,lapin::returned_messages=error,\
             lapin::channel=off"
        );
        assert_eq!(
            check_directives(&LogConfig::default(), 0, Some("debug")),
            "debug"
        );
        let pika = log_config("[log_config.loggers.pika]\nlevel = \"ERROR\"\n");
        assert!(!check_directives(&pika, 0, None).contains("lapin::channel"));
    }

    #[test]
    fn python_level_names_in_any_case_map_to_tracing_levels() {
        let cases = [
            ("DEBUG", LevelFilter::DEBUG),
            ("info", LevelFilter::INFO),
            ("Warning", LevelFilter::WARN),
            ("WARN", LevelFilter::WARN),
            ("error", LevelFilter::ERROR),
            ("CRITICAL", LevelFilter::ERROR),
        ];
        for (name, level) in cases {
            assert_eq!(python_level_name(name), Some(Some(level)), "{name}");
        }
        assert_eq!(python_level_name("NOTSET"), Some(None));
        assert_eq!(python_level_name("LOUD"), None);
    }

    #[test]
    fn python_level_numbers_round_up_to_the_next_named_level() {
        assert_eq!(python_level_number(10), Some(Some(LevelFilter::DEBUG)));
        assert_eq!(python_level_number(20), Some(Some(LevelFilter::INFO)));
        assert_eq!(python_level_number(25), Some(Some(LevelFilter::WARN)));
        assert_eq!(python_level_number(30), Some(Some(LevelFilter::WARN)));
        assert_eq!(python_level_number(40), Some(Some(LevelFilter::ERROR)));
        assert_eq!(python_level_number(50), Some(Some(LevelFilter::ERROR)));
        assert_eq!(python_level_number(60), Some(Some(LevelFilter::OFF)));
        assert_eq!(python_level_number(0), Some(None));
        assert_eq!(python_level_number(-1), None);
    }

    #[test]
    fn logger_names_map_to_fm_targets() {
        let c = log_config(
            r#"
            [log_config.root]
            level = "ERROR"
            [log_config.loggers.fedora_messaging]
            level = "INFO"
            [log_config.loggers.twisted]
            level = "INFO"
            [log_config.loggers.pika]
            level = "WARNING"
            [log_config.loggers.example_printer]
            level = "DEBUG"
            [log_config.loggers."my.pkg"]
            level = 30
            [log_config.loggers."pika.channel"]
            level = "DEBUG"
            "#,
        );
        assert_eq!(
            directives(&c, 0, None),
            "error,fm=info,lapin=info,amq_protocol=info,lapin::returned_messages=error,\
             fm::callback::example_printer=debug,fm::callback::my::pkg=warn"
        );
        // Every directive we build is one EnvFilter accepts.
        EnvFilter::try_new(directives(&c, 0, None)).unwrap();
    }

    #[test]
    fn fm_inherits_the_root_level_when_the_file_does_not_set_fedora_messaging() {
        let c = log_config("[log_config.root]\nlevel = \"ERROR\"\n");
        assert_eq!(
            directives(&c, 0, None),
            "error,fm=error,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        let c = log_config("[log_config]\nversion = 1\n");
        assert_eq!(
            directives(&c, 0, None),
            "warn,fm=warn,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
    }

    #[test]
    fn verbose_and_quiet_move_fm_one_step_per_flag() {
        let c = LogConfig::default();
        assert_eq!(
            directives(&c, 1, None),
            "warn,fm=debug,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(
            directives(&c, 2, None),
            "warn,fm=trace,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(
            directives(&c, 5, None),
            "warn,fm=trace,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(
            directives(&c, -1, None),
            "warn,fm=warn,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(
            directives(&c, -2, None),
            "warn,fm=error,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(
            directives(&c, -3, None),
            "warn,fm=off,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(
            directives(&c, -100, None),
            "warn,fm=off,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
        assert_eq!(adjust(LevelFilter::OFF, 1), LevelFilter::ERROR);
    }

    #[test]
    fn fm_log_replaces_everything_unless_blank() {
        let c = LogConfig::default();
        assert_eq!(directives(&c, 2, Some("lapin=trace")), "lapin=trace");
        assert_eq!(
            directives(&c, 0, Some("  ")),
            "warn,fm=info,lapin=error,amq_protocol=error,lapin::returned_messages=error"
        );
    }

    #[test]
    fn callback_targets_follow_the_python_hierarchy_and_stay_parseable() {
        assert_eq!(
            callback_target("example_printer"),
            "fm::callback::example_printer"
        );
        assert_eq!(callback_target("a.b.c"), "fm::callback::a::b::c");
        assert_eq!(
            callback_target("odd name=x,y"),
            "fm::callback::odd_name_x_y"
        );
        EnvFilter::try_new(format!("{}=debug", callback_target("odd name=[x],y"))).unwrap();
    }
}
