//! TLS with client certificates and SASL EXTERNAL (issue 5), against the test node's TLS
//! listener (`verify_peer`, `fail_if_no_peer_cert`, `rabbitmq_auth_mechanism_ssl`; the client
//! certificate's CN is the RabbitMQ user). The certificates come from scripts/lib/broker.sh.
//!
//! - `consume`, `publish` and `record` work over TLS, logged in with EXTERNAL, with PKCS#8,
//!   PKCS#1 and SEC1 keys, and from a `fedora.toml`-shaped configuration;
//! - every refusal has its exit code and a message that says what to fix: a CA that does not
//!   match, a host name the broker's certificate does not name, an expired or foreign client
//!   certificate, no client certificate, a missing key file, a key that is not the
//!   certificate's, a certificate whose CN is no user, TLS to a plain port and the reverse, a
//!   server that never answers;
//! - plain `amqp://` never touches `[tls]`.

use std::path::Path;

use serde_json::Value;

use crate::util::recorder;
use crate::util::{self, Broker, Fm};

/// The `[tls]` table for files of the test PKI (`None`: the key is left out).
fn tls_table(b: &Broker, ca: &str, cert: Option<&str>, key: Option<&str>) -> String {
    let mut table = format!("[tls]\nca_cert = \"{}\"\n", b.pki().join(ca).display());
    if let Some(cert) = cert {
        table += &format!("certfile = \"{}\"\n", b.pki().join(cert).display());
    }
    if let Some(key) = key {
        table += &format!("keyfile = \"{}\"\n", b.pki().join(key).display());
    }
    table
}

/// A consumer of the durable queue `queue` (bound to `amq.topic` with `QUEUE.#`) through the
/// recorder plugin writing to `out`, at `url`, with `tls` appended.
fn consumer_config(url: &str, queue: &str, out: &Path, app: &str, tls: &str) -> String {
    let plugin = util::build_c_plugin(&util::repo_root().join("tests/fixtures/plugins/recorder.c"));
    format!(
        r#"
amqp_url = "{url}"
callback = "{plugin}"
connection_timeout = 10

[client_properties]
app = "{app}"

[queues."{queue}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
queue = "{queue}"
exchange = "amq.topic"
routing_keys = ["{queue}.#"]

[consumer_config]
out = "{out}"

{tls}"#,
        plugin = plugin.display(),
        out = out.display(),
    )
}

/// The node's connections whose client properties carry `app`: `(user, auth_mechanism, vhost,
/// ssl)` each.
async fn connections_of(b: &Broker, app: &str) -> Vec<(String, String, String, String)> {
    let listed = b
        .rabbitmqctl(&[
            "-q",
            "list_connections",
            "user",
            "auth_mechanism",
            "vhost",
            "ssl",
            "client_properties",
        ])
        .await;
    listed
        .lines()
        .filter(|l| l.contains(&format!("{{\"app\",\"{app}\"}}")))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].into(), f[1].into(), f[2].into(), f[3].into())
        })
        .collect()
}

/// fm consumes over TLS as `fm-client` with EXTERNAL: the message arrives, the node lists the
/// connection as a TLS connection of that user, and SIGTERM ends it with 0.
async fn consume_over_tls(b: &Broker, cert: &str, key: &str) {
    let queue = b.unique("tls-consume");
    let app = b.unique("app");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let tls = tls_table(b, "ca.pem", Some(cert), Some(key));
    let mut proc = fm
        .config_toml(&consumer_config(b.amqps_url(), &queue, &out, &app, &tls))
        .arg("consume")
        .spawn();
    proc.wait_consuming().await;
    assert_eq!(
        connections_of(b, &app).await,
        [(
            "fm-client".into(),
            "EXTERNAL".into(),
            "/".into(),
            "true".into()
        )],
        "{cert}/{key}: fm's connection is TLS, logged in as the certificate's CN with EXTERNAL"
    );
    let id = b
        .publish_fedora(
            "amq.topic",
            &format!("{queue}.ack"),
            &serde_json::json!({"k": cert}),
        )
        .await;
    let lines = recorder::wait_for_lines(&proc, &out, 1).await;
    assert_eq!(lines[0]["record"]["id"], id.as_str());
    assert_eq!(lines[0]["body"]["k"], cert);
    proc.wait_for_stderr("Successfully consumed message").await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    b.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_over_tls_logs_in_with_the_client_certificate() {
    let Some(b) = util::broker() else { return };
    consume_over_tls(&b, "client.pem", "client.key").await;
}

/// PKCS#1 ("BEGIN RSA PRIVATE KEY") and SEC1 ("BEGIN EC PRIVATE KEY") keys work as well as
/// PKCS#8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs1_and_sec1_keys_work_too() {
    let Some(b) = util::broker() else { return };
    consume_over_tls(&b, "client.pem", "client-pkcs1.key").await;
    consume_over_tls(&b, "client-ec.pem", "client-ec.key").await;
}

