//! `fm publish --transaction FILE`: every message of FILE in one AMQP transaction
//! (`tx.select`, the publishes, `tx.commit`): all of them reach their queues, or none does.
//!
//! The file is streamed: each line is checked and published as it is read (RabbitMQ holds the
//! uncommitted messages in the channel, not fm). Whatever goes wrong before the commit — an
//! invalid line, a message the broker refuses (404 no such exchange, 403, 406 a header it
//! cannot route on, a message too large), a lost connection, a signal — ends the transaction
//! without a commit: the broker discards what it holds (a closed channel rolls back, and fm
//! sends `tx.rollback` when the channel is still open), and fm exits with 125.
//!
//! Publisher confirms cannot be used on a transactional channel (AMQP forbids mixing them), so
//! the commit is what fm waits for. Unroutable messages are the limit: RabbitMQ routes a
//! transaction's messages when it commits, so a message no queue receives comes back
//! (`basic.return`, with `mandatory`) only with the commit, too late to roll back. fm looks
//! for returns before committing (a round trip after the last publish) and rolls back when it
//! sees one; one that comes with the commit is reported with exit status 121 and the other
//! messages are committed. If the commit is sent but its answer never comes (the connection is
//! lost, `--timeout`), nobody can tell whether it happened: exit status 111.

use lapin::options::BasicQosOptions;

use super::*;

/// How the transaction ended, when it did not commit.
struct Abort {
    code: u8,
    why: String,
}

fn rolled_back(why: impl Into<String>) -> Abort {
    Abort {
        code: code::ROLLED_BACK,
        why: why.into(),
    }
}

/// Publish FILE in one transaction.
pub(super) async fn run(
    config: &Config,
    args: &PublishArgs,
    exchange: ShortString,
    connector: Connector,
) -> anyhow::Result<u8> {
    let path = args
        .file
        .as_deref()
        .expect("clap: --transaction requires FILE");
    let input_name = if path.as_os_str() == "-" {
        "standard input".to_owned()
    } else {
        path.display().to_string()
    };
    let mut input = Source::open(path).await?.spawn_reader(input_name.clone());
    let shutdown = Shutdown::new();
    shutdown::on_signals(shutdown.clone()).context("installing signal handlers")?;
    let connected = tokio::select! {
        biased;
        _ = shutdown.triggered() => {
            return Err(Exit::new(code::ROLLED_BACK, anyhow!("interrupted before connecting; nothing was published")));
        }
        c = connector.connect_within(args.timeout) => c.context("nothing was published")?,
    };
    let tx = Tx {
        exchange,
        topic_prefix: config.topic_prefix.clone(),
        mandatory: !args.allow_unroutable,
        timeout: args.timeout,
        input_name,
    };
    let result = tx.publish(&connected, &mut input, &shutdown).await;
    close(&connected).await;
    match result {
        Ok((count, returned)) if returned.is_empty() => {
            tracing::info!(
                "published {count} message{} in one transaction to exchange '{}'",
                plural(count),
                tx.exchange
            );
            Ok(code::OK)
        }
        Ok((count, returned)) => Err(Exit::new(
            code::PUBLISH_REFUSED,
            anyhow!(
                "the transaction of {count} messages was committed, but the broker returned {} \
                 of them as unroutable with the commit (RabbitMQ routes transactional messages \
                 at the commit, too late to roll back): {}",
                returned.len(),
                returned.join("; ")
            ),
        )),
        Err(abort) => Err(Exit::new(abort.code, anyhow!("{}", abort.why))),
    }
}

struct Tx {
    exchange: ShortString,
    topic_prefix: String,
    mandatory: bool,
    timeout: Duration,
    input_name: String,
}

