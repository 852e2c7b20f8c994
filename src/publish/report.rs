//! The end of `fm publish`: `--failed` written, what happened said, the exit status chosen.

use super::*;

impl Publisher {
    /// Write `--failed`, say what happened, and choose the exit code.
    pub(super) async fn report(mut self, failed_file: Option<FailedFile>) -> anyhow::Result<u8> {
        // A return that never met its message (RabbitMQ returns before it confirms, so this
        // should not happen) is logged rather than dropped.
        for (id, why) in self.returned.drain() {
            tracing::warn!("message {id}: {why}");
        }
        // Messages still waiting to be sent (the first one when connecting failed, those to
        // send again after a loss).
        let retry: Vec<Outgoing> = self.retry.drain(..).collect();
        for out in retry {
            let kind = if out.sent {
                Failure::Unconfirmed
            } else {
                Failure::NotSent
            };
            self.failed
                .push((out, kind, "publishing stopped".to_owned()));
        }
        self.failed.sort_by_key(|(out, ..)| out.seq);
        let interrupted = self.stop.as_ref().is_some_and(|s| s.interrupted);
        let mut rest_ids: Vec<String> = Vec::new();
        let mut rest = 0u64;
        let mut saved_to = None;
        if let Some(mut file) = failed_file {
            let path = file.path.clone();
            let result: anyhow::Result<()> = async {
                for (out, ..) in &self.failed {
                    file.write(&out.message).await?;
                }
                // The rest of the input, never sent, so that the file completes the set.
                // A signal stops this too (standard input may be a terminal or a long pipe).
                if !interrupted {
                    loop {
                        let read = tokio::select! {
                            biased;
                            _ = self.shutdown.triggered() => break,
                            read = self.input.recv() => read,
                        };
                        let Some(Read { item, .. }) = read else {
                            self.input_done = true;
                            break;
                        };
                        match item {
                            Item::Message { line, message } => {
                                self.line = line;
                                self.read += 1;
                                rest += 1;
                                if rest_ids.len() < IDS_SHOWN {
                                    rest_ids.push(message.id.clone().unwrap_or_default());
                                }
                                file.write(&message).await?;
                            }
                            Item::Invalid { line, reason } => {
                                self.line = line;
                                self.read += 1;
                                tracing::warn!("{}: {reason}", self.where_(line));
                                self.invalid.push((line, reason));
                            }
                            Item::Error(err) => return Err(err),
                        }
                    }
                }
                file.close().await?;
                Ok(())
            }
            .await;
            result.with_context(|| {
                format!(
                    "writing the messages that were not published to {}",
                    path.display()
                )
            })?;
            saved_to = Some(path);
        }
        if saved_to.is_none() && !self.input_done && !interrupted {
            // Is there more input? A file's reader knows at once; do not wait on a pipe.
            if let Ok(None) =
                tokio::time::timeout(Duration::from_millis(100), self.input.recv()).await
            {
                self.input_done = true;
            }
        }
        let published = self.published;
        if self.stop.is_none() && self.failed.is_empty() && self.invalid.is_empty() {
            tracing::info!(
                "published {published} message{} to exchange '{}'",
                plural(published),
                self.exchange
            );
            if self.line == 0
                && let Some(id) = &self.last_id
            {
                // The id of a message from the command line, for scripts.
                println!("{id}");
            }
            return Ok(code::OK);
        }
        let (exit, headline) = self.outcome();
        let text = self.failure_text(headline, rest, &rest_ids, saved_to.as_deref());
        Err(Exit::new(exit, anyhow!("{text}")))
    }

