//! Write fm callback plugins in safe Rust.
//!
//! fm loads native plugins through the C ABI in `include/fm_plugin.h` (the source of truth;
//! read it for the contract). This crate is that ABI for Rust: [`sys`] mirrors the header's
//! structs, and the [`export!`] macro turns a type implementing [`Plugin`] (or
//! [`ThreadSafePlugin`]) into the `fm_plugin_v1` symbol fm looks for. The plugin never touches
//! a raw pointer: it gets a [`Host`] to log through, its `[consumer_config]` as a JSON string,
//! and a [`Message`] view per message, and answers with an [`Outcome`].
//!
//! A panic inside the plugin never crosses into fm (that would abort the process): the
//! generated functions catch it and report a failure, so fm requeues the message and exits 13,
//! exactly as for a callback that raised. After a panic in `handle` the plugin is considered
//! broken and every later call fails too.
//!
//! ```
//! use fm_plugin::{Host, Message, Outcome, Plugin};
//!
//! struct Counter { host: Host, seen: u64 }
//!
//! impl Plugin for Counter {
//!     fn init(host: Host, _config: &str) -> Result<Self, String> {
//!         Ok(Counter { host, seen: 0 })
//!     }
//!     fn handle(&mut self, msg: &Message<'_>) -> Outcome {
//!         self.seen += 1;
//!         self.host.info(&format!("{} messages, the last on {}", self.seen, msg.topic()));
//!         Outcome::Ack
//!     }
//! }
//!
//! fm_plugin::export!(Counter, name = "counter");
//! ```
//!
//! Build it as a `cdylib` and point fm's `callback` at the resulting `.so`.
//!
//! A message may be a request (RPC, ABI 1.1): [`Message::reply_to`] names where the answer
//! goes, and answering [`Outcome::Reply`] with a body makes fm publish it there, with the
//! request's correlation id, before it acks the request. `plugins/attrs` is an example.
//!
//! This crate deliberately has no dependencies (not even on fm): parse the JSON you are given
//! with whatever you like.

use std::any::Any;
use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};

/// The C types of `include/fm_plugin.h`, field for field.
///
/// Plugins built with [`export!`] do not need these; they are public for the macro and for
/// anyone who wants to go lower.
#[allow(non_camel_case_types)]
pub mod sys {
    use std::ffi::{c_char, c_void};

    pub const FM_ABI_MAJOR: u32 = 1;
    pub const FM_ABI_MINOR: u32 = 1;
    pub const FM_PLUGIN_THREAD_SAFE: u32 = 0x1;
    pub const FM_ACK: u32 = 0;
    pub const FM_NACK: u32 = 1;
    pub const FM_DROP: u32 = 2;
    pub const FM_HALT: u32 = 3;
    pub const FM_FAIL: u32 = 0xFFFF_FFFF;
    pub const FM_MSG_REDELIVERED: u32 = 0x1;
    pub const FM_MSG_RAW_BODY: u32 = 0x2;
    pub const FM_REPLY_OK: i32 = 0;
    pub const FM_REPLY_NO_REPLY_TO: i32 = 1;
    pub const FM_LOG_ERROR: u32 = 1;
    pub const FM_LOG_WARN: u32 = 2;
    pub const FM_LOG_INFO: u32 = 3;
    pub const FM_LOG_DEBUG: u32 = 4;
    pub const FM_LOG_TRACE: u32 = 5;

    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct fm_bytes {
        pub ptr: *const u8,
        pub len: usize,
    }

    #[repr(C)]
    #[derive(Debug)]
    pub struct fm_error {
        pub buf: *mut c_char,
        pub cap: usize,
    }

    #[repr(C)]
    #[derive(Debug)]
    pub struct fm_host {
        pub struct_size: u32,
        pub ctx: *mut c_void,
        pub log: Option<unsafe extern "C" fn(*mut c_void, u32, *const c_char, usize)>,
    }

    #[repr(C)]
    #[derive(Debug)]
    pub struct fm_message {
        pub struct_size: u32,
        pub flags: u32,
        pub id: fm_bytes,
        pub topic: fm_bytes,
        pub queue: fm_bytes,
        pub exchange: fm_bytes,
        pub body: fm_bytes,
        pub headers_json: fm_bytes,
        pub json: fm_bytes,
        pub severity: i32,
        pub priority: i32,
        // 1.1: only there when struct_size covers them (see `Message::can_reply`).
        pub reply_to: fm_bytes,
        pub correlation_id: fm_bytes,
        pub reply_ctx: *mut c_void,
        pub reply: Option<fm_reply_fn>,
    }

