//! The relay's side of the spool: the ordered scan of `queue/`, reading a batch line by line,
//! moving aside what is not a batch (or not a message), the progress mark, and removing what
//! dead writers left in `tmp/`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::time::Duration;

use rustix::fs::FlockOperation;

use super::{BAD, Header, Name, PROGRESS, QUEUE, Spool, TMP};

/// A batch in `queue/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its file name.
    pub file_name: String,
    /// What the name says.
    pub name: Name,
}

/// The batches in `queue/`, oldest first, and the names of the files there that are not
/// batches.
pub fn list(spool: &Spool) -> io::Result<(Vec<Entry>, Vec<String>)> {
    let mut batches = Vec::new();
    let mut strangers = Vec::new();
    for entry in std::fs::read_dir(spool.root().join(QUEUE))? {
        let entry = entry?;
        let Ok(file_name) = entry.file_name().into_string() else {
            strangers.push(entry.file_name().to_string_lossy().into_owned());
            continue;
        };
        match Name::parse(&file_name) {
            Some(name) => batches.push(Entry { file_name, name }),
            None => strangers.push(file_name),
        }
    }
    batches.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok((batches, strangers))
}

/// Move `queue/NAME` to `bad/NAME` (with a suffix if that exists), and log why.
pub fn quarantine(spool: &Spool, file_name: &str, why: &str) {
    let from = spool.root().join(QUEUE).join(file_name);
    let moved = spool.folder(BAD).and_then(|bad| {
        let mut to = bad.join(file_name);
        let mut n = 1;
        while to.exists() {
            to = bad.join(format!("{file_name}.{n}"));
            n += 1;
        }
        std::fs::rename(&from, &to).map(|()| to)
    });
    match moved {
        Ok(to) => tracing::warn!(
            "{} cannot be read as a batch of messages ({why}): moved aside to {}",
            from.display(),
            to.display()
        ),
        Err(e) => tracing::error!(
            "{} cannot be read as a batch of messages ({why}), and moving it aside failed: {e}",
            from.display()
        ),
    }
}

/// Keep a line of a batch that is not a message: appended to `bad/NAME.lines`, and logged.
pub fn quarantine_line(spool: &Spool, file_name: &str, line: u64, raw: &[u8], why: &str) {
    let saved = spool.folder(BAD).and_then(|bad| {
        let path = bad.join(format!("{file_name}.lines"));
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        f.write_all(raw)?;
        if !raw.ends_with(b"\n") {
            f.write_all(b"\n")?;
        }
        f.sync_all()?;
        Ok(path)
    });
    match saved {
        Ok(path) => tracing::warn!(
            "line {line} of batch {file_name} is not a message ({why}): kept in {}",
            path.display()
        ),
        Err(e) => tracing::error!(
            "line {line} of batch {file_name} is not a message ({why}), and keeping it failed: {e}"
        ),
    }
}

/// A batch open for reading.
pub struct Reader {
    /// How its messages are published.
    pub header: Header,
    lines: BufReader<File>,
    /// Lines read after the header.
    pub line: u64,
}

/// The longest line read from a batch: RabbitMQ's largest message (128 MiB) written as JSON
/// fits; a longer one is cut there and then refused as not a message.
const MAX_LINE: u64 = 1 << 28;

impl Reader {
    /// Open `queue/NAME` and read its header. `Err(Ok(why))`: not a batch (move it aside);
    /// `Err(Err(e))`: it could not be read (it may have been removed).
    pub fn open(spool: &Spool, file_name: &str) -> Result<Reader, Result<String, io::Error>> {
        let file = File::open(spool.root().join(QUEUE).join(file_name)).map_err(Err)?;
        let mut lines = BufReader::with_capacity(1 << 16, file);
        let mut first = Vec::new();
        (&mut lines)
            .take(4096)
            .read_until(b'\n', &mut first)
            .map_err(Err)?;
        if !first.ends_with(b"\n") {
            return Err(Ok("it does not start with a spool header line".to_owned()));
        }
        let header = Header::parse(&first[..first.len() - 1]).map_err(Ok)?;
        Ok(Reader {
            header,
            lines,
            line: 0,
        })
    }

