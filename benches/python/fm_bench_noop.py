# SPDX-License-Identifier: MIT
"""The benchmark's no-op fedora-messaging callback.

The same callable runs under `fedora-messaging consume --callback fm_bench_noop:noop` and under
fm's Python shim (`[callback] python = "fm_bench_noop:noop"`), so the two runs differ only in
what carries the message to it. Like ``fedora_messaging.example:printer`` it is handed a real
``fedora_messaging.message.Message``; unlike it, it prints nothing.
"""


def noop(message):
    """Accept the message (returning normally acks it)."""
    return None
