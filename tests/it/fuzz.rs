//! The configuration fuzz test (issue 17's acceptance): whatever a configuration file holds,
//! `fm check` ends, in time, without panicking, and a configuration error (exit status 2) says
//! where it is.
//!
//! The cases are the sample configurations (`config/*.toml`, fedora-messaging's
//! `tests/fixtures/fedora-messaging/*.toml`) with mutations applied to their text: wrong types
//! for keys, huge, tiny, negative, NaN and infinite numbers, very long and empty strings,
//! special files (`/dev/zero`, `/dev/urandom`, a directory, a FIFO, a file over the 1 MiB limit)
//! for every path-valued key, malformed `amqp_url` shapes that hold a password, deep nesting,
//! duplicated tables and keys, lines removed, repeated or cut short. A seeded PRNG picks them,
//! so every run tries the same cases; a few command-line cases (`--config` and
//! `--callback-file` naming special files) are listed by hand.
//!
//! No broker is needed, and none is ever reached: every URL a case can produce points at a
//! loopback port nothing listens on (or fails to parse), so a valid configuration ends with a
//! refused connection (exit 14) instead of a network wait. Each case must:
//! - end within [`DEADLINE`] (it is killed otherwise): no read of `/dev/zero`, no FIFO open;
//! - not panic (exit status 101, or "panicked" in its output) nor die of a signal;
//! - never show the password of the URL ([`PASSWORD`]);
//! - when it exits 2, name the configuration file (or the special file it was given) and a
//!   line or a key.
//!
//! A failing case is printed whole: the file, the arguments and fm's output.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::util::{Fm, repo_root};

/// The PRNG's seed: change it to explore other cases, keep it fixed to reproduce them.
const SEED: u64 = 0x17;
/// Random cases (the hand-listed ones come on top).
const RANDOM_CASES: usize = 900;
/// Cases run at once: fm check is quick, the machine may be small and busy.
const PARALLEL: usize = 4;
/// How long one case may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// The password every generated URL carries; no output may contain it.
const PASSWORD: &str = "s3cr3t";

/// One run of `fm check`.
struct Case {
    /// Which mutations made it, to tell cases apart in a failure.
    what: String,
    /// The configuration text (written to `config.toml`), or `None` when `args` name one.
    config: Option<String>,
    /// Arguments after `check`.
    args: Vec<String>,
    /// Files besides `config.toml` whose mention locates an exit-2 error.
    names: Vec<String>,
}

/// Special files a path-valued key can name.
struct Specials {
    _dir: tempfile::TempDir,
    /// For `[tls]` files and `--config`.
    paths: Vec<String>,
    /// For `[callback] plugin` (must end in .so).
    plugins: Vec<String>,
    /// For `[callback] python` and `--callback-file` (a `.py` file and an attribute).
    python_files: Vec<String>,
}

impl Specials {
    fn new() -> Specials {
        let dir = tempfile::tempdir().expect("creating the special files' folder");
        let at = |name: &str| dir.path().join(name);
        let fifo = |name: &str| {
            let path = at(name);
            let made = std::process::Command::new("mkfifo")
                .arg(&path)
                .status()
                .expect("running mkfifo");
            assert!(made.success(), "mkfifo {}", path.display());
            path
        };
        let folder = |name: &str| {
            let path = at(name);
            std::fs::create_dir(&path).expect("creating a folder");
            path
        };
        let big = |name: &str| {
            // Sparse: 2 MiB of zeros, over the 1 MiB limit, without writing them.
            let path = at(name);
            let file = std::fs::File::create(&path).expect("creating a big file");
            file.set_len(2 << 20).expect("growing the big file");
            path
        };
        let link = |name: &str, to: &str| {
            let path = at(name);
            std::os::unix::fs::symlink(to, &path).expect("creating a symbolic link");
            path
        };
        let show = |p: PathBuf| p.display().to_string();
        let paths = vec![
            "/dev/zero".to_owned(),
            "/dev/urandom".to_owned(),
            "/dev/null".to_owned(),
            "/proc/self/status".to_owned(),
            show(fifo("fifo.pem")),
            show(folder("folder.pem")),
            show(big("big.pem")),
            show(link("zero.pem", "/dev/zero")),
            show(at("missing.pem")),
            String::new(),
        ];
        let plugins = vec![
            show(fifo("fifo.so")),
            show(folder("folder.so")),
            show(big("big.so")),
            show(link("zero.so", "/dev/zero")),
            show(link("urandom.so", "/dev/urandom")),
            show(at("missing.so")),
        ];
        let python_files = vec![
            show(fifo("fifo.py")),
            show(folder("folder.py")),
            show(big("big.py")),
            show(link("zero.py", "/dev/zero")),
            show(at("missing.py")),
        ]
        .into_iter()
        .map(|p| format!("{p}:callback"))
        .collect();
        Specials {
            _dir: dir,
            paths,
            plugins,
            python_files,
        }
    }
}

