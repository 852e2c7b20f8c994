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
#![allow(dead_code)] // Each test module uses a different part of the fixture.

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::io::AsyncReadExt as _;

/// How long helpers wait for the broker or for `fm` before failing the test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// What fm logs once its consumers are registered (fedora-messaging's words): from then on a
/// published message reaches it.
pub const CONSUMING: &str = fm::consume::REGISTERED;

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

/// The test broker, or `None` (after [`skip`]) when none was set up:
/// `let Some(b) = broker() else { return };`
pub fn broker() -> Option<Broker> {
    match Broker::from_env(|key| std::env::var(key).ok()) {
        Ok(broker) => Some(broker),
        Err(missing) => {
            skip(&format!("no broker ({missing} is not set)"));
            None
        }
    }
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

/// The 3-node cluster of `scripts/test --full` (node 0 is the seed), or `None` with a `SKIPPED`
/// line when this is not a full run.
pub fn cluster() -> Option<Vec<Broker>> {
    if !full_run() {
        return None;
    }
    let names = std::env::var("FM_TEST_CLUSTER")
        .expect("FM_TEST_FULL=1 but FM_TEST_CLUSTER is not set: run scripts/test --full");
    let seed = broker()?;
    Some(names.split(',').map(|name| seed.named(name)).collect())
}

/// A name no other test (or earlier run) uses, for queues and exchanges: `fm-test.NAME.UUID`.
pub fn unique(name: &str) -> String {
    format!("fm-test.{name}.{}", uuid::Uuid::new_v4().simple())
}

/// A RabbitMQ node the tests may use: its URLs, its TLS material and its controls.
pub struct Broker {
    /// The node's name for scripts/broker (`dev`, `test-1234`...).
    name: String,
    /// The Erlang node name, `fm-NAME@localhost`.
    node: String,
    amqp_url: String,
    amqps_url: String,
    pki: PathBuf,
    rabbitmqctl: PathBuf,
    broker_ctl: Option<PathBuf>,
    venv: Option<PathBuf>,
    /// The helpers' own connection and confirm-mode channel, opened on first use and reopened
    /// after a node restart. A tokio mutex: it is held across awaits.
    amqp: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("node", &self.node)
            .field("url", &self.amqp_url)
            .finish()
    }
}

