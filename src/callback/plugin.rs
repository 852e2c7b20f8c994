//! The native plugin host: loads a shared library written against `include/fm_plugin.h` and
//! calls it for every message.
//!
//! This is one of the two modules allowed `unsafe` (with [`super::abi`]): everything that
//! crosses the C boundary happens here, and every block says why it is sound. The rules it
//! keeps, all from the header:
//!
//! - The library is opened with `RTLD_NOW | RTLD_LOCAL`, so a missing dependency or symbol fails
//!   at start rather than in the middle of a message, and its symbols cannot clash with another
//!   plugin's. It is never unloaded: a `dlclose` under a plugin that started threads or
//!   registered thread-local destructors (every Rust plugin does) can crash the process.
//! - Everything fm hands over (the host table, the message, the error and halt buffers) is
//!   owned by fm; everything the plugin hands over (its table, its strings, its state) is owned
//!   by the plugin. Nothing is freed on the other side.
//! - Every refusal at load time (unloadable file, missing symbol, wrong `abi_major`, a table too
//!   small for this ABI, failed `init`) is an [`Exit`] with [`code::FAILURE`] whose text names
//!   the file, like fedora-messaging's exit 1 for a callback it cannot load.
//! - A plugin without `FM_PLUGIN_THREAD_SAFE` is serialised here, behind a mutex, so the consume
//!   loop may call [`Plugin::handle`] from as many threads as it likes without undefined
//!   behaviour; `shutdown` waits for calls in flight and runs exactly once.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};
use std::fmt;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock, TryLockError};

use anyhow::{anyhow, bail};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

use super::Outcome;
use super::abi::{
    self, FM_ABI_MAJOR, FM_ABI_MINOR, FM_ACK, FM_DROP, FM_FAIL, FM_HALT, FM_MSG_REDELIVERED,
    FM_NACK, FM_PLUGIN_MIN_HEADER, FM_PLUGIN_THREAD_SAFE, fm_bytes, fm_error, fm_halt,
    fm_handle_fn, fm_host, fm_message, fm_plugin, fm_plugin_v1_fn, fm_shutdown_fn,
};
use crate::error::{Exit, code};
use crate::limits;
use crate::message::Received;

/// Bytes in the error buffer lent to `init` and `handle`, NUL included. Enough for a sentence
/// and a path; longer text is cut by the plugin (`snprintf` does that).
const ERROR_CAP: usize = 1024;

/// A loaded, initialised plugin.
pub struct Plugin {
    path: PathBuf,
    name: String,
    version: String,
    flags: u32,
    handle_fn: fm_handle_fn,
    shutdown_fn: Option<fm_shutdown_fn>,
    /// The plugin's state; `None` once `shutdown` ran. Calls into `handle` hold it shared,
    /// `shutdown` holds it exclusively, so it never runs while a message is in flight.
    state: RwLock<Option<State>>,
    /// Held around every `handle` call of a plugin that is not thread-safe.
    serial: Option<Mutex<()>>,
    /// Kept, and never dropped: plugins are never unloaded (see the module docs).
    _library: ManuallyDrop<Library>,
}

/// The opaque `void *state` a plugin's `init` returned.
#[derive(Clone, Copy)]
struct State(*mut c_void);

// SAFETY: fm never dereferences the state; it only hands it back to the plugin's own functions.
// Which threads may do that at the same time is the plugin's declaration (FM_PLUGIN_THREAD_SAFE)
// and `Plugin` enforces it with `serial`; the header tells plugin authors that successive calls
// may come from different threads.
unsafe impl Send for State {}
// SAFETY: as above; sharing the pointer value between threads is harmless by itself.
unsafe impl Sync for State {}

/// What `fm_host.ctx` points to: what the log callback needs to tag a plugin's lines.
struct LogCtx {
    name: String,
}

impl Plugin {
    /// Load the plugin at `path`, check its table and call its `init` with
    /// `consumer_config_json` (the `[consumer_config]` table as a JSON object).
    ///
    /// Every error names the file, says what is wrong, and asks for exit code 1.
    pub fn load(path: &Path, consumer_config_json: &str) -> anyhow::Result<Plugin> {
        Self::load_inner(path, consumer_config_json).map_err(|e| Exit::new(code::FAILURE, e))
    }