    /// The exit code and the headline that goes with it: the most serious thing that
    /// happened, in this order: a message refused or returned (121), not confirmed (111),
    /// another failure (1), an invalid line (2). Pipelining makes "the first failure" fuzzy,
    /// so the order is by kind, not by time.
    pub(super) fn outcome(&self) -> (u8, String) {
        let stopped = |c: u8| {
            self.stop
                .as_ref()
                .filter(|s| s.code == c)
                .map(|s| s.reason.clone())
        };
        let failed = |kind: Failure| {
            self.failed
                .iter()
                .find(|f| f.1 == kind)
                .map(|(out, _, why)| format!("{} was not published: {why}", out.describe()))
        };
        let invalid = || {
            self.invalid
                .first()
                .map(|(line, why)| format!("{}: {why}", self.where_(*line)))
        };
        [
            (code::PUBLISH_REFUSED, stopped(code::PUBLISH_REFUSED)),
            (code::PUBLISH_REFUSED, failed(Failure::Refused)),
            (code::PUBLISH_TIMEOUT, stopped(code::PUBLISH_TIMEOUT)),
            (code::FAILURE, stopped(code::FAILURE)),
            (code::PUBLISH_TIMEOUT, failed(Failure::Unconfirmed)),
            (code::USAGE, stopped(code::USAGE)),
            (code::USAGE, invalid()),
        ]
        .into_iter()
        .find_map(|(code, text)| text.map(|t| (code, t)))
        .unwrap_or((code::FAILURE, "some messages were not published".to_owned()))
    }

    /// What went wrong, how many messages were not published, which ids, and where they are.
    pub(super) fn failure_text(
        &self,
        headline: String,
        rest: u64,
        rest_ids: &[String],
        saved_to: Option<&Path>,
    ) -> String {
        let mut text = headline;
        if let Some(stop) = &self.stop
            && !text.starts_with(&stop.reason)
        {
            text.push_str(&format!("\npublishing stopped: {}", stop.reason));
        }
        let count = |kind| self.failed.iter().filter(|f| f.1 == kind).count() as u64;
        let not_sent = count(Failure::NotSent) + rest;
        let not_published = self.failed.len() as u64 + rest;
        let mut parts = Vec::new();
        for (n, what) in [
            (count(Failure::Refused), "refused or returned by the broker"),
            (count(Failure::Unconfirmed), "not confirmed"),
            (not_sent, "not sent"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if !self.invalid.is_empty() {
            let lines: Vec<String> = self
                .invalid
                .iter()
                .take(IDS_SHOWN)
                .map(|(l, _)| l.to_string())
                .collect();
            parts.push(format!(
                "{} invalid line{}: {}{}",
                self.invalid.len(),
                plural(self.invalid.len() as u64),
                lines.join(", "),
                more(self.invalid.len() as u64, lines.len())
            ));
        }
        // The counts, unless the first line already told the whole story (one message).
        if self.published > 0 || not_published + self.invalid.len() as u64 > 1 {
            text.push_str(&format!(
                "\n{} published, {not_published} not published",
                self.published
            ));
            if !parts.is_empty() {
                text.push_str(&format!(" ({})", parts.join("; ")));
            }
        }
        let ids: Vec<&str> = self
            .failed
            .iter()
            .map(|(o, ..)| o.id())
            .chain(rest_ids.iter().map(String::as_str))
            .take(IDS_SHOWN)
            .collect();
        if not_published > 1 || ids.first().is_some_and(|id| !text.contains(id)) {
            text.push_str(&format!(
                "\nnot published: {}{}",
                ids.join(", "),
                more(not_published, ids.len())
            ));
        }
        match saved_to {
            Some(path) if !self.input_done => text.push_str(&format!(
                "\nthe messages not published up to line {} are in {}; the rest of {} was not \
                 read",
                self.line,
                path.display(),
                self.input_name
            )),
            Some(path) if not_published > 0 => text.push_str(&format!(
                "\nthey are in {}: publish that file to send them",
                path.display()
            )),
            Some(_) => {}
            None if !self.input_done && self.line > 0 => text.push_str(&format!(
                "\nfm stopped after line {} of {}; pass --failed FILE to save what was not \
                 published",
                self.line, self.input_name
            )),
            None if not_published > 0 => {
                text.push_str("\npass --failed FILE to save them for publishing again")
            }
            None => {}
        }
        text
    }
}

/// ", and N more" when only `shown` of `total` were listed.
pub(super) fn more(total: u64, shown: usize) -> String {
    let rest = total.saturating_sub(shown as u64);
    if rest > 0 {
        format!(", and {rest} more")
    } else {
        String::new()
    }
}

pub(super) fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}
