//! Issue 14: publishing that never blocks and never loses — `fm publish --spool` and
//! `fm relay`, with real processes against a real broker, every count checked by message id.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_lite::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use crate::util::peer::{exchange_and_queue, queue_config};
use crate::util::{self, Broker, Fm, FmProcess, broker};

/// `n` record lines of writer `w`, ids `w{w}-{first + i}` (zero-padded).
fn lines(w: usize, first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| {
            format!(
                "{{\"topic\": \"spool.test\", \"body\": {{\"n\": {i}}}, \"id\": \"w{w}-{i:06}\"}}\n"
            )
        })
        .collect()
}

/// `fm publish --spool DIR FILE` (FILE written in the run's folder); returns the output.
async fn spool_file(config: &str, dir: &Path, text: &str, extra: &[&str]) -> util::FmOutput {
    let fm = Fm::new().config_toml(config);
    let file = fm.write_file("in.jsonl", text);
    fm.arg("publish")
        .arg(&file)
        .arg(format!("--spool={}", dir.display()))
        .args(extra)
        .run()
        .await
}

/// `fm relay --spool DIR`.
fn relay(config: &str, dir: &Path) -> FmProcess {
    Fm::new()
        .config_toml(config)
        .args(["relay", "--spool"])
        .arg(dir)
        .spawn()
}

/// Every message id that arrives on `queue` until `n` have, or `within` passes (consumed, and
/// acked, by a consumer of its own).
async fn collect_ids(b: &Broker, queue: &str, n: usize, within: Duration) -> Vec<String> {
    let conn = b.connect().await;
    let chan = conn.create_channel().await.unwrap();
    chan.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = chan
        .basic_consume(
            queue.into(),
            "spool-test".into(),
            // Acked one by one: what arrives beyond `n` goes back to the queue when the
            // connection closes.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    let deadline = Instant::now() + within;
    while ids.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                ids.push(util::message_id(&d));
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            _ => break,
        }
    }
    let _ = conn.close(200, "done".into()).await;
    ids
}

