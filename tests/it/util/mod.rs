//! The integration tests' fixture: the test broker, and a builder that runs the `fm` binary.
//!
//! Every broker test runs against a real RabbitMQ node, never a mock. `scripts/test` (what CI runs)
//! starts a private node and exports its coordinates; a developer gets the same with
//! `eval "$(scripts/broker start)"`. The variables (all written by scripts/lib/broker.sh):
//!
//! | variable | what |
//! |---|---|
//! | `FM_TEST_AMQP_URL` | `amqp://guest:guest@localhost:PORT/%2F` |
//! | `FM_TEST_AMQPS_URL` | `amqps://localhost:PORT/%2F`: TLS, client certificate required |
//! | `FM_TEST_PKI` | the throw-away CA and certificates (file list in scripts/lib/broker.sh) |
//! | `FM_TEST_NODE` | the Erlang node name, `fm-NAME@localhost` |
//! | `FM_TEST_RABBITMQCTL` | a rabbitmqctl wrapper bound to that node |
//! | `FM_TEST_BROKER_CTL`, `FM_TEST_BROKER_NAME` | `scripts/broker` and the node's name, to stop/start it |
//! | `FM_TEST_VENV` | a Python venv with fedora-messaging, for compatibility tests |
//! | `FM_TEST_FULL`, `FM_TEST_CLUSTER` | `scripts/test --full`: slow tests on, a 3-node cluster |
//!
//! Without them a test cannot run: under `CI=true` it fails (a skipped test must never pass CI);
//! locally it prints one `SKIPPED` line and returns, so `cargo test` without a broker still tells
//! what it did not check. Tests share one node, so each uses its own names ([`unique`]) and they
//! run in parallel.

pub mod broker;
pub mod callbacks;
pub mod fm;
pub mod peer;
pub mod plugins;
pub mod proxy;
pub mod recorder;

pub use broker::{Broker, broker, cluster, field_table, message_id, unique};
pub use fm::{Fm, FmOutput, FmProcess, fm_bin};
pub use plugins::{build_c, build_c_plugin, build_c_plugin_with, plugin_path};

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long helpers wait for the broker or for `fm` before failing the test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// What fm logs once its consumers are registered (fedora-messaging's words): from then on a
/// published message reaches it.
pub const CONSUMING: &str = ::fm::consume::REGISTERED;

/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Waits for a condition nobody can notify us of (a file growing, a queue emptying, a count in
/// a log): calls `check` until it returns `Ok`, and returns that. `Err` says what the test sees
/// meanwhile (fm's log, the file...); after `within` the test panics with the last one. The one
/// way tests wait: never a bare sleep, never a loop without a deadline.
pub async fn eventually<T, E: std::fmt::Display>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) if Instant::now() >= deadline => {
                panic!("still waiting after {within:?}: {state}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file from fedora-messaging's own test fixtures (`tests/fixtures/fedora-messaging/`).
pub fn fedora_fixture(name: &str) -> PathBuf {
    let path = repo_root()
        .join("tests/fixtures/fedora-messaging")
        .join(name);
    assert!(
        path.exists(),
        "fixture {} is missing from the repository",
        path.display()
    );
    path
}

/// True under CI, where a test that lacks what it needs must fail instead of skipping.
pub fn under_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// The running test's name (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

/// A test cannot run because `reason`: panic under CI, else print one loud line (straight to the
/// terminal: libtest hides a passing test's captured output) and let the test return.
pub fn skip(reason: &str) {
    let test = test_name();
    if under_ci() {
        panic!(
            "{test}: {reason}; under CI=true a test never skips: run it via scripts/test, which \
             starts the broker and sets FM_TEST_*"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {reason} (run via scripts/test or eval \"$(scripts/broker start)\")"
    );
}

/// Whether the slow tests run (`scripts/test --full`). When not, prints a `SKIPPED` line: a slow
/// test starts with `if !full_run() { return }`.
pub fn full_run() -> bool {
    let full = std::env::var("FM_TEST_FULL").as_deref() == Ok("1");
    if !full {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {}: slow test (run scripts/test --full)",
            test_name()
        );
    }
    full
}