impl Broker {
    /// Reads the `FM_TEST_*` variables through `var`; `Err` names the first one missing.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Broker, String> {
        let need = |key: &str| {
            var(key)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| key.to_owned())
        };
        Ok(Broker {
            amqp_url: need("FM_TEST_AMQP_URL")?,
            amqps_url: need("FM_TEST_AMQPS_URL")?,
            pki: need("FM_TEST_PKI")?.into(),
            node: need("FM_TEST_NODE")?,
            rabbitmqctl: need("FM_TEST_RABBITMQCTL")?.into(),
            name: var("FM_TEST_BROKER_NAME").unwrap_or_default(),
            broker_ctl: var("FM_TEST_BROKER_CTL")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            venv: var("FM_TEST_VENV")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            amqp: tokio::sync::Mutex::new(None),
        })
    }

    /// Another node managed by scripts/broker (a cluster member, an extra node), read from
    /// `scripts/broker env NAME`.
    pub fn named(&self, name: &str) -> Broker {
        let out = self.broker_ctl_blocking(&["env", name]);
        let vars: Vec<(String, String)> = out
            .lines()
            .filter_map(|line| {
                let (key, value) = line.strip_prefix("export ")?.split_once('=')?;
                Some((key.to_owned(), value.trim_matches('\'').to_owned()))
            })
            .collect();
        let var = |key: &str| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        Broker::from_env(var).unwrap_or_else(|missing| {
            panic!("`scripts/broker env {name}` did not print {missing}:\n{out}")
        })
    }

    /// Starts a new node for this test (a restart or failover target), destroyed when the guard
    /// drops. Takes a few seconds. Should the test process die without unwinding, scripts/test
    /// removes the node (its name starts with the run's) and so does the next `broker_gc`
    /// (its owner pid is dead).
    pub fn extra_node(&self, label: &str) -> ExtraNode {
        let name = format!("{}-{label}-{:04x}", self.name, fastrand::u16(..));
        let owner =
            std::env::var("FM_TEST_OWNER_PID").unwrap_or_else(|_| std::process::id().to_string());
        let mut cmd = self.broker_ctl_command(&["start", &name]);
        cmd.env("FM_TEST_OWNER_PID", owner);
        check_broker_ctl(
            &["start", &name],
            cmd.output().expect("running scripts/broker"),
        );
        ExtraNode {
            broker: self.named(&name),
            ctl: self.broker_ctl_path().to_owned(),
            name,
        }
    }

    /// `amqp://guest:guest@localhost:PORT/%2F`
    pub fn url(&self) -> &str {
        &self.amqp_url
    }

    /// `amqps://localhost:PORT/%2F` (the node requires a client certificate).
    pub fn amqps_url(&self) -> &str {
        &self.amqps_url
    }

    /// The TLS URL asking for SASL EXTERNAL (the user is the certificate's CN).
    pub fn amqps_url_external(&self) -> String {
        format!("{}?auth_mechanism=external", self.amqps_url)
    }

    /// The TLS URL with another host for the same listener, e.g. `127.0.0.2`, which is not in the
    /// server certificate: a hostname-verification failure without another certificate.
    pub fn amqps_url_with_host(&self, host: &str) -> String {
        self.amqps_url
            .replacen("://localhost:", &format!("://{host}:"), 1)
    }

    /// The AMQP port (for URLs a test builds itself).
    pub fn amqp_port(&self) -> u16 {
        port_of(&self.amqp_url)
    }

    /// The AMQPS port.
    pub fn amqps_port(&self) -> u16 {
        port_of(&self.amqps_url)
    }

    /// The Erlang node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The folder with the test CA and certificates (see scripts/lib/broker.sh).
    pub fn pki(&self) -> &Path {
        &self.pki
    }

    /// A file in [`Broker::pki`], checked to exist: `b.pki_file("client.pem")`.
    pub fn pki_file(&self, file: &str) -> PathBuf {
        let path = self.pki.join(file);
        assert!(
            path.is_file(),
            "{} is missing: regenerate it with scripts/test",
            path.display()
        );
        path
    }

    /// lapin's TLS settings trusting `ca` and presenting `cert` + `key` (files in the PKI folder),
    /// e.g. `tls_config("ca.pem", "client.pem", "client.key")`.
    pub fn tls_config(&self, ca: &str, cert: &str, key: &str) -> OwnedTLSConfig {
        let read = |file: &str| std::fs::read(self.pki_file(file)).expect("reading test PKI file");
        OwnedTLSConfig {
            identity: Some(OwnedIdentity::PKCS8 {
                pem: read(cert),
                key: read(key),
            }),
            cert_chain: Some(String::from_utf8(read(ca)).expect("CA file is PEM text")),
        }
    }

    /// The Python interpreter of the fedora-messaging venv.
    pub fn venv_python(&self) -> PathBuf {
        let venv = self
            .venv
            .as_ref()
            .expect("FM_TEST_VENV is not set: run via scripts/test");
        venv.join("bin/python")
    }

    /// A unique queue or exchange name; see [`unique`].
    pub fn unique(&self, name: &str) -> String {
        unique(name)
    }

    /// A new connection as guest.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.amqp_url))
    }

    /// A new TLS connection with SASL EXTERNAL, as the user named by `cert`'s CN.
    pub async fn connect_tls(&self, cert: &str, key: &str) -> lapin::Result<Connection> {
        Connection::connect_with_config(
            &self.amqps_url_external(),
            ConnectionProperties::default(),
            self.tls_config("ca.pem", cert, key),
            lapin::runtime::default_runtime()?,
        )
        .await
    }

    /// The helpers' channel (publisher confirms on), reconnecting when the connection or the
    /// channel was closed (a node restart, a failed passive declare).
    pub async fn channel(&self) -> Channel {
        let mut guard = self.amqp.lock().await;
        if let Some((conn, chan)) = guard.as_ref() {
            if chan.status().connected() {
                return chan.clone();
            }
            if conn.status().connected() {
                let chan = confirm_channel(conn).await;
                guard.as_mut().expect("checked above").1 = chan.clone();
                return chan;
            }
        }
        let conn = self.connect().await;
        let chan = confirm_channel(&conn).await;
        *guard = Some((conn, chan.clone()));
        chan
    }

    /// Declares a durable, non-exclusive queue that survives a node restart.
    pub async fn declare_queue(&self, queue: &str) {
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.declare_queue_with(queue, opts, FieldTable::default())
            .await;
    }

    /// Declares a queue with explicit options and arguments (`x-max-priority`...).
    pub async fn declare_queue_with(
        &self,
        queue: &str,
        opts: QueueDeclareOptions,
        args: FieldTable,
    ) {
        self.channel()
            .await
            .queue_declare(queue.into(), opts, args)
            .await
            .unwrap_or_else(|e| panic!("declaring queue {queue}: {e}"));
    }

    /// Declares a durable topic exchange.
    pub async fn declare_topic_exchange(&self, exchange: &str) {
        let opts = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel()
            .await
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                opts,
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declaring exchange {exchange}: {e}"));
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    pub async fn bind(&self, queue: &str, exchange: &str, routing_key: &str) {
        self.channel()
            .await
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("binding {queue} to {exchange} with {routing_key}: {e}"));
    }

    /// Publishes `payload` (mandatory, so an unroutable message is an error) and waits for the
    /// broker's confirm. Panics on a nack or a return.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) {
        let confirm = self
            .channel()
            .await
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props,
            )
            .await
            .unwrap_or_else(|e| panic!("publishing to {exchange:?}/{routing_key}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("confirm for {exchange:?}/{routing_key}: {e}"));
        match confirm {
            Confirmation::Ack(None) => {}
            other => panic!("publishing to {exchange:?}/{routing_key}: not accepted: {other:?}"),
        }
    }

    /// Publishes a JSON body as fedora-messaging does (content type, UTF-8, persistent, the
    /// given message id and headers) and waits for the confirm.
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &serde_json::Value,
        headers: FieldTable,
        message_id: &str,
    ) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(2)
            .with_message_id(message_id.into())
            .with_headers(headers);
        let payload = serde_json::to_vec(body).expect("JSON body serialises");
        self.publish(exchange, routing_key, &payload, props).await;
    }

    /// Publishes a message like fedora-messaging's `api.publish` of a base `Message`: the
    /// schema, severity (INFO), sent-at and priority headers, a UUID4 id. Returns the id.
    pub async fn publish_fedora(
        &self,
        exchange: &str,
        topic: &str,
        body: &serde_json::Value,
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let headers = field_table([
            (
                "fedora_messaging_schema",
                AMQPValue::LongString("base.message".into()),
            ),
            ("fedora_messaging_severity", AMQPValue::LongLongInt(20)),
            (
                "sent-at",
                AMQPValue::LongString("2026-01-02T03:04:05+00:00".into()),
            ),
            ("priority", AMQPValue::LongLongInt(0)),
        ]);
        self.publish_json(exchange, topic, body, headers, &id).await;
        id
    }

    /// Takes one message off `queue` (acknowledged at once), or `None` when it is empty.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::Delivery> {
        self.channel()
            .await
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get on {queue}: {e}"))
            .map(|m| m.delivery)
    }

    /// Takes one message off `queue` and parses its body as JSON.
    pub async fn get_json(&self, queue: &str) -> Option<serde_json::Value> {
        let delivery = self.get(queue).await?;
        Some(serde_json::from_slice(&delivery.data).unwrap_or_else(|e| {
            panic!(
                "message on {queue} is not JSON ({e}): {}",
                String::from_utf8_lossy(&delivery.data)
            )
        }))
    }

    /// Messages ready in `queue` (passive declare, on a channel of its own: a missing queue
    /// closes the channel). Panics when the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.try_queue_depth(queue)
            .await
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
    }

    /// Whether `queue` exists.
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.try_queue_depth(queue).await.is_ok()
    }

    async fn try_queue_depth(&self, queue: &str) -> lapin::Result<u32> {
        self.channel().await; // opens the connection when needed
        let probe = {
            let guard = self.amqp.lock().await;
            let (conn, _) = guard.as_ref().expect("channel() opened the connection");
            conn.create_channel().await?
        };
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let result = probe
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await;
        if probe.status().connected() {
            let _ = probe.close(200, "done".into()).await;
        }
        Ok(result?.message_count())
    }

    /// Waits until `queue` holds exactly `depth` ready messages; panics after [`TIMEOUT`].
    pub async fn wait_for_depth(&self, queue: &str, depth: u32) {
        eventually(TIMEOUT, async || match self.queue_depth(queue).await {
            now if now == depth => Ok(()),
            now => Err(format!(
                "queue {queue} holds {now} messages, expected {depth}"
            )),
        })
        .await
    }

    /// Removes every ready message of `queue`; returns how many.
    pub async fn purge(&self, queue: &str) -> u32 {
        self.channel()
            .await
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .unwrap_or_else(|e| panic!("purging {queue}: {e}"))
    }

    /// Deletes `queue` (whatever it holds).
    pub async fn delete_queue(&self, queue: &str) {
        self.channel()
            .await
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("deleting queue {queue}: {e}"));
    }

    /// Deletes `exchange`.
    pub async fn delete_exchange(&self, exchange: &str) {
        self.channel()
            .await
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("deleting exchange {exchange}: {e}"));
    }

    /// Runs rabbitmqctl against this node (`list_queues`, `close_all_connections`...) and
    /// returns its stdout; panics with its stderr when it fails.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(&self.rabbitmqctl)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {}: {e}", self.rabbitmqctl.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {} failed ({}):\n{stdout}{}",
            self.node,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Stops the node (`rabbitmqctl stop`): connections drop, durable queues and persistent
    /// messages are kept for [`Broker::start_node`]. On the shared node this cuts every test
    /// running in parallel: restart tests use a node of their own, [`Broker::extra_node`].
    pub async fn stop_node(&self) {
        self.amqp.lock().await.take();
        self.broker_ctl_async(&["stop", &self.name]).await;
    }

    /// Starts the node again on the same ports and data (returns when it accepts connections).
    pub async fn start_node(&self) {
        self.broker_ctl_async(&["start", &self.name]).await;
    }

    fn broker_ctl_path(&self) -> &Path {
        self.broker_ctl.as_deref().expect(
            "FM_TEST_BROKER_CTL/FM_TEST_BROKER_NAME are not set: node control needs scripts/test \
             or scripts/broker",
        )
    }

    fn broker_ctl_command(&self, args: &[&str]) -> std::process::Command {
        assert!(
            !self.name.is_empty(),
            "FM_TEST_BROKER_NAME is not set: run via scripts/test"
        );
        // Through bash: the script works even where the executable bit got lost.
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(self.broker_ctl_path())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    async fn broker_ctl_async(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::from(self.broker_ctl_command(args))
            .output()
            .await
            .expect("running scripts/broker");
        check_broker_ctl(args, out)
    }

    fn broker_ctl_blocking(&self, args: &[&str]) -> String {
        let out = self
            .broker_ctl_command(args)
            .output()
            .expect("running scripts/broker");
        check_broker_ctl(args, out)
    }
}

