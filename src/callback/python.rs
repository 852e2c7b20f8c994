//! Python callbacks: fedora-messaging's `callback = "package.module:attribute"`, run unchanged.
//!
//! A team moving to fm keeps its consumers: fm runs the bundled shim (`python/fm_shim.py`) as a
//! [worker](super::worker) per concurrency slot, under `[callback] interpreter` when the
//! configuration sets one, else the [`default_interpreter`]. The shim imports the callback once, rebuilds a real
//! `fedora_messaging.message.Message` from each message with fedora-messaging's own decoder,
//! sets `fedora_messaging.config.conf` (with `consumer_config`), calls the callback and maps
//! `Nack`/`Drop`/`HaltConsumer`/other exceptions onto the worker protocol.
//!
//! Choices, and why:
//! - **The shim is embedded in the binary** and handed to the interpreter through the
//!   environment (`python3 -c <bootstrap>` reads `$FM_SHIM_SOURCE`), so fm finds it wherever it
//!   is installed, nothing is written to disk, and there is no stale copy to go out of date.
//! - **The protocol runs over a Unix socket on the shim's stdin**, not over stdout: a callback's
//!   stdout is fm's stdout, so `fedora_messaging.example:printer` prints exactly what it prints
//!   under `fedora-messaging consume`, when it prints it. The shim flushes it after every message.
//! - **Loading errors stop fm at start**, as they stop `fedora-messaging consume`: an import
//!   error or a missing attribute exits 1, a callback that is not callable exits 2.
//! - **Logging**: the shim configures Python's logging with the levels of `[log_config]` (root
//!   and named loggers) and writes records to stderr with their level name; fm logs them at that
//!   level under the `fm::callback` target.
//! - A class is instantiated once **per worker process**, so with `concurrency = N` there are N
//!   instances (fedora-messaging has one, and runs one message at a time).
//! - **The default interpreter is the virtualenv's fm was started from** (issue 16): fm's wheel
//!   (`pip install` into a consumer's own virtualenv, as ruff and uv ship their binaries) puts
//!   fm at `VENV/bin/fm`, next to the callback's packages, and a unit or a cron line runs that
//!   path without activating the virtualenv. `python3` from `PATH` would then be the system's,
//!   which has neither fedora-messaging nor the callback. So when fm was started as
//!   `VENV/bin/fm` and `VENV/pyvenv.cfg` exists (PEP 405's marker of a virtualenv), the
//!   default is `VENV/bin/python3`; otherwise it is `python3` from `PATH`, which an activated
//!   virtualenv (`$VIRTUAL_ENV/bin` first in `PATH`) already makes its own. The path fm was
//!   *started as* is used, not `/proc/self/exe`: `pipx`/`uv tool` link `~/.local/bin/fm` to a
//!   private virtualenv of fm alone, whose python has none of the user's packages, and a link
//!   followed would pick that one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use tracing::level_filters::LevelFilter;

use super::worker::{Pool, Spec, Transport};
use crate::config::{Config, DEFAULT_PYTHON, LogConfig};
use crate::error::{Exit, code, exit_code_of};
use crate::limits;
use crate::shutdown::Shutdown;

/// The shim's source, embedded at build time.
pub const SHIM: &str = include_str!("../../python/fm_shim.py");

/// The `-c` program: run the shim from the environment, under its own file name for tracebacks.
const BOOTSTRAP: &str =
    "import os;exec(compile(os.environ.pop('FM_SHIM_SOURCE'),'fm_shim.py','exec'))";

/// How long the interpreter may take to import the callback and say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The interpreter of a Python callback whose `[callback] interpreter` is not set: the
/// virtualenv's `python3` when fm was started as `VENV/bin/fm`, else `python3` (looked up in
/// `PATH` when the worker starts). See the module docs for why.
pub fn default_interpreter() -> PathBuf {
    std::env::args_os()
        .next()
        .and_then(|argv0| started_as(Path::new(&argv0), std::env::var_os("PATH").as_deref()))
        .and_then(|fm| venv_python(&fm))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON))
}

