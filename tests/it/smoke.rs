//! The test fixture itself works: the broker scripts/test started takes messages, speaks TLS
//! with client certificates (SASL EXTERNAL as `fm-client`), refuses the bad certificates the
//! negative tests rely on, and keeps durable messages across a node restart.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use crate::util::{Fm, broker, build_c_plugin, cluster, field_table};

#[tokio::test]
async fn a_published_message_can_be_read_back() {
    let Some(b) = broker() else { return };
    let queue = b.unique("smoke");
    b.declare_queue(&queue).await;
    let body = serde_json::json!({"hello": "world", "n": 1});
    let headers = field_table([("fedora_messaging_severity", AMQPValue::LongLongInt(20))]);
    b.publish_json("", &queue, &body, headers, "id-1").await;
    assert_eq!(b.queue_depth(&queue).await, 1);

    let delivery = b.get(&queue).await.expect("the message is in the queue");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&delivery.data).unwrap(),
        body
    );
    let props = &delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some("id-1")
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    let severity = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("fedora_messaging_severity").cloned());
    assert_eq!(severity, Some(AMQPValue::LongLongInt(20)));
    assert_eq!(b.queue_depth(&queue).await, 0);
    assert!(b.get(&queue).await.is_none());

    b.delete_queue(&queue).await;
    assert!(!b.queue_exists(&queue).await);
}

#[tokio::test]
async fn topic_bindings_route_and_purge_empties() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = (b.unique("smoke-ex"), b.unique("smoke-q"));
    b.declare_topic_exchange(&exchange).await;
    b.declare_queue(&queue).await;
    b.bind(&queue, &exchange, "org.fedoraproject.*.smoke").await;
    let id = b
        .publish_fedora(
            &exchange,
            "org.fedoraproject.test.smoke",
            &serde_json::json!({"a": 1}),
        )
        .await;
    b.publish_fedora(
        &exchange,
        "org.fedoraproject.test.smoke",
        &serde_json::json!({"a": 2}),
    )
    .await;
    b.wait_for_depth(&queue, 2).await;
    let first = b.get(&queue).await.unwrap();
    assert_eq!(first.properties.message_id().as_ref().unwrap().as_str(), id);
    assert_eq!(b.purge(&queue).await, 1);
    assert_eq!(b.queue_depth(&queue).await, 0);
    b.delete_queue(&queue).await;
    b.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn rabbitmqctl_reaches_the_test_node() {
    let Some(b) = broker() else { return };
    let queue = b.unique("ctl");
    b.declare_queue(&queue).await;
    let listed = b
        .rabbitmqctl(&["-q", "list_queues", "name", "durable"])
        .await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&queue) && l.ends_with("true")),
        "{listed}"
    );
    let users = b.rabbitmqctl(&["-q", "list_users"]).await;
    assert!(
        users.contains("fm-client"),
        "the fm-client user exists: {users}"
    );
    b.delete_queue(&queue).await;
}

/// TLS with every key format of the client certificate (PKCS#8 and PKCS#1 RSA, SEC1 EC); the
/// node logs the connection in as the certificate's CN through EXTERNAL.
#[tokio::test]
async fn tls_client_certificates_log_in_as_fm_client() {
    let Some(b) = broker() else { return };
    for (cert, key) in [
        ("client.pem", "client.key"),
        ("client.pem", "client-pkcs1.key"),
        ("client-ec.pem", "client-ec.key"),
    ] {
        let conn = b
            .connect_tls(cert, key)
            .await
            .unwrap_or_else(|e| panic!("TLS + EXTERNAL with {cert}/{key}: {e}"));
        let chan = conn.create_channel().await.unwrap();
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = chan
            .queue_declare("".into(), opts, FieldTable::default())
            .await
            .unwrap();
        let listed = b
            .rabbitmqctl(&[
                "-q",
                "list_connections",
                "user",
                "auth_mechanism",
                "ssl",
                "peer_cert_subject",
            ])
            .await;
        assert!(
            listed.lines().any(|l| l.starts_with("fm-client\tEXTERNAL\ttrue\t") && l.contains("CN=fm-client")),
            "no EXTERNAL TLS connection as fm-client ({cert}/{key}) in:\n{listed}"
        );
        assert!(queue.name().as_str().starts_with("amq.gen-"));
        conn.close(200, "bye".into()).await.unwrap();
    }
}

