//! Bounds on what the configuration and the command line can make fm wait for, or read.
//!
//! Numbers and paths come from files and flags written by people: a slip such as
//! `timeout = 1e19` or `ca_cert = "/dev/zero"` must be an error that names the key or the
//! file (exit 2), not a panic when the duration is added to the clock, nor a read that never
//! ends. So everything of that kind passes through this module, and nothing else converts it:
//!
//! - [`seconds`] (and [`parse_seconds`] for text): every number of seconds fm reads — the
//!   configuration's `connection_timeout`, `shutdown_timeout` and `[callback] timeout`, the
//!   URL's `connection_timeout`, `stack_timeout`, `socket_timeout` and `retry_delay`, and
//!   `fm publish --timeout` — with one upper bound, [`MAX_SECONDS`];
//! - [`deadline_in`]: the one way a configured duration is added to the clock, checked, in case
//!   a duration ever reaches it without passing through [`seconds`];
//! - [`read_bounded`] and [`check_file`]: every file the configuration or the command line
//!   names (the configuration itself, `[tls]` files, plugins, `--callback-file`) must be a
//!   regular file — a FIFO would block the open, `/dev/zero` would be read forever — and the
//!   files fm reads whole are read through `take`, so even a file that lies about its size
//!   (procfs) cannot make fm read more than the limit.

use std::fs::{FileType, Metadata};
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail};

/// The longest duration fm accepts anywhere: one day, in seconds.
///
/// No wait of fm's is useful beyond a day: connection attempts, retry delays and publisher
/// confirms take seconds to minutes, a graceful stop must fit in systemd's `TimeoutStopSec`,
/// and a callback that works on one message for a day is stuck. A day is what
/// `fm publish --timeout` always allowed, and it is far below what the clock arithmetic
/// (`Instant + Duration`) and tokio's timer can hold, so no accepted value can overflow them.
pub const MAX_SECONDS: f64 = 86_400.0;

/// The shortest duration accepted where 0 is not: one millisecond. Anything shorter rounds to
/// nothing in practice (and a nanosecond of `1e-300` is a slip, not a setting).
pub const MIN_SECONDS: f64 = 0.001;

/// The largest configuration, `[tls]` or `--callback-file` file fm reads: 1 MiB. A TOML file
/// or a CA bundle is a few KiB (the system's whole trust store is about 200 KiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// `secs` as a [`Duration`], when it is finite, not negative, at most [`MAX_SECONDS`], and —
/// unless `zero_ok` — at least [`MIN_SECONDS`]. The error is the requirement, for the caller
/// to prefix with the key, option or flag and the value as written: "a number of seconds from
/// 0 to 86400 (1 day)".
pub fn seconds(secs: f64, zero_ok: bool) -> Result<Duration, String> {
    let min = if zero_ok { 0.0 } else { MIN_SECONDS };
    // NaN fails every comparison, so it fails this one too.
    if (min..=MAX_SECONDS).contains(&secs) {
        Duration::try_from_secs_f64(secs).map_err(|_| requirement(zero_ok))
    } else {
        Err(requirement(zero_ok))
    }
}

/// [`seconds`] for text (a URL's query value, a command-line flag): a decimal number.
pub fn parse_seconds(text: &str, zero_ok: bool) -> Result<Duration, String> {
    let secs: f64 = text.trim().parse().map_err(|_| requirement(zero_ok))?;
    seconds(secs, zero_ok)
}

fn requirement(zero_ok: bool) -> String {
    format!(
        "a number of seconds from {} to {MAX_SECONDS} (1 day)",
        if zero_ok { "0" } else { "0.001" }
    )
}

/// `now + after` on tokio's clock, checked: an overflow (which [`seconds`] rules out) waits
/// [`MAX_SECONDS`] instead of panicking.
pub fn deadline_in(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs_f64(MAX_SECONDS)))
        .unwrap_or(now)
}

/// Check that `path` is a regular file (following symbolic links) of at most `limit` bytes;
/// `what` names it in errors (`"[tls] ca_cert"`, `"plugin"`): `[tls] ca_cert /dev/zero is not
/// a regular file: it is a character device`. Nothing is opened, so a FIFO cannot block.
pub fn check_file(path: &Path, limit: Option<u64>, what: &str) -> anyhow::Result<Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow!(
            "{what} {} cannot be read: {}",
            path.display(),
            io_reason(&e)
        )
    })?;
    check_metadata(path, &meta, limit, what)?;
    Ok(meta)
}

fn check_metadata(
    path: &Path,
    meta: &Metadata,
    limit: Option<u64>,
    what: &str,
) -> anyhow::Result<()> {
    if !meta.is_file() {
        bail!(
            "{what} {} is not a regular file: it is {}",
            path.display(),
            kind(&meta.file_type())
        );
    }
    if let Some(limit) = limit
        && meta.len() > limit
    {
        bail!(
            "{what} {} is larger than {} ({} bytes)",
            path.display(),
            bytes(limit),
            meta.len()
        );
    }
    Ok(())
}

