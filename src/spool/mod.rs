//! The local spool: store-and-forward publishing (issue 14). `fm publish --spool` writes
//! messages durably into a folder and returns at once, broker up or down; `fm relay` publishes
//! them, in order, and deletes them only once the broker confirmed them — as Postfix's
//! maildrop and queue manager do for mail.
//!
//! # Layout
//! ```text
//! DIR/tmp/PID-RANDOM.tmp     a batch being written (flock'ed by its writer while it lives)
//! DIR/queue/STAMP-COUNT-PID.batch   batches waiting to be published, oldest name first
//! DIR/failed/NAME.jsonl      messages the broker returned or refused (record format) and
//! DIR/failed/NAME.reasons    why, one line per message
//! DIR/bad/NAME               files that are not batches, and lines that are not messages
//! DIR/clock                  the last STAMP given out (writers take it under flock)
//! DIR/relay.lock             flock'ed by the one relay of the spool; holds its pid
//! DIR/relay.progress         how far the relay got into the batch it is publishing
//! ```
//!
//! # One file per call: a batch
//! Each `fm publish --spool` call writes one file, a *batch*: a header line (the exchange,
//! topic prefix and mandatory flag the writer asked for, [`Header`]) and then the messages in
//! the record format, one a line, ids and `sent-at` already given so that a message sent twice
//! carries the same id. The batch is written under `tmp/`, `fsync`ed, renamed into `queue/`
//! and the `queue/` folder is `fsync`ed: two fsyncs per call, however many messages it holds
//! (a file per message would cost a pair per message: 10,000 messages, 20,000 fsyncs). The
//! rename is atomic, so a writer killed at any instant leaves either its whole batch in
//! `queue/` or nothing there (a leftover in `tmp/`, which the relay removes once no writer
//! holds its lock): a call is all or nothing, which is stronger than message by message.
//!
//! # Order
//! A batch's name starts with a 20-digit *stamp*, so names sort in stamp order. Writers take
//! the stamp under an exclusive `flock` of `DIR/clock`, as `max(now in ns, last stamp + 1)`,
//! and rename while they hold it: a batch that appears later always has a greater name than
//! every batch already in `queue/`, and a writer's later call (it starts after the earlier
//! one returned) sorts after its earlier one. The relay publishes batches in name order and
//! each batch's lines in order, so every writer's order is kept. The stamp is the wall clock
//! kept monotonic by the last stamp (no fsync needed: after a crash the clock has moved on; a
//! clock stepped back only means the stamp keeps counting from the last one). The rename uses
//! `RENAME_NOREPLACE`, so even a clock file lost in a crash can never replace a batch.
//!
//! The name also holds the number of messages, so the relay can tell the spool's depth and the
//! oldest message's age from a directory listing.

pub mod read;
pub mod write;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The folder of batches waiting to be published.
pub const QUEUE: &str = "queue";
/// The folder where writers build their batches.
pub const TMP: &str = "tmp";
/// The folder of messages the broker returned or refused.
pub const FAILED: &str = "failed";
/// The folder of files and lines that could not be read.
pub const BAD: &str = "bad";
/// The stamp clock.
pub const CLOCK: &str = "clock";
/// The relay's lock.
pub const LOCK: &str = "relay.lock";
/// The relay's position in the batch it is publishing.
pub const PROGRESS: &str = "relay.progress";
/// The version of the batch format, in every header.
pub const FORMAT: u32 = 1;
/// A batch's file name ends with this.
const SUFFIX: &str = ".batch";

/// A spool folder.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    /// The spool at `root`, which must be an existing folder; its sub-folders are created
    /// when missing.
    pub fn open(root: &Path) -> io::Result<Spool> {
        let meta = std::fs::metadata(root)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "it is not a folder",
            ));
        }
        for sub in [TMP, QUEUE] {
            match std::fs::create_dir(root.join(sub)) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        Ok(Spool {
            root: root.to_owned(),
        })
    }

    /// The spool folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `DIR/NAME`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A folder of the spool, created when missing (`failed/`, `bad/`).
    pub fn folder(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.root.join(name);
        match std::fs::create_dir(&path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(path),
        }
    }
}

/// The first line of a batch: how its messages are to be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT`].
    #[serde(rename = "fm-spool")]
    pub format: u32,
    /// The exchange to publish to.
    pub exchange: String,
    /// Prepended to each topic to make the routing key.
    pub topic_prefix: String,
    /// Publish with `mandatory` (a message no queue receives is returned, and failed).
    pub mandatory: bool,
}