/// The file fm was started from, as its `argv[0]` names it: a path as given (made absolute), or
/// a bare name looked up in `path` as `execvp` does. Symbolic links are not followed.
fn started_as(argv0: &Path, path: Option<&OsStr>) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.components().count() > 1 {
        return std::path::absolute(argv0).ok();
    }
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(argv0))
        .find(|candidate| candidate.is_file())
}

/// `VENV/bin/python3` when `fm` is `VENV/bin/fm` and `VENV/pyvenv.cfg` marks a virtualenv.
fn venv_python(fm: &Path) -> Option<PathBuf> {
    let bin = fm.parent()?;
    let venv = bin.parent()?;
    let python = bin.join("python3");
    (venv.join("pyvenv.cfg").is_file() && python.is_file()).then_some(python)
}

/// How to start the shim for `target` under `interpreter`.
pub fn spec(config: &Config, target: &str, interpreter: &Path) -> Spec {
    let mut env = vec![
        ("FM_SHIM_SOURCE".to_owned(), SHIM.to_owned()),
        (
            "FM_CONSUMER_CONFIG".to_owned(),
            config.consumer_config_json(),
        ),
        ("FM_LOG_LEVELS".to_owned(), log_levels(&config.log_config)),
    ];
    if let Some(path) = &config.path {
        env.push(("FM_CONFIG_FILE".to_owned(), path.display().to_string()));
    }
    Spec {
        argv: vec![
            interpreter.display().to_string(),
            "-c".into(),
            BOOTSTRAP.into(),
            target.into(),
        ],
        env,
        transport: Transport::Socket,
        handshake: Some(READY_WITHIN),
        leveled_stderr: true,
        what: format!("python callback '{target}'"),
        label: target.to_owned(),
    }
}

/// Start one shim per concurrency slot; errors (interpreter missing, callback not importable)
/// carry exit code 1, or 2 for a callback that is not callable.
pub async fn start(
    config: &Config,
    target: &str,
    interpreter: &Path,
    shutdown: Shutdown,
) -> anyhow::Result<Pool> {
    check_callback_file(target).map_err(|e| Exit::new(code::USAGE, e))?;
    Pool::start(
        spec(config, target, interpreter),
        &config.callback,
        shutdown,
    )
    .await
    .map_err(|err| {
        let text = format!("{err:#}");
        if !text.contains("No module named") {
            return err;
        }
        Exit::new(
            exit_code_of(&err),
            anyhow::anyhow!(
                "{text}; is it installed for {}? Set [callback] interpreter to the python of the \
                 virtualenv that has it",
                interpreter.display()
            ),
        )
    })
}