/// Read `path` whole, when it is a regular file of at most `limit` bytes (see
/// [`check_file`]). It is checked before it is opened (a FIFO would block the open) and again
/// once open (it may have been replaced), and read with `take(limit + 1)`, so a file whose size
/// grows or lies cannot make fm read more than `limit + 1` bytes.
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    check_file(path, Some(limit), what)?;
    let cannot = |e: std::io::Error| {
        anyhow!(
            "{what} {} cannot be read: {}",
            path.display(),
            io_reason(&e)
        )
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    check_metadata(path, &file.metadata().map_err(cannot)?, Some(limit), what)?;
    let mut bytes_read = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes_read)
        .map_err(cannot)?;
    if bytes_read.len() as u64 > limit {
        bail!("{what} {} is larger than {}", path.display(), bytes(limit));
    }
    Ok(bytes_read)
}

/// What a file that is not a regular file is, for messages: "a directory", "a FIFO"…
pub fn kind(file_type: &FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// "1 MiB", "64 KiB", "100 bytes".
fn bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// An I/O error as a phrase: "no such file or directory", without " (os error 2)".
pub fn io_reason(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_lowercase(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_bounded_to_a_day_and_zero_only_when_allowed() {
        assert_eq!(seconds(2.5, false), Ok(Duration::from_millis(2500)));
        assert_eq!(seconds(0.0, true), Ok(Duration::ZERO));
        assert_eq!(seconds(86_400.0, false), Ok(Duration::from_secs(86_400)));
        assert_eq!(seconds(0.001, false), Ok(Duration::from_millis(1)));
        for bad in [
            0.0,
            1e-300,
            -1.0,
            86_400.5,
            1e19,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            assert_eq!(
                seconds(bad, false),
                Err("a number of seconds from 0.001 to 86400 (1 day)".to_owned()),
                "{bad}"
            );
        }
        for bad in [-0.5, f64::INFINITY, f64::NAN, 1e19] {
            assert_eq!(
                seconds(bad, true),
                Err("a number of seconds from 0 to 86400 (1 day)".to_owned()),
                "{bad}"
            );
        }
    }

    #[test]
    fn text_seconds_are_decimal_numbers_with_the_same_bounds() {
        assert_eq!(parse_seconds("30", false), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_seconds(" 0.5 ", false),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_seconds("0", true), Ok(Duration::ZERO));
        for bad in ["", "soon", "1e19", "inf", "nan", "-1", "0", "1e400", "0x10"] {
            assert!(parse_seconds(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_deadline_never_overflows() {
        let now = tokio::time::Instant::now();
        assert!(deadline_in(Duration::from_secs(5)) >= now + Duration::from_secs(5));
        let far = deadline_in(Duration::MAX);
        assert!(far >= now + Duration::from_secs(86_400));
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.pem");
        std::fs::write(&small, "abc").unwrap();
        assert_eq!(read_bounded(&small, 3, "[tls] ca_cert").unwrap(), b"abc");

        let err = format!(
            "{:#}",
            read_bounded(&small, 2, "[tls] ca_cert").unwrap_err()
        );
        assert_eq!(
            err,
            format!(
                "[tls] ca_cert {} is larger than 2 bytes (3 bytes)",
                small.display()
            )
        );
        let err = format!(
            "{:#}",
            read_bounded(dir.path(), 10, "the file").unwrap_err()
        );
        assert_eq!(
            err,
            format!(
                "the file {} is not a regular file: it is a directory",
                dir.path().display()
            )
        );
        for device in ["/dev/zero", "/dev/urandom", "/dev/null"] {
            let err = format!(
                "{:#}",
                read_bounded(Path::new(device), MAX_FILE_BYTES, "keyfile").unwrap_err()
            );
            assert_eq!(
                err,
                format!("keyfile {device} is not a regular file: it is a character device")
            );
        }
        let missing = dir.path().join("missing");
        let err = format!("{:#}", check_file(&missing, None, "plugin").unwrap_err());
        assert_eq!(
            err,
            format!(
                "plugin {} cannot be read: no such file or directory",
                missing.display()
            )
        );
    }

    #[test]
    fn a_fifo_is_refused_without_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Opening it would block until a writer comes: the test would hang.
        let err = format!("{:#}", read_bounded(&fifo, 10, "the file").unwrap_err());
        assert!(
            err.ends_with("is not a regular file: it is a FIFO (named pipe)"),
            "{err}"
        );
    }

    #[test]
    fn a_file_lying_about_its_size_is_read_up_to_the_limit_only() {
        // procfs files say they are empty, and are not.
        let path = Path::new("/proc/self/status");
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            let err = format!("{:#}", read_bounded(path, 10, "the file").unwrap_err());
            assert_eq!(err, "the file /proc/self/status is larger than 10 bytes");
            assert!(read_bounded(path, MAX_FILE_BYTES, "the file").is_ok());
        }
    }
}