    /// The next line (with its newline, if it has one), or `None` at the end.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        buf.clear();
        let n = (&mut self.lines).take(MAX_LINE).read_until(b'\n', buf)?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        Ok(true)
    }
}

/// The relay's mark in the batch it is publishing: how many of its lines are done (confirmed,
/// failed or moved aside). One fixed-size record written with one `pwrite`, so a crash leaves
/// the old mark or the new one. It is not `fsync`ed: after a power failure an older mark only
/// means some messages are sent again (at-least-once).
pub struct Progress {
    file: File,
}

/// The size of the progress record.
const PROGRESS_BYTES: usize = 128;

impl Progress {
    /// Open (create) `DIR/relay.progress`.
    pub fn open(spool: &Spool) -> io::Result<Progress> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(spool.path(PROGRESS))?;
        Ok(Progress { file })
    }

    /// The batch and how many of its lines are done, if a mark was left.
    pub fn read(&self) -> Option<(String, u64)> {
        let mut buf = [0u8; PROGRESS_BYTES];
        self.file.read_exact_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf).ok()?.trim_end();
        let (name, done) = text.split_once(' ')?;
        Name::parse(name)?;
        Some((name.to_owned(), done.parse().ok()?))
    }

    /// Mark `done` lines of `file_name` as done.
    pub fn write(&self, file_name: &str, done: u64) -> io::Result<()> {
        let mut buf = [b' '; PROGRESS_BYTES];
        let text = format!("{file_name} {done}");
        if text.len() >= PROGRESS_BYTES {
            return Err(io::Error::other("the batch name is too long"));
        }
        buf[..text.len()].copy_from_slice(text.as_bytes());
        buf[PROGRESS_BYTES - 1] = b'\n';
        self.file.write_all_at(&buf, 0)
    }
}

/// Remove what writers left in `tmp/` when they died: files no writer holds locked, older than
/// `min_age` (a writer locks its file right after creating it). Returns how many.
pub fn remove_leftovers(spool: &Spool, min_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(spool.root().join(TMP)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if !old {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok()
            && std::fs::remove_file(&path).is_ok()
        {
            tracing::info!(
                "removed {}: a batch its writer did not finish (it was killed or failed)",
                path.display()
            );
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_mark_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let p = Progress::open(&spool).unwrap();
        assert_eq!(p.read(), None);
        let name = Name { stamp: 1, count: 5 }.format(3);
        p.write(&name, 4).unwrap();
        assert_eq!(p.read(), Some((name.clone(), 4)));
        p.write("00000000000000000002-1-3.batch", 1).unwrap();
        assert_eq!(p.read().unwrap().1, 1);
    }

    #[test]
    fn strangers_are_listed_apart_and_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let good = Name { stamp: 7, count: 1 }.format(1);
        std::fs::write(dir.path().join(QUEUE).join(&good), "x").unwrap();
        std::fs::write(dir.path().join(QUEUE).join("junk"), "x").unwrap();
        let (batches, strangers) = list(&spool).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(strangers, ["junk"]);
        assert!(matches!(Reader::open(&spool, &good), Err(Ok(_))));
        quarantine(&spool, "junk", "not a batch");
        assert!(dir.path().join(BAD).join("junk").is_file());
    }

    #[test]
    fn leftovers_of_dead_writers_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let dead = dir.path().join(TMP).join("1-dead.tmp");
        std::fs::write(&dead, "x").unwrap();
        let live = dir.path().join(TMP).join("2-live.tmp");
        std::fs::write(&live, "x").unwrap();
        // flock locks belong to the open file: another open of it is another owner.
        let holder = File::open(&live).unwrap();
        rustix::fs::flock(&holder, FlockOperation::LockExclusive).unwrap();
        assert_eq!(remove_leftovers(&spool, Duration::ZERO), 1);
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
