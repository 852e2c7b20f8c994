//! Turning lapin errors into messages and exit codes.
//!
//! The broker answers a refused operation by closing the channel (or the connection) with a
//! reply code: 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, 320
//! CONNECTION_FORCED… fm's exit codes depend on which (see `man fm`, EXIT STATUS), so this
//! module is where the reply code is read, every reply code fm tells apart is named, and a
//! declaration's refusal becomes an exit code ([`declaration_exit`], which `fm consume` and
//! `fm check` share).

use lapin::ErrorKind;

use crate::error::code;

/// AMQP reply code 403 ACCESS_REFUSED.
pub const ACCESS_REFUSED: u16 = 403;
/// AMQP reply code 404 NOT_FOUND.
pub const NOT_FOUND: u16 = 404;
/// AMQP reply code 405 RESOURCE_LOCKED: an exclusive queue of another connection.
pub const RESOURCE_LOCKED: u16 = 405;
/// AMQP reply code 406 PRECONDITION_FAILED.
pub const PRECONDITION_FAILED: u16 = 406;
/// AMQP reply code 312 NO_ROUTE: a `mandatory` message no queue took (`basic.return`).
pub const NO_ROUTE: u16 = 312;

/// The exit code of a queue declaration or binding the broker refused: 15 when access was
/// refused, else 10.
pub fn declaration_exit(err: &anyhow::Error) -> u8 {
    if reply_code(err) == Some(ACCESS_REFUSED) {
        code::PERMISSION
    } else {
        code::BAD_DECLARATION
    }
}

/// The AMQP reply code behind an error, if the broker sent one.
pub fn reply_code(err: &anyhow::Error) -> Option<u16> {
    err.chain()
        .find_map(|e| match e.downcast_ref::<lapin::Error>()?.kind() {
            ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
            _ => None,
        })
}

/// Whether the broker refused access (403), or refused the login during the handshake.
pub fn is_access_refused(err: &anyhow::Error) -> bool {
    reply_code(err) == Some(ACCESS_REFUSED)
}

/// A lapin error as an `anyhow::Error` whose message says what happened in plain words.
pub fn describe(err: lapin::Error) -> anyhow::Error {
    let text = match err.kind() {
        ErrorKind::ProtocolError(amqp) => format!(
            "the broker said {} {}",
            amqp.get_id(),
            amqp.get_message().as_str()
        ),
        ErrorKind::IOError(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is the broker running and listening on that port?)".into()
            }
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => format!(
                "the broker closed the connection ({io}); wrong port, TLS to a plain port \
                 or plain to a TLS port, or credentials refused"
            ),
            _ => io.to_string(),
        },
        ErrorKind::InvalidConnectionState(state) => {
            format!("the connection is {state:?} (lost or refused by the broker)")
        }
        ErrorKind::MissingHeartbeatError => "the broker stopped sending heartbeats".into(),
        _ => err.to_string(),
    };
    anyhow::Error::new(err).context(text)
}

/// Why the broker returned a message published `mandatory`, in words: for `NO_ROUTE`, which
/// exchange and key found no queue.
pub fn returned(r: &lapin::message::BasicReturnMessage) -> String {
    if r.reply_code == NO_ROUTE {
        format!(
            "returned as unroutable ({} {}): no queue is bound to exchange '{}' with a key \
             matching '{}'",
            r.reply_code,
            r.reply_text.as_str(),
            r.delivery.exchange.as_str(),
            r.delivery.routing_key.as_str()
        )
    } else {
        format!(
            "returned by the broker ({} {})",
            r.reply_code,
            r.reply_text.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    #[test]
    fn reply_codes_are_found_through_context() {
        let amqp = AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - no access to vhost".into(),
        );
        let err = describe(lapin::Error::from(ErrorKind::ProtocolError(amqp)))
            .context("declaring queue 'q'");
        assert_eq!(reply_code(&err), Some(ACCESS_REFUSED));
        assert!(is_access_refused(&err));
        assert!(format!("{err:#}").contains("the broker said 403"));
    }
}