fn check_broker_ctl(args: &[&str], out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "scripts/broker {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let chan = conn.create_channel().await.expect("opening a channel");
    chan.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("enabling publisher confirms");
    chan
}

fn port_of(url: &str) -> u16 {
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    let port = authority.rsplit(':').next().unwrap_or("");
    port.parse().unwrap_or_else(|_| panic!("no port in {url}"))
}

/// A `FieldTable` from pairs: `field_table([("key", AMQPValue::Boolean(true))])`.
pub fn field_table<const N: usize>(pairs: [(&str, AMQPValue); N]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(ShortString::from(key), value);
    }
    table
}

/// A node started by [`Broker::extra_node`]; stopped and deleted on drop.
pub struct ExtraNode {
    broker: Broker,
    ctl: PathBuf,
    name: String,
}

impl std::ops::Deref for ExtraNode {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        // Blocking in drop is fine here: the test is over with this node.
        let _ = std::process::Command::new("bash")
            .arg(&self.ctl)
            .args(["destroy", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Running fm.

/// The `fm` binary cargo built for these tests.
pub fn fm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fm"))
}

/// A plugin of the workspace, e.g. `plugin_path("printer")` → `target/debug/libfm_printer.so`
/// (next to the `fm` binary, so CARGO_TARGET_DIR and the profile are respected).
pub fn plugin_path(name: &str) -> PathBuf {
    let dir = fm_bin()
        .parent()
        .expect("fm binary has a folder")
        .to_owned();
    let path = dir.join(format!("libfm_{}.so", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "plugin {} is missing: run cargo build --workspace first (scripts/test does)",
        path.display()
    );
    path
}

/// Compiles a C test plugin (`cc -shared` with [`fm::callback::abi::C_FLAGS`], every warning an
/// error) and returns the `.so`. Results are
/// cached by source contents in the target folder, so parallel tests may share a source.
pub fn build_c_plugin(src: &Path) -> PathBuf {
    build_c_plugin_with(src, &[])
}

/// [`build_c_plugin`] with extra compiler flags (`-DCRASH=1`...).
pub fn build_c_plugin_with(src: &Path, cflags: &[&str]) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    let code = std::fs::read(src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&code, cflags).hash(&mut hasher);
    let stem = src.file_stem().and_then(OsStr::to_str).unwrap_or("plugin");
    let dir = fm_bin()
        .parent()
        .expect("fm binary has a folder")
        .join("c-plugins");
    std::fs::create_dir_all(&dir).expect("creating the C plugin folder");
    let out = dir.join(format!("lib{stem}-{:016x}.so", hasher.finish()));
    if out.is_file() {
        return out;
    }
    // Build under a private name, then rename: a parallel test never sees a half-written file.
    let tmp = dir.join(format!(".{stem}-{}.so", uuid::Uuid::new_v4().simple()));
    let result = std::process::Command::new("cc")
        .arg("-shared")
        .args(fm::callback::abi::C_FLAGS)
        .arg("-I")
        .arg(repo_root().join("include"))
        .args(cflags)
        .arg("-o")
        .arg(&tmp)
        .arg(src)
        .output()
        .expect("running cc (is gcc installed?)");
    assert!(
        result.status.success(),
        "cc failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, &out).expect("moving the built plugin into place");
    out
}

/// A command line for `fm`, run in a temporary folder of its own:
/// `Fm::new().config_toml(&toml).arg("consume").spawn()`.
pub struct Fm {
    /// The binary: [`fm_bin`] unless [`Fm::binary`] names another (an installed one).
    bin: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    config: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    dir: tempfile::TempDir,
}

impl Default for Fm {
    fn default() -> Self {
        Self::new()
    }
}

impl Fm {
    /// `fm` with no arguments, `FEDORA_MESSAGING_CONF` removed from its environment (a test says
    /// which config it means) and `RUST_BACKTRACE=1`.
    pub fn new() -> Fm {
        Fm {
            bin: fm_bin(),
            args: Vec::new(),
            envs: vec![
                ("FEDORA_MESSAGING_CONF".into(), None),
                ("RUST_BACKTRACE".into(), Some("1".into())),
            ],
            config: None,
            stdin: None,
            dir: tempfile::tempdir().expect("creating a temporary folder"),
        }
    }

    /// Runs another fm binary than the one cargo built (one a package installed, say).
    pub fn binary(mut self, bin: impl Into<PathBuf>) -> Fm {
        self.bin = bin.into();
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Fm {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Fm {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for fm.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Fm {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable for fm.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Fm {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Writes `toml` to `config.toml` in the run's folder and passes `--conf PATH` first.
    pub fn config_toml(mut self, toml: &str) -> Fm {
        let path = self.write_file("config.toml", toml);
        self.config = Some(path);
        self
    }

    /// The config file written by [`Fm::config_toml`].
    pub fn config_path(&self) -> &Path {
        self.config
            .as_deref()
            .expect("config_toml() was not called")
    }

    /// The run's temporary folder (fm's working directory; removed when the run is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file into the run's folder and returns its path.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Bytes for fm's standard input (default: none, stdin is /dev/null).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Fm {
        self.stdin = Some(bytes.into());
        self
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        if let Some(config) = &self.config {
            cmd.arg("--conf").arg(config);
        }
        cmd.args(&self.args).current_dir(self.dir.path());
        for (key, value) in &self.envs {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        cmd
    }

    /// Starts fm; its output is collected as it comes (see [`FmProcess::stderr`]).
    pub fn spawn(self) -> FmProcess {
        let mut child = self.command().spawn().expect("starting the fm binary");
        if let Some(bytes) = self.stdin.clone() {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                let _ = stdin.write_all(&bytes).await;
            });
        }
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            tokio::spawn(collect(
                child.stdout.take().expect("stdout is piped"),
                Arc::clone(&stdout),
            )),
            tokio::spawn(collect(
                child.stderr.take().expect("stderr is piped"),
                Arc::clone(&stderr),
            )),
        ];
        FmProcess {
            pid: child.id().expect("fm is running"),
            child,
            stdout,
            stderr,
            readers,
            run: self,
        }
    }

    /// Runs fm to the end (at most [`TIMEOUT`]) and returns its status and output.
    pub async fn run(self) -> FmOutput {
        self.spawn().wait().await
    }
}

async fn collect(mut pipe: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        into.lock()
            .expect("output buffer")
            .extend_from_slice(&buf[..n]);
    }
}

/// A running fm. Killed (SIGKILL) if dropped while still running.
pub struct FmProcess {
    child: tokio::process::Child,
    pid: u32,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Keeps the run's folder (config, files) alive as long as the process.
    run: Fm,
}

/// How an fm run ended.
#[derive(Debug)]
pub struct FmOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl FmOutput {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing both streams, unless fm exited with `code`.
    pub fn assert_code(&self, code: i32) -> &FmOutput {
        assert_eq!(
            self.status.code(),
            Some(code),
            "fm exited with {} instead of code {code}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

impl FmProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The run's folder (see [`Fm::dir`]).
    pub fn dir(&self) -> &Path {
        self.run.dir()
    }

    /// Sends a signal by name: `"TERM"`, `"INT"`, `"KILL"`, `"HUP"`...
    pub fn kill(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Everything fm wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("output buffer")).into_owned()
    }

    /// Everything fm wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("output buffer")).into_owned()
    }

    /// Waits until stderr contains `needle` (fm logs to stderr); panics after [`TIMEOUT`] or when
    /// fm exits first, showing what it wrote.
    pub async fn wait_for_stderr(&mut self, needle: &str) {
        self.wait_for_count(needle, 1, true).await
    }

    /// Waits until stdout contains `needle`; like [`FmProcess::wait_for_stderr`].
    pub async fn wait_for_stdout(&mut self, needle: &str) {
        self.wait_for_count(needle, 1, false).await
    }

    /// Waits until stderr contains `needle` at least `count` times (the n-th reconnection...).
    pub async fn wait_for_stderr_count(&mut self, needle: &str, count: usize) {
        self.wait_for_count(needle, count, true).await
    }

    /// Waits until fm registered its consumers: from then on a published message reaches it.
    pub async fn wait_consuming(&mut self) {
        self.wait_for_stderr(CONSUMING).await
    }

    async fn wait_for_count(&mut self, needle: &str, count: usize, stderr: bool) {
        let seen = |p: &FmProcess| {
            let text = if stderr { p.stderr() } else { p.stdout() };
            text.matches(needle).count() >= count
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if seen(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // fm is gone: once its pipes are drained, the text is final.
                self.drain_pipes().await;
                assert!(
                    seen(self),
                    "fm exited ({status}) before printing {needle:?} {count} time(s)\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fm did not print {needle:?} {count} time(s) within {TIMEOUT:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads fm's output to its end (the pipes close when fm exits, unless a child of fm still
    /// holds them: so at most 5 s).
    async fn drain_pipes(&mut self) {
        for reader in std::mem::take(&mut self.readers) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }

    /// Waits up to `timeout` for fm to exit; `None` if it is still running.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Some(status.expect("waiting for fm")),
            Err(_) => None,
        }
    }

    /// Waits (at most [`TIMEOUT`]) for fm to exit and returns everything it wrote. Panics, with
    /// the output so far, if it does not exit.
    pub async fn wait(mut self) -> FmOutput {
        let Some(status) = self.wait_timeout(TIMEOUT).await else {
            let (out, err) = (self.stdout(), self.stderr());
            let _ = self.child.start_kill();
            panic!("fm did not exit within {TIMEOUT:?}\n--- stdout:\n{out}\n--- stderr:\n{err}");
        };
        self.drain_pipes().await;
        FmOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}
