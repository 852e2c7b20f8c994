/*
 * fm_plugin.h - the fm native plugin ABI, version 1.1.
 *
 * This header is the source of truth for the interface between fm (the host) and a plugin: a
 * shared library that fm loads with dlopen(RTLD_NOW | RTLD_LOCAL) and calls for every message
 * it consumes. fm's Rust mirror (src/callback/abi.rs) and the Rust SDK (plugins/fm-plugin) follow
 * this file, and a test compiles it to check that they agree on every size and offset.
 *
 * It needs nothing but <stddef.h> and <stdint.h>, and compiles as C99 or later and as C++.
 *
 * Writing a plugin
 * ----------------
 * Export exactly one symbol, fm_plugin_v1(), returning a pointer to a static fm_plugin table:
 *
 *     #include "fm_plugin.h"
 *
 *     static uint32_t handle(void *state, const fm_message *msg, fm_halt *halt, fm_error *err) {
 *         (void)state; (void)halt; (void)err;
 *         printf("%.*s\n", (int)msg->topic.len, (const char *)msg->topic.ptr);
 *         return FM_ACK;
 *     }
 *
 *     static const fm_plugin PLUGIN = {
 *         sizeof(fm_plugin), FM_ABI_MAJOR, FM_ABI_MINOR, 0, "topics", "1.0",
 *         NULL, handle, NULL,
 *     };
 *
 *     FM_PLUGIN_EXPORT const fm_plugin *fm_plugin_v1(void) { return &PLUGIN; }
 *
 * and build it with `cc $(pkg-config --cflags fm-plugin) -shared -fPIC -o libtopics.so topics.c`
 * (fm-plugin.pc comes with this header in fm's packages), or with `-I /path/to/fm/include` in
 * place of the pkg-config part from a source tree.
 * plugins/printer-c/printer.c is a complete example.
 *
 * Life cycle
 * ----------
 * 1. fm loads the library once, at start, and never unloads it.
 * 2. It calls fm_plugin_v1() once and checks the table: a missing symbol, a NULL table, a
 *    struct_size smaller than this version's fm_plugin, an abi_major other than FM_ABI_MAJOR, a
 *    NULL name or a NULL handle makes fm refuse the plugin and exit 1 before it connects.
 * 3. It calls init() once (if not NULL). A non-zero return makes fm exit 1 with the text the
 *    plugin wrote into err; shutdown() is then NOT called.
 * 4. It calls handle() for every message (see "Threads" below).
 * 5. It calls shutdown() exactly once (if not NULL) when it stops consuming, after the last
 *    handle() has returned, and then exits.
 *
 * Ownership
 * ---------
 * Nothing allocated on one side is ever freed on the other. Each pointer below says who owns it
 * and how long it stays valid. Strings are UTF-8. fm_bytes buffers are NOT NUL-terminated.
 *
 * Threads
 * -------
 * Without FM_PLUGIN_THREAD_SAFE, fm never runs two calls into the plugin at once, but successive
 * calls may come from different threads. With FM_PLUGIN_THREAD_SAFE, handle() may run on several
 * threads at the same time with the same state. init() and shutdown() never overlap any other
 * call. handle() runs on a thread where blocking is allowed: it may take as long as it needs
 * (mind the broker's consumer acknowledgement timeout, 30 minutes by default).
 *
 * Versioning
 * ----------
 * FM_ABI_MAJOR changes only when an existing field or function changes meaning; fm refuses a
 * plugin built for another major. Minor versions only append fields to the end of the structs
 * below, which is why each versioned struct starts with its struct_size: before reading a field
 * that a later minor version appended, check that struct_size covers it. fm accepts plugins of
 * any minor version of its major.
 *
 * 1.0  the first version.
 * 1.1  requests and replies: fm_message gains reply_to, correlation_id, reply_ctx and reply()
 *      (check FM_MESSAGE_CAN_REPLY(msg) before using them), and the FM_MSG_RAW_BODY flag. A
 *      plugin built against 1.0 loads and behaves exactly as before.
 *
 * Replies (1.1)
 * -------------
 * A message may be a request: its reply_to names where the answer goes (RabbitMQ's RPC
 * convention; a pika, Java or Go client, or `fm call`, sets it). To answer, call
 * msg->reply(msg->reply_ctx, body, len) during handle() and return FM_ACK: fm copies the bytes
 * before reply() returns (the buffer stays the plugin's), publishes them to reply_to with the
 * request's correlation id once handle() has returned, waits for the broker to confirm, and
 * then acknowledges the request. Only FM_ACK sends a reply; any other result discards it.
 * Calling reply() again replaces the previous reply. A reply that is one JSON document is sent
 * with content_type application/json; any other bytes are sent as they are.
 *
 *     if (FM_MESSAGE_CAN_REPLY(msg) && msg->reply_to.len > 0)
 *         msg->reply(msg->reply_ctx, (const uint8_t *)"{\"ok\": true}", 12);
 *     return FM_ACK;
 */
