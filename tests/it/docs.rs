//! The man pages (issue 7): they render without a groff warning, and they cannot fall behind
//! the code, because what they must mention is read from the code itself:
//!
//! - every subcommand and every flag of `fm` comes from clap's own definition
//!   (`Cli::command()`), and each must be in that subcommand's section of `fm(1)`;
//! - every exit code comes from `src/error.rs`, and each must be in `fm(1)`'s EXIT STATUS;
//! - every top-level configuration key is `fm::config::VALID_KEYS`, and the keys of each
//!   fixed-shape table are read from the configuration parser itself (its "unknown field"
//!   error lists them); each must have an entry in its section of `fm.toml(5)`.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory as _;

use crate::util::{self, repo_root};

fn page(name: &str) -> String {
    let path = repo_root().join("man").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The text of man source with the escapes that matter for searching undone: fonts
/// (`\fB`…`\fR`), `\-`, `\(em`, `\&`, `\e`.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('f') => {
                // \fB, \fI, \fR, \fP, or \f(XX
                let extra = if chars.next() == Some('(') { 2 } else { 0 };
                chars.by_ref().take(extra).for_each(drop);
            }
            Some('-') => out.push('-'),
            Some('e') | Some('\\') => out.push('\\'),
            Some('&') | Some('|') | Some('c') => {}
            Some('(') => {
                let code: String = [chars.next(), chars.next()].into_iter().flatten().collect();
                out.push_str(match code.as_str() {
                    "em" | "en" => "-",
                    "dq" => "\"",
                    "aq" => "'",
                    _ => " ",
                });
            }
            Some(' ') => out.push(' '),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// A request's arguments: separated by spaces, `"` quoting one with spaces (`""` inside is a
/// quote).
fn macro_args(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = arg.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        word.push('"');
                    } else {
                        break;
                    }
                } else {
                    word.push(c);
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    out
}