    fn load_inner(path: &Path, consumer_config_json: &str) -> anyhow::Result<Plugin> {
        let shown = path.display();
        // A regular file (of any size: it is mapped, not read): opening a FIFO would block
        // until something writes to it.
        if let Err(e) = limits::check_file(path, None, "plugin") {
            bail!("cannot load {e:#}; check the plugin path in the configuration");
        }
        // dlopen looks a bare file name up in the library search path instead of the current
        // directory; the configuration means a file, so make it a path.
        let open_path = if path.parent() == Some(Path::new("")) {
            Path::new(".").join(path)
        } else {
            path.to_owned()
        };
        // SAFETY: opening a library runs its initialisers. Running the operator's chosen plugin
        // is the point of this function; there is nothing more to check beforehand.
        let library = unsafe { Library::open(Some(&open_path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| anyhow!("cannot load plugin {shown}: {e}"))?;
        let library = ManuallyDrop::new(library);

        // SAFETY: the type is the header's declaration of fm_plugin_v1, as an Option because
        // dlsym can legitimately return NULL. The pointer is copied out and used while the
        // library stays loaded, which is forever.
        let entry = unsafe { library.get::<Option<fm_plugin_v1_fn>>(abi::ENTRY_SYMBOL) }
            .ok()
            .and_then(|symbol| *symbol);
        let Some(entry) = entry else {
            bail!(
                "plugin {shown} does not export fm_plugin_v1: it is not an fm plugin, or it \
                 hides the symbol (declare it with FM_PLUGIN_EXPORT from include/fm_plugin.h)"
            );
        };
        // SAFETY: the plugin's entry point, called as the header declares it: no arguments.
        let table = unsafe { entry() };
        let table = checked_table(path, table)?;

        if table.name.is_null() {
            bail!("plugin {shown} is not usable: its fm_plugin table has a NULL name");
        }
        // SAFETY: not NULL; the header requires `name` to be a NUL-terminated string that lives
        // as long as the library, which is never unloaded.
        let name = unsafe { CStr::from_ptr(table.name) }
            .to_string_lossy()
            .into_owned();
        if name.is_empty() {
            bail!("plugin {shown} is not usable: its fm_plugin table has an empty name");
        }
        let version = if table.version.is_null() {
            String::new()
        } else {
            // SAFETY: as for `name`.
            unsafe { CStr::from_ptr(table.version) }
                .to_string_lossy()
                .into_owned()
        };
        let Some(handle_fn) = table.handle else {
            bail!("plugin {name} ({shown}) is not usable: its fm_plugin table has a NULL handle");
        };
        if table.abi_minor > FM_ABI_MINOR {
            tracing::debug!(
                plugin = %name,
                "plugin {shown} was built for ABI 1.{}, newer than this fm's 1.{FM_ABI_MINOR}; \
                 it must check struct_size before using newer fields",
                table.abi_minor
            );
        }

        let state = match table.init {
            None => std::ptr::null_mut(),
            Some(init) => {
                let host = leak_host(&name);
                // The header promises a NUL after the config_len bytes.
                let mut config = Vec::with_capacity(consumer_config_json.len() + 1);
                config.extend_from_slice(consumer_config_json.as_bytes());
                config.push(0);
                let mut state: *mut c_void = std::ptr::null_mut();
                let mut buf = [0 as c_char; ERROR_CAP];
                let mut err = fm_error {
                    buf: buf.as_mut_ptr(),
                    cap: ERROR_CAP,
                };
                // SAFETY: the arguments are what the header promises: `host` is leaked (valid
                // forever), `config` is NUL-terminated and outlives the call, `state` and `err`
                // point to live locals, `buf` has `cap` bytes and starts with a NUL.
                let rc = unsafe {
                    init(
                        host,
                        config.as_ptr().cast(),
                        consumer_config_json.len(),
                        &mut state,
                        &mut err,
                    )
                };
                if rc != 0 {
                    bail!(
                        "plugin {name} ({shown}) failed to initialise (init returned {rc}): {}",
                        error_text(&buf)
                    );
                }
                state
            }
        };

        let flags = table.flags;
        let thread_safe = flags & FM_PLUGIN_THREAD_SAFE != 0;
        tracing::debug!(plugin = %name, version = %version, thread_safe, "loaded plugin {shown}");
        Ok(Plugin {
            path: path.to_owned(),
            name,
            version,
            flags,
            handle_fn,
            shutdown_fn: table.shutdown,
            state: RwLock::new(Some(State(state))),
            serial: (!thread_safe).then(|| Mutex::new(())),
            _library: library,
        })
    }

    /// The plugin's name, from its table (`fm_plugin.name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version, from its table; empty if it did not say.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the plugin declared `FM_PLUGIN_THREAD_SAFE`, so calls to [`Plugin::handle`] can
    /// overlap (otherwise they are serialised here).
    pub fn thread_safe(&self) -> bool {
        self.flags & FM_PLUGIN_THREAD_SAFE != 0
    }

    /// Hand one message to the plugin and translate its answer.
    ///
    /// Blocking: it runs the plugin's code, so call it from a blocking thread. A result other
    /// than the four defined ones is [`Outcome::Fail`] with the text the plugin wrote.
    pub fn handle(&self, msg: &Received) -> Outcome {
        let m = &msg.message;
        // A map of JSON values always serialises; there is no I/O and no non-string key.
        let headers_json = serde_json::to_string(&m.headers).expect("JSON headers serialise");
        let raw = fm_message {
            struct_size: abi::struct_size::<fm_message>(),
            flags: if msg.redelivered {
                FM_MSG_REDELIVERED
            } else {
                0
            },
            id: fm_bytes::borrow(m.id.as_deref().unwrap_or("").as_bytes()),
            topic: fm_bytes::borrow(m.topic.as_bytes()),
            queue: fm_bytes::borrow(m.queue.as_deref().unwrap_or("").as_bytes()),
            exchange: fm_bytes::borrow(msg.exchange.as_bytes()),
            body: fm_bytes::borrow(&msg.raw_body),
            headers_json: fm_bytes::borrow(headers_json.as_bytes()),
            json: fm_bytes::borrow(msg.record.as_bytes()),
            severity: saturate(m.severity()),
            priority: saturate(m.priority.unwrap_or(0)),
        };
        let mut halt = fm_halt {
            struct_size: abi::struct_size::<fm_halt>(),
            exit_code: 0,
            requeue: 0,
            reserved: [0; 3],
        };
        let mut buf = [0 as c_char; ERROR_CAP];
        let mut err = fm_error {
            buf: buf.as_mut_ptr(),
            cap: ERROR_CAP,
        };
        let result = {
            // Poisoning cannot happen (nothing panics while these are held) and would not
            // matter: the guarded data is a pointer value and `()`.
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            let Some(State(state)) = *state else {
                return Outcome::Fail(format!(
                    "plugin {} was called after it was shut down",
                    self.name
                ));
            };
            let _serial = self
                .serial
                .as_ref()
                .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner));
            // SAFETY: `state` is what init returned and shutdown has not run (we hold the read
            // lock); non-thread-safe plugins are serialised by `_serial`. `raw` and every
            // buffer it borrows, `halt`, `err` and `buf` outlive the call, as the header says.
            unsafe { (self.handle_fn)(state, &raw, &mut halt, &mut err) }
        };
        match result {
            FM_ACK => Outcome::Ack,
            FM_NACK => Outcome::Nack,
            FM_DROP => Outcome::Drop,
            FM_HALT => {
                let reason = error_text(&buf);
                Outcome::Halt {
                    exit_code: halt.exit_code,
                    requeue: halt.requeue != 0,
                    reason: (!reason.is_empty()).then_some(reason),
                }
            }
            FM_FAIL => Outcome::Fail(format!(
                "plugin {} failed: {}",
                self.name,
                or_no_text(error_text(&buf))
            )),
            other => Outcome::Fail(format!(
                "plugin {} returned {other}, which is not FM_ACK, FM_NACK, FM_DROP or FM_HALT: {}",
                self.name,
                or_no_text(error_text(&buf))
            )),
        }
    }

