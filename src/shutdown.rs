//! The one shutdown path.
//!
//! Everything that loops (consumers, workers, the monitor, the watchdog) listens to one
//! [`Shutdown`]. Whatever decides that fm must stop — a signal, a callback's `Halt`, an
//! unexpected callback failure, a fatal broker error — calls [`Shutdown::trigger`] with the
//! exit code it asks for; the first trigger wins, later ones are logged and ignored, as
//! fedora-messaging ignores a second SIGTERM.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Why fm is stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReason {
    /// The process exit code this stop asks for.
    pub code: u8,
    /// What happened, for the log (and the error printed at exit when `code` is not 0).
    pub reason: String,
}

/// A cloneable handle on the process-wide stop.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl Shutdown {
    /// A new, untriggered shutdown.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Ask fm to stop with `code`. Returns false (and changes nothing) if a stop was already
    /// asked for.
    pub fn trigger(&self, code: u8, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let first = self
            .reason
            .set(StopReason {
                code,
                reason: reason.clone(),
            })
            .is_ok();
        if first {
            self.token.cancel();
        } else {
            tracing::debug!(code, %reason, "already stopping; ignored");
        }
        first
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once a stop is asked for.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }

    /// The token, for code that wants `select!` on `cancelled()` or a child token.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why fm is stopping, once it is.
    pub fn reason(&self) -> Option<&StopReason> {
        self.reason.get()
    }
}

/// Turn SIGTERM, SIGINT and SIGHUP into a graceful stop (exit code 0). Repeated signals are
/// logged and ignored: in-flight messages still finish. SIGKILL is the way to stop at once.
/// SIGHUP (the terminal that started fm closed) once ended fm at once, in-flight callbacks cut
/// short and nothing logged; fm has no configuration reload for it to mean instead.
pub fn on_signals(shutdown: Shutdown) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            };
            if shutdown.trigger(0, format!("received {name}")) {
                tracing::info!("received {name}: finishing in-flight messages, then stopping");
            } else {
                tracing::warn!(
                    "received {name} again: ignored while stopping (send SIGKILL to stop at once)"
                );
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_trigger_wins() {
        let s = Shutdown::new();
        assert!(!s.is_triggered());
        assert!(s.trigger(13, "callback failed"));
        assert!(!s.trigger(0, "SIGTERM"));
        s.triggered().await;
        assert_eq!(s.reason().unwrap().code, 13);
    }
}