    pub type fm_reply_fn = unsafe extern "C" fn(*mut c_void, *const u8, usize) -> i32;

    #[repr(C)]
    #[derive(Debug)]
    pub struct fm_halt {
        pub struct_size: u32,
        pub exit_code: i32,
        pub requeue: u8,
        pub reserved: [u8; 3],
    }

    pub type fm_init_fn = unsafe extern "C" fn(
        *const fm_host,
        *const c_char,
        usize,
        *mut *mut c_void,
        *mut fm_error,
    ) -> i32;
    pub type fm_handle_fn =
        unsafe extern "C" fn(*mut c_void, *const fm_message, *mut fm_halt, *mut fm_error) -> u32;
    pub type fm_shutdown_fn = unsafe extern "C" fn(*mut c_void);

    #[repr(C)]
    #[derive(Debug)]
    pub struct fm_plugin {
        pub struct_size: u32,
        pub abi_major: u32,
        pub abi_minor: u32,
        pub flags: u32,
        pub name: *const c_char,
        pub version: *const c_char,
        pub init: Option<fm_init_fn>,
        pub handle: Option<fm_handle_fn>,
        pub shutdown: Option<fm_shutdown_fn>,
    }

    // SAFETY: a table only holds pointers to immutable, 'static NUL-terminated strings and
    // function pointers, so sharing it between threads (as a `static` must be) is harmless.
    unsafe impl Sync for fm_plugin {}

    // The same pins as fm's src/callback/abi.rs: the layout of include/fm_plugin.h.
    const P: usize = size_of::<usize>();
    const _: () = {
        use std::mem::offset_of;
        assert!(size_of::<fm_bytes>() == 2 * P);
        assert!(size_of::<fm_error>() == 2 * P);
        assert!(size_of::<fm_host>() == 3 * P);
        assert!(offset_of!(fm_message, json) == 8 + 12 * P);
        assert!(offset_of!(fm_message, priority) == 12 + 14 * P);
        assert!(offset_of!(fm_message, reply_to) == 16 + 14 * P);
        assert!(offset_of!(fm_message, reply) == 16 + 19 * P);
        assert!(size_of::<fm_message>() == 16 + 20 * P);
        assert!(offset_of!(fm_halt, requeue) == 8);
        assert!(size_of::<fm_halt>() == 12);
        assert!(offset_of!(fm_plugin, name) == 16);
        assert!(offset_of!(fm_plugin, shutdown) == 16 + 4 * P);
        assert!(size_of::<fm_plugin>() == 16 + 5 * P);
    };
}

/// How important a log line is; fm logs it at the matching level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn raw(self) -> u32 {
        match self {
            Level::Error => sys::FM_LOG_ERROR,
            Level::Warn => sys::FM_LOG_WARN,
            Level::Info => sys::FM_LOG_INFO,
            Level::Debug => sys::FM_LOG_DEBUG,
            Level::Trace => sys::FM_LOG_TRACE,
        }
    }
}

/// A handle on fm: log through fm's logging, tagged with the plugin's name.
///
/// It is `Copy`, `Send` and `Sync` and valid for the whole life of the process (the header
/// promises that), so keep it in your plugin and use it from any thread.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    raw: *const sys::fm_host,
}

// SAFETY: the header promises the fm_host and its ctx stay valid for the life of the process
// and that `log` may be called from any thread.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

impl Host {
    /// Log `msg` at `level`.
    pub fn log(&self, level: Level, msg: &str) {
        if self.raw.is_null() {
            return;
        }
        // SAFETY: non-null, and valid forever by the header's promise (see the type's docs).
        let host = unsafe { &*self.raw };
        if let Some(log) = host.log {
            // SAFETY: the arguments are fm's ctx and `msg.len()` readable bytes at `msg`.
            unsafe { log(host.ctx, level.raw(), msg.as_ptr().cast(), msg.len()) };
        }
    }

    pub fn error(&self, msg: &str) {
        self.log(Level::Error, msg);
    }
    pub fn warn(&self, msg: &str) {
        self.log(Level::Warn, msg);
    }
    pub fn info(&self, msg: &str) {
        self.log(Level::Info, msg);
    }
    pub fn debug(&self, msg: &str) {
        self.log(Level::Debug, msg);
    }
    pub fn trace(&self, msg: &str) {
        self.log(Level::Trace, msg);
    }
}

