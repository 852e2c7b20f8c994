//! Telling systemd how fm is doing: `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`.
//!
//! The unit `fm-consumer@.service` is `Type=notify`, so systemd considers fm started only once
//! fm says `READY=1` — after every consumer is registered with the broker, not when the
//! process starts — and `systemctl status` shows the `STATUS=` line (broker, queues, messages
//! handled). `STOPPING=1` is sent when a stop is asked for and the drain starts.
//!
//! The watchdog exists for fedora-messaging's worst failure: a consumer that is "connected"
//! but receives nothing (its issues #208, #574; anitya #1993), which no exit code reveals.
//! When the unit sets `WatchdogSec=`, fm pings `WATCHDOG=1` only while the *health tick* keeps
//! finding the consumer healthy: the connection and every consumer channel open, the consume
//! session running, and the broker answering a round trip that shows each queue still has a
//! consumer. The tick runs on the async runtime and the pings come from a separate thread that
//! only looks at when the tick last succeeded, so a broker that is down, a connection that hangs
//! without closing, a consumer the broker forgot, and a stuck runtime all stop the pings, and
//! systemd restarts fm (`Restart=on-failure`).
//!
//! The protocol is a datagram per message to the socket named by `NOTIFY_SOCKET` (a path, or
//! `@name` for the Linux abstract namespace), see sd_notify(3). It is a few lines of std, so fm
//! needs no crate (and no `unsafe`) for it. Without `NOTIFY_SOCKET` (not under systemd, or
//! `Type=simple`) nothing is sent and no thread is started.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionStatus};
use tokio_util::sync::CancellationToken;

use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// How often the health tick runs when systemd's watchdog is off (it still feeds
/// `fm_last_healthy_timestamp_seconds`).
const TICK_WITHOUT_WATCHDOG: Duration = Duration::from_secs(15);
/// The health tick never runs more often than this, whatever `WatchdogSec=` says.
const TICK_MIN: Duration = Duration::from_millis(100);
/// How often the `STATUS=` line is refreshed at most (message counts change all the time).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A socket to the service manager.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for; `None` when it is not set.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(v.as_encoded_bytes()).map(Some),
        }
    }

    /// A notifier for the socket `name`: an absolute path, or `@name` (abstract namespace).
    pub fn new(name: &[u8]) -> io::Result<Notifier> {
        let addr = match name.first() {
            Some(b'/') => {
                use std::os::unix::ffi::OsStrExt;
                SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(name))?
            }
            #[cfg(target_os = "linux")]
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&name[1..])?
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={} is not an absolute path or an @abstract name",
                        String::from_utf8_lossy(name)
                    ),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        // Never wait on the service manager: a message it has no room for is dropped (and
        // the next STATUS or WATCHDOG supersedes it).
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, addr })
    }

    /// Send one notification: `KEY=VALUE` lines.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket.send_to_addr(message.as_bytes(), &self.addr)?;
        Ok(())
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if it is meant for this process
/// (`WATCHDOG_PID` absent or equal to its pid), as sd_watchdog_enabled(3) decides.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// How often the health tick runs: four times per watchdog interval, so a healthy fm always has
/// a fresh mark when the pinger looks.
pub fn health_interval() -> Duration {
    watchdog_interval().map_or(TICK_WITHOUT_WATCHDOG, |w| (w / 4).max(TICK_MIN))
}

/// The running notifier: a task for READY/STATUS/STOPPING and, with a watchdog, a thread for
/// the pings. [`Running::finish`] ends both.
pub struct Running {
    notifier: Arc<Notifier>,
    stopping: Stopping,
    task: tokio::task::JoinHandle<()>,
    /// Dropping it wakes the pinger, which then ends.
    pinger_stop: Option<mpsc::Sender<()>>,
    pinger: Option<std::thread::JoinHandle<()>>,
}

/// Whether `STOPPING=1` was sent. The pinger holds the lock while it decides and sends, so no
/// `WATCHDOG=1` can follow `STOPPING=1`.
type Stopping = Arc<Mutex<bool>>;

