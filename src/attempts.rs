//! Poison-message detection for `[callback] max_redeliveries`: how often each message was handed
//! to the callback without being settled for good, remembered across crashes.
//!
//! A message that makes the callback fail, hang past its timeout or crash fm itself (a native
//! plugin's segfault) comes back again and again. Two counts that look right are wrong:
//! - the broker's `x-delivery-count` (quorum queues) counts deliveries, prefetched ones too: a
//!   message that sat in the prefetch window while another one crashed fm was dropped as
//!   poison without ever reaching the callback (issue 17);
//! - a count in memory dies with the process, so a message that crashes fm is never caught.
//!
//! So fm counts *attempts*: a message is an attempt once it is handed to the callback. Before
//! the call it writes `+KEY` to a journal, after it `-KEY N` (N: the attempts that did not
//! settle it, 0 once acked or dropped). A journal that ends with `+KEY` tells the next fm that
//! this message was in the callback when fm died: one more attempt. When a message arrives with
//! more than `max_redeliveries` attempts behind it, it is dropped (dead-lettered where the queue
//! has a dead-letter exchange) with a log line naming it, and no other message is.
//!
//! The journal lives in the state folder (`$STATE_DIRECTORY`, which the systemd unit's
//! `StateDirectory=` sets; else `$XDG_STATE_HOME/fm` or `~/.local/state/fm`), one file per
//! process (`attempts-CONFIG-PID.log`, locked while it runs); a new fm adopts the files of dead
//! ones for the same configuration, so several consumers on one queue work. The journal is
//! written, not synced: it survives a crash of fm, not of the machine. Without a state folder
//! the count is kept in memory only (said at start). Messages are known by their id (or, without
//! one, by topic and body), as a 64-bit FNV-1a hash: stable across fm versions.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::message::Received;

/// A journal longer than this is rewritten from what is still worth knowing.
const COMPACT_AT: u64 = 4 << 20;

/// What to do with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the callback; then report how that went with [`Attempts::end`].
    Hand(Key),
    /// It was handed to the callback this many times without being settled: drop it.
    Drop(u32),
}

/// A message's identity in the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u64);

/// The attempts per message (see the module docs).
pub struct Attempts {
    max: Option<u32>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Attempts that did not settle the message, per message; absent means none.
    failed: HashMap<Key, u32>,
    /// Messages in the callback now (a message may be in it twice: redelivered to another
    /// consumer of this process while the first call runs).
    running: HashMap<Key, u32>,
    journal: Option<Journal>,
}

struct Journal {
    path: PathBuf,
    file: File,
    written: u64,
}

impl Attempts {
    /// No counting at all (`max_redeliveries` unset).
    pub fn off() -> Attempts {
        Attempts {
            max: None,
            state: Mutex::default(),
        }
    }

    /// Counting for `max` (None: off), with the journal in `folder` for the configuration
    /// `config_id` (None: in memory only). Adopts the journals of dead fm processes.
    pub fn open(max: Option<u32>, folder: Option<&Path>, config_id: &str) -> Attempts {
        let Some(max) = max else {
            return Attempts::off();
        };
        let mut state = State::default();
        match folder {
            Some(folder) => match Journal::open(folder, config_id, &mut state.failed) {
                Ok(journal) => {
                    tracing::info!(
                        "max_redeliveries: counting attempts in {}",
                        journal.path.display()
                    );
                    state.journal = Some(journal);
                }
                Err(e) => tracing::warn!(
                    "max_redeliveries: cannot keep a journal in {}: {e}; counting in memory \
                     only, so a message that crashes fm is not caught",
                    folder.display()
                ),
            },
            None => tracing::info!(
                "max_redeliveries: no state folder (STATE_DIRECTORY, XDG_STATE_HOME or HOME): \
                 counting in memory only, so a message that crashes fm is not caught"
            ),
        }
        Attempts {
            max: Some(max),
            state: Mutex::new(state),
        }
    }

    /// Before handing `msg` to the callback.
    pub fn begin(&self, msg: &Received) -> Verdict {
        let Some(max) = self.max else {
            return Verdict::Hand(Key(0));
        };
        let key = Key::of(msg);
        let mut state = self.lock();
        let failed = state.failed.get(&key).copied().unwrap_or(0);
        if failed > max {
            state.failed.remove(&key);
            state.write(&format!("-{key} 0\n"));
            return Verdict::Drop(failed);
        }
        *state.running.entry(key).or_insert(0) += 1;
        state.write(&format!("+{key}\n"));
        Verdict::Hand(key)
    }