/// One message, borrowed from fm for the duration of a `handle` call.
///
/// Copy out (`to_owned()`) whatever you want to keep. Text fields are UTF-8 (fm only hands
/// over valid messages); should a field ever not be, its accessor returns `""`.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a sys::fm_message,
}

impl<'a> Message<'a> {
    fn bytes(&self, b: sys::fm_bytes) -> &'a [u8] {
        if b.ptr.is_null() || b.len == 0 {
            return &[];
        }
        // SAFETY: the header guarantees `len` readable bytes at `ptr` for the duration of the
        // handle call, which `'a` (the borrow of the fm_message) does not outlive.
        unsafe { std::slice::from_raw_parts(b.ptr, b.len) }
    }

    fn text(&self, b: sys::fm_bytes) -> &'a str {
        std::str::from_utf8(self.bytes(b)).unwrap_or("")
    }

    /// The AMQP message id; `""` if the message has none (then `json()` has `"id": null`).
    pub fn id(&self) -> &'a str {
        self.text(self.raw.id)
    }

    /// The topic (routing key).
    pub fn topic(&self) -> &'a str {
        self.text(self.raw.topic)
    }

    /// The queue fm consumed the message from.
    pub fn queue(&self) -> &'a str {
        self.text(self.raw.queue)
    }

    /// The exchange it was published to.
    pub fn exchange(&self) -> &'a str {
        self.text(self.raw.exchange)
    }

    /// The body exactly as received: a JSON object, UTF-8, unless [`Message::raw_body`].
    pub fn body(&self) -> &'a [u8] {
        self.bytes(self.raw.body)
    }

    /// Whether the body is not a JSON object and is handed over as the bytes it is (fm's
    /// `[callback] body = "bytes"`); `json()` is then `""`.
    pub fn raw_body(&self) -> bool {
        self.raw.flags & sys::FM_MSG_RAW_BODY != 0
    }

    /// Whether the fm that called speaks ABI 1.1 or later: it passes `reply_to`,
    /// `correlation_id` and takes replies. An fm of ABI 1.0 does not (`reply_to()` is then
    /// `""`, and [`Message::reply`] and [`Outcome::Reply`] fail).
    pub fn can_reply(&self) -> bool {
        self.raw.struct_size as usize
            >= std::mem::offset_of!(sys::fm_message, reply) + size_of::<Option<sys::fm_reply_fn>>()
    }

    /// The AMQP `reply_to` property: where a reply goes; `""` if the message is not a request.
    pub fn reply_to(&self) -> &'a str {
        if self.can_reply() {
            self.text(self.raw.reply_to)
        } else {
            ""
        }
    }

    /// The AMQP `correlation_id` property; `""` if none.
    pub fn correlation_id(&self) -> &'a str {
        if self.can_reply() {
            self.text(self.raw.correlation_id)
        } else {
            ""
        }
    }

    /// Keep `body` as the reply to this request, sent once `handle` returns [`Outcome::Ack`]
    /// (which [`Outcome::Reply`] does for you). Calling it again replaces the reply.
    pub fn reply(&self, body: &[u8]) -> Result<(), ReplyError> {
        let reply = match self.raw.reply {
            Some(f) if self.can_reply() => f,
            _ => return Err(ReplyError::Unsupported),
        };
        // SAFETY: fm (ABI 1.1, checked above) passed this function and its context for the
        // duration of the handle call, which `'a` does not outlive; `body` is readable.
        match unsafe { reply(self.raw.reply_ctx, body.as_ptr(), body.len()) } {
            sys::FM_REPLY_OK => Ok(()),
            _ => Err(ReplyError::NoReplyTo),
        }
    }

    /// The headers as one JSON object.
    pub fn headers_json(&self) -> &'a str {
        self.text(self.raw.headers_json)
    }

    /// The whole message as one JSON object in the record-file format: `body`, `headers`,
    /// `id`, `priority`, `queue`, `topic`, keys sorted, like a line of `fm record`.
    pub fn json(&self) -> &'a str {
        self.text(self.raw.json)
    }

    /// The `fedora_messaging_severity` header: 10, 20, 30 or 40.
    pub fn severity(&self) -> i32 {
        self.raw.severity
    }

    /// The AMQP priority, 0 if unset.
    pub fn priority(&self) -> i32 {
        self.raw.priority
    }

    /// Whether the broker delivered this message before.
    pub fn redelivered(&self) -> bool {
        self.raw.flags & sys::FM_MSG_REDELIVERED != 0
    }
}