/// A page as (request, plain text) lines: `.SH`, `.SS`, `.TP`… keep their request name.
fn lines(source: &str) -> Vec<(String, String)> {
    source
        .lines()
        .map(|l| {
            if let Some(rest) = l.strip_prefix('.') {
                let (req, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                // The arguments as groff splits them (spaces, "quoted" ones); `\(dq` is a quote
                // character, not a delimiter, so this comes before `plain`. The alternating
                // font macros (.BR, .IR...) join their arguments without spaces.
                let args = macro_args(arg);
                let sep = if req.len() == 2 && req.chars().all(|c| "BIR".contains(c)) {
                    ""
                } else {
                    " "
                };
                (req.to_owned(), plain(&args.join(sep)))
            } else {
                (String::new(), plain(l))
            }
        })
        .collect()
}

/// The plain text of the section (`.SH`) or subsection (`.SS`) whose title satisfies `title`,
/// up to the next heading of the same or a higher level.
fn section(source: &str, level: &str, title: impl Fn(&str) -> bool) -> Option<String> {
    let lines = lines(source);
    let start = lines.iter().position(|(r, t)| r == level && title(t))?;
    let end = lines[start + 1..]
        .iter()
        .position(|(r, _)| r == "SH" || (level == "SS" && r == "SS"))
        .map_or(lines.len(), |i| start + 1 + i);
    Some(
        lines[start..end]
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The entries (`.TP` tags) of a stretch of man source: the first word of each line following
/// a `.TP` request, plain.
fn tags(source: &str) -> Vec<String> {
    let lines = lines(source);
    lines
        .windows(2)
        .filter(|w| w[0].0 == "TP")
        .map(|w| {
            w[1].1
                .split([' ', '=', ','])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Whether `flag` (`--name` or `-x`) occurs in `text` as a whole flag.
fn has_flag(text: &str, flag: &str) -> bool {
    let is_flag_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(flag).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + flag.len()..].chars().next();
        !before.is_some_and(is_flag_char) && !after.is_some_and(is_flag_char)
    })
}

#[test]
fn the_man_pages_render_without_a_warning() {
    let groff = Path::new("/usr/bin/groff");
    if !groff.exists() {
        util::skip("groff is not installed (apt-get install groff-base)");
        return;
    }
    for name in ["fm.1", "fm.toml.5", "fm-callbacks.7"] {
        let path = repo_root().join("man").join(name);
        // At groff's default width, and at the 78 columns man uses on an 80-column terminal.
        for width in [None, Some("-rLL=78n")] {
            let out = std::process::Command::new(groff)
                .args(["-man", "-ww", "-z"])
                .args(width)
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.is_empty(),
                "groff -man -ww -z {} {name}: {}\n{stderr}",
                width.unwrap_or(""),
                out.status
            );
        }
        // The title line names the page and its section.
        let (title, section) = name.rsplit_once('.').unwrap();
        let th = page(name)
            .lines()
            .find(|l| l.starts_with(".TH "))
            .map(plain)
            .unwrap_or_else(|| panic!("{name} has no .TH"));
        let words: Vec<&str> = th.split_whitespace().collect();
        assert_eq!(
            words[1..3],
            [title.to_uppercase().as_str(), section],
            "{name}: {th}"
        );
    }
}

/// The flags of one command as written on a command line: `--long`, its visible aliases,
/// `-s`.
fn flags_of(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() || arg.is_positional() {
            continue;
        }
        if let Some(long) = arg.get_long() {
            out.push(format!("--{long}"));
        }
        for alias in arg.get_visible_aliases().unwrap_or_default() {
            out.push(format!("--{alias}"));
        }
        if let Some(short) = arg.get_short() {
            out.push(format!("-{short}"));
        }
    }
    out
}

#[test]
fn every_subcommand_and_flag_is_in_fm_1() {
    let source = page("fm.1");
    let mut cli = fm::cli::Cli::command();
    cli.build();
    let global: BTreeSet<String> = cli
        .get_arguments()
        .filter(|a| a.is_global_set() || a.get_id() == "help" || a.get_id() == "version")
        .flat_map(|a| {
            let mut f = Vec::new();
            if let Some(l) = a.get_long() {
                f.push(format!("--{l}"));
            }
            for alias in a.get_visible_aliases().unwrap_or_default() {
                f.push(format!("--{alias}"));
            }
            if let Some(s) = a.get_short() {
                f.push(format!("-{s}"));
            }
            f
        })
        .collect();
    let options = section(&source, "SH", |t| t == "OPTIONS").expect("fm.1 has OPTIONS");
    for flag in &global {
        assert!(
            has_flag(&options, flag),
            "fm(1) OPTIONS does not mention {flag}"
        );
    }
    let mut missing = Vec::new();
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        if name == "help" {
            continue;
        }
        let heading = format!("fm {name}");
        let text = section(&source, "SS", |t| {
            t == heading || t.starts_with(&format!("{heading} "))
        })
        .unwrap_or_else(|| panic!("fm(1) has no .SS \"{heading} ...\" subsection"));
        // "the options of fm consume" sends the reader to that subsection.
        let mut scope = text.clone();
        for other in cli.get_subcommands() {
            let other_heading = format!("fm {}", other.get_name());
            let flat = text.replace('\n', " ");
            if other.get_name() != name && flat.contains(&format!("options of {other_heading}")) {
                scope.push('\n');
                scope.push_str(
                    &section(&source, "SS", |t| t.starts_with(&other_heading)).unwrap_or_default(),
                );
            }
        }
        for flag in flags_of(sub) {
            if !global.contains(&flag) && !has_flag(&scope, &flag) {
                missing.push(format!("{flag} in \"{heading}\""));
            }
        }
        for arg in sub.get_positionals() {
            let value = arg
                .get_value_names()
                .and_then(|v| v.first().map(|s| s.to_string()))
                .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
            if !scope.contains(&value) {
                missing.push(format!("argument {value} in \"{heading}\""));
            }
            for possible in arg.get_possible_values() {
                if !possible.is_hide_set() && !scope.contains(possible.get_name()) {
                    missing.push(format!(
                        "value {} of {value} in \"{heading}\"",
                        possible.get_name()
                    ));
                }
            }
        }
    }
    assert!(missing.is_empty(), "fm(1) does not document: {missing:#?}");
}