    /// After the callback: `settled` when the message will not come back (acked, dropped).
    pub fn end(&self, key: Key, settled: bool) {
        if self.max.is_none() {
            return;
        }
        let mut state = self.lock();
        if let Some(n) = state.running.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                state.running.remove(&key);
            }
        }
        let failed = if settled {
            state.failed.remove(&key);
            0
        } else {
            let n = state.failed.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        state.write(&format!("-{key} {failed}\n"));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The state folder: `$STATE_DIRECTORY` (systemd's `StateDirectory=`; the first of a list),
/// else `$XDG_STATE_HOME/fm`, else `$HOME/.local/state/fm`.
pub fn state_folder(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    if let Some(dirs) = set("STATE_DIRECTORY") {
        return dirs.split(':').next().map(PathBuf::from);
    }
    if let Some(state) = set("XDG_STATE_HOME") {
        return Some(Path::new(&state).join("fm"));
    }
    set("HOME").map(|home| Path::new(&home).join(".local/state/fm"))
}

/// The name journals of consumers of `queues` share (`attempts-ID-PID.log`): consumers of the
/// same queues count the same messages.
pub fn config_id(queues: &[&str]) -> String {
    let mut sorted = queues.to_vec();
    sorted.sort_unstable();
    let parts: Vec<&[u8]> = sorted.iter().flat_map(|q| [q.as_bytes(), b"\0"]).collect();
    format!("{:016x}", fnv1a(&parts))
}

impl Key {
    fn of(msg: &Received) -> Key {
        let m = &msg.message;
        Key(match &m.id {
            Some(id) => fnv1a(&[b"id\0", id.as_bytes()]),
            None => fnv1a(&[b"body\0", m.topic.as_bytes(), b"\0", msg.record.as_bytes()]),
        })
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// 64-bit FNV-1a over the concatenation of `parts`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl State {
    /// Appends `line` to the journal. A journal that cannot be written any more is given up
    /// (said once): counting goes on in memory.
    fn write(&mut self, line: &str) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        if let Err(e) = journal.file.write_all(line.as_bytes()) {
            tracing::warn!(
                "max_redeliveries: cannot write {}: {e}; counting in memory only from now on",
                journal.path.display()
            );
            self.journal = None;
            return;
        }
        journal.written += line.len() as u64;
        if journal.written > COMPACT_AT {
            let snapshot = snapshot(&self.failed, &self.running);
            if let Err(e) = journal.rewrite(&snapshot) {
                tracing::warn!(
                    "max_redeliveries: cannot rewrite {}: {e}; counting in memory only from now on",
                    journal.path.display()
                );
                self.journal = None;
            }
        }
    }
}

/// The journal lines that say all of `failed` and `running`.
fn snapshot(failed: &HashMap<Key, u32>, running: &HashMap<Key, u32>) -> String {
    let mut text = String::new();
    for (key, n) in failed {
        text.push_str(&format!("-{key} {n}\n"));
    }
    for key in running.keys() {
        text.push_str(&format!("+{key}\n"));
    }
    text
}

impl Journal {
    /// Creates this process's journal in `folder`, after adopting (reading, then deleting) the
    /// journals of dead processes for the same configuration into `failed`.
    fn open(
        folder: &Path,
        config_id: &str,
        failed: &mut HashMap<Key, u32>,
    ) -> std::io::Result<Journal> {
        std::fs::create_dir_all(folder)?;
        let prefix = format!("attempts-{config_id}-");
        for entry in std::fs::read_dir(folder)? {
            let path = entry?.path();
            let adopt = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".log"));
            if adopt && let Some(file) = lock_if_dead(&path)? {
                replay(BufReader::new(&file), failed);
                std::fs::remove_file(&path)?;
            }
        }
        let path = folder.join(format!("{prefix}{}.log", std::process::id()));
        // Locked before it is emptied: never truncate a journal another fm still writes.
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        file.set_len(0)?;
        let mut journal = Journal {
            path,
            file,
            written: 0,
        };
        journal.rewrite(&snapshot(failed, &HashMap::new()))?;
        Ok(journal)
    }

    /// Replaces the journal's content with `text` (written beside it, then renamed over it,
    /// so a crash leaves the old journal or the new one, never half of one).
    fn rewrite(&mut self, text: &str) -> std::io::Result<()> {
        let fresh = self.path.with_extension("new");
        let mut file = File::create(&fresh)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&fresh, &self.path)?;
        // Written at its end from now on; its lock never lapses.
        self.file = file;
        self.written = text.len() as u64;
        Ok(())
    }
}