#ifndef FM_PLUGIN_H
#define FM_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Versions --------------------------------------------------------------------------- */

/* The ABI this header describes. Put these in fm_plugin.abi_major / abi_minor. */
#define FM_ABI_MAJOR 1
#define FM_ABI_MINOR 1

/* Marks fm_plugin_v1 as exported even when the plugin is built with -fvisibility=hidden. */
#if defined(__GNUC__) || defined(__clang__)
#define FM_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define FM_PLUGIN_EXPORT
#endif

/* ---- Constants (plain #defines: the ABI never uses C enums) ------------------------------ */

/* fm_plugin.flags: handle() may be called from several threads at once with the same state. */
#define FM_PLUGIN_THREAD_SAFE UINT32_C(0x1)

/* Results of handle(). They mean what fedora-messaging's callback results mean. */
#define FM_ACK  UINT32_C(0) /* handled: the message is acknowledged */
#define FM_NACK UINT32_C(1) /* not now: the message is returned to the queue (Nack) */
#define FM_DROP UINT32_C(2) /* never: the message is rejected, dead-lettered if the queue
                               has a dead-letter exchange (Drop) */
#define FM_HALT UINT32_C(3) /* stop consuming (HaltConsumer): the message is acknowledged, or
                               requeued if halt->requeue, then fm stops cleanly and exits
                               with halt->exit_code; text written into err is the reason */
/* Any other value is an unexpected failure: fm logs the text written into err, returns this
 * message and every prefetched one to the queue and exits 13. FM_FAIL is the conventional
 * value to return for it. */
#define FM_FAIL UINT32_C(0xFFFFFFFF)

/* fm_message.flags: the broker delivered this message before (it was requeued). */
#define FM_MSG_REDELIVERED UINT32_C(0x1)
/* fm_message.flags (1.1): the body is not a JSON object and is handed over as the bytes it is,
 * because the configuration says [callback] body = "bytes"; json is then empty (len 0). */
#define FM_MSG_RAW_BODY UINT32_C(0x2)

/* Results of fm_message.reply() (1.1). */
#define FM_REPLY_OK          0 /* kept: sent if handle() returns FM_ACK */
#define FM_REPLY_NO_REPLY_TO 1 /* the message has no reply_to: there is no one to send it to */

/* Levels for fm_host.log(). fm logs the text at the matching level, with the plugin's name.
 * A level below 1 is logged as FM_LOG_ERROR, above 5 as FM_LOG_TRACE. */
#define FM_LOG_ERROR 1
#define FM_LOG_WARN  2
#define FM_LOG_INFO  3
#define FM_LOG_DEBUG 4
#define FM_LOG_TRACE 5

/* ---- Types ------------------------------------------------------------------------------ */

/* A borrowed byte buffer: `len` bytes at `ptr`, not NUL-terminated. `ptr` is never NULL (an
 * empty buffer has len 0 and a valid pointer). Owned by fm; valid only during the call it is
 * passed to: copy what you want to keep. */
typedef struct fm_bytes {
    const uint8_t *ptr;
    size_t len;
} fm_bytes;

/* A buffer owned by fm that the plugin may write an error text into: at most `cap` bytes,
 * including a terminating NUL. fm passes it with buf[0] == '\0' and reads it back (bounded by
 * `cap`) after the call returns; valid only during that call. snprintf(err->buf, err->cap, ...)
 * does the right thing. */
typedef struct fm_error {
    char *buf;
    size_t cap;
} fm_error;

/* What fm offers the plugin. Owned by fm. The pointer passed to init() and everything it
 * points to (ctx, log) stay valid for the life of the process, so a plugin may keep it. */
typedef struct fm_host {
    uint32_t struct_size; /* sizeof(fm_host) as fm was built */
    void *ctx;            /* opaque; pass it back to log() */
    /* Log `len` bytes of UTF-8 text at `msg` (need not be NUL-terminated; invalid UTF-8 is
     * replaced) through fm's logging, at `level` (FM_LOG_*), tagged with the plugin's name.
     * Safe to call from any thread, at any time after init() has been entered. */
    void (*log)(void *ctx, uint32_t level, const char *msg, size_t len);
} fm_host;

/* One message. Owned by fm; the struct and every buffer in it are valid only during the
 * handle() call. All text is UTF-8. */