#[test]
fn every_exit_code_and_environment_variable_is_in_fm_1() {
    let source = page("fm.1");
    let exit = section(&source, "SH", |t| t == "EXIT STATUS").expect("fm.1 has EXIT STATUS");
    let exit_tags: Vec<String> = {
        let start = source
            .find(".SH \"EXIT STATUS\"")
            .or_else(|| source.find(".SH EXIT STATUS"));
        let rest = &source[start.expect("EXIT STATUS heading")..];
        let end = rest[4..].find("\n.SH").map_or(rest.len(), |i| i + 4);
        tags(&rest[..end])
    };
    // Every `pub const NAME: u8 = N;` of error::code, read from the source.
    let error_rs = std::fs::read_to_string(repo_root().join("src/error.rs")).unwrap();
    let codes: Vec<(String, String)> = error_rs
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("pub const ")?;
            let (name, value) = rest.split_once(": u8 = ")?;
            Some((name.to_owned(), value.trim_end_matches(';').to_owned()))
        })
        .collect();
    assert!(
        codes.len() >= 10,
        "read the exit codes from src/error.rs: {codes:?}"
    );
    for (name, value) in &codes {
        assert!(
            exit_tags.iter().any(|t| t == value),
            "fm(1) EXIT STATUS has no entry for {value} ({name}); entries: {exit_tags:?}"
        );
    }
    assert!(
        exit.contains("HaltConsumer"),
        "the Halt exit code is explained"
    );

    let env = section(&source, "SH", |t| t == "ENVIRONMENT").expect("fm.1 has ENVIRONMENT");
    for var in [
        fm::config::ENV_CONF,
        fm::logging::ENV_LOG,
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "JOURNAL_STREAM",
    ] {
        assert!(
            env.contains(var),
            "fm(1) ENVIRONMENT does not mention {var}"
        );
    }
    let files = section(&source, "SH", |t| t == "FILES").expect("fm.1 has FILES");
    assert!(files.contains(fm::config::DEFAULT_PATH));
    for heading in ["SIGNALS", "EXAMPLES", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"] {
        assert!(
            section(&source, "SH", |t| t == heading).is_some(),
            "fm(1) has no {heading} section"
        );
    }
}

/// The keys the configuration parser accepts in a fixed-shape table, read from its "unknown
/// field" error for a key that cannot exist. `prefix` is the TOML before the probe key.
fn keys_of(prefix: &str) -> Vec<String> {
    let text = format!("{prefix}\nfm_docs_probe_no_such_key = 1\n");
    let err = fm::config::Config::from_toml_str(&text, None)
        .err()
        .unwrap_or_else(|| panic!("the parser accepted an unknown key in:\n{text}"));
    let msg = format!("{err:#}");
    let expected = msg
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no \"expected\" list in the parser's error: {msg}"));
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "no keys in: {msg}");
    keys
}

