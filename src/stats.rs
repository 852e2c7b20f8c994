//! Counters shared by the consume loop, the monitoring endpoint and the systemd status line.
//!
//! The names follow fedora-messaging's monitoring (`received`, `processed`, `dropped`,
//! `rejected`, `failed`, `published`), so `/ready` answers what operators already scrape.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Process-wide message counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages delivered that passed validation.
    pub received: AtomicU64,
    /// Messages acked after the callback handled them (including `Halt` without requeue).
    pub processed: AtomicU64,
    /// Messages dropped: invalid, or the callback said `Drop`.
    pub dropped: AtomicU64,
    /// Messages requeued because the callback said `Nack` (or `Halt` with requeue).
    pub rejected: AtomicU64,
    /// Messages whose callback failed unexpectedly.
    pub failed: AtomicU64,
    /// Messages published (by `fm publish`).
    pub published: AtomicU64,
    /// Callbacks running right now.
    pub in_flight: AtomicU64,
    /// Reconnections after a lost connection.
    pub reconnects: AtomicU64,
    consuming: AtomicBool,
}

impl Stats {
    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Whether every consumer is registered and receiving.
    pub fn consuming(&self) -> bool {
        self.consuming.load(Relaxed)
    }

    /// Record whether fm is consuming.
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
