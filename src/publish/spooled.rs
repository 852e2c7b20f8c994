//! `fm publish --spool`: the messages go into the local spool ([`crate::spool`]) as one batch,
//! durably, and fm returns without talking to the broker; `fm relay` publishes them.
//!
//! The input is read and checked exactly as `fm publish` reads it (the same reader, the same
//! checks of the routing key and properties), so that what reaches the spool can be
//! published. An invalid line stops the call with exit status 2 and nothing spooled, unless
//! `--keep-going` skips it. If the spool cannot take the batch (a full disk, a missing,
//! read-only or forbidden folder) the call fails with exit status 28 and nothing of it is
//! spooled: the batch becomes visible only by its final rename. The one exception is a failed
//! `fsync` of `queue/` after that rename, also exit status 28, whose message says the batch
//! is spooled but may not survive a crash of the machine.

use std::path::PathBuf;

use super::*;
use crate::spool::write::{Batch, CommitError};
use crate::spool::{self, Header, Spool};

/// Spool what the arguments describe into `dir`.
pub(super) async fn run(
    config: &Config,
    args: &PublishArgs,
    dir: PathBuf,
    exchange: ShortString,
) -> anyhow::Result<u8> {
    let (source, input_name) = Source::from_args(config, args).await?;
    let header = Header {
        format: spool::FORMAT,
        exchange: exchange.to_string(),
        topic_prefix: config.topic_prefix.clone(),
        mandatory: !args.allow_unroutable,
    };
    let keep_going = args.keep_going;
    let one = matches!(source, Source::One(_));
    let mut input = source.spawn_reader(input_name.clone());
    let name_of_input = input_name.clone();
    // Files and fsyncs: off the runtime's threads.
    let written = tokio::task::spawn_blocking(move || {
        let unwritable = |e: std::io::Error| {
            Exit::new(
                code::SPOOL_FAILED,
                anyhow!(
                    "cannot spool into {}: {e}; nothing was spooled",
                    dir.display()
                ),
            )
        };
        let spool = Spool::open(&dir).map_err(unwritable)?;
        let mut batch = Batch::create(&spool, &header).map_err(unwritable)?;
        let mut invalid: Vec<(usize, String)> = Vec::new();
        let mut last_id = None;
        let mut seq = 0;
        while let Some(Read { item, .. }) = input.blocking_recv() {
            let (line, reason) = match item {
                Item::Message { line, message } => {
                    seq += 1;
                    // The checks the relay's publishing would make, made now.
                    match Outgoing::new(seq, line, *message, &header.topic_prefix) {
                        Ok(out) => {
                            batch.push(&out.message).map_err(unwritable)?;
                            last_id = out.message.id.clone();
                            continue;
                        }
                        Err(reason) => (line, reason),
                    }
                }
                Item::Invalid { line, reason } => (line, reason),
                Item::Error(err) => {
                    return Err(err.context("nothing was spooled"));
                }
            };
            let what = format!("line {line} of {name_of_input}");
            if !keep_going {
                return Err(Exit::new(
                    code::USAGE,
                    anyhow!(
                        "{what}: {reason}; nothing was spooled (--keep-going skips such lines)"
                    ),
                ));
            }
            tracing::warn!("{what}: {reason}; skipped (--keep-going)");
            invalid.push((line, reason));
        }
        let count = batch.len();
        let name = if batch.is_empty() {
            None
        } else {
            Some(batch.commit().map_err(|e| match e {
                CommitError::NotSpooled(e) => unwritable(e),
                CommitError::NotSynced { name, err } => Exit::new(
                    code::SPOOL_FAILED,
                    anyhow!(
                        "spooled into {} as {name}, but syncing its queue/ folder failed: \
                         {err}; the relay will send the batch, unless the machine crashes \
                         first (sending it again may duplicate its messages)",
                        dir.display()
                    ),
                ),
            })?)
        };
        anyhow::Ok((count, name, invalid, last_id, spool))
    })
    .await
    .map_err(|e| anyhow!("spooling failed: {e}"))?;
    let (count, name, invalid, last_id, spool) = written?;
    if let Some(name) = &name {
        tracing::info!(
            "spooled {count} message{} into {} ({name})",
            plural(count),
            spool.root().display()
        );
    }
    if let Some((line, reason)) = invalid.first() {
        let lines: Vec<String> = invalid.iter().map(|(l, _)| l.to_string()).collect();
        return Err(Exit::new(
            code::USAGE,
            anyhow!(
                "line {line} of {input_name}: {reason}\n{count} spooled, {} invalid line{} \
                 skipped: {}",
                invalid.len(),
                plural(invalid.len() as u64),
                lines.join(", ")
            ),
        ));
    }
    if one && let Some(id) = last_id {
        // The id of a message from the command line, for scripts (as fm publish prints it).
        println!("{id}");
    }
    Ok(code::OK)
}