    /// Call the plugin's `shutdown`, once: later calls (and the one on drop) do nothing; a
    /// `handle` call after it answers [`Outcome::Fail`]. It never waits for a `handle` call:
    /// when one is still running (fm abandoned it at `shutdown_timeout`, issue 17) the plugin's
    /// `shutdown` is not called at all — it may not free state a call still uses — and fm exits
    /// as fm(1) promises instead of waiting forever.
    pub fn shutdown(&self) {
        let mut state = match self.state.try_write() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                tracing::warn!(
                    "plugin {}: a handle call is still running; not calling its shutdown",
                    self.name
                );
                return;
            }
        };
        if let Some(State(raw)) = state.take()
            && let Some(shutdown) = self.shutdown_fn
        {
            // SAFETY: `raw` is what init returned; taking it out of `state` under the write
            // lock guarantees no handle call is running and this happens once.
            unsafe { shutdown(raw) };
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("thread_safe", &self.thread_safe())
            .finish_non_exhaustive()
    }
}

/// Read the table `fm_plugin_v1` returned, refusing one this fm cannot use.
///
/// The order matters: `struct_size` first (it is the only field every version has), then
/// `abi_major` (a different major may lay the rest out differently, so a size mismatch is
/// reported as the version mismatch it really is), then the full size of this version.
fn checked_table<'a>(path: &Path, table: *const fm_plugin) -> anyhow::Result<&'a fm_plugin> {
    let shown = path.display();
    let rebuild = "rebuild it against this fm's include/fm_plugin.h";
    if table.is_null() {
        bail!("plugin {shown} is not usable: fm_plugin_v1() returned NULL");
    }
    if !table.is_aligned() {
        bail!("plugin {shown} is not usable: fm_plugin_v1() returned a misaligned pointer");
    }
    // SAFETY: non-null and aligned; every version of the table starts with a uint32_t
    // struct_size, which is all that is read here.
    let size = unsafe { (&raw const (*table).struct_size).read() };
    let full = abi::struct_size::<fm_plugin>();
    let too_small = |size: u32| {
        anyhow!(
            "plugin {shown} is not usable: its fm_plugin table says struct_size = {size}, but \
             ABI {FM_ABI_MAJOR}.{FM_ABI_MINOR} needs at least {full} bytes; {rebuild}"
        )
    };
    if size < FM_PLUGIN_MIN_HEADER {
        return Err(too_small(size));
    }
    // SAFETY: struct_size says the table extends past abi_major.
    let major = unsafe { (&raw const (*table).abi_major).read() };
    if major != FM_ABI_MAJOR {
        bail!(
            "plugin {shown} was built for plugin ABI {major}, but this fm speaks ABI \
             {FM_ABI_MAJOR}; {rebuild}"
        );
    }
    if size < full {
        return Err(too_small(size));
    }
    // SAFETY: the table declares at least the size of this version's struct, so every field
    // is inside it; the header requires it to stay valid and unchanged while the library is
    // loaded (forever), which makes any lifetime sound.
    Ok(unsafe { &*table })
}