/// Checks `got` against the `expected` ids of each writer: none lost, each writer's order
/// kept (by first arrival); returns the number of duplicates.
fn check_delivery(got: &[String], expected: &BTreeMap<String, Vec<String>>) -> usize {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut firsts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in got {
        let count = seen.entry(id.as_str()).or_default();
        *count += 1;
        if *count == 1 {
            let writer = id.split('-').next().unwrap_or_default().to_owned();
            firsts.entry(writer).or_default().push(id.clone());
        }
    }
    let duplicates = got.len() - seen.len();
    for (writer, ids) in expected {
        let arrived = firsts.get(writer).cloned().unwrap_or_default();
        let lost: Vec<&String> = ids
            .iter()
            .filter(|i| !seen.contains_key(i.as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "writer {writer}: {} of {} lost, first {:?}",
            lost.len(),
            ids.len(),
            lost.first()
        );
        assert_eq!(&arrived, ids, "writer {writer}: its order was not kept");
    }
    let foreign = seen.len() - expected.values().map(Vec::len).sum::<usize>();
    assert_eq!(foreign, 0, "messages nobody spooled arrived");
    duplicates
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A call refused for a full disk: exit status 28, the OS's words, and the promise that
/// nothing of it was spooled.
fn assert_full_and_nothing_spooled(out: &util::FmOutput) {
    out.assert_code(28);
    assert!(
        out.stderr.contains("No space left on device")
            && out.stderr.contains("nothing was spooled"),
        "{}",
        out.stderr
    );
}

/// A small tmpfs, unmounted when dropped: a disk that fills up on cue. Mounting needs root;
/// without it the test is skipped (it fails under CI=true).
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Tmpfs {
                path: dir.path().to_owned(),
                _dir: dir,
            }),
            other => {
                util::skip(&format!(
                    "cannot mount a {size} tmpfs (needs root): {other:?}"
                ));
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// The acceptance test: the broker stopped, 8 writer processes enqueue 10,000 messages (every
/// call returns 0), the broker started, the relay delivers them all, each writer's order kept,
/// no duplicate.
#[tokio::test]
async fn writers_enqueue_while_the_broker_is_down_and_the_relay_delivers_everything() {
    let Some(b) = broker() else { return };
    let node = b.extra_node("spool-down");
    let (exchange, queue) = exchange_and_queue(&node, "spool-down").await;
    let config = queue_config(&node, &exchange, &queue);
    let spool = tempfile::tempdir().unwrap();
    node.stop_node().await;

    let (writers, calls, per_call) = (8, 10, 125);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut expected = BTreeMap::new();
    for w in 0..writers {
        let ids: Vec<String> = (0..calls * per_call)
            .map(|i| format!("w{w}-{i:06}"))
            .collect();
        expected.insert(format!("w{w}"), ids);
        let (config, dir) = (config.clone(), spool.path().to_owned());
        tasks.push(tokio::spawn(async move {
            for c in 0..calls {
                let out = spool_file(&config, &dir, &lines(w, c * per_call, per_call), &[]).await;
                out.assert_code(0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let enqueue = started.elapsed();
    let batches = files_in(&spool.path().join("queue"));
    assert_eq!(batches.len(), writers * calls, "{batches:?}");

    node.start_node().await;
    let started = Instant::now();
    let mut fm = relay(&config, spool.path());
    let got = collect_ids(&node, &queue, 10_000, Duration::from_secs(120)).await;
    let took = started.elapsed();
    // The relay deletes a batch once confirmed: the queue folder empties.
    util::eventually(Duration::from_secs(30), async || {
        match files_in(&spool.path().join("queue")).len() {
            0 => Ok(()),
            n => Err(format!("{n} batches left")),
        }
    })
    .await;
    fm.kill("TERM");
    let duplicates = check_delivery(&got, &expected);
    assert_eq!(duplicates, 0, "no crash, no duplicate");
    eprintln!(
        "spool: 8 writers enqueued 10,000 messages in {enqueue:.1?} (broker down); the relay \
         delivered them in {took:.1?}, 0 lost, 0 duplicates"
    );
    let _ = fm.wait_timeout(Duration::from_secs(10)).await;
}

/// The relay SIGKILLed three times while it delivers 10,000 messages, restarted each time:
/// nothing lost, each writer's order kept, at most the window (1000) sent twice per kill.
#[tokio::test]
async fn a_relay_killed_three_times_loses_nothing() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "spool-kill").await;
    let config = queue_config(&b, &exchange, &queue);
    let spool = tempfile::tempdir().unwrap();
    let mut expected = BTreeMap::new();
    for w in 0..4 {
        expected.insert(
            format!("w{w}"),
            (0..2500)
                .map(|i| format!("w{w}-{i:06}"))
                .collect::<Vec<_>>(),
        );
        for c in 0..5 {
            spool_file(&config, spool.path(), &lines(w, c * 500, 500), &[])
                .await
                .assert_code(0);
        }
    }
    let mut kills = Vec::new();
    for at in [2000, 4500, 7000] {
        let fm = relay(&config, spool.path());
        util::eventually(Duration::from_secs(60), async || {
            match b.queue_depth(&queue).await {
                d if d as usize >= at => Ok(()),
                d => Err(format!("queue holds {d}, waiting for {at}")),
            }
        })
        .await;
        fm.kill("KILL");
        let mut fm = fm;
        fm.wait_timeout(Duration::from_secs(10)).await;
        kills.push(b.queue_depth(&queue).await);
    }
    let mut fm = relay(&config, spool.path());
    let got = collect_ids(&b, &queue, 10_000, Duration::from_secs(60)).await;
    // Whatever else arrives (duplicates after the last kill) within a moment.
    let mut got = got;
    util::eventually(Duration::from_secs(30), async || {
        match files_in(&spool.path().join("queue")).len() {
            0 => Ok(()),
            n => Err(format!("{n} batches left")),
        }
    })
    .await;
    got.extend(collect_ids(&b, &queue, usize::MAX, Duration::from_secs(2)).await);
    fm.kill("TERM");
    let duplicates = check_delivery(&got, &expected);
    assert!(
        duplicates <= 3 * fm::relay::WINDOW,
        "{duplicates} duplicates after 3 kills"
    );
    eprintln!(
        "spool: relay SIGKILLed 3 times (queue depth at the kills: {kills:?}); 10,000 delivered, \
         0 lost, {duplicates} duplicates (at most {} allowed)",
        3 * fm::relay::WINDOW
    );
    let _ = fm.wait_timeout(Duration::from_secs(10)).await;
}

/// Writers SIGKILLed while they enqueue: nothing of theirs is ever published; what they left
/// in tmp/ is never read; the writers that finished are delivered whole.
#[tokio::test]
async fn writers_killed_mid_enqueue_publish_nothing_partial() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "spool-wkill").await;
    let config = queue_config(&b, &exchange, &queue);
    let spool = tempfile::tempdir().unwrap();
    // A finished writer.
    spool_file(&config, spool.path(), &lines(0, 0, 300), &[])
        .await
        .assert_code(0);
    // Writers fed from a pipe that never ends, killed while they write.
    let mut killed = Vec::new();
    for w in 1..=3 {
        let fm = Fm::new()
            .config_toml(&config)
            .args(["publish", "-"])
            .arg(format!("--spool={}", spool.path().display()))
            .stdin(lines(w, 0, 20_000))
            .spawn();
        killed.push(fm);
    }
    util::eventually(Duration::from_secs(30), async || {
        match files_in(&spool.path().join("tmp")).len() {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} writers writing")),
        }
    })
    .await;
    for fm in &killed {
        fm.kill("KILL");
    }
    for mut fm in killed {
        fm.wait_timeout(Duration::from_secs(10)).await;
    }
    let mut fm = relay(&config, spool.path());
    let got = collect_ids(&b, &queue, 300, Duration::from_secs(30)).await;
    let late = collect_ids(&b, &queue, usize::MAX, Duration::from_secs(2)).await;
    fm.kill("TERM");
    let mut expected = BTreeMap::new();
    expected.insert(
        "w0".to_owned(),
        (0..300).map(|i| format!("w0-{i:06}")).collect::<Vec<_>>(),
    );
    assert_eq!(check_delivery(&got, &expected), 0);
    assert!(late.is_empty(), "{} messages of killed writers", late.len());
    // Their leftovers are still in tmp/ (younger than a minute), never in queue/.
    assert!(files_in(&spool.path().join("queue")).is_empty());
    let _ = fm.wait_timeout(Duration::from_secs(10)).await;
}

/// Files in queue/ that are not batches (a stranger's name; a batch name with garbage in it;
/// a batch with one line that is not a message) are moved aside with a log line; the rest is
/// delivered; /ready and /metrics tell.
#[tokio::test]
async fn garbage_in_the_spool_is_moved_aside_and_the_rest_delivered() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "spool-garbage").await;
    let config =
        queue_config(&b, &exchange, &queue) + "\n[monitoring]\naddress = \"127.0.0.1\"\nport = 0\n";
    let spool = tempfile::tempdir().unwrap();
    spool_file(&config, spool.path(), &lines(0, 0, 10), &[])
        .await
        .assert_code(0);
    let q = spool.path().join("queue");
    std::fs::write(q.join("garbage.txt"), "not a batch\n").unwrap();
    std::fs::write(
        q.join("00000000000000000001-5-1.batch"),
        b"\xff\xfe binary\n",
    )
    .unwrap();
    spool_file(&config, spool.path(), &lines(0, 10, 10), &[])
        .await
        .assert_code(0);
    // A batch whose third line was damaged after it was spooled.
    let third = files_in(&q)
        .into_iter()
        .rfind(|n| n.ends_with(".batch") && !n.starts_with("00000000000000000001"))
        .unwrap();
    let path = q.join(&third);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut damaged: Vec<String> = text.lines().map(str::to_owned).collect();
    damaged[3] = "{\"topic\": 5}".to_owned();
    std::fs::write(&path, damaged.join("\n") + "\n").unwrap();

    let mut fm = relay(&config, spool.path());
    let addr = fm.monitor_addr().await;
    let got = collect_ids(&b, &queue, 19, Duration::from_secs(30)).await;
    let mut expected = BTreeMap::new();
    expected.insert(
        "w0".to_owned(),
        (0..20)
            .filter(|&i| i != 12)
            .map(|i| format!("w0-{i:06}"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(check_delivery(&got, &expected), 0);
    let bad = spool.path().join("bad");
    util::eventually(Duration::from_secs(10), async || {
        let files = files_in(&bad);
        if files.len() == 3 {
            Ok(())
        } else {
            Err(format!("{files:?}"))
        }
    })
    .await;
    assert!(bad.join("garbage.txt").is_file());
    assert!(bad.join("00000000000000000001-5-1.batch").is_file());
    let kept = std::fs::read_to_string(bad.join(format!("{third}.lines"))).unwrap();
    assert_eq!(kept, "{\"topic\": 5}\n");
    fm.wait_for_stderr("moved aside").await;

    let ready = util::eventually(Duration::from_secs(10), async || {
        let body = get(addr, "/ready").await;
        if body.contains("\"depth\": 0,") && body.contains("\"sent\": 19") {
            Ok(body)
        } else {
            Err(body)
        }
    })
    .await;
    assert!(ready.starts_with("{\"relaying\": true"), "{ready}");
    assert!(ready.contains("\"quarantined\": 3}"), "{ready}");
    let metrics = get(addr, "/metrics").await;
    for line in [
        "fm_spool_depth_messages 0\n",
        "fm_spool_sent_total 19\n",
        "fm_spool_failed_total 0\n",
        "fm_spool_quarantined_total 3\n",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    fm.kill("TERM");
    let out = fm.wait().await;
    out.assert_code(0);
}

/// The body of `GET path` (HTTP/1.0, the connection closes after the answer).
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(out)
}

/// What the broker returns (unroutable) or refuses goes to the failed area with why, in the
/// record format; `fm publish` replays it after the fix; a second relay is refused.
#[tokio::test]
async fn refused_messages_go_to_the_failed_area_and_a_second_relay_is_refused() {
    let Some(b) = broker() else { return };
    let (exchange, queue) = exchange_and_queue(&b, "spool-failed").await;
    let config = queue_config(&b, &exchange, &queue);
    let spool = tempfile::tempdir().unwrap();
    let missing = b.unique("spool-no-such-exchange");
    spool_file(&config, spool.path(), &lines(0, 0, 5), &[])
        .await
        .assert_code(0);
    // An exchange that does not exist: the broker closes the channel (404).
    spool_file(
        &config,
        spool.path(),
        &lines(1, 0, 3),
        &["--exchange", &missing],
    )
    .await
    .assert_code(0);
    spool_file(&config, spool.path(), &lines(0, 5, 5), &[])
        .await
        .assert_code(0);

    let mut fm = relay(&config, spool.path());
    fm.wait_for_stderr(fm::relay::RELAYING).await;
    let second = relay(&config, spool.path()).wait().await;
    second.assert_code(1);
    assert!(
        second
            .stderr
            .contains(&format!("another fm relay (pid {})", fm.pid())),
        "{}",
        second.stderr
    );

    util::eventually(Duration::from_secs(30), async || {
        match files_in(&spool.path().join("queue")).len() {
            0 => Ok(()),
            n => Err(format!(
                "{n} batches left; the relay's log:\n{}",
                fm.stderr()
            )),
        }
    })
    .await;
    let got = collect_ids(&b, &queue, usize::MAX, Duration::from_secs(2)).await;
    let mut expected = BTreeMap::new();
    expected.insert(
        "w0".to_owned(),
        (0..10).map(|i| format!("w0-{i:06}")).collect::<Vec<_>>(),
    );
    // What was in flight when the broker closed the channel may be sent twice (at-least-once).
    let duplicates = check_delivery(&got, &expected);
    assert!(duplicates <= 5, "{duplicates} duplicates: {got:?}");
    let failed = spool.path().join("failed");
    let record = util::eventually(Duration::from_secs(30), async || {
        let files = files_in(&failed);
        let jsonl: Vec<PathBuf> = files
            .iter()
            .filter(|f| f.ends_with(".jsonl"))
            .map(|f| failed.join(f))
            .collect();
        match jsonl.first() {
            Some(p) if std::fs::read_to_string(p).unwrap().lines().count() == 3 => Ok(p.clone()),
            _ => Err(format!("{files:?}")),
        }
    })
    .await;
    let reasons = std::fs::read_to_string(record.with_extension("reasons")).unwrap();
    assert_eq!(reasons.lines().count(), 3, "{reasons}");
    assert!(reasons.contains("404"), "{reasons}");
    assert!(files_in(&spool.path().join("queue")).is_empty());
    fm.kill("TERM");
    fm.wait().await.assert_code(0);

    // The fix: publish the failed file to the right exchange.
    let fm = Fm::new().config_toml(&config);
    fm.arg("publish").arg(&record).run().await.assert_code(0);
    let replayed = collect_ids(&b, &queue, 3, Duration::from_secs(10)).await;
    assert_eq!(replayed, ["w1-000000", "w1-000001", "w1-000002"]);
}

/// A spool on a tiny file system that fills up: the writer fails with exit status 28 and a
/// clear message, leaves nothing half-written, and the relay delivers what was spooled.
#[tokio::test]
async fn a_full_spool_fails_clearly_and_what_was_spooled_is_delivered() {
    let Some(b) = broker() else { return };
    let Some(mount) = Tmpfs::mount("64k") else {
        return;
    };
    let (exchange, queue) = exchange_and_queue(&b, "spool-full").await;
    let config = queue_config(&b, &exchange, &queue);
    let mut expected = Vec::new();
    let mut failure = None;
    for c in 0..100 {
        let out = spool_file(&config, &mount.path, &lines(0, c * 50, 50), &[]).await;
        match out.code() {
            Some(0) => expected.extend((c * 50..c * 50 + 50).map(|i| format!("w0-{i:06}"))),
            _ => {
                failure = Some(out);
                break;
            }
        }
    }
    let out = failure.expect("a 64 KiB spool fills up");
    assert_full_and_nothing_spooled(&out);
    assert!(
        files_in(&mount.path.join("tmp")).is_empty(),
        "nothing half-written"
    );
    assert!(!expected.is_empty());
    let fm = relay(&config, &mount.path);
    let got = collect_ids(&b, &queue, expected.len(), Duration::from_secs(30)).await;
    fm.kill("TERM");
    let mut want = BTreeMap::new();
    want.insert("w0".to_owned(), expected);
    assert_eq!(check_delivery(&got, &want), 0);
    fm.wait().await.assert_code(0);
}

/// The first batch of a spool creates its clock file. When the disk fills up just then (the
/// batch took the last page), the call fails with nothing spooled, and says so truly: the
/// clock is written before the batch is renamed into `queue/`, never after.
#[tokio::test]
async fn a_disk_full_at_the_first_clock_write_spools_nothing() {
    let Some(mount) = Tmpfs::mount("8k") else {
        return;
    };
    // One of the two pages: the batch takes the other, and the clock finds none.
    let filler = mount.path.join("filler");
    std::fs::write(&filler, vec![0u8; 4096]).unwrap();
    let spool = mount.path.join("spool");
    std::fs::create_dir(&spool).unwrap();
    // No broker: spooling never talks to one.
    let config = "amqp_url = \"amqp://127.0.0.1:1/%2F\"\n";
    let out = spool_file(config, &spool, &lines(0, 0, 1), &[]).await;
    assert_full_and_nothing_spooled(&out);
    assert_eq!(files_in(&spool.join("queue")), Vec::<String>::new());
    assert_eq!(files_in(&spool.join("tmp")), Vec::<String>::new());

    // With room again, the same call spools its batch.
    std::fs::remove_file(&filler).unwrap();
    spool_file(config, &spool, &lines(0, 0, 1), &[])
        .await
        .assert_code(0);
    assert_eq!(files_in(&spool.join("queue")).len(), 1);
}
