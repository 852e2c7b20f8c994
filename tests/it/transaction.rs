//! Issue 14: `fm publish --transaction FILE`: every message reaches the broker, or none does.

use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use crate::util::peer::{exchange_and_queue, queue_config};
use crate::util::proxy::{Mode, Proxy};
use crate::util::{self, Fm, broker};

/// 1000 record lines; line `bad` (1-based), if any, replaced by `bad_line`.
fn file(bad: Option<(usize, &str)>) -> String {
    (1..=1000)
        .map(|i| match bad {
            Some((at, line)) if at == i => format!("{line}\n"),
            _ => format!(
                "{{\"topic\": \"tx.test\", \"body\": {{\"n\": {i}}}, \"id\": \"tx-{i:04}\"}}\n"
            ),
        })
        .collect()
}

/// Without a fault the queue holds all 1000; when the 600th message is one the broker refuses
/// (a `CC` header that is not a list: 406, the channel closed), it holds none of them and fm
/// exits with 125.
#[tokio::test]
async fn a_transaction_is_all_or_nothing() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "tx").await;
    let config = queue_config(&b, &exchange, &queue);

    let refused = r#"{"topic": "tx.test", "body": {"n": 600}, "id": "tx-0600", "headers": {"CC": "not-a-list"}}"#;
    let fm = Fm::new().config_toml(&config);
    let path = fm.write_file("bad.jsonl", file(Some((600, refused))));
    let out = fm.args(["publish", "--transaction"]).arg(&path).run().await;
    out.assert_code(125);
    assert!(
        out.stderr.contains("rolled back") && out.stderr.contains("nothing was published"),
        "{}",
        out.stderr
    );
    assert_eq!(b.queue_depth(&queue).await, 0);

    // An invalid line mid-file rolls back too.
    let fm = Fm::new().config_toml(&config);
    let path = fm.write_file("invalid.jsonl", file(Some((600, "{\"topic\": 5}"))));
    let out = fm.args(["publish", "--transaction"]).arg(&path).run().await;
    out.assert_code(125);
    assert!(out.stderr.contains("line 600"), "{}", out.stderr);
    assert_eq!(b.queue_depth(&queue).await, 0);

    // An exchange that does not exist: 404 on the first message.
    let fm = Fm::new().config_toml(&config);
    let path = fm.write_file("good.jsonl", file(None));
    let missing = b.unique("tx-missing");
    let out = fm
        .args(["publish", "--transaction", "--exchange", &missing])
        .arg(&path)
        .run()
        .await;
    out.assert_code(125);
    assert!(out.stderr.contains("404"), "{}", out.stderr);

    let fm = Fm::new().config_toml(&config);
    let path = fm.write_file("good.jsonl", file(None));
    fm.args(["publish", "--transaction"])
        .arg(&path)
        .run()
        .await
        .assert_code(0);
    b.wait_for_depth(&queue, 1000).await;
}

/// The connection closed mid-transaction (after the broker holds 600 uncommitted messages):
/// nothing is published, exit 125.
#[tokio::test]
async fn a_connection_lost_mid_transaction_publishes_nothing() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "tx-cut").await;
    let proxy = Proxy::start(b.amqp_port()).await;
    let config = queue_config(&b, &exchange, &queue).replacen(
        b.url(),
        &proxy.url_for(b.url(), b.amqp_port()),
        1,
    );
    let text = file(None);
    let all: Vec<&str> = text.lines().collect();
    // Standard input: the first 600 lines now, the rest after the cut.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), &config).unwrap();
    let mut child = tokio::process::Command::new(util::fm_bin())
        .args(["--conf", "config.toml", "publish", "--transaction", "-"])
        .current_dir(dir.path())
        .env_remove("FEDORA_MESSAGING_CONF")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all((all[..600].join("\n") + "\n").as_bytes())
        .await
        .unwrap();
    util::eventually(Duration::from_secs(30), async || {
        let channels = b
            .rabbitmqctl(&["list_channels", "messages_uncommitted", "--quiet"])
            .await;
        if channels.lines().any(|l| l.trim() == "600") {
            Ok(())
        } else {
            Err(channels)
        }
    })
    .await;
    proxy.set(Mode::Down);
    let _ = stdin
        .write_all((all[600..].join("\n") + "\n").as_bytes())
        .await;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("fm ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("rolled back"), "{stderr}");
    assert_eq!(b.queue_depth(&queue).await, 0);
}

/// Connecting fails as with plain `fm publish` (and `fm call`, which connects the same way): a
/// broker not reached within `--timeout` is 111, a refused login 1; either way nothing was
/// published, and fm says so.
#[tokio::test]
async fn no_broker_is_111_and_a_refused_login_1_before_anything_is_published() {
    let Some(b) = broker() else { return };
    let cases = [
        (
            "amqp://guest:guest@127.0.0.1:1/%2F".to_owned(),
            111,
            "unreachable",
        ),
        (
            b.url().replacen("guest:guest@", "guest:wrong@", 1),
            1,
            "refused the login",
        ),
    ];
    for (url, code, says) in cases {
        let fm = Fm::new().config_toml(&format!("amqp_url = \"{url}\"\n"));
        let path = fm.write_file("good.jsonl", file(None));
        let out = fm
            .args(["publish", "--transaction", "--timeout", "5"])
            .arg(&path)
            .run()
            .await;
        out.assert_code(code);
        assert!(
            out.stderr.contains(says) && out.stderr.contains("nothing was published"),
            "{}",
            out.stderr
        );
    }
}