/// Why [`Message::reply`] did not take a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// The message has no `reply_to`: there is no one to send a reply to.
    NoReplyTo,
    /// The fm that loaded the plugin speaks ABI 1.0, which has no replies: upgrade fm.
    Unsupported,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplyError::NoReplyTo => "the message has no reply_to",
            ReplyError::Unsupported => {
                "this fm speaks plugin ABI 1.0, which cannot send replies (ABI 1.1 can): upgrade fm"
            }
        })
    }
}

impl std::error::Error for ReplyError {}

/// What a plugin decided about a message; the same choices as a fedora-messaging callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: acknowledge it.
    Ack,
    /// Handled, and this is the answer to the request: fm publishes it to the message's
    /// `reply_to` (with its correlation id), then acknowledges it. For a message without
    /// `reply_to` this is [`Outcome::Ack`]. On an fm of ABI 1.0 it fails the message, saying
    /// that fm cannot send replies.
    Reply(Vec<u8>),
    /// Not now: return it to the queue (`Nack`).
    Nack,
    /// Never: reject it, dead-lettered if the queue has a DLX (`Drop`).
    Drop,
    /// Stop consuming (`HaltConsumer`): ack the message (requeue it if `requeue`), stop, and
    /// exit with `exit_code`; `reason` is logged.
    Halt {
        exit_code: i32,
        requeue: bool,
        reason: Option<String>,
    },
    /// Something went wrong: fm logs the text, requeues the message and every prefetched one,
    /// and exits 13.
    Fail(String),
}

/// A plugin whose `handle` fm calls one message at a time (possibly from different threads,
/// hence `Send`). The usual choice.
pub trait Plugin: Send + Sized + 'static {
    /// Set up. `config` is the configuration's `[consumer_config]` table as a JSON object.
    /// An `Err` makes fm exit 1 with its text.
    fn init(host: Host, config: &str) -> Result<Self, String>;

    /// Decide about one message.
    fn handle(&mut self, msg: &Message<'_>) -> Outcome;

    /// Called once when fm stops; the plugin is dropped right after.
    fn shutdown(&mut self) {}
}

/// A plugin whose `handle` fm may call from several threads at once (it sets
/// `FM_PLUGIN_THREAD_SAFE`), which lets fm run messages concurrently.
pub trait ThreadSafePlugin: Send + Sync + Sized + 'static {
    /// Set up. `config` is the configuration's `[consumer_config]` table as a JSON object.
    /// An `Err` makes fm exit 1 with its text.
    fn init(host: Host, config: &str) -> Result<Self, String>;

    /// Decide about one message.
    fn handle(&self, msg: &Message<'_>) -> Outcome;

    /// Called once when fm stops; the plugin is dropped right after.
    fn shutdown(&self) {}
}

/// Export a plugin type as this library's `fm_plugin_v1`.
///
/// `export!(MyPlugin, name = "mine")` for a [`Plugin`];
/// `export!(MyPlugin, name = "mine", thread_safe = true)` for a [`ThreadSafePlugin`].
/// `name` must be a string literal; the version is the crate's `CARGO_PKG_VERSION`.
/// Use it once per library.
#[macro_export]
macro_rules! export {
    ($ty:ty, name = $name:literal $(, thread_safe = false)? $(,)?) => {
        $crate::export!(@table $ty, $name, 0,
            $crate::__private::init::<$crate::__private::Serial<$ty>>,
            $crate::__private::handle::<$crate::__private::Serial<$ty>>,
            $crate::__private::shutdown::<$crate::__private::Serial<$ty>>);
    };
    ($ty:ty, name = $name:literal, thread_safe = true $(,)?) => {
        $crate::export!(@table $ty, $name, $crate::sys::FM_PLUGIN_THREAD_SAFE,
            $crate::__private::init::<$crate::__private::Shared<$ty>>,
            $crate::__private::handle::<$crate::__private::Shared<$ty>>,
            $crate::__private::shutdown::<$crate::__private::Shared<$ty>>);
    };
    (@table $ty:ty, $name:literal, $flags:expr, $init:expr, $handle:expr, $shutdown:expr) => {
        /// The entry point fm looks up (see include/fm_plugin.h).
        #[unsafe(no_mangle)]
        pub extern "C" fn fm_plugin_v1() -> *const $crate::sys::fm_plugin {
            static TABLE: $crate::sys::fm_plugin = $crate::sys::fm_plugin {
                struct_size: ::core::mem::size_of::<$crate::sys::fm_plugin>() as u32,
                abi_major: $crate::sys::FM_ABI_MAJOR,
                abi_minor: $crate::sys::FM_ABI_MINOR,
                flags: $flags,
                name: ::core::concat!($name, "\0").as_ptr().cast(),
                version: ::core::concat!(::core::env!("CARGO_PKG_VERSION"), "\0")
                    .as_ptr()
                    .cast(),
                init: Some($init),
                handle: Some($handle),
                shutdown: Some($shutdown),
            };
            &TABLE
        }
    };
}

