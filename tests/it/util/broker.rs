//! The test broker: its URLs, TLS material and controls (stop, start, extra nodes), and the
//! AMQP helpers tests use to declare, publish and inspect queues on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

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

use super::{TIMEOUT, eventually, full_run, skip};

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

    /// Takes every message off `queue` and returns their ids, in queue order ("" for none).
    pub async fn drain_ids(&self, queue: &str) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(d) = self.get(queue).await {
            ids.push(message_id(&d));
        }
        ids
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

    /// Closes, from the broker's side (`rabbitmqctl close_connection`), the connection of the
    /// client whose `client_properties` mention `app` (fm's `[client_properties] app`).
    pub async fn close_connection_of(&self, app: &str, reason: &str) {
        let listed = self
            .rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"])
            .await;
        let pid = listed
            .lines()
            .find(|l| l.contains(app))
            .and_then(|l| l.split('\t').next())
            .unwrap_or_else(|| panic!("no connection of {app} is listed:\n{listed}"))
            .to_owned();
        self.rabbitmqctl(&["close_connection", &pid, reason]).await;
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

/// A delivery's `message_id` ("" when it has none).
pub fn message_id(delivery: &lapin::message::Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
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
