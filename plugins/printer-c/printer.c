/*
 * printer.c - fm's example printer plugin, in C.
 *
 * Prints every message the way fedora-messaging's `fedora_messaging.example:printer` does
 * (`print(str(message))`), then acknowledges it:
 *
 *     Id: <id, or None>
 *     Topic: <topic>
 *     Headers: <headers as JSON, indent 4, keys sorted, non-ASCII as \uXXXX>
 *     Body: <body, the same way>
 *
 * A request (a message with reply_to, ABI 1.1) is answered with the text printed for it: the
 * reply is copied by fm during msg->reply(), so the buffer stays this plugin's. A body that is
 * not a JSON object (fm's [callback] body = "bytes") is printed as the bytes it is.
 *
 * It shows how little a plugin needs: one exported function returning a static table, no
 * allocation that crosses the boundary (the output buffer is this plugin's own, freed here),
 * and borrowed fm_bytes that are read during the call only.
 *
 * Rather than parsing JSON into a tree, it re-indents the "headers" and "body" members of the
 * record-format document fm passes in msg->json. fm writes that document like Python's
 * json.dumps(sort_keys=True) (keys sorted at every level, Python's number formatting), so the
 * output is byte-identical to Python's as long as that holds; the Rust printer
 * (plugins/printer) sorts and formats by itself and does not depend on it.
 *
 * Build: make -C plugins/printer-c   (or: cc -shared -fPIC -I include -o libfm_printer_c.so
 * plugins/printer-c/printer.c)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fm_plugin.h"

/* A growable output buffer, owned by this plugin. */
typedef struct out {
    char *p;
    size_t len, cap;
    int oom;
} out;

static void put(out *o, const void *bytes, size_t n) {
    if (o->oom)
        return;
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 1024;
        while (cap < o->len + n)
            cap *= 2;
        char *p = realloc(o->p, cap);
        if (!p) {
            o->oom = 1;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, bytes, n);
    o->len += n;
}

static void puts_(out *o, const char *s) { put(o, s, strlen(s)); }

static void newline_indent(out *o, int depth) {
    put(o, "\n", 1);
    for (int i = 0; i < depth; i++)
        put(o, "    ", 4);
}

static void put_u16(out *o, unsigned unit) {
    char esc[7];
    snprintf(esc, sizeof esc, "\\u%04x", unit & 0xFFFF);
    put(o, esc, 6);
}

/* ---- A minimal JSON scanner over the (valid) document fm passes. Returns 0 on malformed. -- */

static size_t skip_ws(const uint8_t *s, size_t n, size_t i) {
    while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t'))
        i++;
    return i;
}

/* s[i] is '"'; returns the index just past the closing quote, or 0. */
static size_t skip_string(const uint8_t *s, size_t n, size_t i) {
    for (i++; i < n; i++) {
        if (s[i] == '\\')
            i++;
        else if (s[i] == '"')
            return i + 1;
    }
    return 0;
}

/* Returns the index just past the value starting at s[i], or 0. */
static size_t skip_value(const uint8_t *s, size_t n, size_t i) {
    if (i >= n)
        return 0;
    if (s[i] == '"')
        return skip_string(s, n, i);
    if (s[i] == '{' || s[i] == '[') {
        int depth = 0;
        while (i < n) {
            if (s[i] == '"') {
                i = skip_string(s, n, i);
                if (!i)
                    return 0;
                continue;
            }
            if (s[i] == '{' || s[i] == '[')
                depth++;
            else if (s[i] == '}' || s[i] == ']') {
                if (--depth == 0)
                    return i + 1;
            }
            i++;
        }
        return 0;
    }
    /* number, true, false, null */
    size_t start = i;
    while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']' && s[i] != ' ' && s[i] != '\n')
        i++;
    return i > start ? i : 0;
}

/* Find the top-level member `key` of the object in s; sets *start and *end to its value. */
static int find_member(const uint8_t *s, size_t n, const char *key, size_t *start, size_t *end) {
    size_t klen = strlen(key);
    size_t i = skip_ws(s, n, 0);
    if (i >= n || s[i] != '{')
        return 0;
    i = skip_ws(s, n, i + 1);
    while (i < n && s[i] == '"') {
        size_t kend = skip_string(s, n, i);
        if (!kend)
            return 0;
        int match = kend - i - 2 == klen && memcmp(s + i + 1, key, klen) == 0;
        i = skip_ws(s, n, kend);
        if (i >= n || s[i] != ':')
            return 0;
        i = skip_ws(s, n, i + 1);
        size_t vend = skip_value(s, n, i);
        if (!vend)
            return 0;
        if (match) {
            *start = i;
            *end = vend;
            return 1;
        }
        i = skip_ws(s, n, vend);
        if (i < n && s[i] == ',')
            i = skip_ws(s, n, i + 1);
    }
    return 0;
}

/* ---- Python's json.dumps(indent=4, separators=(",", ": "), ensure_ascii=True) ----------- */

/* Copy the string starting at s[i] ('"'), escaping everything outside printable ASCII as
 * Python does; escapes already in the input are kept. Returns the index past it, or 0. */