impl Header {
    /// The header line, without its newline.
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("a header serialises")
    }

    /// Read a header line.
    pub fn parse(line: &[u8]) -> Result<Header, String> {
        let header: Header = serde_json::from_slice(line)
            .map_err(|e| format!("the first line is not a spool header ({e})"))?;
        if header.format != FORMAT {
            return Err(format!(
                "spool format {} is not {FORMAT}, the one this fm reads",
                header.format
            ));
        }
        Ok(header)
    }
}

/// What a batch's name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name {
    /// When it was spooled, in ns since the epoch (kept monotonic: see the module docs).
    pub stamp: u64,
    /// How many messages it holds.
    pub count: u64,
}

impl Name {
    /// `STAMP-COUNT-PID.batch`, the stamp on 20 digits so that names sort by stamp.
    pub fn format(&self, pid: u32) -> String {
        format!("{:020}-{}-{pid}{SUFFIX}", self.stamp, self.count)
    }

    /// The name of a batch file, or `None` for a file that is not one.
    pub fn parse(file_name: &str) -> Option<Name> {
        let rest = file_name.strip_suffix(SUFFIX)?;
        let mut parts = rest.split('-');
        let stamp = parts.next().filter(|s| s.len() == 20)?;
        let count = parts.next()?;
        let pid = parts.next()?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if parts.next().is_some() || !digits(stamp) || !digits(count) || !digits(pid) {
            return None;
        }
        Some(Name {
            stamp: stamp.parse().ok()?,
            count: count.parse().ok()?,
        })
    }
}

/// The spool folder: `given` on the command line (`--spool DIR`), else the configuration's
/// `[spool] directory`; neither is a usage error that says how to name one.
pub fn directory(given: Option<&Path>, config: &crate::config::Config) -> anyhow::Result<PathBuf> {
    given
        .map(Path::to_path_buf)
        .or_else(|| config.spool.directory.clone())
        .ok_or_else(|| {
            crate::error::Exit::new(
                crate::error::code::USAGE,
                anyhow::anyhow!(
                    "no spool folder: give --spool DIR, or set [spool] directory in the \
                     configuration"
                ),
            )
        })
}

/// `fsync` a folder, so that the names created or renamed in it survive a crash.
pub fn sync_folder(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spool_folder_comes_from_the_flag_then_the_configuration() {
        let mut config = crate::config::Config::default();
        let err = directory(None, &config).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&err), crate::error::code::USAGE);
        assert!(format!("{err:#}").contains("[spool] directory"), "{err:#}");
        config.spool.directory = Some(PathBuf::from("/var/spool/fm/a"));
        assert_eq!(
            directory(None, &config).unwrap(),
            Path::new("/var/spool/fm/a")
        );
        assert_eq!(
            directory(Some(Path::new("/tmp/b")), &config).unwrap(),
            Path::new("/tmp/b")
        );
    }

    #[test]
    fn names_sort_by_stamp_and_refuse_strangers() {
        let a = Name { stamp: 9, count: 3 }.format(77);
        let b = Name {
            stamp: 10,
            count: 1,
        }
        .format(5);
        assert_eq!(a, "00000000000000000009-3-77.batch");
        assert!(a < b);
        assert_eq!(Name::parse(&a), Some(Name { stamp: 9, count: 3 }));
        for strange in [
            "garbage",
            "00000000000000000009-3-77.batch.tmp",
            "0009-3-77.batch",
            "00000000000000000009-x-77.batch",
            "00000000000000000009-3-77-1.batch",
            "00000000000000000009--77.batch",
        ] {
            assert_eq!(Name::parse(strange), None, "{strange}");
        }
    }

    #[test]
    fn headers_round_trip_and_refuse_other_formats() {
        let h = Header {
            format: FORMAT,
            exchange: "amq.topic".into(),
            topic_prefix: "org.".into(),
            mandatory: true,
        };
        assert_eq!(Header::parse(h.line().as_bytes()), Ok(h));
        assert!(
            Header::parse(
                br#"{"fm-spool": 2, "exchange": "", "topic_prefix": "", "mandatory": true}"#
            )
            .unwrap_err()
            .contains("format 2")
        );
        assert!(Header::parse(b"{\"topic\": \"t\"}").is_err());
    }
}