/// Implementation details of [`export!`]; not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// What the generated C functions need from a plugin, whichever trait it implements.
    pub trait Adapter: Sized + 'static {
        fn init(host: Host, config: &str) -> Result<Self, String>;
        /// # Safety
        /// Only called as the ABI allows: never concurrently unless the plugin is thread-safe.
        unsafe fn handle(this: *mut Self, msg: &Message<'_>) -> Outcome;
        fn shutdown(&mut self);
    }

    /// A [`Plugin`]: fm serialises calls, so `handle` may take `&mut`.
    pub struct Serial<T>(T);
    /// A [`ThreadSafePlugin`]: calls may overlap, so `handle` takes `&`.
    pub struct Shared<T>(T);

    impl<T: Plugin> Adapter for Serial<T> {
        fn init(host: Host, config: &str) -> Result<Self, String> {
            T::init(host, config).map(Serial)
        }
        unsafe fn handle(this: *mut Self, msg: &Message<'_>) -> Outcome {
            // SAFETY: the plugin does not set FM_PLUGIN_THREAD_SAFE, so fm never runs two
            // calls at once: this is the only reference to the state for the call.
            unsafe { (*this).0.handle(msg) }
        }
        fn shutdown(&mut self) {
            self.0.shutdown();
        }
    }

    impl<T: ThreadSafePlugin> Adapter for Shared<T> {
        fn init(host: Host, config: &str) -> Result<Self, String> {
            T::init(host, config).map(Shared)
        }
        unsafe fn handle(this: *mut Self, msg: &Message<'_>) -> Outcome {
            // SAFETY: only a shared reference is made, and T is Sync.
            unsafe { (*this).0.handle(msg) }
        }
        fn shutdown(&mut self) {
            self.0.shutdown();
        }
    }

    /// The state behind fm's `void *state`.
    struct State<A> {
        host: Host,
        /// Set when `handle` panicked: the plugin's own state may be half-updated, so every
        /// later call fails instead of running on it.
        poisoned: AtomicBool,
        plugin: A,
    }

    fn panic_text(payload: &(dyn Any + Send)) -> String {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "(a non-string panic payload)".to_owned()
        }
    }

    /// Write `text` into fm's error buffer: cut at a character boundary to fit, NUL-terminated.
    fn write_error(err: *mut sys::fm_error, text: &str) {
        if err.is_null() {
            return;
        }
        // SAFETY: fm passes a valid fm_error for the duration of the call.
        let err = unsafe { &*err };
        if err.buf.is_null() || err.cap == 0 {
            return;
        }
        let mut n = text.len().min(err.cap - 1);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: `buf` has `cap` writable bytes (the header's promise) and n + 1 <= cap.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), err.buf.cast::<u8>(), n);
            *err.buf.add(n) = 0;
        }
    }

    /// `fm_plugin.init`.
    ///
    /// # Safety
    /// Called by fm with the arguments the header describes.
    pub unsafe extern "C" fn init<A: Adapter>(
        host: *const sys::fm_host,
        config_json: *const c_char,
        config_len: usize,
        state: *mut *mut c_void,
        err: *mut sys::fm_error,
    ) -> i32 {
        let host = Host { raw: host };
        let config: &[u8] = if config_json.is_null() || config_len == 0 {
            b"{}"
        } else {
            // SAFETY: fm passes `config_len` readable bytes at `config_json` for this call.
            unsafe { std::slice::from_raw_parts(config_json.cast::<u8>(), config_len) }
        };
        let Ok(config) = std::str::from_utf8(config) else {
            write_error(err, "the consumer_config JSON is not valid UTF-8");
            return 1;
        };
        match catch_unwind(AssertUnwindSafe(|| A::init(host, config))) {
            Ok(Ok(plugin)) => {
                let boxed = Box::new(State {
                    host,
                    poisoned: AtomicBool::new(false),
                    plugin,
                });
                // SAFETY: fm passes a valid `void **` for the result.
                unsafe { *state = Box::into_raw(boxed).cast() };
                0
            }
            Ok(Err(text)) => {
                write_error(err, &text);
                1
            }
            Err(payload) => {
                write_error(err, &format!("init panicked: {}", panic_text(&*payload)));
                1
            }
        }
    }

    /// `fm_plugin.handle`.
    ///
    /// # Safety
    /// Called by fm with the state `init` returned and the arguments the header describes.
    pub unsafe extern "C" fn handle<A: Adapter>(
        state: *mut c_void,
        msg: *const sys::fm_message,
        halt: *mut sys::fm_halt,
        err: *mut sys::fm_error,
    ) -> u32 {
        let state = state.cast::<State<A>>();
        if state.is_null() || msg.is_null() {
            write_error(err, "fm passed a NULL state or message");
            return sys::FM_FAIL;
        }
        // SAFETY: `state` is the Box init leaked, alive until shutdown. Only the `poisoned`
        // field is borrowed here: `plugin` may be borrowed mutably by A::handle at the same time.
        let poisoned = unsafe { &(*state).poisoned };
        if poisoned.load(Ordering::Acquire) {
            write_error(
                err,
                "the plugin panicked earlier and is not usable any more",
            );
            return sys::FM_FAIL;
        }
        // SAFETY: fm passes a valid fm_message for the call; `Message` does not outlive it.
        let msg = Message {
            raw: unsafe { &*msg },
        };
        // SAFETY: a raw pointer to a field of the live State, no reference made.
        let plugin = unsafe { &raw mut (*state).plugin };
        // SAFETY: A::handle's contract (no overlapping calls unless thread-safe) is the rule
        // fm follows for this plugin's flags, which export! derived from the same trait.
        let outcome = catch_unwind(AssertUnwindSafe(|| unsafe { A::handle(plugin, &msg) }));
        match outcome {
            Ok(Outcome::Ack) => sys::FM_ACK,
            Ok(Outcome::Reply(body)) => match msg.reply(&body) {
                Ok(()) | Err(ReplyError::NoReplyTo) => sys::FM_ACK,
                Err(e @ ReplyError::Unsupported) => {
                    write_error(err, &e.to_string());
                    sys::FM_FAIL
                }
            },
            Ok(Outcome::Nack) => sys::FM_NACK,
            Ok(Outcome::Drop) => sys::FM_DROP,
            Ok(Outcome::Halt {
                exit_code,
                requeue,
                reason,
            }) => {
                if !halt.is_null() {
                    // SAFETY: fm passes a valid fm_halt for the call.
                    unsafe {
                        (*halt).exit_code = exit_code;
                        (*halt).requeue = u8::from(requeue);
                    }
                }
                if let Some(reason) = reason {
                    write_error(err, &reason);
                }
                sys::FM_HALT
            }
            Ok(Outcome::Fail(text)) => {
                write_error(err, &text);
                sys::FM_FAIL
            }
            Err(payload) => {
                poisoned.store(true, Ordering::Release);
                write_error(
                    err,
                    &format!("the plugin panicked: {}", panic_text(&*payload)),
                );
                sys::FM_FAIL
            }
        }
    }

    /// `fm_plugin.shutdown`.
    ///
    /// # Safety
    /// Called by fm once, with the state `init` returned, after every `handle` returned.
    pub unsafe extern "C" fn shutdown<A: Adapter>(state: *mut c_void) {
        if state.is_null() {
            return;
        }
        // SAFETY: `state` is the Box init leaked; fm calls shutdown exactly once, with no
        // other call running, so taking it back is sound.
        let mut state = unsafe { Box::from_raw(state.cast::<State<A>>()) };
        let host = state.host;
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| state.plugin.shutdown())) {
            host.error(&format!("shutdown panicked: {}", panic_text(&*payload)));
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(state))) {
            host.error(&format!(
                "dropping the plugin panicked: {}",
                panic_text(&*payload)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The generated entry points, called in-process exactly as fm calls them.
    use super::*;
    use std::sync::Mutex;

    static LOG: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

    unsafe extern "C" fn test_log(_ctx: *mut c_void, level: u32, msg: *const c_char, len: usize) {
        let bytes = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
        let text = String::from_utf8_lossy(bytes).into_owned();
        LOG.lock().unwrap().push((level, text));
    }

    struct SyncHost(sys::fm_host);
    // SAFETY: immutable, and its ctx is NULL.
    unsafe impl Sync for SyncHost {}

    static HOST: SyncHost = SyncHost(sys::fm_host {
        struct_size: size_of::<sys::fm_host>() as u32,
        ctx: std::ptr::null_mut(),
        log: Some(test_log),
    });

    fn logged(level: u32, text: &str) -> usize {
        let log = LOG.lock().unwrap();
        log.iter().filter(|(l, t)| *l == level && t == text).count()
    }

    /// Echoes its config and the message into a Halt reason, panics on topic "panic", logs its
    /// shutdown.
    struct Echo {
        host: Host,
        config: String,
        calls: u32,
    }

    impl Plugin for Echo {
        fn init(host: Host, config: &str) -> Result<Self, String> {
            if config.contains("refuse") {
                return Err(format!("refusing config {config}"));
            }
            if config.contains("explode") {
                panic!("init exploded");
            }
            Ok(Echo {
                host,
                config: config.to_owned(),
                calls: 0,
            })
        }
        fn handle(&mut self, msg: &Message<'_>) -> Outcome {
            self.calls += 1;
            match msg.topic() {
                "panic" => panic!("boom on {}", msg.id()),
                "fail" => Outcome::Fail("é".repeat(1000)),
                "log" => {
                    self.host.warn("careful");
                    Outcome::Ack
                }
                "nack" => Outcome::Nack,
                "drop" => Outcome::Drop,
                "reply" => Outcome::Reply(
                    format!("{} {}", msg.reply_to(), msg.correlation_id()).into_bytes(),
                ),
                _ => Outcome::Halt {
                    exit_code: self.calls as i32,
                    requeue: msg.redelivered(),
                    reason: Some(format!(
                        "{} {} {} {} {} {} {} {} {}",
                        self.config,
                        msg.id(),
                        msg.queue(),
                        msg.exchange(),
                        String::from_utf8_lossy(msg.body()),
                        msg.headers_json(),
                        msg.json(),
                        msg.severity(),
                        msg.priority()
                    )),
                },
            }
        }
        fn shutdown(&mut self) {
            self.host.info(&format!("shutdown {}", self.config));
        }
    }

    export!(Echo, name = "echo");

    fn table() -> &'static sys::fm_plugin {
        unsafe { &*fm_plugin_v1() }
    }

    fn b(s: &str) -> sys::fm_bytes {
        sys::fm_bytes {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Call init with `config`: Ok(state) or Err(error text).
    fn init(config: &str) -> Result<*mut c_void, String> {
        let mut state = std::ptr::null_mut();
        let mut buf = [0 as c_char; 64];
        let mut err = sys::fm_error {
            buf: buf.as_mut_ptr(),
            cap: buf.len(),
        };
        let c = format!("{config}\0");
        let rc = unsafe {
            table().init.unwrap()(
                &HOST.0,
                c.as_ptr().cast(),
                config.len(),
                &mut state,
                &mut err,
            )
        };
        if rc == 0 { Ok(state) } else { Err(text(&buf)) }
    }

    fn text(buf: &[c_char]) -> String {
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8(bytes).expect("the SDK writes whole UTF-8 characters")
    }

    /// Call handle with a message on `topic`: (result, halt, error text).
    fn handle(state: *mut c_void, topic: &str) -> (u32, sys::fm_halt, String) {
        handle_sized(state, topic, size_of::<sys::fm_message>(), &mut None)
    }

    /// What the test host's `reply` keeps.
    unsafe extern "C" fn test_reply(ctx: *mut c_void, body: *const u8, len: usize) -> i32 {
        let slot = unsafe { &mut *ctx.cast::<Option<Vec<u8>>>() };
        *slot = Some(unsafe { std::slice::from_raw_parts(body, len) }.to_vec());
        sys::FM_REPLY_OK
    }

    /// [`handle`] as an fm whose fm_message is `size` bytes calls it (the 1.0 size: an fm that
    /// knows nothing of replies, and leaves garbage after it); a reply lands in `reply`.
    fn handle_sized(
        state: *mut c_void,
        topic: &str,
        size: usize,
        reply: &mut Option<Vec<u8>>,
    ) -> (u32, sys::fm_halt, String) {
        let msg = sys::fm_message {
            struct_size: size as u32,
            flags: sys::FM_MSG_REDELIVERED,
            id: b("id-1"),
            topic: b(topic),
            queue: b("q"),
            exchange: b("amq.topic"),
            body: b("{\"a\": 1}"),
            headers_json: b("{\"h\":true}"),
            json: b("{}"),
            severity: 30,
            priority: 4,
            reply_to: b("amq.rabbitmq.reply-to.x"),
            correlation_id: b("c-1"),
            reply_ctx: std::ptr::from_mut(reply).cast(),
            reply: Some(test_reply),
        };
        let mut halt = sys::fm_halt {
            struct_size: size_of::<sys::fm_halt>() as u32,
            exit_code: 0,
            requeue: 0,
            reserved: [0; 3],
        };
        let mut buf = [0 as c_char; 256];
        let mut err = sys::fm_error {
            buf: buf.as_mut_ptr(),
            cap: buf.len(),
        };
        let rc = unsafe { table().handle.unwrap()(state, &msg, &mut halt, &mut err) };
        (rc, halt, text(&buf))
    }

    #[test]
    fn the_table_describes_the_plugin() {
        let t = table();
        assert_eq!(t.struct_size as usize, size_of::<sys::fm_plugin>());
        assert_eq!(t.abi_major, 1);
        assert_eq!(t.flags, 0, "Plugin is not thread-safe");
        let name = unsafe { std::ffi::CStr::from_ptr(t.name) };
        assert_eq!(name.to_str().unwrap(), "echo");
        let version = unsafe { std::ffi::CStr::from_ptr(t.version) };
        assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn init_errors_and_panics_become_error_text() {
        assert_eq!(
            init("{\"refuse\": 1}"),
            Err("refusing config {\"refuse\": 1}".into())
        );
        assert_eq!(
            init("{\"explode\": 1}"),
            Err("init panicked: init exploded".into())
        );
    }

    #[test]
    fn a_message_round_trips_and_outcomes_map_to_results() {
        let state = init("{\"k\": \"v\"}").unwrap();
        let (rc, halt, reason) = handle(state, "anything");
        assert_eq!(rc, sys::FM_HALT);
        assert_eq!((halt.exit_code, halt.requeue), (1, 1));
        assert_eq!(
            reason,
            "{\"k\": \"v\"} id-1 q amq.topic {\"a\": 1} {\"h\":true} {} 30 4"
        );
        assert_eq!(handle(state, "nack").0, sys::FM_NACK);
        assert_eq!(handle(state, "drop").0, sys::FM_DROP);
        assert_eq!(handle(state, "log").0, sys::FM_ACK);
        assert_eq!(logged(sys::FM_LOG_WARN, "careful"), 1);
        // Failure text longer than the buffer is cut at a character boundary.
        let (rc, _, text) = handle(state, "fail");
        assert_eq!(rc, sys::FM_FAIL);
        assert_eq!(text, "é".repeat(127), "255 bytes fit; half an é does not");
        unsafe { table().shutdown.unwrap()(state) };
        assert_eq!(logged(sys::FM_LOG_INFO, "shutdown {\"k\": \"v\"}"), 1);
    }

    #[test]
    fn a_reply_reaches_fm_of_abi_1_1_and_fails_clearly_on_1_0() {
        let state = init("{}").unwrap();
        let mut reply = None;
        let (rc, _, _) = handle_sized(state, "reply", size_of::<sys::fm_message>(), &mut reply);
        assert_eq!(rc, sys::FM_ACK);
        assert_eq!(reply.as_deref(), Some(&b"amq.rabbitmq.reply-to.x c-1"[..]));
        // An fm of ABI 1.0 passes a smaller fm_message: the appended fields are not read.
        let size_1_0 = std::mem::offset_of!(sys::fm_message, reply_to);
        let mut reply = None;
        let (rc, _, text) = handle_sized(state, "reply", size_1_0, &mut reply);
        assert_eq!(rc, sys::FM_FAIL);
        assert!(text.starts_with("this fm speaks plugin ABI 1.0"), "{text}");
        assert_eq!(reply, None);
        unsafe { table().shutdown.unwrap()(state) };
    }

    #[test]
    fn a_panic_in_handle_is_a_failure_and_poisons_the_plugin() {
        let state = init("{}").unwrap();
        let (rc, _, text) = handle(state, "panic");
        assert_eq!(rc, sys::FM_FAIL);
        assert_eq!(text, "the plugin panicked: boom on id-1");
        let (rc, _, text) = handle(state, "nack");
        assert_eq!(rc, sys::FM_FAIL, "a panicked plugin must not run again");
        assert_eq!(
            text,
            "the plugin panicked earlier and is not usable any more"
        );
        unsafe { table().shutdown.unwrap()(state) };
    }

    #[test]
    fn host_is_usable_from_any_thread() {
        let host = Host { raw: &HOST.0 };
        std::thread::spawn(move || host.error("from a thread"))
            .join()
            .unwrap();
        assert_eq!(logged(sys::FM_LOG_ERROR, "from a thread"), 1);
    }
}