static size_t put_string(out *o, const uint8_t *s, size_t n, size_t i) {
    put(o, "\"", 1);
    for (i++; i < n; i++) {
        uint8_t c = s[i];
        if (c == '"') {
            put(o, "\"", 1);
            return i + 1;
        }
        if (c == '\\') {
            if (i + 1 >= n)
                return 0;
            put(o, s + i, 2);
            i++;
        } else if (c >= 0x20 && c < 0x7f) {
            put(o, &c, 1);
        } else if (c < 0x80) {
            put_u16(o, c); /* control characters and DEL */
        } else {
            /* Decode one UTF-8 sequence (fm only passes valid UTF-8). */
            unsigned cp, extra;
            if ((c & 0xE0) == 0xC0) {
                cp = c & 0x1F;
                extra = 1;
            } else if ((c & 0xF0) == 0xE0) {
                cp = c & 0x0F;
                extra = 2;
            } else {
                cp = c & 0x07;
                extra = 3;
            }
            if (i + extra >= n)
                return 0;
            for (unsigned k = 1; k <= extra; k++)
                cp = (cp << 6) | (s[i + k] & 0x3F);
            i += extra;
            if (cp >= 0x10000) {
                cp -= 0x10000;
                put_u16(o, 0xD800 | (cp >> 10));
                put_u16(o, 0xDC00 | (cp & 0x3FF));
            } else {
                put_u16(o, cp);
            }
        }
    }
    return 0;
}

/* Re-indent the JSON value in s[0..n). Returns 0 if it is malformed. */
static int put_pretty(out *o, const uint8_t *s, size_t n) {
    int depth = 0;
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        switch (c) {
        case ' ': case '\n': case '\r': case '\t':
            i++;
            break;
        case '"':
            i = put_string(o, s, n, i);
            if (!i)
                return 0;
            break;
        case '{': case '[': {
            size_t next = skip_ws(s, n, i + 1);
            if (next < n && s[next] == (c == '{' ? '}' : ']')) {
                put(o, c == '{' ? "{}" : "[]", 2); /* Python writes empty containers inline */
                i = next + 1;
            } else {
                put(o, &c, 1);
                newline_indent(o, ++depth);
                i++;
            }
            break;
        }
        case '}': case ']':
            newline_indent(o, --depth);
            put(o, &c, 1);
            i++;
            break;
        case ',':
            put(o, ",", 1);
            newline_indent(o, depth);
            i++;
            break;
        case ':':
            put(o, ": ", 2);
            i++;
            break;
        default:
            put(o, &c, 1); /* numbers and literals, already in Python's format */
            i++;
        }
    }
    return depth == 0;
}

/* ---- The plugin ----------------------------------------------------------------------- */

/* Write `o` to stdout and, for a request, hand it to fm as the reply; then free it. */
static uint32_t emit(const fm_message *msg, out *o, fm_error *err) {
    uint32_t result = FM_ACK;
    if (o->oom) {
        snprintf(err->buf, err->cap, "printer: out of memory");
        result = FM_FAIL;
    } else if (fwrite(o->p, 1, o->len, stdout) != o->len || fflush(stdout) != 0) {
        snprintf(err->buf, err->cap, "printer: cannot write to standard output");
        result = FM_FAIL;
    } else if (FM_MESSAGE_CAN_REPLY(msg) && msg->reply_to.len > 0) {
        msg->reply(msg->reply_ctx, (const uint8_t *)o->p, o->len);
    }
    free(o->p);
    return result;
}

static uint32_t handle(void *state, const fm_message *msg, fm_halt *halt, fm_error *err) {
    (void)state;
    (void)halt;
    if (FM_MESSAGE_CAN_REPLY(msg) && (msg->flags & FM_MSG_RAW_BODY)) {
        out o = {0};
        puts_(&o, "Topic: ");
        put(&o, msg->topic.ptr, msg->topic.len);
        puts_(&o, "\nBody: ");
        put(&o, msg->body.ptr, msg->body.len);
        puts_(&o, "\n");
        return emit(msg, &o, err);
    }
    const uint8_t *doc = msg->json.ptr;
    size_t n = msg->json.len;
    size_t hs, he, bs, be, is, ie;
    if (!find_member(doc, n, "headers", &hs, &he) || !find_member(doc, n, "body", &bs, &be)) {
        snprintf(err->buf, err->cap, "printer: message %.*s has no headers or body",
                 (int)msg->id.len, (const char *)msg->id.ptr);
        return FM_FAIL;
    }
    /* An absent id is null in the document; Python prints it as None. */
    int has_id = find_member(doc, n, "id", &is, &ie) && doc[is] == '"';

    out o = {0};
    puts_(&o, "Id: ");
    if (has_id)
        put(&o, msg->id.ptr, msg->id.len);
    else
        puts_(&o, "None");
    puts_(&o, "\nTopic: ");
    put(&o, msg->topic.ptr, msg->topic.len);
    puts_(&o, "\nHeaders: ");
    int ok = put_pretty(&o, doc + hs, he - hs);
    puts_(&o, "\nBody: ");
    ok = ok && put_pretty(&o, doc + bs, be - bs);
    puts_(&o, "\n");

    if (!ok && !o.oom) {
        snprintf(err->buf, err->cap, "printer: message %.*s is not valid JSON",
                 (int)msg->id.len, (const char *)msg->id.ptr);
        free(o.p);
        return FM_FAIL;
    }
    return emit(msg, &o, err);
}

static const fm_plugin PLUGIN = {
    sizeof(fm_plugin),
    FM_ABI_MAJOR,
    FM_ABI_MINOR,
    FM_PLUGIN_THREAD_SAFE, /* one fwrite per message: stdio locks the stream around it */
    "printer-c",
    "0.1.0",
    NULL, /* no init: nothing to configure */
    handle,
    NULL, /* no shutdown: no state */
};

FM_PLUGIN_EXPORT const fm_plugin *fm_plugin_v1(void) { return &PLUGIN; }