typedef struct fm_message {
    uint32_t struct_size; /* sizeof(fm_message) as fm was built */
    uint32_t flags;       /* FM_MSG_* */
    fm_bytes id;          /* the AMQP message_id; empty if the message has none */
    fm_bytes topic;       /* the routing key */
    fm_bytes queue;       /* the queue fm consumed it from */
    fm_bytes exchange;    /* the exchange it was published to */
    fm_bytes body;        /* the body exactly as received: a JSON object (any bytes under
                             FM_MSG_RAW_BODY) */
    fm_bytes headers_json; /* the AMQP headers as one JSON object */
    /* The whole message as one JSON object in the record-file format (what `fm record` writes
     * per line, without the newline): {"body", "headers", "id", "priority", "queue", "topic"},
     * keys sorted; "id", "priority" and "queue" may be null. Parse this one document if you
     * want everything. Empty under FM_MSG_RAW_BODY. */
    fm_bytes json;
    int32_t severity; /* the fedora_messaging_severity header: 10, 20, 30 or 40 (default 20) */
    int32_t priority; /* the AMQP priority; 0 if the message has none */

    /* ---- 1.1: only there when FM_MESSAGE_CAN_REPLY(msg) ---- */
    fm_bytes reply_to;       /* the AMQP reply_to property; empty if the message has none */
    fm_bytes correlation_id; /* the AMQP correlation_id property; empty if none */
    void *reply_ctx;         /* opaque; pass it back to reply() */
    /* Keep `len` bytes at `body` (copied before it returns; body may be NULL when len is 0)
     * as the reply to this message; see "Replies" above. Returns FM_REPLY_OK, or
     * FM_REPLY_NO_REPLY_TO when the message has no reply_to (nothing will be sent). Callable
     * from any thread, but only until handle() returns. */
    int32_t (*reply)(void *reply_ctx, const uint8_t *body, size_t len);
} fm_message;

/* Whether `msg` (a const fm_message *) has the 1.1 fields, i.e. fm speaks ABI 1.1 or later. */
#define FM_MESSAGE_CAN_REPLY(msg) \
    ((msg)->struct_size >= offsetof(fm_message, reply) + sizeof((msg)->reply))

/* Filled in by handle() when it returns FM_HALT. Owned by fm, valid only during the call; fm
 * passes it zeroed except struct_size, so returning FM_HALT without touching it means exit
 * code 0, acknowledge the message. */
typedef struct fm_halt {
    uint32_t struct_size; /* sizeof(fm_halt) as fm was built */
    int32_t exit_code;    /* the code fm exits with, like HaltConsumer(exit_code=...) */
    uint8_t requeue;      /* non-zero: return the message to the queue instead of acking it */
    uint8_t reserved[3];  /* leave zero */
} fm_halt;

/* The table a plugin exports. Owned by the plugin: it must stay valid and unchanged for as long
 * as the library is loaded (a `static const` does this). */
typedef struct fm_plugin {
    uint32_t struct_size; /* sizeof(fm_plugin) */
    uint32_t abi_major;   /* FM_ABI_MAJOR */
    uint32_t abi_minor;   /* FM_ABI_MINOR */
    uint32_t flags;       /* FM_PLUGIN_* */
    const char *name;     /* NUL-terminated, not NULL, e.g. "printer"; used in fm's logs */
    const char *version;  /* NUL-terminated, e.g. "1.2.0"; NULL means unknown */

    /* Called once before any message; may be NULL. `config_json` is the configuration file's
     * [consumer_config] table as a JSON object: `config_len` bytes, followed by a NUL that is
     * not counted; owned by fm, valid only during the call. Store whatever the plugin needs in
     * *state (fm passes it as NULL); fm hands it back to handle() and shutdown() and never
     * looks inside. Return 0 on success. Any other value is a failure: write why into err,
     * and fm exits 1 with that text. */
    int32_t (*init)(const fm_host *host, const char *config_json, size_t config_len,
                    void **state, fm_error *err);

    /* Called for each message; must not be NULL. Return FM_ACK, FM_NACK, FM_DROP or FM_HALT
     * (filling in *halt); anything else is a failure whose text is in err. */
    uint32_t (*handle)(void *state, const fm_message *msg, fm_halt *halt, fm_error *err);

    /* Called exactly once when fm stops, if init() succeeded; may be NULL. Free the state. */
    void (*shutdown)(void *state);
} fm_plugin;

/* The one symbol fm looks up. Return a pointer to a table that lives as long as the library. */
FM_PLUGIN_EXPORT const fm_plugin *fm_plugin_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* FM_PLUGIN_H */