/// Start notifying systemd, if `NOTIFY_SOCKET` is set. `target` names the brokers for the
/// status line before the first connection.
pub fn start(stats: Arc<Stats>, shutdown: Shutdown, target: String) -> Option<Running> {
    let notifier = match Notifier::from_env() {
        Ok(Some(n)) => Arc::new(n),
        Ok(None) => return None,
        Err(err) => {
            tracing::warn!("not notifying systemd: {err}");
            return None;
        }
    };
    let stopping = Stopping::default();
    let (pinger_stop, pinger) = match watchdog_interval() {
        None => (None, None),
        Some(every) => {
            tracing::debug!(
                "systemd watchdog every {:.3} s; health tick every {:.3} s",
                every.as_secs_f64(),
                health_interval().as_secs_f64()
            );
            let (tx, rx) = mpsc::channel();
            let (notifier, stats, stopping) = (
                Arc::clone(&notifier),
                Arc::clone(&stats),
                Arc::clone(&stopping),
            );
            let thread = std::thread::Builder::new()
                .name("fm-watchdog".into())
                .spawn(move || ping_while_healthy(&notifier, &stats, &stopping, &rx, every))
                .expect("spawning the watchdog thread");
            (Some(tx), Some(thread))
        }
    };
    let task = tokio::spawn(report(
        Arc::clone(&notifier),
        stats,
        shutdown,
        target,
        Arc::clone(&stopping),
    ));
    Some(Running {
        notifier,
        stopping,
        task,
        pinger_stop,
        pinger,
    })
}

impl Running {
    /// fm is about to exit: say `STOPPING=1` if it was not said yet, stop the task and the
    /// pinger.
    pub async fn finish(self) {
        self.task.abort();
        send_stopping(&self.notifier, &self.stopping, "stopping");
        drop(self.pinger_stop);
        if let Some(pinger) = self.pinger {
            let _ = tokio::task::spawn_blocking(move || pinger.join()).await;
        }
    }
}

fn send(notifier: &Notifier, message: &str) {
    if let Err(err) = notifier.send(message) {
        tracing::debug!("notifying systemd ({message:?}): {err}");
    }
}

fn send_stopping(notifier: &Notifier, stopping: &Mutex<bool>, status: &str) {
    let mut sent = stopping.lock().unwrap_or_else(|e| e.into_inner());
    if !*sent {
        *sent = true;
        send(notifier, &format!("STOPPING=1\nSTATUS={status}\n"));
    }
}