/// A loopback port nothing listens on: bound by the OS, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let port = listener.local_addr().expect("its address").port();
    drop(listener);
    port
}

/// The sample configurations, with the broker pointed at `port` (never a real host: no
/// DNS lookup, no network).
fn samples(port: u16) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for dir in ["config", "tests/fixtures/fedora-messaging"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
            .unwrap_or_else(|e| panic!("listing {dir}: {e}"))
            .map(|entry| entry.expect("a folder entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        found.sort();
        files.extend(found);
    }
    assert!(files.len() >= 5, "sample configurations: {files:?}");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("reading a sample configuration");
            let name = path
                .strip_prefix(repo_root())
                .unwrap_or(&path)
                .display()
                .to_string();
            let without_url: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("amqp_url"))
                .collect();
            let mut text = without_url.join("\n");
            // A callback that exists for the samples without one, so that the unmutated parts
            // pass and the check goes on to the (closed) broker port.
            let has_callback = text.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with("callback") || l.starts_with("plugin") || l.starts_with("python")
            });
            if !has_callback {
                text = set(&text, "callback", "command", "[\"true\"]");
            }
            (name, with_url(&text, port))
        })
        .collect()
}

/// `text` with the closed port's URL first, unless it sets `amqp_url` already. A case that lost
/// it (a line removed, the file cut short) gets it back: fm's default URL is localhost:5672,
/// where a developer's broker may listen, and it tries 3 times 5 s apart.
fn with_url(text: &str, port: u16) -> String {
    let has_url = text.lines().any(|l| {
        l.trim_start()
            .trim_start_matches('\u{feff}')
            .to_ascii_lowercase()
            .starts_with("amqp_url")
    });
    if has_url {
        text.to_owned()
    } else {
        format!("amqp_url = \"amqp://127.0.0.1:{port}/%2F\"\n{text}")
    }
}

/// The index of the header line `[table]`, and the end of its section.
fn section(lines: &[String], table: &str) -> Option<(Option<usize>, usize)> {
    let is_header = |l: &String| l.trim_start().starts_with('[');
    if table.is_empty() {
        let end = lines.iter().position(is_header).unwrap_or(lines.len());
        return Some((None, end));
    }
    let header = format!("[{table}]");
    let at = lines.iter().position(|l| l.trim() == header)?;
    let end = lines[at + 1..]
        .iter()
        .position(is_header)
        .map_or(lines.len(), |i| at + 1 + i);
    Some((Some(at), end))
}

/// `text` with `key = value` set in `[table]` ("" for the top level): the key's line is
/// replaced, or the key added at the top of the section, or the section appended.
fn set(text: &str, table: &str, key: &str, value: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let line = format!("{key} = {value}");
    match section(&lines, table) {
        Some((header, end)) => {
            let start = header.map_or(0, |h| h + 1);
            let existing = lines[start..end].iter().position(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            match existing {
                Some(i) => lines[start + i] = line,
                None => lines.insert(start, line),
            }
        }
        None => {
            lines.push(format!("[{table}]"));
            lines.push(line);
        }
    }
    lines.join("\n") + "\n"
}

/// Every key of the format, by table, with what it holds.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Seconds,
    Integer,
    Bool,
    Text,
    Path,
    Table,
    List,
}

