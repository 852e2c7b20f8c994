//! `fm-bench-sleep`: a plugin that waits 10 ms per message, then acknowledges it.
//!
//! The benchmark's stand-in for a callback that waits on a database or an HTTP service
//! (`scripts/bench --only latency`): it uses no CPU while it waits, so what limits the rate is
//! how many messages fm keeps in progress at once (`[callback] concurrency`). It is thread-safe,
//! so fm may run it on every concurrency slot.

use std::time::Duration;

use fm_plugin::{Host, Message, Outcome, ThreadSafePlugin};

/// How long each message takes, the same as the exec (`sleep 0.01`), worker and Python
/// callbacks of the latency section.
const WAIT: Duration = Duration::from_millis(10);

struct Sleep;

impl ThreadSafePlugin for Sleep {
    fn init(_host: Host, _config: &str) -> Result<Self, String> {
        Ok(Sleep)
    }

    fn handle(&self, _msg: &Message<'_>) -> Outcome {
        std::thread::sleep(WAIT);
        Outcome::Ack
    }
}

fm_plugin::export!(Sleep, name = "bench-sleep", thread_safe = true);