#[test]
fn every_configuration_key_is_in_fm_toml_5() {
    let source = page("fm.toml.5");
    let mut missing = Vec::new();

    // Top-level keys: each an entry of the KEYS section.
    let keys_start = source
        .find(".SH KEYS")
        .expect("fm.toml.5 has a KEYS section");
    let keys_end = source[keys_start + 4..]
        .find("\n.SH")
        .map_or(source.len(), |i| keys_start + 4 + i);
    let top = tags(&source[keys_start..keys_end]);
    for key in fm::config::VALID_KEYS {
        if !top.iter().any(|t| t == key) {
            missing.push(format!("{key} (KEYS)"));
        }
    }

    // Tables: each key an entry of the table's subsection.
    let tables: [(&str, &str); 7] = [
        ("[qos]", "[qos]"),
        ("[tls]", "[tls]"),
        ("[monitoring]", "[monitoring]"),
        ("[callback]", "[callback]"),
        (
            "[queues.NAME]",
            "[queues.q]\ndurable = true\nauto_delete = true\nexclusive = true\narguments = {}",
        ),
        (
            "[[bindings]]",
            "[[bindings]]\nexchange = \"x\"\nrouting_keys = [\"#\"]",
        ),
        ("[exchanges.NAME]", "[exchanges.x]"),
    ];
    for (heading, probe) in tables {
        let start = source
            .find(&format!(".SS \"{heading}\""))
            .or_else(|| source.find(&format!(".SS {heading}")))
            .unwrap_or_else(|| panic!("fm.toml(5) has no .SS \"{heading}\""));
        let end = source[start + 4..]
            .find("\n.S")
            .map_or(source.len(), |i| start + 4 + i);
        let entries = tags(&source[start..end]);
        for key in keys_of(probe) {
            if !entries.contains(&key) {
                missing.push(format!("{key} ({heading})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fm.toml(5) has no entry for: {missing:#?}"
    );

    // Where fm differs from fedora-messaging is said in one place.
    assert!(
        section(&source, "SH", |t| t.contains("FEDORA-MESSAGING")).is_some(),
        "fm.toml(5) has a section on the differences from fedora-messaging"
    );
}

#[test]
fn fm_callbacks_7_documents_the_three_contracts() {
    let source = page("fm-callbacks.7");
    let text: String = lines(&source)
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join("\n");
    // The plugin ABI: every #define and function of the header.
    let header = std::fs::read_to_string(repo_root().join("include/fm_plugin.h")).unwrap();
    let mut missing = Vec::new();
    for name in header.lines().filter_map(|l| {
        l.strip_prefix("#define ")
            .and_then(|r| r.split_whitespace().next())
            .filter(|n| n.starts_with("FM_") && *n != "FM_PLUGIN_H" && *n != "FM_PLUGIN_EXPORT")
    }) {
        if !text.contains(name) {
            missing.push(name.to_owned());
        }
    }
    for name in [
        "fm_plugin_v1",
        "fm_plugin",
        "fm_message",
        "fm_bytes",
        "fm_halt",
        "fm_error",
        "fm_host",
        "struct_size",
    ] {
        if !text.contains(name) {
            missing.push(name.to_owned());
        }
    }
    // The exec protocol: its environment and exit statuses; the worker and shim protocols.
    for needle in [
        "FM_TOPIC",
        "FM_MESSAGE_ID",
        "FM_QUEUE",
        "FM_EXCHANGE",
        "FM_SEVERITY",
        "FM_PRIORITY",
        "FM_REDELIVERED",
        "FM_CONSUMER_CONFIG",
        "65",
        "75",
        "\"result\"",
        "\"ack\"",
        "\"nack\"",
        "\"drop\"",
        "\"halt\"",
        "\"fail\"",
        "exit_code",
        "requeue",
        "HaltConsumer",
        "Nack",
        "Drop",
        "on_error",
    ] {
        if !text.contains(needle) {
            missing.push(needle.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "fm-callbacks(7) does not mention: {missing:?}"
    );
}

/// The `.EX` … `.EE` examples of a page, as plain text (escapes undone), in order.
fn examples(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in source.lines() {
        match (line, current.as_mut()) {
            (".EX", None) => current = Some(Vec::new()),
            (".EE", Some(_)) => out.push(current.take().unwrap_or_default().join("\n") + "\n"),
            (_, Some(lines)) => lines.push(plain(line)),
            _ => {}
        }
    }
    out
}

/// Issue 16: the plugin example of fm-callbacks(7) builds with the page's own command line,
/// `cc $(pkg-config --cflags fm-plugin) …`, against the header and fm-plugin.pc as
/// scripts/install puts them (so as the .deb ships them; scripts/rpm does the same against the
/// RPM), and fm loads what it built.
#[test]
fn the_plugin_example_builds_with_pkg_config_against_the_installed_header() {
    for tool in ["cc", "pkg-config"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            util::skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let examples = examples(&page("fm-callbacks.7"));
    let code = examples
        .iter()
        .find(|e| e.contains("fm_plugin_v1(void)"))
        .expect("fm-callbacks(7) has the plugin example");
    let build = examples
        .iter()
        .find(|e| e.starts_with("cc $(pkg-config --cflags fm-plugin)"))
        .expect("fm-callbacks(7) says how to build it with pkg-config");
    assert!(code.contains("#include <fm_plugin.h>"), "{code}");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/install"))
        .env("DESTDIR", &root)
        .env("PREFIX", "/usr")
        .env("FM_BIN", util::fm_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pc = std::fs::read_to_string(root.join("usr/share/pkgconfig/fm-plugin.pc")).unwrap();
    assert!(
        pc.contains("\nincludedir=${prefix}/include\n")
            && pc.contains(&format!("\nVersion: {}\n", env!("CARGO_PKG_VERSION"))),
        "{pc}"
    );

    // pkg-config reads the staged .pc, and prefixes its paths with the staging root.
    // ALLOW_SYSTEM_CFLAGS: /usr/include is a system folder, which pkg-config leaves out (the
    // compiler searches it anyway); here it must become ROOT/usr/include.
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("topics.c"), code).unwrap();
    let out = std::process::Command::new("sh")
        .args(["-ec", build])
        .current_dir(&work)
        .env("PKG_CONFIG_LIBDIR", root.join("usr/share/pkgconfig"))
        .env("PKG_CONFIG_SYSROOT_DIR", &root)
        .env("PKG_CONFIG_ALLOW_SYSTEM_CFLAGS", "1")
        .env_remove("PKG_CONFIG_PATH")
        .env_remove("CPATH")
        .env_remove("C_INCLUDE_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{build}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let library = work.join("libtopics.so");

    // fm check loads, initialises and shuts the plugin down before it tries the broker (which
    // is not there: port 1).
    let config = work.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "amqp_url = \"amqp://127.0.0.1:1/%2F?connection_attempts=1\"\ncallback = \"{}\"\n",
            library.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(util::fm_bin())
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "ok    callback: plugin topics 1.0 ({}) loaded, initialised and shut down",
            library.display()
        )),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