const KEYS: &[(&str, &str, Kind)] = &[
    ("", "connection_timeout", Kind::Seconds),
    ("", "shutdown_timeout", Kind::Seconds),
    ("", "publish_exchange", Kind::Text),
    ("", "topic_prefix", Kind::Text),
    ("", "publish_priority", Kind::Integer),
    ("", "passive_declares", Kind::Bool),
    ("", "callback", Kind::Text),
    ("", "consumer_config", Kind::Table),
    ("", "log_config", Kind::Table),
    ("qos", "prefetch_size", Kind::Integer),
    ("qos", "prefetch_count", Kind::Integer),
    ("callback", "plugin", Kind::Path),
    ("callback", "command", Kind::List),
    ("callback", "python", Kind::Text),
    ("callback", "mode", Kind::Text),
    ("callback", "interpreter", Kind::Path),
    ("callback", "concurrency", Kind::Integer),
    ("callback", "timeout", Kind::Seconds),
    ("callback", "on_error", Kind::Text),
    ("callback", "max_redeliveries", Kind::Integer),
    ("tls", "ca_cert", Kind::Path),
    ("tls", "certfile", Kind::Path),
    ("tls", "keyfile", Kind::Path),
    ("monitoring", "address", Kind::Text),
    ("monitoring", "port", Kind::Integer),
    ("client_properties", "app", Kind::Text),
    ("client_properties", "extra", Kind::Table),
    ("consumer_config", "anything", Kind::Table),
    ("log_config.root", "level", Kind::Text),
    ("log_config.loggers.pika", "level", Kind::Integer),
    ("queues.\"\"", "durable", Kind::Bool),
    ("queues.\"\"", "arguments", Kind::Table),
    ("queues.fuzz", "exclusive", Kind::Bool),
    ("exchanges.\"amq.topic\"", "type", Kind::Text),
    ("exchanges.\"amq.topic\"", "arguments", Kind::Table),
];

/// Values of every type, for any key.
const ANY: &[&str] = &[
    "\"text\"",
    "\"\"",
    "0",
    "1",
    "-1",
    "true",
    "false",
    "[]",
    "[\"a\", 1]",
    "[[1], [\"a\"]]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "1.5",
];

/// Numbers at and beyond every bound fm has.
const NUMBERS: &[&str] = &[
    "0",
    "-0.0",
    "0.0005",
    "0.001",
    "1e-300",
    "86400",
    "86400.0001",
    "86401",
    "1e19",
    "1e308",
    "1e400",
    "-1e400",
    "nan",
    "+nan",
    "-nan",
    "inf",
    "+inf",
    "-inf",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967295",
    "4294967296",
    "65535",
    "65536",
    "255",
    "256",
    "-1",
    "0x7fffffff",
    "0o777",
    "0b1",
];

/// URLs holding [`PASSWORD`], malformed or with bad options; `{port}` is the closed port.
const URLS: &[&str] = &[
    "amqp:user:s3cr3t@127.0.0.1:{port}/%2F",
    "amqp:/user:s3cr3t@127.0.0.1:{port}/",
    "amqp//user:s3cr3t@127.0.0.1:{port}/",
    "AMQP:user:s3cr3t@127.0.0.1:{port}/",
    "amqp:///user:s3cr3t@127.0.0.1:{port}/",
    "amqpx://user:s3cr3t@127.0.0.1:{port}/",
    "amqpx://user:pa/s3cr3t@127.0.0.1:{port}/",
    "amqp://user:pa/s3cr3t@127.0.0.1:{port}/",
    "amqp://user:p@s3cr3t/w@127.0.0.1:{port}/",
    "amqp://user:s3cr3t?x@127.0.0.1:{port}/",
    "amqp://user:s3cr3t#x@127.0.0.1:{port}/",
    "amqp://user:s3:cr3t@127.0.0.1:{port}/",
    "amqp://user:s3cr3t@127.0.0.1:{port}/a@b",
    "amqp://user:s3cr3t@127.0.0.1:{port}/a/b",
    "amqp://user:s3cr3t%zz@127.0.0.1:{port}/",
    "amqp://user:s3cr3t@127.0.0.1:notaport/",
    "amqp://user:s3cr3t@[::1/",
    "http://user:s3cr3t@127.0.0.1:{port}/",
    "user:s3cr3t@127.0.0.1:{port}",
    " amqp://user:s3cr3t@127.0.0.1:{port}/",
    "amqp://user:s3cr3t@127.0.0.1:{port}/%2F",
    "amqps://user:s3cr3t@127.0.0.1:{port}/%2F",
    "amqp://user:s3cr3t%40%2F%3A@127.0.0.1:{port}/%2F",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?socket_timeout=1e19",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?connection_timeout=1e19",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?stack_timeout=nan",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?retry_delay=1e19",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?retry_delay=-inf",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?socket_timeout=0",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?connection_timeout=0.5&socket_timeout=86400",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?heartbeat=0",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?heartbeat=99999",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?connection_attempts=0",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?frame_max=1",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?channel_max=0",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?auth_mechanism=external",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?ssl_options=x",
    "amqp://user:s3cr3t@127.0.0.1:{port}/?frobnicate=1",
];