/// The journal at `path`, locked, if no running process holds it; `None` if one does.
fn lock_if_dead(path: &Path) -> std::io::Result<Option<File>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads a journal into `failed`: the last count written for each message stands, plus one
/// when the message was in the callback after it (its process died during that call). Lines
/// that do not parse (a journal from elsewhere) are skipped.
fn replay(journal: impl std::io::BufRead, failed: &mut HashMap<Key, u32>) {
    // Per message: the last count written, and whether a call began after it.
    let mut last: HashMap<Key, (u32, bool)> = HashMap::new();
    for line in journal.lines().map_while(Result::ok) {
        let (began, rest) = match line.split_at_checked(1) {
            Some(("+", rest)) => (true, rest),
            Some(("-", rest)) => (false, rest),
            _ => continue,
        };
        let mut words = rest.split(' ');
        let Some(Ok(key)) = words.next().map(|k| u64::from_str_radix(k, 16)) else {
            continue;
        };
        let entry = last.entry(Key(key)).or_insert((0, false));
        if began {
            entry.1 = true;
        } else {
            match words.next().map(str::parse) {
                Some(Ok(n)) => *entry = (n, false),
                _ => continue,
            }
        }
    }
    for (key, (count, died_in_call)) in last {
        let now = count.saturating_add(u32::from(died_in_call));
        let before = failed.get(&key).copied().unwrap_or(0);
        if now.max(before) == 0 {
            failed.remove(&key);
        } else {
            failed.insert(key, now.max(before));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> Key {
        Key(n)
    }

    fn replayed(text: &str) -> HashMap<Key, u32> {
        let mut failed = HashMap::new();
        replay(text.as_bytes(), &mut failed);
        failed
    }

    #[test]
    fn a_message_in_the_callback_when_fm_died_failed_once_more() {
        let text = "-00000000000000aa 2\n+00000000000000aa\n+00000000000000bb\n";
        assert_eq!(
            replayed(text),
            HashMap::from([(key(0xaa), 3), (key(0xbb), 1)])
        );
    }

    #[test]
    fn a_settled_message_is_forgotten_and_garbage_skipped() {
        let text = "+00000000000000aa\n-00000000000000aa 0\nnonsense\n+zz\n-00000000000000cc x\n";
        assert!(replayed(text).is_empty());
    }

    #[test]
    fn the_state_folder_follows_systemd_then_xdg_then_home() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            state_folder(env(&[
                ("STATE_DIRECTORY", "/var/lib/fm/a:/x"),
                ("HOME", "/h")
            ])),
            Some(PathBuf::from("/var/lib/fm/a"))
        );
        assert_eq!(
            state_folder(env(&[("XDG_STATE_HOME", "/s"), ("HOME", "/h")])),
            Some(PathBuf::from("/s/fm"))
        );
        assert_eq!(
            state_folder(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.local/state/fm"))
        );
        assert_eq!(state_folder(env(&[])), None);
    }

    #[test]
    fn fnv1a_is_the_standard_one() {
        // The published test vectors of 64-bit FNV-1a.
        assert_eq!(fnv1a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foo", b"bar"]), fnv1a(&[b"foobar"]));
    }

    #[test]
    fn a_new_process_adopts_a_dead_ones_journal_and_counts_on() {
        let dir = tempfile::tempdir().unwrap();
        // A journal left by a process that died (nobody holds its lock) with one message
        // in the callback, seen twice before.
        let dead = dir.path().join("attempts-cfg-1.log");
        std::fs::write(&dead, "-0000000000000abc 2\n+0000000000000abc\n").unwrap();
        // Another configuration's journal is not ours.
        let other = dir.path().join("attempts-other-1.log");
        std::fs::write(&other, "+0000000000000abc\n").unwrap();

        let attempts = Attempts::open(Some(2), Some(dir.path()), "cfg");
        assert!(!dead.exists(), "adopted and removed");
        assert!(other.exists());
        assert_eq!(attempts.lock().failed.get(&key(0xabc)), Some(&3));
        let own = dir
            .path()
            .join(format!("attempts-cfg-{}.log", std::process::id()));
        assert_eq!(
            std::fs::read_to_string(&own).unwrap(),
            "-0000000000000abc 3\n"
        );

        // A second fm of the same configuration cannot adopt a journal whose process lives.
        let second = Attempts::open(Some(2), Some(dir.path()), "cfg");
        assert!(own.exists());
        assert!(second.lock().failed.is_empty());
        drop(second);
        drop(attempts);
    }
}
