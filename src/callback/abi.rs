//! The Rust mirror of `include/fm_plugin.h`, the native plugin ABI.
//!
//! The header is the source of truth; this module copies it field for field (`#[repr(C)]`, the
//! C names kept so the two read side by side) for the host in [`super::plugin`]. The `const`
//! assertions at the bottom pin every size and offset to what a C compiler produces for the
//! header, written in terms of the pointer width so that they hold on 32- and 64-bit targets;
//! a test in `plugin.rs` compiles the header with `cc` and compares the real numbers.
//!
//! Function pointers that a plugin fills in are `Option<…>`: C may leave them NULL, and a null
//! non-`Option` function pointer would be undefined behaviour in Rust.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// The C compiler flags `include/fm_plugin.h` is promised to compile cleanly with: every test
/// builds its C plugins with them (and `-shared`), so the header and the test plugins stay
/// warning-free C11.
pub const C_FLAGS: &[&str] = &[
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-fPIC",
];

/// The ABI major version this fm implements (`FM_ABI_MAJOR`).
pub const FM_ABI_MAJOR: u32 = 1;
/// The ABI minor version this fm implements (`FM_ABI_MINOR`).
pub const FM_ABI_MINOR: u32 = 1;

/// `fm_plugin.flags`: `handle` may run on several threads at once.
pub const FM_PLUGIN_THREAD_SAFE: u32 = 0x1;

/// `handle` result: acknowledge.
pub const FM_ACK: u32 = 0;
/// `handle` result: requeue (fedora-messaging's `Nack`).
pub const FM_NACK: u32 = 1;
/// `handle` result: reject without requeueing (fedora-messaging's `Drop`).
pub const FM_DROP: u32 = 2;
/// `handle` result: stop consuming, as described by the `fm_halt` it filled in.
pub const FM_HALT: u32 = 3;
/// The conventional failure result; any value other than the four above is a failure.
pub const FM_FAIL: u32 = 0xFFFF_FFFF;

/// `fm_message.flags`: the broker delivered this message before.
pub const FM_MSG_REDELIVERED: u32 = 0x1;
/// `fm_message.flags` (1.1): the body is not a JSON object, handed over as bytes.
pub const FM_MSG_RAW_BODY: u32 = 0x2;

/// `fm_message.reply` result (1.1): the reply is kept.
pub const FM_REPLY_OK: i32 = 0;
/// `fm_message.reply` result (1.1): the message has no `reply_to`.
pub const FM_REPLY_NO_REPLY_TO: i32 = 1;

/// `fm_host.log` levels.
pub const FM_LOG_ERROR: u32 = 1;
pub const FM_LOG_WARN: u32 = 2;
pub const FM_LOG_INFO: u32 = 3;
pub const FM_LOG_DEBUG: u32 = 4;
pub const FM_LOG_TRACE: u32 = 5;

/// The exported symbol, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"fm_plugin_v1\0";

/// `const fm_plugin *fm_plugin_v1(void)`.
pub type fm_plugin_v1_fn = unsafe extern "C" fn() -> *const fm_plugin;

/// `fm_host.log`.
pub type fm_log_fn =
    unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const c_char, len: usize);

/// `fm_plugin.init`.
pub type fm_init_fn = unsafe extern "C" fn(
    host: *const fm_host,
    config_json: *const c_char,
    config_len: usize,
    state: *mut *mut c_void,
    err: *mut fm_error,
) -> i32;

/// `fm_plugin.handle`.
pub type fm_handle_fn = unsafe extern "C" fn(
    state: *mut c_void,
    msg: *const fm_message,
    halt: *mut fm_halt,
    err: *mut fm_error,
) -> u32;

/// `fm_message.reply` (1.1).
pub type fm_reply_fn =
    unsafe extern "C" fn(reply_ctx: *mut c_void, body: *const u8, len: usize) -> i32;

/// `fm_plugin.shutdown`.
pub type fm_shutdown_fn = unsafe extern "C" fn(state: *mut c_void);

/// A borrowed byte buffer, not NUL-terminated; `ptr` is never null.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct fm_bytes {
    pub ptr: *const u8,
    pub len: usize,
}

