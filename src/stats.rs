//! Counters shared by the consume loop, the monitoring endpoint and the systemd status line.
//!
//! The process-wide names follow fedora-messaging's monitoring (`received`, `processed`,
//! `dropped`, `rejected`, `failed`, `published`), so `/ready` answers what operators already
//! scrape. On top of those, fm keeps per-queue counters and a callback-duration histogram for
//! `/metrics`, the connection state for `STATUS=` lines, and when the consumer was last seen
//! healthy, which decides whether systemd's watchdog is pinged.
//!
//! Everything is lock-free on the per-message path except one read lock to find a queue's
//! counters; registering a queue (once per connection) takes the write lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// The upper bounds (seconds) of the callback-duration histogram buckets; `+Inf` is implied.
/// From a millisecond (a plugin) to five minutes (a slow command).
pub const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Process-wide message counters and state.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages delivered that passed validation.
    pub received: AtomicU64,
    /// Messages acked after the callback handled them (including `Halt` without requeue).
    pub processed: AtomicU64,
    /// Messages dropped because the callback said `Drop` (or they were redelivered too often).
    pub dropped: AtomicU64,
    /// Messages requeued because the callback said `Nack` (or `Halt` with requeue).
    pub rejected: AtomicU64,
    /// Messages whose callback failed unexpectedly.
    pub failed: AtomicU64,
    /// Messages dropped because they failed validation (not UTF-8, not JSON, bad headers).
    /// fedora-messaging counts these nowhere, so they are not in `/ready`'s numbers.
    pub invalid: AtomicU64,
    /// Messages published (by `fm publish`).
    pub published: AtomicU64,
    /// Callbacks running right now.
    pub in_flight: AtomicU64,
    /// Reconnections after a lost connection.
    pub reconnects: AtomicU64,
    consuming: AtomicBool,
    /// The broker fm is connected to (redacted URL), if any.
    broker: Mutex<Option<String>>,
    queues: RwLock<Queues>,
    /// When the health tick last found the connection healthy: nanoseconds since [`base`],
    /// plus one (0: never).
    last_healthy: AtomicU64,
    changes: Changes,
    /// The spool, when this process is `fm relay`.
    pub spool: SpoolStats,
}

/// What `fm relay` reports about its spool (all zero, and `active` false, in other commands).
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// This process is a relay: `/ready`, `/metrics` and the status line speak of the spool.
    pub active: AtomicBool,
    /// Messages waiting in the spool (read from the batch names, every second).
    pub depth: AtomicU64,
    /// When the oldest waiting message was spooled, in ns since the epoch (0: none waits).
    pub oldest_ns: AtomicU64,
    /// Messages the broker confirmed (and that were not returned).
    pub sent: AtomicU64,
    /// Messages the broker returned or refused, moved to the failed area.
    pub failed: AtomicU64,
    /// Files and lines that were not messages, moved aside.
    pub quarantined: AtomicU64,
}

impl SpoolStats {
    /// How long the oldest waiting message has waited (`None`: none waits).
    pub fn oldest_age(&self) -> Option<Duration> {
        match self.oldest_ns.load(Relaxed) {
            0 => None,
            ns => Some(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH + Duration::from_nanos(ns))
                    .unwrap_or_default(),
            ),
        }
    }

    /// Whether this process is a relay.
    pub fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }
}

/// Which per-queue counters there are, by the name the queue has in the configuration (the
/// label in `/metrics`, stable across reconnections even for a server-named queue) and by its
/// name on the broker (what a delivery knows).
#[derive(Debug, Default)]
struct Queues {
    labelled: Vec<Arc<QueueStats>>,
    by_broker_name: HashMap<String, Arc<QueueStats>>,
}

/// The counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// The queue's name in the configuration (`""` for the server-named queue).
    pub label: String,
    /// Its name on the broker for the latest connection.
    broker_name: Mutex<String>,
    /// Messages delivered that passed validation.
    pub received: AtomicU64,
    /// Acked (`processed` in `/ready`).
    pub acked: AtomicU64,
    /// Requeued: `Nack`, or `Halt` with requeue (`rejected` in `/ready`).
    pub nacked: AtomicU64,
    /// Dropped: `Drop`, or too many redeliveries.
    pub dropped: AtomicU64,
    /// The callback failed unexpectedly.
    pub failed: AtomicU64,
    /// Invalid messages, dropped before reaching the callback.
    pub invalid: AtomicU64,
    /// How long the callback took.
    pub duration: Histogram,
}