/// Lines that are not TOML, or not the TOML fm expects.
const GARBAGE: &[&str] = &[
    "= = =",
    "[",
    "[[",
    "]",
    "key =",
    "\"unterminated = 1",
    "a = \"\\q\"",
    "[queues.\"\"]",
    "[[bindings]]",
    "[tls]",
    "AMQP_URL = \"amqp://127.0.0.1:1/\"",
    "Connection_Timeout = 1",
    "\u{0}",
    "x = 1 # \u{7f}",
    "\u{feff}callback = 1",
];

/// Make the cases: the random ones, then those listed by hand.
fn cases(port: u16, specials: &Specials) -> Vec<Case> {
    let samples = samples(port);
    let mut rng = fastrand::Rng::with_seed(SEED);
    let pick = |rng: &mut fastrand::Rng, from: &[&str]| from[rng.usize(..from.len())].to_owned();
    let pick_owned =
        |rng: &mut fastrand::Rng, from: &[String]| from[rng.usize(..from.len())].clone();
    let url = |u: &str| toml_string(&u.replace("{port}", &port.to_string()));
    let mut out = Vec::new();
    for n in 0..RANDOM_CASES {
        let (sample, base) = &samples[n % samples.len()];
        let mut text = base.clone();
        let mut what = vec![sample.clone()];
        let mut names = Vec::new();
        for _ in 0..rng.usize(1..=3) {
            let (table, key, kind) = KEYS[rng.usize(..KEYS.len())];
            let op = rng.u8(..14);
            if text.is_empty() {
                text.push('\n'); // cut to nothing by an earlier step: one empty line
            }
            let step = match op {
                // A value of any type.
                0 | 1 => {
                    let value = pick(&mut rng, ANY);
                    text = set(&text, table, key, &value);
                    format!("[{table}] {key} = {value}")
                }
                // A value of the key's own kind, at and beyond its bounds.
                2..=4 => {
                    let value = match kind {
                        Kind::Path => {
                            let path = pick_owned(&mut rng, &specials.paths);
                            names.push(path.clone());
                            toml_string(&path)
                        }
                        Kind::Text => long_or_odd_string(&mut rng),
                        Kind::Table => nested(&mut rng),
                        Kind::List => format!("[{}]", long_or_odd_string(&mut rng)),
                        Kind::Seconds | Kind::Integer | Kind::Bool => pick(&mut rng, NUMBERS),
                    };
                    text = set(&text, table, key, &value);
                    format!("[{table}] {key} = {}", shorten(&value))
                }
                // A broker URL with a password, malformed or with a bad option.
                5 | 6 => {
                    let value = if rng.u8(..4) == 0 {
                        format!(
                            "[{}, {}]",
                            url(&pick(&mut rng, URLS)),
                            url(&pick(&mut rng, URLS))
                        )
                    } else {
                        url(&pick(&mut rng, URLS))
                    };
                    text = set(&text, "", "amqp_url", &value);
                    format!("amqp_url = {value}")
                }
                // TLS files that are special, with a URL that reads them.
                7 => {
                    let url = url("amqps://127.0.0.1:{port}/%2F");
                    text = set(&text, "", "amqp_url", &url);
                    let mut step = "amqps with [tls]".to_owned();
                    for key in ["ca_cert", "certfile", "keyfile"] {
                        if rng.bool() {
                            let path = pick_owned(&mut rng, &specials.paths);
                            names.push(path.clone());
                            text = set(&text, "tls", key, &toml_string(&path));
                            let _ = write!(step, " {key} = {path:?}");
                        }
                    }
                    step
                }
                // A callback file that is special.
                8 => {
                    let (key, value) = if rng.bool() {
                        ("plugin", pick_owned(&mut rng, &specials.plugins))
                    } else {
                        ("python", pick_owned(&mut rng, &specials.python_files))
                    };
                    names.push(value.split(':').next().unwrap_or_default().to_owned());
                    if rng.bool() {
                        text = set(&text, "", "callback", &toml_string(&value));
                    } else {
                        text = set(&text, "callback", key, &toml_string(&value));
                    }
                    format!("callback {key} = {value:?}")
                }
                // Deep nesting.
                9 => {
                    let value = nested(&mut rng);
                    text = set(&text, table, key, &value);
                    format!("[{table}] {key} = {}", shorten(&value))
                }
                // A table or a line twice.
                10 => {
                    let lines: Vec<&str> = text.lines().collect();
                    let line = lines[rng.usize(..lines.len())].to_owned();
                    text.push_str(&format!("\n{line}\nx = 1\n"));
                    format!("repeated {line:?}")
                }
                // A line removed or replaced by garbage.
                11 | 12 => {
                    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
                    let at = rng.usize(..lines.len());
                    let step = if op == 11 {
                        format!("removed line {} {:?}", at + 1, lines.remove(at))
                    } else {
                        let garbage = pick(&mut rng, GARBAGE);
                        lines.insert(at, garbage.clone());
                        format!("inserted {garbage:?} at line {}", at + 1)
                    };
                    text = lines.join("\n") + "\n";
                    step
                }
                // The file cut short.
                _ => {
                    let mut at = rng.usize(..text.len());
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text.truncate(at);
                    format!("cut at byte {at}")
                }
            };
            what.push(step);
        }
        out.push(Case {
            what: what.join("; "),
            config: Some(with_url(&text, port)),
            args: Vec::new(),
            names,
        });
    }
    // The configuration file itself, and --callback-file, naming special files.
    let base = &samples[0].1;
    for path in specials.paths.iter().filter(|p| !p.is_empty()) {
        out.push(Case {
            what: format!("--config {path}"),
            config: None,
            args: vec!["--config".into(), path.clone()],
            names: vec![path.clone()],
        });
    }
    for file in &specials.python_files {
        out.push(Case {
            what: format!("--callback-file {file}"),
            config: Some(base.clone()),
            args: vec!["--callback-file".into(), file.clone()],
            names: vec![file.split(':').next().unwrap_or_default().to_owned()],
        });
    }
    // Every key with every number, once each, on the sample with the most keys.
    let fm_toml = &samples
        .iter()
        .find(|(n, _)| n == "config/fm.toml")
        .expect("config/fm.toml")
        .1;
    for (table, key, kind) in KEYS {
        if matches!(kind, Kind::Seconds | Kind::Integer) {
            for value in NUMBERS.iter().step_by(3) {
                out.push(Case {
                    what: format!("config/fm.toml; [{table}] {key} = {value}"),
                    config: Some(set(fm_toml, table, key, value)),
                    args: Vec::new(),
                    names: Vec::new(),
                });
            }
        }
    }
    out
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An empty, blank, very long, non-ASCII or control-character string, as TOML.
fn long_or_odd_string(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..7) {
        0 => "\"\"".into(),
        1 => "\"   \"".into(),
        2 => toml_string(&"q".repeat(256)),
        3 => toml_string(&"x".repeat(200_000)),
        4 => toml_string("é\u{0}\u{1b}[31m\u{202e}"),
        5 => toml_string("a.b:c"),
        _ => toml_string("/"),
    }
}