impl fm_bytes {
    /// Borrow `bytes` for the duration of one call. An empty slice still has a non-null
    /// (dangling, well-aligned) pointer, as the header promises.
    pub fn borrow(bytes: &[u8]) -> fm_bytes {
        fm_bytes {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }
}

/// A host-owned buffer the plugin writes NUL-terminated error text into.
#[repr(C)]
#[derive(Debug)]
pub struct fm_error {
    pub buf: *mut c_char,
    pub cap: usize,
}

/// What the host offers the plugin.
#[repr(C)]
#[derive(Debug)]
pub struct fm_host {
    pub struct_size: u32,
    pub ctx: *mut c_void,
    pub log: Option<fm_log_fn>,
}

/// One message, borrowed for one `handle` call.
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
    // 1.1
    pub reply_to: fm_bytes,
    pub correlation_id: fm_bytes,
    pub reply_ctx: *mut c_void,
    pub reply: Option<fm_reply_fn>,
}

/// Filled in by `handle` when it returns [`FM_HALT`].
#[repr(C)]
#[derive(Debug)]
pub struct fm_halt {
    pub struct_size: u32,
    pub exit_code: i32,
    pub requeue: u8,
    pub reserved: [u8; 3],
}

/// The table a plugin exports.
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

/// Size of `T` as the `u32` that goes into a `struct_size` field.
pub const fn struct_size<T>() -> u32 {
    size_of::<T>() as u32
}

// Layout pins: the C layout of include/fm_plugin.h, written out by hand. If one of these
// fails, this file no longer mirrors the header (or the header changed without a new version).
const P: usize = size_of::<usize>();
const _: () = {
    use std::mem::offset_of;

    assert!(size_of::<fm_bytes>() == 2 * P);
    assert!(offset_of!(fm_bytes, len) == P);

    assert!(size_of::<fm_error>() == 2 * P);
    assert!(offset_of!(fm_error, cap) == P);

    assert!(offset_of!(fm_host, ctx) == P);
    assert!(offset_of!(fm_host, log) == 2 * P);
    assert!(size_of::<fm_host>() == 3 * P);

    assert!(offset_of!(fm_message, flags) == 4);
    assert!(offset_of!(fm_message, id) == 8);
    assert!(offset_of!(fm_message, topic) == 8 + 2 * P);
    assert!(offset_of!(fm_message, queue) == 8 + 4 * P);
    assert!(offset_of!(fm_message, exchange) == 8 + 6 * P);
    assert!(offset_of!(fm_message, body) == 8 + 8 * P);
    assert!(offset_of!(fm_message, headers_json) == 8 + 10 * P);
    assert!(offset_of!(fm_message, json) == 8 + 12 * P);
    assert!(offset_of!(fm_message, severity) == 8 + 14 * P);
    assert!(offset_of!(fm_message, priority) == 12 + 14 * P);
    assert!(offset_of!(fm_message, reply_to) == 16 + 14 * P);
    assert!(offset_of!(fm_message, correlation_id) == 16 + 16 * P);
    assert!(offset_of!(fm_message, reply_ctx) == 16 + 18 * P);
    assert!(offset_of!(fm_message, reply) == 16 + 19 * P);
    assert!(size_of::<fm_message>() == 16 + 20 * P);

    assert!(offset_of!(fm_halt, exit_code) == 4);
    assert!(offset_of!(fm_halt, requeue) == 8);
    assert!(size_of::<fm_halt>() == 12);

    assert!(offset_of!(fm_plugin, abi_major) == 4);
    assert!(offset_of!(fm_plugin, abi_minor) == 8);
    assert!(offset_of!(fm_plugin, flags) == 12);
    assert!(offset_of!(fm_plugin, name) == 16);
    assert!(offset_of!(fm_plugin, version) == 16 + P);
    assert!(offset_of!(fm_plugin, init) == 16 + 2 * P);
    assert!(offset_of!(fm_plugin, handle) == 16 + 3 * P);
    assert!(offset_of!(fm_plugin, shutdown) == 16 + 4 * P);
    assert!(size_of::<fm_plugin>() == 16 + 5 * P);

    // Option<fn> is a nullable function pointer: the same size as a C function pointer.
    assert!(size_of::<Option<fm_handle_fn>>() == P);
};

/// `sizeof(fm_message)` in ABI 1.0: what a plugin built against 1.0 knows of.
pub const FM_MESSAGE_SIZE_1_0: u32 = (16 + 14 * P) as u32;

/// The smallest `struct_size` a table may declare and still have an `abi_major` to read.
pub const FM_PLUGIN_MIN_HEADER: u32 = (std::mem::offset_of!(fm_plugin, abi_major) + 4) as u32;
