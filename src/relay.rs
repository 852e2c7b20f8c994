//! `fm relay`: publish what `fm publish --spool` spooled ([`crate::spool`]), in order, until
//! stopped — the long-running service of `fm-relay@.service`.
//!
//! - **Order**: batches in name order (the order writers enqueued them), each batch's
//!   messages in line order, on one channel; after a reconnection, from the first message not
//!   yet confirmed.
//! - **Confirms**: every message is sent `mandatory` (unless its writer said
//!   `--allow-unroutable`) on a channel in confirm mode, up to [`WINDOW`] at once
//!   (pipelined, as `fm publish`, whose message building and confirm handling it shares). A
//!   batch is deleted only once every message of it is settled: confirmed, or written to the
//!   failed area.
//! - **The window bounds the duplicates**: the relay's position is kept on disk
//!   (`relay.progress`: the batch and how many of its lines are done; batches done are
//!   deleted). At most [`WINDOW`] messages are ever sent and not yet recorded there, so a relay
//!   killed at any instant sends at most [`WINDOW`] messages again when it restarts
//!   (at-least-once, duplicates bounded).
//! - **Failed area**: a message the broker returns (unroutable) or nacks, or whose publishing
//!   makes the broker close the channel (404 no such exchange, 403, 406), is appended to
//!   `failed/BATCH.jsonl` in the record format, its reason to `failed/BATCH.reasons`, both
//!   `fsync`ed before the batch is marked done; `fm publish --exchange E failed/BATCH.jsonl`
//!   replays them after a fix. When the broker closes the channel with messages in flight,
//!   the relay sends them again one at a time to find the one it refuses: only that one fails.
//! - **The broker away**: connections are retried forever with the capped, jittered backoff,
//!   URL failover and TLS of `fm consume` ([`Backoff`], [`Connector`]).
//! - **One relay per spool**: an exclusive `flock` on `relay.lock`, held for the process's
//!   life (the kernel releases it when the process dies, however it dies). A second relay is
//!   refused, naming the pid of the first.
//! - **Garbage**: a file in `queue/` that is not a batch is moved to `bad/`, a line that is not
//!   a message to `bad/BATCH.lines`, each with a log line; the relay goes on.
//!
//! A return normally comes with the confirm of its own message or of one confirmed with it;
//! one that comes later (lapin hands it to the next confirm) still finds its message among the
//! last [`WINDOW`] confirmed and fails it then, from memory: only a kill of the relay in that
//! instant would lose it.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, PublisherConfirm};
use rustix::fs::FlockOperation;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::amqp::backoff::{Backoff, HEALTHY_AFTER};
use crate::amqp::{Connected, Connector};
use crate::cli::RelayArgs;
use crate::config::Config;
use crate::error::{Exit, code};
use crate::publish::{
    Carries, InFlightQueue, Outgoing, ReadAhead, Recent, close, connection_lost, loss_text,
    open_channel, return_reason, soft_error,
};
use crate::shutdown::{self, Shutdown};
use crate::spool::read::{self, Progress};
use crate::spool::{FAILED, LOCK, QUEUE, Spool};
use crate::stats::Stats;

/// The most messages sent and not yet recorded as done: the pipelining window and the bound
/// on what a killed relay sends twice.
pub const WINDOW: usize = 1000;
/// With the window full, the progress is recorded once this many messages at its head are
/// done, not after every confirm.
const FLUSH_EVERY: usize = WINDOW / 4;

/// How often the relay looks for new batches when it has nothing to send.
const POLL: Duration = Duration::from_millis(50);

/// How often the spool's depth and oldest message are measured.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// A writer's leftover in `tmp/` is removed once this old and unlocked.
const LEFTOVER_AGE: Duration = Duration::from_secs(60);

/// What fm logs once it relays (tests and operators wait for it).
pub const RELAYING: &str = "relaying the spool";

