//! The durable enqueue: a batch is written under `tmp/`, `fsync`ed, given a stamp under the
//! clock's lock (written to the clock first), renamed into `queue/` (never over another file),
//! and `queue/` is `fsync`ed. Until the rename nothing of it is visible to the relay; if
//! anything before it fails the temporary file is removed, so a full disk leaves nothing
//! half-written behind. Only the last `fsync` comes after the rename: its failure is told
//! apart ([`CommitError::NotSynced`]), because the batch is then spooled, but not durably.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use rustix::fs::{FlockOperation, RenameFlags};

use super::{CLOCK, Header, Name, QUEUE, Spool, TMP, now_ns, sync_folder};
use crate::message::Message;

/// Why [`Batch::commit`] failed.
#[derive(Debug)]
pub enum CommitError {
    /// Nothing of the batch is in `queue/` (a full disk, an I/O error before the rename).
    NotSpooled(io::Error),
    /// The batch is in `queue/` as `name`, and the relay will send it, but `queue/` could not
    /// be synced: a crash of the machine before its next sync may lose it.
    NotSynced { name: String, err: io::Error },
}

impl From<io::Error> for CommitError {
    fn from(err: io::Error) -> CommitError {
        CommitError::NotSpooled(err)
    }
}

/// A batch being written. Dropping it without [`Batch::commit`] removes the temporary file.
pub struct Batch {
    spool: Spool,
    tmp: PathBuf,
    /// Locked (`flock`) while the writer lives: the relay removes only unlocked leftovers.
    file: Option<BufWriter<File>>,
    count: u64,
    /// Renamed into `queue/`: no longer ours to remove.
    committed: bool,
}

impl Batch {
    /// Start a batch of messages to publish as `header` says.
    pub fn create(spool: &Spool, header: &Header) -> io::Result<Batch> {
        let name = format!("{}-{:016x}.tmp", std::process::id(), fastrand::u64(..));
        let tmp = spool.root().join(TMP).join(name);
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut batch = Batch {
            spool: spool.clone(),
            tmp,
            file: None,
            count: 0,
            committed: false,
        };
        rustix::fs::flock(&file, FlockOperation::LockExclusive)?;
        let mut file = BufWriter::with_capacity(1 << 16, file);
        file.write_all(header.line().as_bytes())?;
        file.write_all(b"\n")?;
        batch.file = Some(file);
        Ok(batch)
    }

    /// Add a message (already prepared for publishing: its id and `sent-at` are kept).
    pub fn push(&mut self, message: &Message) -> io::Result<()> {
        let file = self.file.as_mut().expect("open until committed");
        let mut line = message.record_line();
        line.push('\n');
        file.write_all(line.as_bytes())?;
        self.count += 1;
        Ok(())
    }

    /// How many messages were added.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether no message was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Make the batch durable and visible to the relay; returns its name in `queue/`.
    pub fn commit(mut self) -> Result<String, CommitError> {
        let file = self.file.take().expect("open until committed");
        let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        let queue = self.spool.root().join(QUEUE);
        let name = {
            let clock = Clock::lock(&self.spool)?;
            let mut stamp = clock.next()?;
            loop {
                let name = Name {
                    stamp,
                    count: self.count,
                }
                .format(std::process::id());
                // The clock before the rename: a clock that cannot be written (a full disk,
                // when the first batch makes the file) then fails the call with nothing
                // spooled, and a stamp once visible in queue/ is never given out again.
                clock.set(stamp)?;
                match rename_no_replace(&self.tmp, &queue.join(&name)) {
                    Ok(()) => {
                        self.committed = true;
                        break name;
                    }
                    // Only if the clock file was lost: take the next stamp.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => stamp += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        drop(file); // releases the writer's lock
        sync_folder(&queue).map_err(|err| CommitError::NotSynced {
            name: name.clone(),
            err,
        })?;
        Ok(name)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `rename(2)` that never replaces an existing file (`RENAME_NOREPLACE`); on a file system
/// without it, a plain rename (the clock's lock already makes names unique).
fn rename_no_replace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        RenameFlags::NOREPLACE,
    ) {
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => std::fs::rename(from, to),
        other => other.map_err(io::Error::from),
    }
}

/// The stamp clock, locked: `DIR/clock` holds the last stamp given out (8 bytes).
struct Clock {
    file: File,
}

impl Clock {
    fn lock(spool: &Spool) -> io::Result<Clock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(spool.root().join(CLOCK))?;
        rustix::fs::flock(&file, FlockOperation::LockExclusive)?;
        Ok(Clock { file })
    }

    /// `max(now, last + 1)`.
    fn next(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        let last = match self.file.read_exact_at(&mut buf, 0) {
            Ok(()) => u64::from_le_bytes(buf),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        Ok(now_ns().max(last.saturating_add(1)))
    }

    fn set(&self, stamp: u64) -> io::Result<()> {
        self.file.write_all_at(&stamp.to_le_bytes(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format: super::super::FORMAT,
            exchange: "amq.topic".into(),
            topic_prefix: String::new(),
            mandatory: true,
        }
    }

    fn message(n: u32) -> Message {
        crate::publish::parse_line(format!(r#"{{"topic": "t", "body": {{"n": {n}}}}}"#).as_bytes())
            .unwrap()
    }

    #[test]
    fn batches_appear_whole_in_order_and_leave_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut names = Vec::new();
        for n in 0..3 {
            let mut b = Batch::create(&spool, &header()).unwrap();
            b.push(&message(n)).unwrap();
            b.push(&message(n + 10)).unwrap();
            names.push(b.commit().unwrap());
        }
        let mut listed: Vec<String> = std::fs::read_dir(dir.path().join(QUEUE))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        assert_eq!(listed, names, "names sort in the order of the calls");
        let text = std::fs::read_to_string(dir.path().join(QUEUE).join(&names[0])).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(Header::parse(lines[0].as_bytes()), Ok(header()));
        assert_eq!(Name::parse(&names[0]).unwrap().count, 2);

        let mut b = Batch::create(&spool, &header()).unwrap();
        b.push(&message(1)).unwrap();
        drop(b);
        assert_eq!(std::fs::read_dir(dir.path().join(TMP)).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join(QUEUE)).unwrap().count(),
            3
        );
    }
}
