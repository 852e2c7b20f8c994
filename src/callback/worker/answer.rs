//! The answer line a worker writes for each message, and the outcome it asks for.
//!
//! An `ack` may carry the reply to a request (issue 13): `"reply": VALUE` is sent as that JSON
//! value, encoded (compact, keys in the order given); `"reply_text": "TEXT"` is sent as the
//! UTF-8 bytes of the text, as it is (how the Python shim sends what a callback returned, and
//! how a worker answers a client that does not speak JSON). `"reply": null` is no reply. A
//! reply with any other result is ignored: only an ack sends one.

use serde::Deserialize;

use crate::callback::Outcome;
use crate::callback::exec::on_failure;
use crate::config::OnError;

/// One answer line.
#[derive(Debug, Deserialize)]
pub(super) struct Answer {
    result: String,
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    requeue: Option<bool>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    reply: Option<serde_json::Value>,
    #[serde(default)]
    reply_text: Option<String>,
}

impl Answer {
    pub(super) fn outcome(
        self,
        on_error: OnError,
        id: &str,
        what: &str,
    ) -> Result<Outcome, String> {
        let note = |verb: &str| {
            if let Some(e) = &self.error {
                tracing::info!("{what} {verb} message {id}: {e}");
            }
        };
        Ok(match self.result.as_str() {
            "ack" => {
                note("acked");
                match (&self.reply, &self.reply_text) {
                    (Some(_), Some(_)) => {
                        return Err(
                            "answered with both \"reply\" and \"reply_text\"; give one".into()
                        );
                    }
                    (Some(value), None) => Outcome::Reply(
                        serde_json::to_vec(value).expect("a JSON value always serialises"),
                    ),
                    (None, Some(text)) => Outcome::Reply(text.clone().into_bytes()),
                    (None, None) => Outcome::Ack,
                }
            }
            "nack" => {
                note("returned");
                Outcome::Nack
            }
            "drop" => {
                note("dropped");
                Outcome::Drop
            }
            "halt" => {
                let exit_code = self.exit_code.unwrap_or(0);
                Outcome::Halt {
                    exit_code: i32::try_from(exit_code).map_err(|_| {
                        format!("answered halt with exit_code {exit_code}, not a 32-bit integer")
                    })?,
                    requeue: self.requeue.unwrap_or(false),
                    reason: self.error,
                }
            }
            "fail" => on_failure(
                on_error,
                id,
                format!(
                    "{what} failed on message {id}: {}",
                    self.error.as_deref().unwrap_or("no reason given")
                ),
            ),
            other => {
                return Err(format!(
                    "answered result {other:?}; expected \"ack\", \"nack\", \"drop\", \"halt\" or \"fail\""
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(line: &str, on_error: OnError) -> Result<Outcome, String> {
        let answer: Answer = serde_json::from_str(line).map_err(|e| e.to_string())?;
        answer.outcome(on_error, "id", "worker 'w'")
    }

    #[test]
    fn answers_map_onto_outcomes() {
        assert_eq!(
            outcome(r#"{"result": "ack"}"#, OnError::Halt),
            Ok(Outcome::Ack)
        );
        assert_eq!(
            outcome(r#"{"result": "nack", "error": "later"}"#, OnError::Halt),
            Ok(Outcome::Nack)
        );
        assert_eq!(
            outcome(r#"{"result": "drop", "extra": 1}"#, OnError::Halt),
            Ok(Outcome::Drop)
        );
        assert_eq!(
            outcome(
                r#"{"result": "halt", "exit_code": 7, "requeue": true, "error": "bye"}"#,
                OnError::Halt
            ),
            Ok(Outcome::Halt {
                exit_code: 7,
                requeue: true,
                reason: Some("bye".into())
            })
        );
        assert_eq!(
            outcome(r#"{"result": "halt"}"#, OnError::Halt),
            Ok(Outcome::Halt {
                exit_code: 0,
                requeue: false,
                reason: None
            })
        );
        assert!(matches!(
            outcome(r#"{"result": "fail", "error": "KeyError: 'x'"}"#, OnError::Halt),
            Ok(Outcome::Fail(e)) if e.contains("KeyError: 'x'")
        ));
        assert_eq!(
            outcome(r#"{"result": "fail"}"#, OnError::Drop),
            Ok(Outcome::Drop)
        );
    }

    #[test]
    fn an_ack_may_carry_a_reply() {
        assert_eq!(
            outcome(
                r#"{"result": "ack", "reply": {"b": 1, "a": [true]}}"#,
                OnError::Halt
            ),
            Ok(Outcome::Reply(br#"{"b":1,"a":[true]}"#.to_vec()))
        );
        assert_eq!(
            outcome(r#"{"result": "ack", "reply": "Polo"}"#, OnError::Halt),
            Ok(Outcome::Reply(br#""Polo""#.to_vec()))
        );
        assert_eq!(
            outcome(r#"{"result": "ack", "reply_text": "Polo"}"#, OnError::Halt),
            Ok(Outcome::Reply(b"Polo".to_vec()))
        );
        assert_eq!(
            outcome(r#"{"result": "ack", "reply": null}"#, OnError::Halt),
            Ok(Outcome::Ack)
        );
        assert_eq!(
            outcome(r#"{"result": "nack", "reply": 1}"#, OnError::Halt),
            Ok(Outcome::Nack),
            "only an ack sends a reply"
        );
        assert!(
            outcome(
                r#"{"result": "ack", "reply": 1, "reply_text": "1"}"#,
                OnError::Halt
            )
            .unwrap_err()
            .contains("both")
        );
        assert!(outcome(r#"{"result": "ack", "reply_text": 1}"#, OnError::Halt).is_err());
    }

    #[test]
    fn anything_else_is_garbage() {
        assert!(
            outcome(r#"{"result": "maybe"}"#, OnError::Halt)
                .unwrap_err()
                .contains("\"maybe\"")
        );
        assert!(outcome(r#"{"result": 1}"#, OnError::Halt).is_err());
        assert!(outcome(r#"{"exit_code": 1}"#, OnError::Halt).is_err());
        assert!(outcome(r#"{"result": "halt", "exit_code": "7"}"#, OnError::Halt).is_err());
        assert!(
            outcome(
                r#"{"result": "halt", "exit_code": 99999999999}"#,
                OnError::Halt
            )
            .is_err()
        );
        assert!(outcome("ok", OnError::Halt).is_err());
        assert!(outcome("", OnError::Halt).is_err());
    }
}