/// `fm relay`.
pub async fn run(config: &Config, args: &RelayArgs) -> anyhow::Result<u8> {
    let dir = crate::spool::directory(args.spool.as_deref(), config)?;
    let spool = Spool::open(&dir).map_err(|e| {
        Exit::new(
            code::USAGE,
            anyhow!("cannot use {} as the spool: {e}", dir.display()),
        )
    })?;
    let _lock = lock(&spool)?;
    let connector = Connector::new(config)?;
    let shutdown = Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let stats = Arc::new(Stats::default());
    stats.spool.active.store(true, Relaxed);
    let monitor = match &config.monitoring {
        Some(m) => Some(crate::monitor::start(m, Arc::clone(&stats)).await?),
        None => None,
    };
    let notifier = crate::notify::start(Arc::clone(&stats), shutdown.clone(), connector.describe());
    let progress = Progress::open(&spool)
        .with_context(|| format!("opening the progress mark in {}", dir.display()))?;
    let marks = Arc::new(Mutex::new(progress.read()));
    tokio::spawn(measure(
        spool.clone(),
        Arc::clone(&marks),
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    tracing::info!("{RELAYING} {} to {}", dir.display(), connector.describe());
    let mut relay = Relay {
        spool,
        progress,
        marks,
        stats: Arc::clone(&stats),
        shutdown: shutdown.clone(),
        drain_timeout: config.shutdown_timeout,
        ledger: VecDeque::new(),
        base: 0,
        in_flight: InFlightQueue::new(),
        recent: Recent::new(),
        returned: HashMap::new(),
        probe: 0,
        reader: None,
    };
    relay.serve(&connector).await;
    if let Some(notifier) = notifier {
        notifier.finish().await;
    }
    drop(monitor);
    Ok(code::OK)
}

/// Take the spool's relay lock, or say who holds it.
fn lock(spool: &Spool) -> anyhow::Result<std::fs::File> {
    let path = spool.path(LOCK);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(anyhow!(
            "another fm relay (pid {}) is already relaying {}: a spool has one relay; stop \
             that one first",
            holder.trim(),
            spool.root().display()
        ));
    }
    let pid = format!("{:<12}\n", std::process::id());
    file.write_all_at(pid.as_bytes(), 0)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// Measure the spool every second: depth (from the batch names, less what is done of the
/// batch being published) and the oldest message's age; remove writers' leftovers.
async fn measure(
    spool: Spool,
    marks: Arc<Mutex<Option<(String, u64)>>>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
) {
    let mut last_cleanup = None::<Instant>;
    loop {
        let cleanup = last_cleanup.is_none_or(|t| t.elapsed() >= LEFTOVER_AGE);
        if cleanup {
            last_cleanup = Some(Instant::now());
        }
        let spool2 = spool.clone();
        let mark = marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let measured = tokio::task::spawn_blocking(move || {
            if cleanup {
                read::remove_leftovers(&spool2, LEFTOVER_AGE);
            }
            read::list(&spool2).ok().map(|(batches, _)| {
                let total: u64 = batches.iter().map(|b| b.name.count).sum();
                let done = mark
                    .filter(|(name, _)| batches.iter().any(|b| &b.file_name == name))
                    .map_or(0, |(_, done)| done);
                let oldest = batches.first().map_or(0, |b| b.name.stamp);
                (total.saturating_sub(done), oldest)
            })
        })
        .await;
        if let Ok(Some((depth, oldest))) = measured {
            stats.spool.depth.store(depth, Relaxed);
            stats.spool.oldest_ns.store(oldest, Relaxed);
        }
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(MEASURE_EVERY) => {}
        }
    }
}

/// A batch being published: its name and how to publish its messages.
struct Batch {
    file_name: String,
    exchange: ShortString,
    options: BasicPublishOptions,
}

/// What the reader hands over, in spool order.
enum Item {
    Message {
        batch: Arc<Batch>,
        line: u64,
        out: Box<Outgoing>,
        /// Its share of the read-ahead budget ([`ReadAhead`]), given back once the relay takes it.
        _budget: OwnedSemaphorePermit,
    },
    /// A line that was not a message (already moved aside).
    Bad { batch: Arc<Batch>, line: u64 },
    /// The batch has no more lines.
    End { batch: Arc<Batch> },
}

/// One item taken from the reader and not yet recorded as done on disk.
struct Slot {
    batch: Arc<Batch>,
    line: u64,
    end: bool,
    done: bool,
}

/// A message sent and waiting for its confirm.
struct Flight {
    /// Its slot: `Relay::base` + its index in the ledger.
    seq: u64,
    batch: Arc<Batch>,
    out: Box<Outgoing>,
    confirm: PublisherConfirm,
    sent_at: Instant,
}

/// How a channel's life ended.
enum ChannelEnd {
    /// Stopped on request, in-flight messages drained.
    Stopped,
    /// The connection was lost.
    Lost(anyhow::Error),
    /// The broker closed the channel over a message: open another one.
    Refused,
}

struct Relay {
    spool: Spool,
    progress: Progress,
    /// The last mark written: shared with [`measure`].
    marks: Arc<Mutex<Option<(String, u64)>>>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    /// How long a stop waits for the confirms of what is in flight.
    drain_timeout: Duration,
    /// Items taken from the reader and not yet recorded as done, in order.
    ledger: VecDeque<Slot>,
    /// The sequence number of `ledger[0]`.
    base: u64,
    /// The window is `fm publish`'s: [`WINDOW`] messages and `WINDOW_BYTES`.
    in_flight: InFlightQueue<Flight>,
    /// The last confirmed messages, for returns that come after their confirm.
    recent: Recent<(Arc<Batch>, Box<Outgoing>)>,
    /// Returns not matched to their message yet: message id → why.
    returned: HashMap<String, String>,
    /// Messages still to send one at a time, to find the one the broker refuses.
    probe: usize,
    reader: Option<Reader>,
}

/// The reader thread and its stop flag.
struct Reader {
    items: mpsc::Receiver<Item>,
    stop: Arc<AtomicBool>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

impl Relay {
    /// Connect, relay, reconnect after a loss, until stopped.
    async fn serve(&mut self, connector: &Connector) {
        let mut backoff = Backoff::default();
        while !self.shutdown.is_triggered() {
            let attempt = tokio::select! {
                biased;
                _ = self.shutdown.triggered() => break,
                c = connector.connect() => c,
            };
            let connected = match attempt {
                Ok(c) => c,
                Err(err) => {
                    let pause = backoff.pause();
                    tracing::warn!(
                        "the broker is unreachable ({err:#}); the spool keeps the messages; \
                         trying again in {:.1} s",
                        pause.as_secs_f64()
                    );
                    self.pause(pause).await;
                    continue;
                }
            };
            let started = Instant::now();
            let end = self.connection(&connected).await;
            self.stats.set_consuming(false);
            self.stats.set_broker(None);
            close(&connected).await;
            if let Some(err) = end {
                Stats::bump(&self.stats.reconnects);
                let pause = backoff.after_loss(started.elapsed());
                tracing::warn!(
                    broker = %connected.url,
                    "connection lost ({err:#}); reconnecting in {:.1} s",
                    pause.as_secs_f64()
                );
                self.pause(pause).await;
            }
        }
        self.flush();
    }

    async fn pause(&self, pause: Duration) {
        tokio::select! {
            _ = self.shutdown.triggered() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }

    /// One connection's life: channels until stopped (`None`) or lost.
    async fn connection(&mut self, connected: &Connected) -> Option<anyhow::Error> {
        self.stats.set_broker(Some(&connected.url));
        loop {
            let channel = match open_channel(connected).await {
                Ok(c) => c,
                Err(err) => return Some(err),
            };
            self.stats.set_consuming(true);
            let end = self.channel(connected, &channel).await;
            self.stats.set_consuming(false);
            match end {
                ChannelEnd::Stopped => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        channel.close(200, "fm relay stopping".into()),
                    )
                    .await;
                    return None;
                }
                ChannelEnd::Lost(err) => return Some(err),
                ChannelEnd::Refused => {}
            }
        }
    }

    /// Start reading the spool again from what is recorded as done (what was sent and not
    /// recorded is sent again).
    fn rewind(&mut self) {
        self.flush();
        self.ledger.clear();
        self.in_flight.clear();
        self.reader = None;
        let mark = self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.reader = Some(spawn_reader(
            self.spool.clone(),
            mark,
            Arc::clone(&self.stats),
        ));
    }

    /// Publish on one channel until stopped, lost or refused.
    async fn channel(&mut self, connected: &Connected, channel: &Channel) -> ChannelEnd {
        self.rewind();
        let mut health = tokio::time::interval(crate::notify::health_interval());
        loop {
            let room = self.ledger.len() < WINDOW
                && if self.probe > 0 {
                    self.in_flight.is_empty()
                } else {
                    self.in_flight.has_room_for(0)
                };
            // Record progress when nothing is in flight, or when the window is full and a
            // good part of it is done: a write per confirm would cost a system call per message
            // and send one message per confirm; [`FLUSH_EVERY`] at once keeps the pipe full.
            if self.in_flight.is_empty()
                || (self.ledger.len() >= WINDOW && self.done_at_head() >= FLUSH_EVERY)
            {
                self.flush();
            }
            let event = {
                let in_flight = &mut self.in_flight;
                let reader = self.reader.as_mut().expect("rewind started it");
                tokio::select! {
                    biased;
                    _ = self.shutdown.triggered() => Event::Stop,
                    r = async {
                        let f = in_flight.front_mut().expect("checked: not empty");
                        (&mut f.confirm).await
                    }, if !in_flight.is_empty() => Event::Confirm(r),
                    item = reader.items.recv(), if room => Event::Item(item),
                    _ = health.tick() => Event::Health,
                }
            };
            match event {
                Event::Stop => return self.drain().await,
                Event::Health => {
                    let stuck = self
                        .in_flight
                        .front()
                        .is_some_and(|f| f.sent_at.elapsed() > HEALTHY_AFTER);
                    if connected.connection.status().connected()
                        && channel.status().connected()
                        && !stuck
                    {
                        self.stats.mark_healthy();
                    }
                }
                Event::Item(None) => {
                    // The reader stopped on an error it logged: read again after a pause.
                    tokio::time::sleep(POLL * 20).await;
                    self.rewind();
                }
                Event::Item(Some(item)) => {
                    if let Err(err) = self.take(channel, item).await {
                        return self.abort(connected, channel, err).await;
                    }
                }
                Event::Confirm(Ok(confirmation)) => {
                    let f = self.in_flight.pop_front().expect("it was just polled");
                    self.settle(f, confirmation);
                }
                Event::Confirm(Err(err)) => return self.abort(connected, channel, err).await,
            }
        }
    }

    /// Take an item from the reader: send a message, record the others.
    async fn take(&mut self, channel: &Channel, item: Item) -> lapin::Result<()> {
        let (batch, line, end) = match item {
            Item::Message {
                batch, line, out, ..
            } => {
                let confirm = out.publish(channel, &batch.exchange, batch.options).await?;
                let seq = self.base + self.ledger.len() as u64;
                self.ledger.push_back(Slot {
                    batch: Arc::clone(&batch),
                    line,
                    end: false,
                    done: false,
                });
                self.in_flight.push(Flight {
                    seq,
                    batch,
                    out,
                    confirm,
                    sent_at: Instant::now(),
                });
                return Ok(());
            }
            Item::Bad { batch, line } => (batch, line, false),
            Item::End { batch } => (batch, 0, true),
        };
        self.ledger.push_back(Slot {
            batch,
            line,
            end,
            done: true,
        });
        Ok(())
    }

    /// The broker's answer about one message.
    fn settle(&mut self, f: Flight, confirmation: Confirmation) {
        self.probe = self.probe.saturating_sub(1);
        let (accepted, returned) = match confirmation {
            Confirmation::Ack(r) => (true, r),
            Confirmation::Nack(r) => (false, r),
            Confirmation::NotRequested => (true, None),
        };
        if let Some(r) = returned {
            let (id, why) = return_reason(&r);
            match self.recent.take(&id) {
                Some((batch, out)) => {
                    self.stats.spool.sent.fetch_sub(1, Relaxed);
                    self.fail(&batch, &out, &why);
                }
                None => {
                    self.returned.insert(id, why);
                }
            }
        }
        let why = match self.returned.remove(f.out.id()) {
            Some(why) => Some(why),
            None if !accepted => Some(
                "the broker refused it (basic.nack: a queue limit, or an internal error)".into(),
            ),
            None => None,
        };
        match why {
            Some(why) => self.fail(&f.batch, &f.out, &why),
            None => {
                Stats::bump(&self.stats.spool.sent);
                Stats::bump(&self.stats.published);
                self.recent.push((Arc::clone(&f.batch), f.out));
            }
        }
        self.done(f.seq);
    }

    /// How many messages at the head of the ledger are done (ready to be recorded).
    fn done_at_head(&self) -> usize {
        self.ledger
            .iter()
            .take(FLUSH_EVERY)
            .take_while(|s| s.done)
            .count()
    }

    fn done(&mut self, seq: u64) {
        if let Some(slot) = seq
            .checked_sub(self.base)
            .and_then(|i| self.ledger.get_mut(i as usize))
        {
            slot.done = true;
        }
    }

    /// Keep a message the broker would not take in the failed area, durably, with why.
    fn fail(&self, batch: &Batch, out: &Outgoing, why: &str) {
        Stats::bump(&self.stats.spool.failed);
        let written = self.spool.folder(FAILED).and_then(|dir| {
            let record = dir.join(format!("{}.jsonl", batch.file_name));
            let mut line = out.message.record_line();
            line.push('\n');
            append(&record, line.as_bytes())?;
            let reason = format!(
                "{}: {why} (exchange '{}'; publish {} again with fm publish --exchange '{}')\n",
                out.describe(),
                batch.exchange,
                record.display(),
                batch.exchange
            );
            append(
                &dir.join(format!("{}.reasons", batch.file_name)),
                reason.as_bytes(),
            )?;
            Ok(record)
        });
        match written {
            Ok(record) => tracing::warn!(
                "{} of batch {} was not published: {why}; kept in {}",
                out.describe(),
                batch.file_name,
                record.display()
            ),
            Err(e) => tracing::error!(
                "{} of batch {} was not published: {why}; and keeping it in the failed area \
                 failed: {e}",
                out.describe(),
                batch.file_name
            ),
        }
    }

    /// Record on disk what is done at the head of the ledger: delete finished batches, move
    /// the progress mark.
    fn flush(&mut self) {
        let mut mark: Option<(String, u64)> = None;
        let mut moved = false;
        while self.ledger.front().is_some_and(|s| s.done) {
            let slot = self.ledger.pop_front().expect("checked: not empty");
            self.base += 1;
            moved = true;
            if slot.end {
                let path = self.spool.root().join(QUEUE).join(&slot.batch.file_name);
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::error!("cannot delete {} once published: {e}", path.display());
                }
                mark = None;
            } else {
                mark = Some((slot.batch.file_name.clone(), slot.line));
            }
        }
        if !moved {
            return;
        }
        if let Some((name, done)) = &mark
            && let Err(e) = self.progress.write(name, *done)
        {
            tracing::error!("cannot record the relay's progress: {e}");
        }
        if mark.is_some() {
            *self.marks.lock().unwrap_or_else(|e| e.into_inner()) = mark;
        }
    }

    /// A stop: send nothing more, wait (up to `shutdown_timeout`) for the confirms of what is
    /// in flight, record what is done.
    async fn drain(&mut self) -> ChannelEnd {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while let Some(mut f) = self.in_flight.pop_front() {
            match tokio::time::timeout_at(deadline, &mut f.confirm).await {
                Ok(Ok(confirmation)) => self.settle(f, confirmation),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        self.flush();
        ChannelEnd::Stopped
    }

    /// The channel failed: a broker refusal (the channel closed by the broker) or a lost
    /// connection. The confirms that arrived before are settled; the rest is sent again.
    async fn abort(
        &mut self,
        connected: &Connected,
        channel: &Channel,
        first: lapin::Error,
    ) -> ChannelEnd {
        let mut refusal = soft_error(&first);
        let mut unconfirmed = Vec::new();
        while let Some(mut f) = self.in_flight.pop_front() {
            match tokio::time::timeout(Duration::from_secs(1), &mut f.confirm).await {
                Ok(Ok(confirmation)) => self.settle(f, confirmation),
                Ok(Err(err)) => {
                    refusal = refusal.or_else(|| soft_error(&err));
                    unconfirmed.push(f);
                }
                Err(_) => unconfirmed.push(f),
            }
        }
        let connection_up = connected.connection.status().connected() && !connection_lost(&first);
        if refusal.is_none() && connection_up && !channel.status().connected() {
            refusal = Some(format!("the broker closed the channel ({first})"));
        }
        match refusal {
            Some(why) if connection_up => {
                if self.probe > 0 && unconfirmed.len() == 1 {
                    // Sent alone: this is the message the broker refuses.
                    let f = unconfirmed.pop().expect("checked: one");
                    self.probe -= 1;
                    self.fail(&f.batch, &f.out, &format!("the broker refused it ({why})"));
                    self.done(f.seq);
                } else {
                    tracing::warn!(
                        "the broker closed the channel ({why}) with {} message{} unconfirmed: \
                         sending them again one at a time to find the one it refuses",
                        unconfirmed.len(),
                        if unconfirmed.len() == 1 { "" } else { "s" }
                    );
                    self.probe = unconfirmed.len().max(1);
                }
                self.flush();
                ChannelEnd::Refused
            }
            _ => {
                self.flush();
                ChannelEnd::Lost(anyhow!("{}", loss_text(&first)))
            }
        }
    }
}

/// What woke the relay.
#[allow(clippy::large_enum_variant)]
enum Event {
    Stop,
    Health,
    Confirm(lapin::Result<Confirmation>),
    Item(Option<Item>),
}

/// Append to a file of the failed area and `fsync` it.
fn append(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Read the spool on a thread of its own (files are blocking I/O), from `mark` on: batches in
/// name order, each batch's lines after the mark.
fn spawn_reader(spool: Spool, mark: Option<(String, u64)>, stats: Arc<Stats>) -> Reader {
    let (tx, items) = mpsc::channel(WINDOW);
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let ahead = Budget {
        ahead: ReadAhead::new(),
        runtime: tokio::runtime::Handle::current(),
    };
    std::thread::Builder::new()
        .name("fm-spool-reader".into())
        .spawn(move || {
            if let Err(err) = read_spool(&spool, mark, &stats, &tx, &ahead, &stopped) {
                tracing::error!("reading the spool {}: {err:#}", spool.root().display());
            }
        })
        .expect("spawning the spool reader thread");
    Reader { items, stop }
}

impl Carries for Flight {
    fn outgoing(&self) -> &Outgoing {
        &self.out
    }
    fn outgoing_mut(&mut self) -> &mut Outgoing {
        &mut self.out
    }
}

impl Carries for (Arc<Batch>, Box<Outgoing>) {
    fn outgoing(&self) -> &Outgoing {
        &self.1
    }
    fn outgoing_mut(&mut self) -> &mut Outgoing {
        &mut self.1
    }
}

/// The reader's budget of bytes read ahead (`fm publish`'s, [`ReadAhead`]), waited for on the
/// reader's own thread.
struct Budget {
    ahead: ReadAhead,
    runtime: tokio::runtime::Handle,
}

impl Budget {
    fn take(&self, len: usize) -> OwnedSemaphorePermit {
        self.runtime.block_on(self.ahead.take(len))
    }
}

/// The reader's loop; returns when stopped (`Ok`) or on an error it cannot get past.
fn read_spool(
    spool: &Spool,
    mark: Option<(String, u64)>,
    stats: &Stats,
    tx: &mpsc::Sender<Item>,
    ahead: &Budget,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut after: Option<String> = None;
    let mut buf = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        let (batches, strangers) = read::list(spool).context("listing the queue")?;
        for name in strangers {
            read::quarantine(spool, &name, "its name is not a batch's");
            Stats::bump(&stats.spool.quarantined);
        }
        let fresh: Vec<_> = batches
            .into_iter()
            .filter(|b| after.as_ref().is_none_or(|a| &b.file_name > a))
            .collect();
        if fresh.is_empty() {
            std::thread::sleep(POLL);
            continue;
        }
        for entry in fresh {
            if stop.load(Relaxed) {
                return Ok(());
            }
            after = Some(entry.file_name.clone());
            let mut reader = match read::Reader::open(spool, &entry.file_name) {
                Ok(r) => r,
                Err(Ok(why)) => {
                    read::quarantine(spool, &entry.file_name, &why);
                    Stats::bump(&stats.spool.quarantined);
                    continue;
                }
                Err(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(Err(e)) => {
                    return Err(e).with_context(|| format!("opening batch {}", entry.file_name));
                }
            };
            let Ok(exchange) = ShortString::try_new(reader.header.exchange.as_str()) else {
                read::quarantine(spool, &entry.file_name, "its exchange name is too long");
                Stats::bump(&stats.spool.quarantined);
                continue;
            };
            let batch = Arc::new(Batch {
                file_name: entry.file_name.clone(),
                exchange,
                options: BasicPublishOptions {
                    mandatory: reader.header.mandatory,
                    immediate: false,
                },
            });
            let skip = mark
                .as_ref()
                .filter(|(name, _)| name == &entry.file_name)
                .map_or(0, |(_, done)| *done);
            while reader
                .next_line(&mut buf)
                .with_context(|| format!("reading batch {}", entry.file_name))?
            {
                let line = reader.line;
                if line <= skip {
                    continue;
                }
                seq += 1;
                let budget = ahead.take(buf.len());
                let message = crate::publish::parse_line(&buf).and_then(|m| {
                    Outgoing::new(seq, line as usize, m, &reader.header.topic_prefix)
                });
                let item = match message {
                    Ok(out) => Item::Message {
                        batch: Arc::clone(&batch),
                        line,
                        out: Box::new(out),
                        _budget: budget,
                    },
                    Err(why) => {
                        read::quarantine_line(spool, &entry.file_name, line, &buf, &why);
                        Stats::bump(&stats.spool.quarantined);
                        Item::Bad {
                            batch: Arc::clone(&batch),
                            line,
                        }
                    }
                };
                if tx.blocking_send(item).is_err() {
                    return Ok(());
                }
            }
            if tx.blocking_send(Item::End { batch }).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{FORMAT, Header, write};

    /// The spool reader parses at most READ_AHEAD_BYTES (8 MiB) of messages ahead of the relay
    /// (besides its WINDOW items), and reads on as the relay takes them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_reads_ahead_by_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let header = Header {
            format: FORMAT,
            exchange: "amq.topic".into(),
            topic_prefix: String::new(),
            mandatory: true,
        };
        let text = "x".repeat(3 << 20);
        let line = format!("{{\"topic\": \"t\", \"body\": {{\"t\": \"{text}\"}}}}");
        let message = crate::publish::parse_line(line.as_bytes()).unwrap();
        let mut batch = write::Batch::create(&spool, &header).unwrap();
        for _ in 0..6 {
            batch.push(&message).unwrap();
        }
        batch.commit().unwrap();

        let mut reader = spawn_reader(spool, None, Arc::new(Stats::default()));
        // Two 3 MiB lines fit in 8 MiB, a third does not: the reader waits.
        let settled = async {
            while reader.items.len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), settled)
            .await
            .expect("the reader sends two messages");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            reader.items.len(),
            2,
            "no third message before one is taken"
        );
        // Taking them lets it go on, to the batch's end.
        let mut messages = 0;
        loop {
            let item = tokio::time::timeout(Duration::from_secs(10), reader.items.recv())
                .await
                .expect("the reader goes on")
                .expect("an item");
            match item {
                Item::Message { .. } => messages += 1,
                Item::End { .. } => break,
                Item::Bad { .. } => panic!("a good message read as bad"),
            }
        }
        assert_eq!(messages, 6);
    }
}