/// Build the `fm_host` handed to `init`. It is leaked on purpose: the header promises plugins
/// that it and its context stay valid for the life of the process, so a plugin may keep the
/// pointer and log from its own threads. One small allocation per loaded plugin.
fn leak_host(name: &str) -> &'static fm_host {
    let ctx: &'static LogCtx = Box::leak(Box::new(LogCtx {
        name: name.to_owned(),
    }));
    Box::leak(Box::new(fm_host {
        struct_size: abi::struct_size::<fm_host>(),
        ctx: std::ptr::from_ref(ctx).cast_mut().cast(),
        log: Some(host_log),
    }))
}

/// `fm_host.log`: a plugin's log line, through `tracing` with target `fm::plugin` and the
/// plugin's name, at the level it asked for (below 1 is ERROR, above 5 is TRACE).
unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: *const c_char, len: usize) {
    if ctx.is_null() {
        return;
    }
    // SAFETY: the only ctx fm hands out is a leaked `LogCtx` (see leak_host), valid forever and
    // never mutated; the plugin passes it back unchanged.
    let ctx = unsafe { &*ctx.cast::<LogCtx>() };
    let bytes: &[u8] = if msg.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: the header makes the plugin promise `len` readable bytes at `msg` for the
        // duration of the call.
        unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) }
    };
    let text = String::from_utf8_lossy(bytes);
    let plugin = ctx.name.as_str();
    match level {
        0 | abi::FM_LOG_ERROR => tracing::error!(target: "fm::plugin", plugin, "{text}"),
        abi::FM_LOG_WARN => tracing::warn!(target: "fm::plugin", plugin, "{text}"),
        abi::FM_LOG_INFO => tracing::info!(target: "fm::plugin", plugin, "{text}"),
        abi::FM_LOG_DEBUG => tracing::debug!(target: "fm::plugin", plugin, "{text}"),
        _ => tracing::trace!(target: "fm::plugin", plugin, "{text}"),
    }
}

/// The text a plugin wrote into an error buffer: up to the first NUL, or the whole buffer if
/// it forgot the NUL; invalid UTF-8 replaced; trailing whitespace (a habitual `\n`) removed.
fn error_text(buf: &[c_char]) -> String {
    // c_char is i8 or u8 depending on the target; either way each element is one byte.
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

fn or_no_text(text: String) -> String {
    if text.is_empty() {
        "(the plugin wrote no error text)".to_owned()
    } else {
        text
    }
}

/// Clamp an i64 into the ABI's int32_t. Severity and priority are small in practice (10–40,
/// 0–255); clamping keeps an absurd header value from wrapping into a different number.
fn saturate(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX })
}

#[cfg(test)]
mod tests {
    //! The ABI, tested across the real boundary: C plugins compiled with `cc` at test time
    //! (one per failure mode, plus a well-behaved one that echoes what it receives), the
    //! workspace's Rust plugins, and a Rust plugin that panics.
    use super::*;
    use crate::error::exit_code_of;
    use crate::message::{Message, Received};
    use serde_json::json;
    use std::io;
    use std::process::Command;
    use std::sync::{Arc, Barrier, OnceLock};

    const ROOT: &str = env!("CARGO_MANIFEST_DIR");
    const ID: &str = "273ed91d-b8b5-487a-9576-95b9fbdf3eec";

    fn fixture(name: &str) -> PathBuf {
        Path::new(ROOT).join("tests/fixtures/plugins").join(name)
    }

    /// Whether `cc` works. Under CI=true a missing compiler fails the test; elsewhere the
    /// test says loudly that it skipped.
    fn have_cc() -> bool {
        static CC: OnceLock<bool> = OnceLock::new();
        let ok = *CC.get_or_init(|| {
            Command::new("cc")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cc is not installed, and the plugin ABI tests need it (CI=true)"
            );
            eprintln!("SKIPPED: cc is not installed; the C plugin tests did not run");
        }
        ok
    }

    /// Compile `src` (a fixture's file name or a path) into `dir/<out>` with the header on the
    /// include path and every warning an error, as the header promises it compiles cleanly.
    fn build_c(dir: &Path, src: &Path, out: &str, extra: &[&str]) -> PathBuf {
        let out = dir.join(out);
        let status = Command::new("cc")
            .args(crate::callback::abi::C_FLAGS)
            .arg("-I")
            .arg(Path::new(ROOT).join("include"))
            .args(extra)
            .arg("-o")
            .arg(&out)
            .arg(src)
            .status()
            .expect("running cc");
        assert!(status.success(), "cc failed on {}", src.display());
        out
    }

    /// Build fixture `name.c` as a plugin in a fresh temporary directory.
    fn c_plugin(name: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["-shared"];
        args.extend_from_slice(extra);
        let lib = build_c(
            dir.path(),
            &fixture(&format!("{name}.c")),
            &format!("lib{name}.so"),
            &args,
        );
        (dir, lib)
    }