/// `fm publish` and `fm record` use the same TLS set-up: a message published over TLS is
/// recorded over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_record_work_over_tls() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("tls-record");
    let tls = tls_table(&b, "ca.pem", Some("client.pem"), Some("client.key"));
    let config = format!(
        r#"amqp_url = "{url}"
[queues."{queue}"]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
queue = "{queue}"
exchange = "amq.topic"
routing_keys = ["{queue}.#"]

{tls}"#,
        url = b.amqps_url(),
    );
    let record = Fm::new().config_toml(&config);
    // Outside fm's run folder, which goes when the run ends.
    let kept = tempfile::tempdir().unwrap();
    let file = kept.path().join("recorded.jsonl");
    let mut recording = record
        .arg("record")
        .arg(&file)
        .args(["--limit", "1"])
        .spawn();
    recording.wait_consuming().await;

    Fm::new()
        .config_toml(&config)
        .args([
            "publish",
            "--topic",
            &format!("{queue}.hello"),
            "--body",
            r#"{"over": "tls"}"#,
        ])
        .run()
        .await
        .assert_code(0);

    recording.wait().await.assert_code(0);
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .next()
            .expect("one line recorded"),
    )
    .unwrap();
    assert_eq!(line["topic"], format!("{queue}.hello"));
    assert_eq!(line["body"]["over"], "tls");
    b.delete_queue(&queue).await;
}

