//! `noop`: acknowledges every message and does nothing else.
//!
//! The benchmark's plugin: with it, what `fm` measures is fm itself (broker round trips,
//! decoding, acks), not a callback. It is thread-safe, so it also exercises fm's concurrent
//! path when `[callback] concurrency` is above 1.

use fm_plugin::{Host, Message, Outcome, ThreadSafePlugin};

struct Noop;

impl ThreadSafePlugin for Noop {
    fn init(_host: Host, _config: &str) -> Result<Self, String> {
        Ok(Noop)
    }

    fn handle(&self, _msg: &Message<'_>) -> Outcome {
        Outcome::Ack
    }
}

fm_plugin::export!(Noop, name = "noop", thread_safe = true);