    /// The target directory the test binary runs from (`target/debug`), with the workspace's
    /// plugin crates freshly built into it (a no-op when they are up to date).
    fn rust_plugins() -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
            let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
                "debug" => "dev",
                other => other,
            };
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(ROOT)
                .args(["build", "--quiet", "--profile", profile, "--target-dir"])
                .arg(profile_dir.parent().unwrap())
                .args(["-p", "fm-plugin", "-p", "fm-noop", "-p", "fm-printer"])
                .status()
                .expect("running cargo build for the plugin crates");
            assert!(status.success(), "cargo build of the plugin crates failed");
            profile_dir
        })
    }

    /// A message like fedora-messaging's test message, delivered on `topic`.
    fn received(topic: &str) -> Received {
        let message = Message {
            topic: topic.to_owned(),
            id: Some(ID.to_owned()),
            headers: json!({
                "fedora_messaging_schema": "base.message",
                "fedora_messaging_severity": 30,
                "sent-at": "2018-11-18T10:11:41+00:00",
            })
            .as_object()
            .unwrap()
            .clone(),
            body: json!({"test_key1": "test_value1", "ünï": [1, 2.5]}).into(),
            queue: Some("test_queue".to_owned()),
            priority: Some(4),
        };
        Received {
            // What a Python publisher sends: default separators, ensure_ascii.
            raw_body: message.encoded_body(),
            record: message.record_line(),
            message,
            exchange: "amq.topic".to_owned(),
            redelivered: true,
        }
    }

    /// A message with nothing optional: no id, queue, priority or headers; first delivery.
    fn bare(topic: &str) -> Received {
        let message = Message {
            topic: topic.to_owned(),
            id: None,
            headers: Default::default(),
            body: json!({}).into(),
            queue: None,
            priority: None,
        };
        Received {
            raw_body: b"{}".to_vec(),
            record: message.record_line(),
            message,
            exchange: String::new(),
            redelivered: false,
        }
    }

    fn refusal(lib: &Path, config: &str) -> (String, u8) {
        let err = Plugin::load(lib, config).expect_err("the plugin must be refused");
        (format!("{err:#}"), exit_code_of(&err))
    }

    const REBUILD: &str = "rebuild it against this fm's include/fm_plugin.h";

    #[test]
    fn the_header_and_the_rust_mirror_agree_on_every_size_and_offset() {
        use std::mem::offset_of;
        if !have_cc() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = build_c(dir.path(), &fixture("layout.c"), "layout", &[]);
        let out = Command::new(&exe).output().unwrap();
        let c: Vec<(String, u64)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect();
        macro_rules! rust {
            ($t:ident) => {
                (stringify!($t).to_owned(), size_of::<abi::$t>() as u64)
            };
            ($t:ident . $f:ident) => {
                (
                    concat!(stringify!($t), ".", stringify!($f)).to_owned(),
                    offset_of!(abi::$t, $f) as u64,
                )
            };
            (const $c:ident) => {
                (stringify!($c).to_owned(), abi::$c as u64)
            };
        }
        let rust = vec![
            rust!(fm_bytes),
            rust!(fm_bytes.ptr),
            rust!(fm_bytes.len),
            rust!(fm_error),
            rust!(fm_error.buf),
            rust!(fm_error.cap),
            rust!(fm_host),
            rust!(fm_host.struct_size),
            rust!(fm_host.ctx),
            rust!(fm_host.log),
            rust!(fm_message),
            rust!(fm_message.struct_size),
            rust!(fm_message.flags),
            rust!(fm_message.id),
            rust!(fm_message.topic),
            rust!(fm_message.queue),
            rust!(fm_message.exchange),
            rust!(fm_message.body),
            rust!(fm_message.headers_json),
            rust!(fm_message.json),
            rust!(fm_message.severity),
            rust!(fm_message.priority),
            rust!(fm_halt),
            rust!(fm_halt.struct_size),
            rust!(fm_halt.exit_code),
            rust!(fm_halt.requeue),
            rust!(fm_halt.reserved),
            rust!(fm_plugin),
            rust!(fm_plugin.struct_size),
            rust!(fm_plugin.abi_major),
            rust!(fm_plugin.abi_minor),
            rust!(fm_plugin.flags),
            rust!(fm_plugin.name),
            rust!(fm_plugin.version),
            rust!(fm_plugin.init),
            rust!(fm_plugin.handle),
            rust!(fm_plugin.shutdown),
            rust!(const FM_ABI_MAJOR),
            rust!(const FM_ABI_MINOR),
            rust!(const FM_PLUGIN_THREAD_SAFE),
            rust!(const FM_MSG_REDELIVERED),
            rust!(const FM_ACK),
            rust!(const FM_NACK),
            rust!(const FM_DROP),
            rust!(const FM_HALT),
            rust!(const FM_FAIL),
            rust!(const FM_LOG_ERROR),
            rust!(const FM_LOG_WARN),
            rust!(const FM_LOG_INFO),
            rust!(const FM_LOG_DEBUG),
            rust!(const FM_LOG_TRACE),
        ];
        assert_eq!(c, rust);
    }

    #[test]
    fn a_plugin_built_for_another_abi_major_is_refused() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("bad_abi_major", &[]);
        let shown = lib.display();
        assert_eq!(
            refusal(&lib, "{}"),
            (
                format!(
                    "plugin {shown} was built for plugin ABI 2, but this fm speaks ABI 1; {REBUILD}"
                ),
                code::FAILURE
            )
        );
    }

    #[test]
    fn a_table_smaller_than_this_abi_is_refused() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("small_struct_size", &[]);
        let shown = lib.display();
        let full = size_of::<fm_plugin>();
        assert_eq!(
            refusal(&lib, "{}"),
            (
                format!(
                    "plugin {shown} is not usable: its fm_plugin table says struct_size = 16, \
                     but ABI 1.0 needs at least {full} bytes; {REBUILD}"
                ),
                code::FAILURE
            )
        );
    }

    #[test]
    fn a_library_without_the_entry_point_is_refused() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("missing_symbol", &[]);
        let shown = lib.display();
        assert_eq!(
            refusal(&lib, "{}"),
            (
                format!(
                    "plugin {shown} does not export fm_plugin_v1: it is not an fm plugin, or it \
                     hides the symbol (declare it with FM_PLUGIN_EXPORT from include/fm_plugin.h)"
                ),
                code::FAILURE
            )
        );
    }

    #[test]
    fn a_failing_init_is_refused_with_the_plugins_own_words() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("init_fails", &[]);
        let shown = lib.display();
        assert_eq!(
            refusal(&lib, r#"{"db": null}"#),
            (
                format!(
                    "plugin init-fails ({shown}) failed to initialise (init returned -1): \
                     cannot use consumer_config {{\"db\": null}}: no database configured"
                ),
                code::FAILURE
            )
        );
    }

    #[test]
    fn missing_and_unloadable_files_are_refused() {
        let (text, code) = refusal(Path::new("/nonexistent/libnothing.so"), "{}");
        assert_eq!(
            text,
            "cannot load plugin /nonexistent/libnothing.so cannot be read: no such file or \
             directory; check the plugin path in the configuration"
        );
        assert_eq!(code, code::FAILURE);

        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("libfifo.so");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let (text, code) = refusal(&fifo, "{}");
        assert_eq!(
            text,
            format!(
                "cannot load plugin {} is not a regular file: it is a FIFO (named pipe); check \
                 the plugin path in the configuration",
                fifo.display()
            )
        );
        assert_eq!(code, code::FAILURE);

        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("libtext.so");
        std::fs::write(&not_elf, "this is not a shared library\n".repeat(10)).unwrap();
        let (text, code) = refusal(&not_elf, "{}");
        let prefix = format!("cannot load plugin {}: ", not_elf.display());
        assert!(text.starts_with(&prefix), "{text}");
        assert!(
            text.contains("invalid ELF header"),
            "dlerror's reason: {text}"
        );
        assert_eq!(code, code::FAILURE);
    }

    #[test]
    fn a_result_that_is_not_an_fm_result_is_a_failure_with_the_plugins_text() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("handle_returns_42", &[]);
        let plugin = Plugin::load(&lib, "{}").unwrap();
        assert_eq!(
            plugin.handle(&received("org.example.jam")),
            Outcome::Fail(
                "plugin handle-returns-42 returned 42, which is not FM_ACK, FM_NACK, FM_DROP or \
                 FM_HALT: the frobnicator jammed on org.example.jam"
                    .into()
            )
        );
    }

    #[test]
    fn every_message_field_reaches_a_c_plugin_intact() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("roundtrip", &[]);
        let plugin = Plugin::load(&lib, "{}").unwrap();
        assert_eq!(
            (plugin.name(), plugin.version(), plugin.thread_safe()),
            ("roundtrip", "1.2.3", false)
        );

        let msg = received("echo");
        let body = r#"{"test_key1": "test_value1", "\u00fcn\u00ef": [1, 2.5]}"#;
        assert_eq!(
            msg.raw_body,
            body.as_bytes(),
            "the body goes over as received"
        );
        let headers = r#"{"fedora_messaging_schema":"base.message","fedora_messaging_severity":30,"sent-at":"2018-11-18T10:11:41+00:00"}"#;
        let record = r#"{"body": {"test_key1": "test_value1", "ünï": [1, 2.5]}, "headers": {"fedora_messaging_schema": "base.message", "fedora_messaging_severity": 30, "sent-at": "2018-11-18T10:11:41+00:00"}, "id": "273ed91d-b8b5-487a-9576-95b9fbdf3eec", "priority": 4, "queue": "test_queue", "topic": "echo"}"#;
        assert_eq!(msg.record, record);
        assert_eq!(
            plugin.handle(&msg),
            Outcome::Halt {
                exit_code: 4,
                requeue: true,
                reason: Some(format!(
                    "id={ID}|topic=echo|queue=test_queue|exchange=amq.topic|body={body}\
                     |headers={headers}|json={record}|severity=30|priority=4|redelivered=1"
                )),
            },
            "exit code = priority, requeue = redelivered"
        );

        let msg = bare("echo");
        let record = r#"{"body": {}, "headers": {}, "id": null, "priority": 0, "queue": null, "topic": "echo"}"#;
        assert_eq!(
            plugin.handle(&msg),
            Outcome::Halt {
                exit_code: 0,
                requeue: false,
                reason: Some(format!(
                    "id=|topic=echo|queue=|exchange=|body={{}}|headers={{}}|json={record}\
                     |severity=20|priority=0|redelivered=0"
                )),
            },
            "absent fields are empty, severity defaults to INFO, priority to 0"
        );
    }

    #[test]
    fn results_map_onto_outcomes() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("roundtrip", &[]);
        let plugin = Plugin::load(&lib, r#"{"example_key": "é"}"#).unwrap();
        let outcome = |topic: &str| plugin.handle(&received(topic));
        assert_eq!(outcome("ack"), Outcome::Ack);
        assert_eq!(outcome("nack"), Outcome::Nack);
        assert_eq!(outcome("drop"), Outcome::Drop);
        let halt = |exit_code, requeue, reason: Option<&str>| Outcome::Halt {
            exit_code,
            requeue,
            reason: reason.map(str::to_owned),
        };
        assert_eq!(outcome("halt"), halt(7, true, Some("told to stop")));
        assert_eq!(outcome("halt-plain"), halt(0, false, None));
        assert_eq!(
            outcome("config"),
            halt(0, false, Some(r#"{"example_key": "é"}"#)),
            "init got consumer_config, NUL-terminated"
        );
        assert_eq!(
            outcome("fail"),
            Outcome::Fail("plugin roundtrip failed: failed on purpose".into())
        );
        assert_eq!(
            outcome("unterminated"),
            Outcome::Fail(format!(
                "plugin roundtrip failed: {}",
                "x".repeat(ERROR_CAP)
            )),
            "an error text without its NUL is read up to the buffer's end, not beyond"
        );
        assert_eq!(
            outcome("what"),
            Outcome::Fail("plugin roundtrip failed: unexpected topic what".into())
        );
    }

    /// Run `f` with a tracing subscriber that records every event; return what it wrote.
    fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[test]
    fn plugins_log_through_fm_with_their_name_and_are_shut_down_exactly_once() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("roundtrip", &[]);
        let (outcomes, logs) = capture_logs(|| {
            let plugin = Plugin::load(&lib, "{}").unwrap();
            let logged = plugin.handle(&received("log"));
            plugin.shutdown();
            plugin.shutdown();
            let after = plugin.handle(&received("ack"));
            drop(plugin);
            (logged, after)
        });
        assert_eq!(outcomes.0, Outcome::Ack);
        assert_eq!(
            outcomes.1,
            Outcome::Fail("plugin roundtrip was called after it was shut down".into())
        );
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains("fm::plugin")).collect();
        assert_eq!(
            lines,
            [
                "ERROR fm::plugin: level 0 plugin=\"roundtrip\"",
                "ERROR fm::plugin: level 1 plugin=\"roundtrip\"",
                " WARN fm::plugin: level 2 plugin=\"roundtrip\"",
                " INFO fm::plugin: level 3 plugin=\"roundtrip\"",
                "DEBUG fm::plugin: level 4 plugin=\"roundtrip\"",
                "TRACE fm::plugin: level 5 plugin=\"roundtrip\"",
                "TRACE fm::plugin: level 6 plugin=\"roundtrip\"",
                " INFO fm::plugin: shutdown plugin=\"roundtrip\"",
            ],
            "levels map one to one, out-of-range ones clamp; shutdown ran once\n{logs}"
        );
    }

    /// Run 4 "slow" messages at once through `plugin`; answer the most it saw overlap.
    fn max_overlap(plugin: Plugin) -> i32 {
        let plugin = Arc::new(plugin);
        let start = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (plugin, start) = (Arc::clone(&plugin), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    plugin.handle(&received("slow"))
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Outcome::Ack);
        }
        match plugin.handle(&received("max")) {
            Outcome::Halt { exit_code, .. } => exit_code,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_plugin_that_is_not_thread_safe_is_never_called_concurrently() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("roundtrip", &[]);
        let plugin = Plugin::load(&lib, "{}").unwrap();
        assert!(!plugin.thread_safe());
        assert_eq!(max_overlap(plugin), 1);
    }

    #[test]
    fn a_thread_safe_plugin_is_called_concurrently() {
        if !have_cc() {
            return;
        }
        let (_dir, lib) = c_plugin("roundtrip", &["-DROUNDTRIP_FLAGS=FM_PLUGIN_THREAD_SAFE"]);
        let plugin = Plugin::load(&lib, "{}").unwrap();
        assert!(plugin.thread_safe());
        assert!(
            max_overlap(plugin) > 1,
            "4 calls sleeping 50 ms each overlapped"
        );
    }

    #[test]
    fn the_noop_plugin_acks_everything() {
        let lib = rust_plugins().join("libfm_noop.so");
        let plugin = Plugin::load(&lib, "{}").unwrap();
        assert_eq!(
            (plugin.name(), plugin.version(), plugin.thread_safe()),
            ("noop", "0.1.0", true)
        );
        assert_eq!(plugin.handle(&received("any.topic")), Outcome::Ack);
        assert_eq!(plugin.handle(&bare("")), Outcome::Ack);
    }

    #[test]
    fn a_panicking_rust_plugin_fails_instead_of_aborting() {
        let deps = rust_plugins();
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libpanics.so");
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let status = Command::new(rustc)
            .current_dir(ROOT)
            .args([
                "--edition",
                "2024",
                "--crate-type",
                "cdylib",
                "--crate-name",
                "panics",
            ])
            .arg("-L")
            .arg(format!("dependency={}", deps.join("deps").display()))
            .arg("--extern")
            .arg(format!(
                "fm_plugin={}",
                deps.join("libfm_plugin.rlib").display()
            ))
            .arg("-o")
            .arg(&lib)
            .arg(fixture("panics.rs"))
            .status()
            .expect("running rustc");
        assert!(status.success(), "rustc failed on panics.rs");

        let (text, code) = refusal(&lib, r#"{"x": "panic in init"}"#);
        assert_eq!(
            (text.as_str(), code),
            (
                &*format!(
                    "plugin panics ({}) failed to initialise (init returned 1): init panicked: \
                     init panicked on purpose",
                    lib.display()
                ),
                code::FAILURE
            )
        );

        let plugin = Plugin::load(&lib, "{}").unwrap();
        assert_eq!(plugin.handle(&received("fine")), Outcome::Ack);
        assert_eq!(
            plugin.handle(&received("panic")),
            Outcome::Fail(format!(
                "plugin panics failed: the plugin panicked: handle panicked on purpose for {ID}"
            ))
        );
        assert_eq!(
            plugin.handle(&received("fine")),
            Outcome::Fail(
                "plugin panics failed: the plugin panicked earlier and is not usable any more"
                    .into()
            ),
            "a plugin that panicked stays failed"
        );
    }

    const PRINTED_START: &str = "<<<printed>>>\n";
    const PRINTED_END: &str = "<<<end>>>\n";

    /// Messages for the printers: fedora-messaging's test message, and one with no id or
    /// headers and a body that exercises sorting, nesting, escapes and float formatting.
    fn printer_messages() -> Vec<Received> {
        let mut first = received("test_topic");
        first.message.headers = json!({
            "fedora_messaging_schema": "base.message",
            "fedora_messaging_severity": 20,
            "sent-at": "2018-11-18T10:11:41+00:00",
        })
        .as_object()
        .unwrap()
        .clone();
        first.message.body = json!({"test_key1": "test_value1"}).into();
        first.record = first.message.record_line();
        let mut second = bare("org.fedoraproject.prod.bodhi.update.comment");
        second.message.body = json!({
            "b": [1, {}, [], 2.5, 1e16, null, true],
            "a": {"z": "é😀\u{7f}\n\"\\/", "ä": -0.0, "n": {"y": 1e-05, "x": -12}},
        })
        .into();
        second.record = second.message.record_line();
        vec![first, second]
    }

    /// What fedora-messaging's `example:printer` prints for [`printer_messages`] (CPython 3).
    const PYTHON_PRINTS: &str = concat!(
        "Id: 273ed91d-b8b5-487a-9576-95b9fbdf3eec\n",
        "Topic: test_topic\n",
        "Headers: {\n",
        "    \"fedora_messaging_schema\": \"base.message\",\n",
        "    \"fedora_messaging_severity\": 20,\n",
        "    \"sent-at\": \"2018-11-18T10:11:41+00:00\"\n",
        "}\n",
        "Body: {\n",
        "    \"test_key1\": \"test_value1\"\n",
        "}\n",
        "Id: None\n",
        "Topic: org.fedoraproject.prod.bodhi.update.comment\n",
        "Headers: {}\n",
        "Body: {\n",
        "    \"a\": {\n",
        "        \"n\": {\n",
        "            \"x\": -12,\n",
        "            \"y\": 1e-05\n",
        "        },\n",
        "        \"z\": \"\\u00e9\\ud83d\\ude00\\u007f\\n\\\"\\\\/\",\n",
        "        \"\\u00e4\": -0.0\n",
        "    },\n",
        "    \"b\": [\n",
        "        1,\n",
        "        {},\n",
        "        [],\n",
        "        2.5,\n",
        "        1e+16,\n",
        "        null,\n",
        "        true\n",
        "    ]\n",
        "}\n",
    );

    /// Child half of `the_printers_print_what_fedora_messagings_printer_prints`: load the
    /// plugin named by FM_TEST_PRINTER and print [`printer_messages`] between markers. Run in a
    /// child process so the plugin's standard output can be captured.
    #[test]
    #[ignore = "run as a child process by the_printers_print_what_fedora_messagings_printer_prints"]
    fn printer_child() {
        let lib = std::env::var_os("FM_TEST_PRINTER").expect("FM_TEST_PRINTER names the plugin");
        let plugin = Plugin::load(Path::new(&lib), "{}").unwrap();
        print!("{PRINTED_START}");
        for msg in printer_messages() {
            assert_eq!(plugin.handle(&msg), Outcome::Ack);
        }
        print!("{PRINTED_END}");
    }

    fn printed_by(lib: &Path) -> String {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "callback::plugin::tests::printer_child",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env("FM_TEST_PRINTER", lib)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "printer child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, rest) = stdout.split_once(PRINTED_START).expect("start marker");
        let (printed, _) = rest.split_once(PRINTED_END).expect("end marker");
        printed.to_owned()
    }

    #[test]
    fn the_printers_print_what_fedora_messagings_printer_prints() {
        let rust = rust_plugins().join("libfm_printer.so");
        assert_eq!(printed_by(&rust), PYTHON_PRINTS, "the Rust printer");
        if !have_cc() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let c = build_c(
            dir.path(),
            &Path::new(ROOT).join("plugins/printer-c/printer.c"),
            "libfm_printer_c.so",
            &["-shared"],
        );
        assert_eq!(printed_by(&c), PYTHON_PRINTS, "the C printer");
    }
}
