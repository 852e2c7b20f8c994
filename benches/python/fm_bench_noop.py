# SPDX-License-Identifier: MIT
"""The benchmark's no-op fedora-messaging callback.

The same callable runs under `fedora-messaging consume --callback fm_bench_noop:noop` and under
fm's Python shim (`[callback] python = "fm_bench_noop:noop"`), so the two runs differ only in
what carries the message to it. Like ``fedora_messaging.example:printer`` it is handed a real
``fedora_messaging.message.Message``; unlike it, it prints nothing.
"""

import time


def noop(message):
    """Accept the message (returning normally acks it)."""
    return None


def sleep(message):
    """Wait 10 ms, as a callback waiting on a database or a web service does, then accept the
    message (the latency section of scripts/bench)."""
    time.sleep(0.01)