impl QueueStats {
    /// The queue's name on the broker (for a server-named queue, the latest one).
    pub fn broker_name(&self) -> String {
        lock(&self.broker_name).clone()
    }
}

/// A Prometheus-style histogram of durations with [`DURATION_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Record one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Cumulative counts per bucket, ending with `+Inf`, as the exposition format wants them.
    pub fn cumulative(&self) -> [u64; DURATION_BUCKETS.len() + 1] {
        let mut out = [0; DURATION_BUCKETS.len() + 1];
        let mut total = 0;
        for (slot, bucket) in out.iter_mut().zip(&self.buckets) {
            total += bucket.load(Relaxed);
            *slot = total;
        }
        out
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Their sum, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        Duration::from_nanos(self.sum_nanos.load(Relaxed)).as_secs_f64()
    }
}

/// What happened to a message, for [`Stats::count`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// It passed validation and goes to the callback.
    Received,
    /// Acked.
    Processed,
    /// Requeued (`Nack`, `Halt` with requeue).
    Rejected,
    /// Dropped by the callback's choice or the redelivery limit.
    Dropped,
    /// The callback failed.
    Failed,
    /// It failed validation and was dropped.
    Invalid,
}

/// A version number bumped on every state change (consuming, broker), for whoever waits on it
/// (the systemd notifier). A newtype only because `watch::Sender` has no `Default`.
#[derive(Debug)]
struct Changes(watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Self {
        Changes(watch::Sender::new(0))
    }
}