impl Tx {
    /// Publish everything and commit: the number of messages and the returns that came with
    /// the commit.
    async fn publish(
        &self,
        connected: &Connected,
        input: &mut mpsc::Receiver<Read>,
        shutdown: &Shutdown,
    ) -> Result<(u64, Vec<String>), Abort> {
        let channel = self
            .step(connected.connection.create_channel(), "opening a channel")
            .await?;
        self.step(channel.tx_select(), "starting the transaction (tx.select)")
            .await?;
        let options = BasicPublishOptions {
            mandatory: self.mandatory,
            immediate: false,
        };
        let mut count = 0u64;
        let result: Result<(), Abort> = async {
            loop {
                let read = tokio::select! {
                    biased;
                    _ = shutdown.triggered() => {
                        return Err(rolled_back(format!(
                            "interrupted after {count} messages of {}", self.input_name
                        )));
                    }
                    read = input.recv() => read,
                };
                let Some(Read { item, .. }) = read else {
                    return Ok(());
                };
                let out = match item {
                    Item::Message { line, message } => {
                        Outgoing::new(count + 1, line, *message, &self.topic_prefix).map_err(
                            |why| rolled_back(format!("line {line} of {}: {why}", self.input_name)),
                        )?
                    }
                    Item::Invalid { line, reason } => {
                        return Err(rolled_back(format!(
                            "line {line} of {}: {reason}",
                            self.input_name
                        )));
                    }
                    Item::Error(err) => return Err(rolled_back(format!("{err:#}"))),
                };
                out.publish(&channel, &self.exchange, options)
                    .await
                    .map_err(|e| {
                        rolled_back(format!(
                            "the broker refused {}: {}",
                            out.describe(),
                            refusal(&channel, &e)
                        ))
                    })?;
                count += 1;
            }
        }
        .await;
        if let Err(mut abort) = result {
            abort.why = self.end_without_commit(&channel, abort.why).await;
            return Err(abort);
        }
        if count == 0 {
            let _ = channel.tx_rollback().await;
            return Ok((0, Vec::new()));
        }
        // A round trip: the broker has handled every publish before it answers, so a refusal
        // (a closed channel) or a return it sends at publish time has arrived.
        let checked = self
            .step(
                channel.basic_qos(0, BasicQosOptions::default()),
                "checking the messages before the commit",
            )
            .await;
        if let Err(mut abort) = checked {
            abort.why = self.end_without_commit(&channel, abort.why).await;
            return Err(abort);
        }
        let returned = returns(&channel).await;
        if !returned.is_empty() {
            let why = format!(
                "the broker returned {} message{}: {}",
                returned.len(),
                plural(returned.len() as u64),
                returned.join("; ")
            );
            return Err(rolled_back(self.end_without_commit(&channel, why).await));
        }
        match tokio::time::timeout(self.timeout, channel.tx_commit()).await {
            Ok(Ok(())) => Ok((count, returns(&channel).await)),
            Ok(Err(e)) if soft_error(&e).is_some() => Err(rolled_back(format!(
                "the broker refused the commit of {count} messages ({}); nothing was published",
                soft_error(&e).unwrap_or_default()
            ))),
            Ok(Err(e)) => Err(Abort {
                code: code::PUBLISH_TIMEOUT,
                why: format!(
                    "the commit of {count} messages was sent but not answered ({}): the broker \
                     may or may not have committed it",
                    loss_text(&e)
                ),
            }),
            Err(_) => Err(Abort {
                code: code::PUBLISH_TIMEOUT,
                why: format!(
                    "the commit of {count} messages was not answered within {:.0} s (--timeout): \
                     the broker may or may not have committed it",
                    self.timeout.as_secs_f64()
                ),
            }),
        }
    }

    /// One step before anything is committed; a failure is a rollback.
    async fn step<T>(
        &self,
        fut: impl std::future::Future<Output = lapin::Result<T>>,
        doing: &str,
    ) -> Result<T, Abort> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(rolled_back(format!(
                "{doing}: {}",
                soft_error(&e).unwrap_or_else(|| loss_text(&e))
            ))),
            Err(_) => Err(rolled_back(format!(
                "{doing}: no answer within {:.0} s (--timeout)",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// Roll back if the channel is still open (a closed channel discarded the transaction),
    /// and say so.
    async fn end_without_commit(&self, channel: &Channel, why: String) -> String {
        if channel.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.tx_rollback()).await;
        }
        format!("{why}; the transaction was rolled back: nothing was published")
    }
}

/// Why a publish failed: the broker's refusal that closed the channel, or the lost
/// connection.
fn refusal(channel: &Channel, err: &lapin::Error) -> String {
    soft_error(err).unwrap_or_else(|| {
        if channel.status().connected() {
            err.to_string()
        } else {
            loss_text(err)
        }
    })
}

/// The messages the broker returned so far, described.
async fn returns(channel: &Channel) -> Vec<String> {
    channel
        .wait_for_confirms()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let id = r
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map_or("<none>", |s| s.as_str());
            format!(
                "message {id} ({} {}, routing key '{}')",
                r.reply_code,
                r.reply_text.as_str(),
                r.delivery.routing_key.as_str()
            )
        })
        .collect()
}
