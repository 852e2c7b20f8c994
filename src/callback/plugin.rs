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
//! - A reply (ABI 1.1) is copied into an fm-owned slot that lives on the stack of the
//!   `handle` call (`fm_message.reply_ctx` points to it); a plugin built against 1.0 never sees
//!   the appended fields, since it reads no further than the `struct_size` it knows.
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
    self, FM_ABI_MAJOR, FM_ABI_MINOR, FM_ACK, FM_DROP, FM_FAIL, FM_HALT, FM_MSG_RAW_BODY,
    FM_MSG_REDELIVERED, FM_NACK, FM_PLUGIN_MIN_HEADER, FM_PLUGIN_THREAD_SAFE, FM_REPLY_NO_REPLY_TO,
    FM_REPLY_OK, fm_bytes, fm_error, fm_halt, fm_handle_fn, fm_host, fm_message, fm_plugin,
    fm_plugin_v1_fn, fm_shutdown_fn,
};
use crate::error::{Exit, code};
use crate::limits;
use crate::message::Received;

/// Bytes in the error buffer lent to `init` and `handle`, NUL included. Enough for a sentence
/// and a path; longer text is cut by the plugin (`snprintf` does that).
pub const ERROR_CAP: usize = 1024;

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
    /// than the four defined ones is [`Outcome::Fail`] with the text the plugin wrote; FM_ACK
    /// after a call of `fm_message.reply` is [`Outcome::Reply`].
    pub fn handle(&self, msg: &Received) -> Outcome {
        let m = &msg.message;
        // A map of JSON values always serialises; there is no I/O and no non-string key.
        let headers_json = serde_json::to_string(&m.headers).expect("JSON headers serialise");
        let slot = ReplySlot {
            accepts: msg.reply_to.is_some(),
            body: Mutex::new(None),
        };
        let mut flags = 0;
        if msg.redelivered {
            flags |= FM_MSG_REDELIVERED;
        }
        if msg.raw {
            flags |= FM_MSG_RAW_BODY;
        }
        let raw = fm_message {
            struct_size: abi::struct_size::<fm_message>(),
            flags,
            id: fm_bytes::borrow(m.id.as_deref().unwrap_or("").as_bytes()),
            topic: fm_bytes::borrow(m.topic.as_bytes()),
            queue: fm_bytes::borrow(m.queue.as_deref().unwrap_or("").as_bytes()),
            exchange: fm_bytes::borrow(msg.exchange.as_bytes()),
            body: fm_bytes::borrow(&msg.raw_body),
            headers_json: fm_bytes::borrow(headers_json.as_bytes()),
            // A raw body has no record line a plugin could parse as a message.
            json: fm_bytes::borrow(if msg.raw { &[] } else { msg.record.as_bytes() }),
            severity: saturate(m.severity()),
            priority: saturate(m.priority.unwrap_or(0)),
            reply_to: fm_bytes::borrow(msg.reply_to.as_deref().unwrap_or("").as_bytes()),
            correlation_id: fm_bytes::borrow(
                msg.correlation_id.as_deref().unwrap_or("").as_bytes(),
            ),
            reply_ctx: std::ptr::from_ref(&slot).cast_mut().cast(),
            reply: Some(host_reply),
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
            // buffer it borrows (the reply slot included), `halt`, `err` and `buf` outlive the
            // call, as the header says.
            unsafe { (self.handle_fn)(state, &raw, &mut halt, &mut err) }
        };
        let reply = slot
            .body
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            FM_ACK => reply.map_or(Outcome::Ack, Outcome::Reply),
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

/// What `fm_message.reply_ctx` points to during one `handle` call: where `reply` copies the
/// plugin's reply. Lives on the stack of [`Plugin::handle`], which outlives the call.
struct ReplySlot {
    /// The message has a `reply_to`: a reply can be sent.
    accepts: bool,
    /// The last reply given. A mutex: a thread-safe plugin may reply from another thread.
    body: Mutex<Option<Vec<u8>>>,
}

/// `fm_message.reply` (ABI 1.1): keep a copy of the plugin's reply for the message.
unsafe extern "C" fn host_reply(ctx: *mut c_void, body: *const u8, len: usize) -> i32 {
    if ctx.is_null() {
        return FM_REPLY_NO_REPLY_TO;
    }
    // SAFETY: the only reply_ctx fm hands out points to the `ReplySlot` of the handle call in
    // progress, and the header allows reply() only until handle() returns.
    let slot = unsafe { &*ctx.cast::<ReplySlot>() };
    if !slot.accepts {
        return FM_REPLY_NO_REPLY_TO;
    }
    let bytes: &[u8] = if body.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: the header makes the plugin promise `len` readable bytes at `body` for the
        // duration of the call.
        unsafe { std::slice::from_raw_parts(body, len) }
    };
    *slot.body.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes.to_vec());
    FM_REPLY_OK
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