/// The negative material the TLS tests rely on is really refused, and for the reason its name says.
#[tokio::test]
async fn tls_refuses_untrusted_expired_and_unknown_certificates() {
    let Some(b) = broker() else { return };
    for (cert, key) in [
        ("other-client.pem", "other-client.key"),
        ("expired-client.pem", "expired-client.key"),
    ] {
        let err = b.connect_tls(cert, key).await.err();
        assert!(err.is_some(), "the node accepted {cert}");
    }
    // A valid certificate whose CN is no RabbitMQ user: TLS succeeds, EXTERNAL login does not.
    assert!(
        b.connect_tls("stranger.pem", "stranger.key").await.is_err(),
        "fm-stranger logged in"
    );
    // The server certificate names localhost and 127.0.0.1, not 127.0.0.2 (same listener).
    let err = lapin::Connection::connect_with_config(
        &format!(
            "{}?auth_mechanism=external",
            b.amqps_url_with_host("127.0.0.2")
        ),
        lapin::ConnectionProperties::default(),
        b.tls_config("ca.pem", "client.pem", "client.key"),
        lapin::runtime::default_runtime().unwrap(),
    )
    .await
    .expect_err("127.0.0.2 is not in the server certificate");
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    // The control: the same client succeeds on the right host, so the failures above are real.
    b.connect_tls("client.pem", "client.key")
        .await
        .expect("the good client certificate");
}

/// Restarts go through scripts/broker on a node of the test's own (stopping the shared node would
/// cut every test running in parallel): a durable queue and its persistent message survive.
#[tokio::test]
async fn a_node_restart_keeps_durable_messages() {
    let Some(b) = broker() else { return };
    let node = b.extra_node("restart");
    let queue = node.unique("durable");
    node.declare_queue(&queue).await;
    node.publish_json(
        "",
        &queue,
        &serde_json::json!({"kept": true}),
        FieldTable::default(),
        "id-r",
    )
    .await;
    let conn = node.connect().await;

    node.stop_node().await;
    crate::util::eventually(crate::util::TIMEOUT, async || {
        match conn.status().connected() {
            false => Ok(()),
            true => Err("the stop did not close the client's connection"),
        }
    })
    .await;
    node.start_node().await;

    assert_eq!(node.queue_depth(&queue).await, 1);
    assert_eq!(
        node.get_json(&queue).await,
        Some(serde_json::json!({"kept": true}))
    );
}

/// The command builder runs the binary cargo built, in a folder of its own, and collects its
/// output.
#[tokio::test]
async fn the_fm_builder_runs_the_built_binary() {
    let out = Fm::new().arg("--help").run().await;
    out.assert_code(0);
    assert!(out.stdout.contains("Usage:"), "{}", out.stdout);
    assert!(out.stdout.contains("consume"), "{}", out.stdout);
}

/// C test plugins compile against include/fm_plugin.h, once per source.
#[test]
fn c_plugins_compile_against_the_plugin_header() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("smoke_plugin.c");
    std::fs::write(
        &src,
        "#include \"fm_plugin.h\"\nint smoke_plugin_marker = 42;\n",
    )
    .unwrap();
    let so = build_c_plugin(&src);
    assert!(so.is_file(), "{}", so.display());
    assert_eq!(
        build_c_plugin(&src),
        so,
        "the second build reuses the first"
    );
}

/// `scripts/test --full` starts a 3-node cluster: all three nodes run as one cluster, and a
/// queue declared on one node is visible from another.
#[tokio::test]
async fn the_full_run_cluster_has_three_running_nodes() {
    let Some(nodes) = cluster() else { return };
    assert_eq!(nodes.len(), 3);
    let status = nodes[0]
        .rabbitmqctl(&["-q", "cluster_status", "--formatter", "json"])
        .await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let mut running: Vec<&str> = status["running_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    running.sort_unstable();
    let mut expected: Vec<&str> = nodes.iter().map(|n| n.node()).collect();
    expected.sort_unstable();
    assert_eq!(running, expected);

    let queue = nodes[0].unique("cluster");
    nodes[0].declare_queue(&queue).await;
    assert!(nodes[2].queue_exists(&queue).await);
    nodes[1].delete_queue(&queue).await;
}