/// The instant `last_healthy` counts from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// A poisoned lock still holds valid counters: a panic elsewhere must not stop monitoring.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A callback in flight, counted in [`Stats::in_flight`] for as long as it lives.
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Stats {
    /// Count a callback in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(&self.in_flight)
    }

    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    /// Count what happened to a message from `queue` (its name on the broker): the
    /// process-wide counter and the queue's own.
    pub fn count(&self, queue: &str, what: Counter) {
        let q = self.queue(queue);
        let (global, own) = match what {
            Counter::Received => (&self.received, &q.received),
            Counter::Processed => (&self.processed, &q.acked),
            Counter::Rejected => (&self.rejected, &q.nacked),
            Counter::Dropped => (&self.dropped, &q.dropped),
            Counter::Failed => (&self.failed, &q.failed),
            Counter::Invalid => (&self.invalid, &q.invalid),
        };
        Self::bump(global);
        Self::bump(own);
    }

    /// Record how long the callback took on a message from `queue` (its name on the broker).
    pub fn observe_callback(&self, queue: &str, took: Duration) {
        self.queue(queue).duration.observe(took);
    }

    /// Say that the configured queue `configured` is called `broker_name` on the broker for
    /// this connection (they differ for the server-named queue `""`). Counters are kept per
    /// configured queue, so they survive reconnections.
    pub fn register_queue(&self, broker_name: &str, configured: &str) {
        let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
        let entry = match queues.labelled.iter().find(|q| q.label == configured) {
            Some(q) => Arc::clone(q),
            None => {
                let q = Arc::new(QueueStats {
                    label: configured.to_owned(),
                    ..QueueStats::default()
                });
                queues.labelled.push(Arc::clone(&q));
                q
            }
        };
        *lock(&entry.broker_name) = broker_name.to_owned();
        queues.by_broker_name.insert(broker_name.to_owned(), entry);
    }

    /// The counters of the queue the broker calls `name` (created, labelled with that name, if
    /// it was never registered).
    pub fn queue(&self, name: &str) -> Arc<QueueStats> {
        if let Some(q) = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_broker_name
            .get(name)
        {
            return Arc::clone(q);
        }
        self.register_queue(name, name);
        self.queue(name)
    }

    /// Every queue's counters, in the order they were first registered.
    pub fn queues(&self) -> Vec<Arc<QueueStats>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .labelled
            .clone()
    }

    /// Whether every consumer is registered and receiving.
    pub fn consuming(&self) -> bool {
        self.consuming.load(Relaxed)
    }

    /// Record whether fm is consuming.
    pub fn set_consuming(&self, on: bool) {
        if self.consuming.swap(on, Relaxed) != on {
            self.changed();
        }
    }

    /// The broker fm is connected to (its redacted URL), if it is.
    pub fn broker(&self) -> Option<String> {
        lock(&self.broker).clone()
    }

    /// Record that fm is connected to `broker` (a redacted URL), or no longer connected.
    pub fn set_broker(&self, broker: Option<&str>) {
        *lock(&self.broker) = broker.map(str::to_owned);
        self.changed();
    }

    /// The health tick found the connection, its channels and the consumers alive.
    pub fn mark_healthy(&self) {
        let since = u64::try_from(base().elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_healthy.store(since + 1, Relaxed);
    }

    /// How long ago fm was last found healthy (`None`: never).
    pub fn healthy_age(&self) -> Option<Duration> {
        match self.last_healthy.load(Relaxed) {
            0 => None,
            n => Some(base().elapsed().saturating_sub(Duration::from_nanos(n - 1))),
        }
    }

    /// When fm was last found healthy, in seconds since the Unix epoch (`None`: never).
    pub fn last_healthy_unix(&self) -> Option<f64> {
        let age = self.healthy_age()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        Some(now.saturating_sub(age).as_secs_f64())
    }

    /// A receiver that sees a new value whenever the consuming state or the broker changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.0.subscribe()
    }

    fn changed(&self) {
        self.changes.0.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_to_the_configured_queue_across_broker_names() {
        let stats = Stats::default();
        stats.register_queue("amq.gen-1", "");
        stats.count("amq.gen-1", Counter::Received);
        // A reconnection gives the server-named queue a new name: same counters.
        stats.register_queue("amq.gen-2", "");
        stats.count("amq.gen-2", Counter::Received);
        stats.count("amq.gen-2", Counter::Processed);
        stats.count("named", Counter::Invalid);
        let queues = stats.queues();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[0].label, "");
        assert_eq!(queues[0].broker_name(), "amq.gen-2");
        assert_eq!(Stats::get(&queues[0].received), 2);
        assert_eq!(Stats::get(&queues[0].acked), 1);
        assert_eq!(queues[1].label, "named");
        assert_eq!(Stats::get(&queues[1].invalid), 1);
        assert_eq!(Stats::get(&stats.received), 2);
        assert_eq!(Stats::get(&stats.processed), 1);
        assert_eq!(Stats::get(&stats.invalid), 1);
        assert_eq!(Stats::get(&stats.dropped), 0);
    }

    #[test]
    fn the_histogram_is_cumulative_and_ends_with_the_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // <= 0.001
        h.observe(Duration::from_millis(1)); // == 0.001: bounds are inclusive
        h.observe(Duration::from_millis(200)); // <= 0.25
        h.observe(Duration::from_secs(1000)); // +Inf only
        let c = h.cumulative();
        assert_eq!(c[0], 2);
        assert_eq!(c[5], 2); // le=0.1
        assert_eq!(c[6], 3); // le=0.25
        assert_eq!(c[DURATION_BUCKETS.len() - 1], 3); // le=300
        assert_eq!(c[DURATION_BUCKETS.len()], 4); // +Inf
        assert_eq!(h.count(), 4);
        assert!((h.sum_seconds() - 1000.2015).abs() < 1e-9);
    }

    #[test]
    fn health_ages_from_the_last_mark() {
        let stats = Stats::default();
        assert_eq!(stats.healthy_age(), None);
        assert_eq!(stats.last_healthy_unix(), None);
        stats.mark_healthy();
        assert!(stats.healthy_age().unwrap() < Duration::from_secs(1));
        let unix = stats.last_healthy_unix().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - unix).abs() < 1.0);
    }

    #[test]
    fn state_changes_are_announced() {
        let stats = Stats::default();
        let mut rx = stats.subscribe();
        assert!(!rx.has_changed().unwrap());
        stats.set_consuming(true);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        stats.set_consuming(true); // no change, no news
        assert!(!rx.has_changed().unwrap());
        stats.set_broker(Some("amqp://localhost:5672/%2F"));
        assert!(rx.has_changed().unwrap());
        assert_eq!(stats.broker().as_deref(), Some("amqp://localhost:5672/%2F"));
    }
}