/// Arrays, inline tables or both, nested from a few levels to far past the parser's limit.
fn nested(rng: &mut fastrand::Rng) -> String {
    let depth = [2, 64, 300, 5_000, 100_000][rng.usize(..5)];
    match rng.u8(..3) {
        0 => format!("{}1{}", "[".repeat(depth), "]".repeat(depth)),
        1 => format!("{}1{}", "{ a = ".repeat(depth), " }".repeat(depth)),
        _ => format!("{}nan{}", "[{ a = ".repeat(depth), " }]".repeat(depth)),
    }
}

/// A value as shown in a case's description: long ones elided.
fn shorten(value: &str) -> String {
    if value.len() <= 80 {
        value.to_owned()
    } else {
        let mut end = 60;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &value[..end], value.len())
    }
}

/// Run one case: its exit status, or what is wrong with how it ended.
async fn run(case: &Case) -> Result<i32, String> {
    let mut fm = Fm::new().arg("check").args(&case.args);
    if let Some(text) = &case.config {
        fm = fm.config_toml(text);
    }
    let mut process = fm.spawn();
    let Some(_status) = process.wait_timeout(DEADLINE).await else {
        process.kill("KILL");
        return Err(format!(
            "still running after {DEADLINE:?} (killed)\n--- stdout:\n{}\n--- stderr:\n{}",
            process.stdout(),
            process.stderr()
        ));
    };
    let out = process.wait().await;
    let text = format!("{}\n{}", out.stdout, out.stderr);
    let shown = || format!("--- stdout:\n{}\n--- stderr:\n{}", out.stdout, out.stderr);
    let Some(code) = out.code() else {
        return Err(format!("killed by a signal ({})\n{}", out.status, shown()));
    };
    if code == 101 || text.contains("panicked") {
        return Err(format!("panicked (exit status {code})\n{}", shown()));
    }
    if text.contains(PASSWORD) {
        return Err(format!("showed the password {PASSWORD:?}\n{}", shown()));
    }
    if code == 2 {
        let file = text.contains("config.toml") || case.names.iter().any(|n| text.contains(n));
        let place = text.contains("line ")
            || KEYS.iter().any(|(_, key, _)| text.contains(key))
            || [
                "amqp_url",
                "[tls]",
                "[callback]",
                "--config",
                "--callback-file",
            ]
            .iter()
            .any(|k| text.contains(k));
        if !(file && place) {
            return Err(format!(
                "exit status 2 without naming the file and a line or key\n{}",
                shown()
            ));
        }
    }
    Ok(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configuration_panics_hangs_or_hides_where_its_error_is() {
    let specials = Specials::new();
    let cases = cases(closed_port(), &specials);
    assert!(cases.len() >= 1_000, "only {} cases", cases.len());
    let total = cases.len();
    let cases = Arc::new(cases);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL {
        let (cases, next) = (Arc::clone(&cases), Arc::clone(&next));
        workers.spawn(async move {
            let mut failures = Vec::new();
            let mut codes = std::collections::BTreeMap::<i32, usize>::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                match run(case).await {
                    Ok(code) => *codes.entry(code).or_default() += 1,
                    Err(why) => failures.push(format!(
                        "case #{i} ({}): {why}\n--- args: check {}\n--- config.toml:\n{}",
                        case.what,
                        case.args.join(" "),
                        case.config.as_deref().map_or("(none)".into(), shorten_file)
                    )),
                }
            }
            (failures, codes)
        });
    }
    let mut failures = Vec::new();
    let mut codes = std::collections::BTreeMap::<i32, usize>::new();
    while let Some(done) = workers.join_next().await {
        let (mut failed, counted) = done.expect("a fuzz worker");
        failures.append(&mut failed);
        for (code, n) in counted {
            *codes.entry(code).or_default() += n;
        }
    }
    // Shown with --nocapture: how the cases ended (2: configuration errors; 1, 14: valid
    // enough to reach the callback check or the closed port).
    eprintln!("fuzz: {total} cases, exit statuses {codes:?}");
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed (seed {SEED:#x}):\n{}\n\nThe first in full:\n{}",
        failures.len(),
        failures
            .iter()
            .map(|f| f.lines().next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n"),
        failures[0]
    );
}

/// A configuration as printed in a failure: its long lines elided.
fn shorten_file(text: &str) -> String {
    text.lines().map(shorten).collect::<Vec<_>>().join("\n")
}

#[test]
fn set_replaces_adds_or_appends_a_key() {
    let text = "a = 1\n[t]\nb = 2\n[u]\n";
    assert_eq!(set(text, "", "a", "3"), "a = 3\n[t]\nb = 2\n[u]\n");
    assert_eq!(set(text, "", "z", "3"), "z = 3\na = 1\n[t]\nb = 2\n[u]\n");
    assert_eq!(set(text, "t", "b", "4"), "a = 1\n[t]\nb = 4\n[u]\n");
    assert_eq!(set(text, "u", "c", "5"), "a = 1\n[t]\nb = 2\n[u]\nc = 5\n");
    assert_eq!(
        set(text, "v", "d", "6"),
        "a = 1\n[t]\nb = 2\n[u]\n[v]\nd = 6\n"
    );
    // A key is matched whole, not by prefix.
    assert_eq!(set("ab = 1\n", "", "a", "2"), "a = 2\nab = 1\n");
}
