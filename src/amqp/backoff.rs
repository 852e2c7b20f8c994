//! Capped, jittered exponential backoff between reconnection attempts: what every long-running
//! AMQP client of fm (the consumer, the relay) waits between two tries, so a broker coming back
//! is not met by every client at once.

use std::time::Duration;

/// The first pause before reconnecting; doubled after each failure, up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest pause between two reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A connection that lived this long was healthy: the backoff starts over.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            step: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// Start over from [`BACKOFF_START`], after a connection that was healthy.
    pub fn reset(&mut self) {
        self.step = BACKOFF_START;
    }

    /// The pause after a connection that lived `lived` was lost: a healthy one (at least
    /// [`HEALTHY_AFTER`]) starts the backoff over, a short-lived one keeps it growing.
    pub fn after_loss(&mut self, lived: Duration) -> Duration {
        if lived >= HEALTHY_AFTER {
            self.reset();
        }
        self.pause()
    }

    /// The next pause: uniformly between half and all of the current step, which doubles.
    pub fn pause(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(BACKOFF_MAX);
        step.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.pause();
        assert!(first <= BACKOFF_START && first >= BACKOFF_START / 2);
        for _ in 0..20 {
            assert!(b.pause() <= BACKOFF_MAX);
        }
        assert_eq!(b.step, BACKOFF_MAX);
        b.reset();
        assert!(b.pause() <= BACKOFF_START);
    }

    #[test]
    fn a_healthy_connection_starts_the_backoff_over_and_a_short_one_does_not() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.pause();
        }
        assert!(b.after_loss(Duration::from_secs(1)) >= BACKOFF_MAX / 2);
        assert!(b.after_loss(HEALTHY_AFTER) <= BACKOFF_START);
    }
}