/// The pinger thread: every half interval, `WATCHDOG=1` if the health tick succeeded within
/// the last half interval. Once stopping, no more pings (systemd's stop timeout applies then).
/// Ends when `stop` is dropped.
fn ping_while_healthy(
    notifier: &Notifier,
    stats: &Stats,
    stopping: &Mutex<bool>,
    stop: &mpsc::Receiver<()>,
    every: Duration,
) {
    let half = every / 2;
    let period = half.min(Duration::from_millis(500)).max(TICK_MIN / 2);
    let mut was_healthy = true;
    loop {
        {
            let stopping = stopping.lock().unwrap_or_else(|e| e.into_inner());
            if *stopping {
                return;
            }
            let age = stats.healthy_age();
            let healthy = age.is_some_and(|age| age <= half);
            if healthy {
                send(notifier, "WATCHDOG=1\n");
            } else if was_healthy && let Some(age) = age {
                tracing::warn!(
                    "the consumer has not been healthy for {:.1} s: no longer pinging \
                     systemd's watchdog (it restarts fm after {:.1} s without a ping)",
                    age.as_secs_f64(),
                    every.as_secs_f64()
                );
            }
            was_healthy = healthy;
        }
        match stop.recv_timeout(period) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// The task: `READY=1` the first time fm is consuming, a `STATUS=` line whenever something
/// changes (at most every [`STATUS_EVERY`]), `STOPPING=1` when a stop is asked for.
async fn report(
    notifier: Arc<Notifier>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    target: String,
    stopping: Stopping,
) {
    let mut changes = stats.subscribe();
    let mut ready = false;
    let mut last = String::new();
    loop {
        if shutdown.is_triggered() {
            let status = status_line(&stats, &shutdown, &target);
            send_stopping(&notifier, &stopping, &status);
            return;
        }
        let status = status_line(&stats, &shutdown, &target);
        if !ready && stats.consuming() {
            ready = true;
            send(&notifier, &format!("READY=1\nSTATUS={status}\n"));
            last = status;
        } else if status != last {
            send(&notifier, &format!("STATUS={status}\n"));
            last = status;
        }
        tokio::select! {
            _ = shutdown.triggered() => {}
            r = changes.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(STATUS_EVERY) => {}
        }
    }
}

/// The line `systemctl status` shows.
pub fn status_line(stats: &Stats, shutdown: &Shutdown, target: &str) -> String {
    if stats.spool.is_active() {
        return relay_status_line(stats, shutdown, target);
    }
    let handled = format!(
        "{} messages handled ({} acked, {} requeued, {} dropped, {} failed, {} invalid)",
        Stats::get(&stats.processed)
            + Stats::get(&stats.rejected)
            + Stats::get(&stats.dropped)
            + Stats::get(&stats.failed)
            + Stats::get(&stats.invalid),
        Stats::get(&stats.processed),
        Stats::get(&stats.rejected),
        Stats::get(&stats.dropped),
        Stats::get(&stats.failed),
        Stats::get(&stats.invalid),
    );
    if shutdown.is_triggered() {
        let in_flight = Stats::get(&stats.in_flight);
        return format!("stopping: {in_flight} messages in flight; {handled}");
    }
    match stats.broker() {
        Some(broker) if stats.consuming() => {
            let queues: Vec<String> = stats.queues().iter().map(|q| q.broker_name()).collect();
            format!(
                "consuming from {} on {broker}; {handled}",
                queues.join(", ")
            )
        }
        Some(broker) => format!("connected to {broker}, setting up consumers; {handled}"),
        None if Stats::get(&stats.reconnects) > 0 => format!(
            "connection lost, reconnecting to {target} (reconnections: {}); {handled}",
            Stats::get(&stats.reconnects)
        ),
        None => format!("connecting to {target}"),
    }
}

/// `fm relay`'s status line: the broker and the spool.
fn relay_status_line(stats: &Stats, shutdown: &Shutdown, target: &str) -> String {
    let spool = &stats.spool;
    let waiting = match spool.oldest_age() {
        Some(age) => format!(
            "{} spooled (oldest {:.0} s)",
            Stats::get(&spool.depth),
            age.as_secs_f64()
        ),
        None => format!("{} spooled", Stats::get(&spool.depth)),
    };
    let counts = format!(
        "{waiting}, {} sent, {} failed, {} quarantined",
        Stats::get(&spool.sent),
        Stats::get(&spool.failed),
        Stats::get(&spool.quarantined)
    );
    if shutdown.is_triggered() {
        return format!("stopping; {counts}");
    }
    match stats.broker() {
        Some(broker) if stats.consuming() => format!("relaying to {broker}; {counts}"),
        Some(broker) => format!("connected to {broker}; {counts}"),
        None => format!("connecting to {target}; {counts}"),
    }
}

/// Start the health tick for one connection's consumers; it runs until `stop` is cancelled
/// (the session ends). `consumers` are each consumer's channel and queue name on the broker.
///
/// The tick opens a channel of its own for the round trip: a failed probe closes only that
/// channel, never a consumer's.
pub async fn start_health_tick(
    connection: &Connection,
    consumers: Vec<(Channel, String)>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let every = health_interval();
    let probe = match tokio::time::timeout(probe_timeout(every), connection.create_channel()).await
    {
        Ok(Ok(channel)) => Some(channel),
        Ok(Err(err)) => {
            tracing::warn!("cannot open the health-check channel: {err}");
            None
        }
        Err(_) => {
            tracing::warn!("cannot open the health-check channel: no answer from the broker");
            None
        }
    };
    let status = connection.status().clone();
    tokio::spawn(health_tick(status, consumers, probe, stats, stop, every));
}

/// How long the broker may take to answer the probe.
fn probe_timeout(every: Duration) -> Duration {
    (every * 2).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

async fn health_tick(
    connection: ConnectionStatus,
    consumers: Vec<(Channel, String)>,
    probe: Option<Channel>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    every: Duration,
) {
    let mut problem: Option<String> = None;
    loop {
        let check = tokio::select! {
            _ = stop.cancelled() => break,
            c = check_health(&connection, &consumers, probe.as_ref(), probe_timeout(every)) => c,
        };
        match check {
            Ok(()) => {
                if stop.is_cancelled() {
                    break;
                }
                stats.mark_healthy();
                if problem.take().is_some() {
                    tracing::info!("the consumer is healthy again");
                }
            }
            Err(why) => {
                if problem.as_deref() != Some(why.as_str()) {
                    tracing::warn!("health check failed: {why}");
                }
                problem = Some(why);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Some(probe) = probe
        && probe.status().connected()
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), probe.close(200, "done".into())).await;
    }
}

/// Healthy: the connection and every consumer channel are open, and the broker answers a
/// passive declare of each queue within `timeout` showing at least one consumer on it.
/// (RabbitMQ answers passive declares for any user of the vhost, even one without any
/// configure, write or read permission, so the probe works wherever consuming does.)
async fn check_health(
    connection: &ConnectionStatus,
    consumers: &[(Channel, String)],
    probe: Option<&Channel>,
    timeout: Duration,
) -> Result<(), String> {
    if !connection.connected() {
        return Err("the connection to the broker is not open".into());
    }
    if let Some((_, queue)) = consumers.iter().find(|(c, _)| !c.status().connected()) {
        return Err(format!("the channel consuming from '{queue}' is closed"));
    }
    let Some(probe) = probe.filter(|p| p.status().connected()) else {
        return Err("the health-check channel is closed".into());
    };
    for (_, queue) in consumers {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = tokio::time::timeout(
            timeout,
            probe.queue_declare(queue.as_str().into(), options, FieldTable::default()),
        )
        .await
        .map_err(|_| {
            format!(
                "the broker did not answer within {:.1} s (checking queue '{queue}')",
                timeout.as_secs_f64()
            )
        })?
        .map_err(|e| format!("checking queue '{queue}': {e}"))?;
        if declared.consumer_count() == 0 {
            return Err(format!(
                "the broker reports no consumer on queue '{queue}', though fm registered one"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str().as_encoded_bytes()).unwrap();
        n.send("READY=1\nSTATUS=hello\n").unwrap();
        let mut buf = [0; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=hello\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fm-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::new(format!("@{name}").as_bytes()).unwrap();
        n.send("WATCHDOG=1\n").unwrap();
        let mut buf = [0; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }

    #[test]
    fn a_relative_notify_socket_is_refused() {
        let err = Notifier::new(b"run/notify").err().unwrap();
        assert!(
            err.to_string().contains("NOTIFY_SOCKET=run/notify"),
            "{err}"
        );
    }

    #[test]
    fn the_status_line_says_what_fm_is_doing() {
        let stats = Stats::default();
        let shutdown = Shutdown::new();
        let target = "amqp://localhost:5672/%2F";
        assert_eq!(
            status_line(&stats, &shutdown, target),
            "connecting to amqp://localhost:5672/%2F"
        );
        stats.set_broker(Some(target));
        stats.register_queue("amq.gen-x", "");
        stats.register_queue("q2", "q2");
        stats.set_consuming(true);
        stats.count("q2", crate::stats::Counter::Received);
        stats.count("q2", crate::stats::Counter::Processed);
        assert_eq!(
            status_line(&stats, &shutdown, target),
            "consuming from amq.gen-x, q2 on amqp://localhost:5672/%2F; 1 messages handled \
             (1 acked, 0 requeued, 0 dropped, 0 failed, 0 invalid)"
        );
        stats.set_consuming(false);
        stats.set_broker(None);
        Stats::bump(&stats.reconnects);
        assert!(
            status_line(&stats, &shutdown, target)
                .starts_with("connection lost, reconnecting to amqp://localhost:5672/%2F")
        );
        shutdown.trigger(0, "SIGTERM");
        assert!(
            status_line(&stats, &shutdown, target).starts_with("stopping: 0 messages in flight")
        );
    }
}