/// The file of a `path/to/file.py:attribute` target (`--callback-file`, or `[callback] python`
/// naming a file), which the shim executes: a regular file of at most 1 MiB, so that a FIFO or
/// a device is refused with its name instead of hanging the interpreter. A module target has
/// no file to check.
pub fn check_callback_file(target: &str) -> anyhow::Result<()> {
    match target.rsplit_once(':') {
        Some((file, _)) if file.ends_with(".py") => {
            limits::check_file(
                Path::new(file),
                Some(limits::MAX_FILE_BYTES),
                "the python callback file",
            )?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `[log_config]` levels as the shim's `FM_LOG_LEVELS`: `{"root": "WARNING", "loggers":
/// {"name": "INFO"}}` in Python's level names.
fn log_levels(log: &LogConfig) -> String {
    fn python(level: LevelFilter) -> Value {
        match level {
            LevelFilter::OFF => Value::from(100), // above CRITICAL: nothing
            LevelFilter::ERROR => "ERROR".into(),
            LevelFilter::WARN => "WARNING".into(),
            LevelFilter::INFO => "INFO".into(),
            _ => "DEBUG".into(),
        }
    }
    let loggers: Map<String, Value> = log
        .loggers
        .iter()
        .map(|(name, level)| (name.clone(), python(*level)))
        .collect();
    serde_json::json!({"root": python(log.root), "loggers": loggers}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_file_must_be_a_regular_file_of_at_most_1_mib() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cb.py");
        std::fs::write(&file, "def cb(message): pass\n").unwrap();
        check_callback_file(&format!("{}:cb", file.display())).unwrap();
        // Module targets have no file to check.
        check_callback_file("pkg.mod:cb").unwrap();
        let big = dir.path().join("big.py");
        std::fs::File::create(&big)
            .unwrap()
            .set_len((1 << 20) + 1)
            .unwrap();
        let folder = dir.path().join("folder.py");
        std::fs::create_dir(&folder).unwrap();
        for (target, expected) in [
            (
                format!("{}:cb", folder.display()),
                format!(
                    "{} is not a regular file: it is a directory",
                    folder.display()
                ),
            ),
            (
                format!("{}:cb", big.display()),
                format!("{} is larger than 1 MiB", big.display()),
            ),
        ] {
            let err = format!("{:#}", check_callback_file(&target).unwrap_err());
            assert!(
                err.starts_with("the python callback file ") && err.contains(&expected),
                "{err}"
            );
        }
    }

    #[test]
    fn the_shim_gets_the_target_the_interpreter_and_the_settings() {
        let config = Config::from_toml_str(
            "[consumer_config]\nkey = \"v\"\n[log_config.root]\nlevel = \"ERROR\"\n\
             [log_config.loggers.mine]\nlevel = \"DEBUG\"\n",
            Some(Path::new("/etc/fm/x.toml")),
        )
        .unwrap();
        let spec = spec(&config, "pkg.mod:cb", Path::new("/venv/bin/python"));
        assert_eq!(spec.argv[0], "/venv/bin/python");
        assert_eq!(spec.argv[1..], ["-c", BOOTSTRAP, "pkg.mod:cb"]);
        let env: std::collections::HashMap<_, _> = spec.env.into_iter().collect();
        assert_eq!(env["FM_SHIM_SOURCE"], SHIM);
        assert_eq!(env["FM_CONSUMER_CONFIG"], r#"{"key":"v"}"#);
        assert_eq!(env["FM_CONFIG_FILE"], "/etc/fm/x.toml");
        assert_eq!(
            env["FM_LOG_LEVELS"],
            r#"{"root":"ERROR","loggers":{"mine":"DEBUG"}}"#
        );
        assert_eq!(spec.transport, Transport::Socket);
    }

    #[test]
    fn fm_started_from_a_virtualenv_defaults_to_its_python() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("venv");
        let bin = venv.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for file in ["fm", "python3"] {
            std::fs::write(bin.join(file), "").unwrap();
        }
        let fm = bin.join("fm");
        // Not a virtualenv yet: no pyvenv.cfg.
        assert_eq!(venv_python(&fm), None);
        std::fs::write(venv.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        assert_eq!(venv_python(&fm), Some(bin.join("python3")));
        // A virtualenv without python3 is no default.
        std::fs::remove_file(bin.join("python3")).unwrap();
        assert_eq!(venv_python(&fm), None);
        // /usr/bin/fm: /usr has no pyvenv.cfg.
        assert_eq!(venv_python(Path::new("/usr/bin/fm")), None);
    }

    #[test]
    fn the_path_fm_was_started_as_is_its_argv0_or_found_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("fm"), "").unwrap();
        let path = std::env::join_paths([Path::new("relative"), &a, &b]).unwrap();
        // A bare name: the first PATH entry that has it (relative entries are skipped).
        assert_eq!(started_as(Path::new("fm"), Some(&path)), Some(b.join("fm")));
        assert_eq!(started_as(Path::new("fm"), None), None);
        assert_eq!(started_as(Path::new("other"), Some(&path)), None);
        assert_eq!(started_as(Path::new(""), Some(&path)), None);
        // A path is taken as given (absolute, or made so), without looking at PATH.
        assert_eq!(
            started_as(Path::new("/venv/bin/fm"), Some(&path)),
            Some(PathBuf::from("/venv/bin/fm"))
        );
        assert_eq!(
            started_as(Path::new("venv/bin/fm"), None),
            Some(std::env::current_dir().unwrap().join("venv/bin/fm"))
        );
    }

    #[test]
    fn the_embedded_shim_is_the_python_file() {
        assert!(SHIM.contains("def main():"));
        assert!(SHIM.contains("\"ready\": True"));
    }
}
