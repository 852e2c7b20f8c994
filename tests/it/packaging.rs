//! Issue 16: fm as its users install it. The Python wheel (pyproject.toml, built by
//! scripts/wheel) goes into a fresh virtualenv with fedora-messaging, as a consumer's own
//! virtualenv would have it, and the `fm` it installs there runs a Python callback that only
//! that virtualenv can import, with that virtualenv's python, without the virtualenv being
//! activated (a unit's `ExecStart=VENV/bin/fm`). The RPM is built and checked by scripts/rpm,
//! which `scripts/test --full` runs; the .deb by ops.rs.
//!
//! Slow (a release build the first time, a pip install every time): only in full runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::callbacks::{Setup, python3};
use crate::util::{self, repo_root};

/// The callback, installed into the virtualenv's site-packages only: the system's python
/// cannot import it, so fm runs it with the virtualenv's python or not at all.
const CALLBACK: &str = r#"import json, sys
import fedora_messaging
from fedora_messaging.config import conf


def record(message):
    with open(conf["consumer_config"]["out"], "a") as out:
        out.write(json.dumps({
            "executable": sys.executable,
            "prefix": sys.prefix,
            "fedora_messaging": fedora_messaging.__file__,
            "class": type(message).__module__ + "." + type(message).__name__,
            "id": message.id,
            "body": message.body,
        }) + "\n")
"#;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The fedora-messaging version of scripts/test's venv (its stamp file), so the fresh venv
/// gets the same one.
fn fedora_messaging_version(b: &util::Broker) -> String {
    let venv = b.venv_python();
    let stamp = venv
        .parent()
        .and_then(Path::parent)
        .expect("the venv's python is VENV/bin/python")
        .join(".fm-fedora-messaging");
    std::fs::read_to_string(&stamp)
        .unwrap_or_else(|e| panic!("reading {}: {e} (scripts/test writes it)", stamp.display()))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wheel_puts_fm_in_a_virtualenv_whose_python_runs_its_callbacks() {
    if !util::full_run() {
        return;
    }
    let Some(b) = util::broker() else { return };
    let dir = tempfile::tempdir().unwrap();

    // The wheel, as scripts/wheel builds it.
    let out = run(Command::new("bash")
        .arg(repo_root().join("scripts/wheel"))
        .arg(dir.path().join("wheels")));
    let wheel = PathBuf::from(stdout(&out));
    let name = wheel.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("fm-{}-py3-none-", env!("CARGO_PKG_VERSION")))
            && name.ends_with(".whl"),
        "{name}"
    );

    // A fresh virtualenv with the wheel and fedora-messaging, and the callback's module.
    let venv = dir.path().join("venv");
    run(Command::new(python3()).args(["-m", "venv"]).arg(&venv));
    let bin = venv.join("bin");
    run(Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(&wheel)
        .arg(format!(
            "fedora-messaging=={}",
            fedora_messaging_version(&b)
        )));
    let site = stdout(&run(Command::new(bin.join("python3")).args([
        "-c",
        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    ])));
    std::fs::write(Path::new(&site).join("wheel_callback.py"), CALLBACK).unwrap();
    let fm = bin.join("fm");
    assert_eq!(
        stdout(&run(Command::new(&fm).arg("--version"))),
        format!("fm {}", env!("CARGO_PKG_VERSION"))
    );

    // Not activated: PATH has only the system's folders, whose python3 cannot import the
    // callback (checked, so this test can tell the two interpreters apart).
    let system_path = "/usr/bin:/bin";
    let system = Command::new(python3())
        .args(["-c", "import wheel_callback"])
        .env("PATH", system_path)
        .env_remove("PYTHONPATH")
        .output()
        .unwrap();
    assert!(
        !system.status.success(),
        "the system's python3 imports the callback, so this test proves nothing"
    );

    let s = Setup::new(&b, "wheel").await;
    let calls = dir.path().join("calls.jsonl");
    let config = s.fm_config(
        "python = \"wheel_callback:record\"",
        &format!("[consumer_config]\nout = \"{}\"\n", calls.display()),
    );
    let started = |args: &[&str]| {
        util::Fm::new()
            .program(&fm)
            .config_toml(&config)
            .args(args)
            .env("PATH", system_path)
            .env_remove("VIRTUAL_ENV")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
    };

    // fm check says which python it will use.
    let check = started(&["check"]).run().await;
    let expected = format!(
        "module 'wheel_callback' found by {}",
        bin.join("python3").display()
    );
    assert!(
        check.stdout.contains(&expected),
        "fm check does not say {expected:?}:\n{}\n{}",
        check.stdout,
        check.stderr
    );

    let mut consumer = started(&["consume"]).spawn();
    consumer.wait_consuming().await;
    let id = s.publish(&b, "hello", json!({"from": "the wheel"})).await;
    let call: Value = util::eventually(Duration::from_secs(30), async || {
        let text = std::fs::read_to_string(&calls).unwrap_or_default();
        match text.lines().next() {
            Some(line) => Ok(serde_json::from_str::<Value>(line).unwrap()),
            None => Err(format!(
                "the callback has not run yet; fm's log:\n{}",
                consumer.stderr()
            )),
        }
    })
    .await;
    let canonical = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        canonical(call["prefix"].as_str().unwrap()),
        canonical(venv.to_str().unwrap()),
        "{call}"
    );
    assert_eq!(
        call["executable"],
        bin.join("python3").display().to_string(),
        "{call}"
    );
    assert!(
        canonical(call["fedora_messaging"].as_str().unwrap()).starts_with(canonical(&site)),
        "fedora_messaging comes from the virtualenv: {call}"
    );
    assert_eq!(call["class"], "fedora_messaging.message.Message");
    assert_eq!(call["id"], id.as_str());
    assert_eq!(call["body"], json!({"from": "the wheel"}));

    consumer.kill("TERM");
    consumer.wait().await.assert_code(0);
    s.cleanup(&b).await;
}