/// Fedora's own configuration file, with only the broker's address and the certificate paths
/// swapped for the test ones: `amqps://fedora:@HOST/%2Fpublic_pubsub` (user `fedora`, empty
/// password, vhost `/public_pubsub`), a client certificate so EXTERNAL, a server-named queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fedora_toml_shaped_config_connects_and_consumes() {
    let Some(b) = util::broker() else { return };
    b.rabbitmqctl(&["-q", "add_vhost", "/public_pubsub"]).await;
    for user in ["fm-client", "guest"] {
        b.rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            "/public_pubsub",
            user,
            ".*",
            ".*",
            ".*",
        ])
        .await;
    }
    let fedora = std::fs::read_to_string(util::fedora_fixture("fedora.toml")).unwrap();
    let app = b.unique("fedora-app");
    let config = fedora
        .replace(
            "@rabbitmq.fedoraproject.org/",
            &format!("@localhost:{}/", b.amqps_port()),
        )
        .replace(
            "/etc/fedora-messaging/cacert.pem",
            &b.pki_file("ca.pem").display().to_string(),
        )
        .replace(
            "/etc/fedora-messaging/fedora-key.pem",
            &b.pki_file("client.key").display().to_string(),
        )
        .replace(
            "/etc/fedora-messaging/fedora-cert.pem",
            &b.pki_file("client.pem").display().to_string(),
        )
        .replace("app = \"Example Application\"", &format!("app = \"{app}\""));
    assert!(
        config.contains("amqps://fedora:@localhost:"),
        "the fixture's URL was swapped"
    );
    assert!(config.contains("/%2Fpublic_pubsub"));

    // The fixture's callback is fedora_messaging.example:printer; fm's printer plugin prints
    // the same thing.
    let mut proc = Fm::new()
        .config_toml(&config)
        .arg("consume")
        .arg("--callback")
        .arg(util::plugin_path("printer"))
        .spawn();
    proc.wait_consuming().await;
    assert_eq!(
        connections_of(&b, &app).await,
        [(
            "fm-client".into(),
            "EXTERNAL".into(),
            "/public_pubsub".into(),
            "true".into()
        )]
    );

    // The fixture binds "#" on amq.topic: publish there in the same vhost.
    let topic = b.unique("fedora.topic");
    let publisher = lapin::Connection::connect(
        &format!(
            "amqp://guest:guest@localhost:{}/%2Fpublic_pubsub",
            b.amqp_port()
        ),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("guest on /public_pubsub");
    let channel = publisher.create_channel().await.unwrap();
    channel
        .basic_publish(
            "amq.topic".into(),
            topic.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            br#"{"hello": "fedora"}"#,
            lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id("5e1ec7ed-0000-4000-8000-000000000001".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    proc.wait_for_stdout(&format!("Topic: {topic}")).await;
    assert!(
        proc.stdout()
            .contains("Id: 5e1ec7ed-0000-4000-8000-000000000001")
    );
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    let _ = publisher.close(200, "done".into()).await;
}

/// Runs `fm consume` with `tls` at `url` and expects it to give up with `code`, its last line
/// saying every one of `says`; returns that line. Also checks that it gave up in time.
async fn refused(b: &Broker, url: &str, tls: &str, code: i32, says: &[&str]) -> String {
    let queue = b.unique("refused");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    // A refusal is final: fm gives up at once instead of retrying until connection_timeout,
    // here far longer than util::TIMEOUT, within which `run` requires fm to exit.
    let config = consumer_config(url, &queue, &out, "refused", tls)
        .replace("connection_timeout = 10", "connection_timeout = 600");
    let output = fm.config_toml(&config).arg("consume").run().await;
    output.assert_code(code);
    let last = output
        .stderr
        .lines()
        .rfind(|l| l.starts_with("fm: "))
        .unwrap_or_else(|| panic!("no \"fm: \" error line in:\n{}", output.stderr))
        .to_owned();
    for part in says {
        assert!(
            last.contains(part),
            "{part:?} is not in fm's error:\n{last}"
        );
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_broker_certificate_is_refused() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "other-ca.pem", Some("client.pem"), Some("client.key"));
    refused(
        &b,
        b.amqps_url(),
        &tls,
        14,
        &[
            "the broker's certificate is not signed by a CA fm trusts",
            &format!("[tls] ca_cert {}", b.pki().join("other-ca.pem").display()),
            "set ca_cert to the PEM bundle of the CA that signed it",
        ],
    )
    .await;
}

/// The server certificate names localhost, 127.0.0.1 and ::1; 127.0.0.2 reaches the same
/// listener under a name it does not carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_for_another_host_is_refused() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "ca.pem", Some("client.pem"), Some("client.key"));
    refused(
        &b,
        &b.amqps_url_with_host("127.0.0.2"),
        &tls,
        14,
        &[
            "the broker's certificate is not valid for the host name \"127.0.0.2\" in amqp_url",
            "(it is valid for localhost, 127.0.0.1",
            "connect with one of those names",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_and_named() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(
        &b,
        "ca.pem",
        Some("expired-client.pem"),
        Some("expired-client.key"),
    );
    let cert = b.pki_file("expired-client.pem");
    refused(
        &b,
        b.amqps_url(),
        &tls,
        14,
        &[&format!(
            "the broker refused fm's client certificate, [tls] certfile {} (CN=fm-client, \
                 issued by CN=fm test CA): it expired on 2020-01-02 00:00:00 UTC; renew it",
            cert.display()
        )],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fm_warns_at_start_that_its_client_certificate_expired() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("expired-warning");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let tls = tls_table(
        &b,
        "ca.pem",
        Some("expired-client.pem"),
        Some("expired-client.key"),
    );
    let output = fm
        .config_toml(&consumer_config(b.amqps_url(), &queue, &out, "warn", &tls))
        .arg("consume")
        .run()
        .await;
    output.assert_code(14);
    let warning = output
        .stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("[tls] certfile"))
        .unwrap_or_else(|| panic!("no start-up warning in:\n{}", output.stderr));
    assert!(
        warning.contains("expired on 2020-01-02 00:00:00 UTC: brokers refuse expired client certificates; renew it"),
        "{warning}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_an_unknown_ca_is_refused() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(
        &b,
        "ca.pem",
        Some("other-client.pem"),
        Some("other-client.key"),
    );
    refused(
        &b,
        b.amqps_url(),
        &tls,
        14,
        &[
            "the broker does not trust the CA that issued fm's client certificate",
            "issued by CN=fm unrelated test CA",
            "use a certificate signed by a CA the broker trusts",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_where_the_broker_requires_one_is_explained() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "ca.pem", None, None);
    refused(
        &b,
        b.amqps_url(),
        &tls,
        14,
        &["the broker requires a client certificate; set [tls] certfile and keyfile"],
    )
    .await;
}

/// A valid certificate whose CN is no RabbitMQ user: TLS succeeds, the EXTERNAL login does
/// not (403, exit 15), and the message names the certificate's CN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_a_broker_user_is_refused_with_exit_15() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "ca.pem", Some("stranger.pem"), Some("stranger.key"));
    refused(
        &b,
        b.amqps_url(),
        &tls,
        15,
        &[
            "the broker refused the login (403 ACCESS_REFUSED",
            "no user for fm's client certificate (subject CN=fm-stranger) (SASL EXTERNAL)",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_file_is_a_configuration_error() {
    let Some(b) = util::broker() else { return };
    let missing = b.pki().join("no-such.key");
    let tls = tls_table(&b, "ca.pem", Some("client.pem"), Some("no-such.key"));
    let last = refused(&b, b.amqps_url(), &tls, 2, &[]).await;
    assert!(
        last.ends_with(&format!(
            "config.toml: [tls] keyfile {} cannot be read: no such file or directory; fix the \
             path in the [tls] table",
            missing.display()
        )),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_the_certificates_is_a_configuration_error() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "ca.pem", Some("client.pem"), Some("stranger.key"));
    refused(
        &b,
        b.amqps_url(),
        &tls,
        2,
        &[&format!(
            "[tls] keyfile {} does not match certfile {}: the key is not the private key of the \
             certificate",
            b.pki().join("stranger.key").display(),
            b.pki().join("client.pem").display()
        )],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_client_certificate_is_a_configuration_error() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "ca.pem", Some("client.pem"), None);
    refused(
        &b,
        b.amqps_url(),
        &tls,
        2,
        &["[tls] sets certfile", "but not keyfile: set both"],
    )
    .await;
}

/// The plain port answers a TLS ClientHello with an AMQP header: fm says so at once instead of
/// waiting for connection_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_the_plain_port_fails_fast() {
    let Some(b) = util::broker() else { return };
    let tls = tls_table(&b, "ca.pem", Some("client.pem"), Some("client.key"));
    let url = format!("amqps://localhost:{}/%2F", b.amqp_port());
    refused(
        &b,
        &url,
        &tls,
        14,
        &[&format!(
            "localhost:{} did not answer with TLS; is it a plain AMQP port? Use amqp:// for it",
            b.amqp_port()
        )],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_to_the_tls_port_fails_fast() {
    let Some(b) = util::broker() else { return };
    let url = format!("amqp://guest:guest@localhost:{}/%2F", b.amqps_port());
    refused(
        &b,
        &url,
        "",
        14,
        &[
            &format!("localhost:{}", b.amqps_port()),
            "TLS port",
            "amqps://",
        ],
    )
    .await;
}

/// A server that accepts the connection and never says a word: each step is bounded by
/// connection_timeout, and the message says which step hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_naming_the_step() {
    let Some(b) = util::broker() else { return };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold every connection, silently, until the test ends.
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            conns.push(conn);
        }
    });
    for (url, step) in [
        (
            format!("amqps://127.0.0.1:{port}/%2F"),
            "while in the TLS handshake; is it a TLS port?",
        ),
        (
            format!("amqp://127.0.0.1:{port}/%2F"),
            "while in the AMQP handshake; is it an AMQP port?",
        ),
    ] {
        let queue = b.unique("silent");
        let fm = Fm::new();
        let out = fm.dir().join("out.jsonl");
        let tls = tls_table(&b, "ca.pem", Some("client.pem"), Some("client.key"));
        let config = consumer_config(&url, &queue, &out, "silent", &tls)
            .replace("connection_timeout = 10", "connection_timeout = 1");
        // Without the bound fm would wait forever; `run` requires it to exit within
        // util::TIMEOUT, and fm's words say which bound ended the wait.
        let output = fm.config_toml(&config).arg("consume").run().await;
        output.assert_code(14);
        assert!(
            output.stderr.contains(&format!(
                "no answer within 1.0 s (connection_timeout) {step}"
            )),
            "{url}:\n{}",
            output.stderr
        );
    }
    held.abort();
}

/// fedora-messaging's sample config has a [tls] table naming files that do not exist, with an
/// amqp:// URL: plain connections never read [tls].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_amqp_never_reads_the_tls_table() {
    let Some(b) = util::broker() else { return };
    let queue = b.unique("plain");
    let app = b.unique("plain-app");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let tls = "[tls]\nca_cert = \"/nonexistent/ca.pem\"\ncertfile = \"/nonexistent/c.pem\"\n";
    let mut proc = fm
        .config_toml(&consumer_config(b.url(), &queue, &out, &app, tls))
        .arg("consume")
        .spawn();
    proc.wait_consuming().await;
    assert_eq!(
        connections_of(&b, &app).await,
        [("guest".into(), "PLAIN".into(), "/".into(), "false".into())]
    );
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    b.delete_queue(&queue).await;
}

/// Without `ca_cert`, the system's trust store decides (rustls-native-certs, which honours
/// `SSL_CERT_FILE`): a store holding the test CA connects, one without it is named in the
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_cert_the_system_trust_store_is_used() {
    let Some(b) = util::broker() else { return };
    let tls = format!(
        "[tls]\ncertfile = \"{}\"\nkeyfile = \"{}\"\n",
        b.pki_file("client.pem").display(),
        b.pki_file("client.key").display()
    );
    let queue = b.unique("system-store");
    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let mut proc = fm
        .config_toml(&consumer_config(b.amqps_url(), &queue, &out, "store", &tls))
        .env("SSL_CERT_FILE", b.pki_file("ca.pem"))
        .arg("consume")
        .spawn();
    proc.wait_consuming().await;
    proc.kill("TERM");
    proc.wait().await.assert_code(0);
    b.delete_queue(&queue).await;

    let fm = Fm::new();
    let out = fm.dir().join("out.jsonl");
    let output = fm
        .config_toml(&consumer_config(b.amqps_url(), &queue, &out, "store", &tls))
        .env("SSL_CERT_FILE", b.pki_file("other-ca.pem"))
        .arg("consume")
        .run()
        .await;
    output.assert_code(14);
    assert!(
        output.stderr.contains(
            "the broker's certificate is not signed by a CA fm trusts: the system's trust store \
             ([tls] ca_cert is not set) does not hold its issuer"
        ),
        "{}",
        output.stderr
    );
}

/// EXTERNAL asked for in the URL needs TLS and a client certificate: said at start (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_auth_without_a_client_certificate_is_a_configuration_error() {
    let Some(b) = util::broker() else { return };
    let plain = format!("{}?auth_mechanism=external", b.url());
    refused(
        &b,
        &plain,
        "",
        2,
        &["auth_mechanism=external needs TLS with a client certificate"],
    )
    .await;
    let tls = tls_table(&b, "ca.pem", None, None);
    refused(
        &b,
        &b.amqps_url_external(),
        &tls,
        2,
        &["auth_mechanism=external needs a client certificate; set [tls] certfile and keyfile"],
    )
    .await;
}
