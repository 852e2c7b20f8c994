//! Exit codes, and the error type that carries one up to `main`.
//!
//! fm keeps fedora-messaging's exit codes so that systemd units, scripts and monitoring that
//! branch on them keep working (see `man fm`, EXIT STATUS). Only `main` turns an error into a
//! process exit code: everything below returns `anyhow::Error`, and an error that must end the
//! process with a particular code is wrapped with [`Exit::new`] (or [`ExitExt::exit_code`]).

use std::fmt;

/// The exit codes fm uses, fedora-messaging's for `consume`/`record` and for `publish`.
pub mod code {
    /// Success, a graceful stop, or `Halt` with exit code 0.
    pub const OK: u8 = 0;
    /// Any other error: a plugin that cannot be loaded or initialised, an I/O failure.
    pub const FAILURE: u8 = 1;
    /// Bad command-line arguments, a bad configuration file, an invalid message to publish.
    pub const USAGE: u8 = 2;
    /// A queue declaration or binding was refused by the broker (or the queue is missing under
    /// `passive_declares`).
    pub const BAD_DECLARATION: u8 = 10;
    /// An unexpected error while registering consumers.
    pub const REGISTRATION: u8 = 11;
    /// The broker cancelled the consumer, for example because its queue was deleted.
    pub const CONSUMER_CANCELED: u8 = 12;
    /// The callback failed unexpectedly (the message and all prefetched ones were requeued).
    pub const CALLBACK_FAILED: u8 = 13;
    /// The connection to the broker could not be established (TCP, TLS or AMQP handshake).
    pub const CONNECTION: u8 = 14;
    /// The broker refused access (403 ACCESS_REFUSED).
    pub const PERMISSION: u8 = 15;
    /// `publish`: the broker could not connect or did not confirm in time (`ECONNREFUSED`).
    pub const PUBLISH_TIMEOUT: u8 = 111;
    /// `publish`: the message was returned as unroutable, nacked or forbidden (`EREMOTEIO`).
    pub const PUBLISH_REFUSED: u8 = 121;
    /// `call`: a reply did not come within `--timeout` (as timeout(1) exits). The broker
    /// unreachable is [`PUBLISH_TIMEOUT`], a request no queue receives [`PUBLISH_REFUSED`].
    pub const CALL_TIMEOUT: u8 = 124;
    /// `publish --spool`: the spool could not take the messages (`ENOSPC`): the disk is full,
    /// the spool folder is missing, read-only or not writable. Nothing of the call was spooled.
    pub const SPOOL_FAILED: u8 = 28;
    /// `publish --transaction`: the transaction was rolled back (`ECANCELED`): a message was
    /// returned or refused, or the connection was lost before the commit. Nothing was published.
    pub const ROLLED_BACK: u8 = 125;
}

/// An error that ends the process with a specific exit code.
///
/// Its `Display` is the whole context chain of the inner error, so `main` prints it once.
#[derive(Debug)]
pub struct Exit {
    code: u8,
    inner: anyhow::Error,
}

impl Exit {
    /// Wrap `err` so that the process exits with `code`.
    // Returns the wrapped `anyhow::Error`, which is what every caller wants to propagate.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(code: u8, err: impl Into<anyhow::Error>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code,
            inner: err.into(),
        })
    }

    /// The exit code this error asks for.
    pub fn code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.inner)
    }
}

impl std::error::Error for Exit {}

/// The exit code an error asks for: the outermost [`Exit`] in its chain, or [`code::FAILURE`].
pub fn exit_code_of(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Exit>())
        .map_or(code::FAILURE, Exit::code)
}

/// Attach an exit code to the error of a `Result`.
pub trait ExitExt<T> {
    /// On error, exit with `code`.
    fn exit_code(self, code: u8) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> ExitExt<T> for Result<T, E> {
    fn exit_code(self, code: u8) -> anyhow::Result<T> {
        self.map_err(|e| Exit::new(code, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_outermost_exit_code_wins_and_context_is_kept() {
        let err: anyhow::Result<()> = Err(anyhow::anyhow!("queue 'q' not found"));
        let err = err
            .exit_code(code::BAD_DECLARATION)
            .context("declaring queues")
            .unwrap_err();
        assert_eq!(exit_code_of(&err), code::BAD_DECLARATION);
        assert_eq!(format!("{err:#}"), "declaring queues: queue 'q' not found");
    }

    #[test]
    fn a_plain_error_is_a_failure() {
        assert_eq!(exit_code_of(&anyhow::anyhow!("boom")), code::FAILURE);
    }
}
