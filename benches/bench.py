# SPDX-License-Identifier: MIT
"""The benchmark driver behind scripts/bench (which installs what it needs, builds fm in release
mode and starts a private RabbitMQ node, then runs this with the node's URL).

What it measures, and how (BENCHMARKS.md says the same for readers):

- Consume runs. Before every run the durable queue ``fm-bench`` is purged and pre-filled with
  N fedora-messaging messages (200-byte JSON bodies, persistent) by ``fm-bench fill``. Then
  ``fm-bench watch`` polls the queue's ready count every 5 ms while the consumer under test
  starts: the rate is the number of messages that left the queue between the first poll that
  saw a delivery and the first poll that saw it empty, over the time between them. With a
  prefetch window of P the broker only sends a message when one is acked, so that is the
  consumer's ack rate, start-up excluded, measured the same way for every consumer. After the
  queue is empty the consumer gets a moment to ack what it holds, is stopped (SIGTERM, or SIGINT
  for fedora-messaging), and the queue must then hold 0 ready messages: every message was acked.
- Publish runs. A record file of N messages; the time from starting the publisher to its exit
  (connection included); the queue must then hold exactly N messages.
- Memory and start-up. Each consumer is started against an empty queue and left idle; peak RSS
  is VmHWM from /proc after a second of idleness (for fm with workers, the workers' too). fm's
  start-up is the time from spawning it to its READY=1 on $NOTIFY_SOCKET, set to a datagram
  socket this script listens on; every consumer's start-up is also timed to the moment the
  broker shows its consumer on the queue.

Runs are interleaved (round 1 of every case, then round 2...) so that drift on a shared machine
spreads over all of them; every figure is a median, and every speed is also a ratio against the
baseline of the same run.
"""

import argparse
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
OUT = os.path.join(ROOT, "target", "bench")
FM = os.path.join(RELEASE, "fm")
TOOL = os.path.join(RELEASE, "fm-bench")
QUEUE = "fm-bench"
PREFETCH = 10


def log(*parts):
    print("    " + " ".join(str(p) for p in parts), file=sys.stderr, flush=True)


def phase(text):
    print("==> " + text, file=sys.stderr, flush=True)


def tool(*args, timeout=300):
    """Run fm-bench to completion and return its last JSON line."""
    out = subprocess.run(
        [TOOL, *map(str, args)], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# Configurations.


def common_toml(url, app, prefetch=PREFETCH):
    return f"""amqp_url = "{url}"

[client_properties]
app = "{app}"

[queues.{QUEUE}]
durable = true
auto_delete = false
exclusive = false
arguments = {{}}

[[bindings]]
queue = "{QUEUE}"
exchange = "amq.topic"
routing_keys = ["bench.#"]

[qos]
prefetch_size = 0
prefetch_count = {prefetch}
"""


def write_config(name, text):
    path = os.path.join(OUT, "configs", name + ".toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def fm_config(url, name, callback_table, prefetch=PREFETCH):
    return write_config(
        name, common_toml(url, "fm bench", prefetch) + "\n[callback]\n" + callback_table)


class Case:
    """One consumer under test: how to start it and how to stop it. `queues` is the queue it
    drains (a comma-separated list for several, `count` messages in all), `size` the body size
    of the messages it is given."""

    def __init__(self, name, label, argv, count, env=None, stop=signal.SIGTERM, exits=False,
                 queues=QUEUE, size=200, prefetch=PREFETCH):
        self.name, self.label, self.argv, self.count = name, label, argv, count
        self.env, self.stop, self.exits = env or {}, stop, exits
        self.queues, self.size, self.prefetch = queues, size, prefetch


def consume_cases(url, n_fast, n_mid, n_slow, venv):
    pyenv = {"PYTHONPATH": os.path.join(ROOT, "benches", "python")}
    noop = os.path.join(RELEASE, "libfm_noop.so")
    printer = os.path.join(RELEASE, "libfm_printer_c.so")
    worker = os.path.join(ROOT, "benches", "python", "noop_worker.py")
    python = os.path.join(venv, "bin", "python")

    def fm(name, table):
        return [FM, "--config", fm_config(url, name, table), "consume"]

    fedora_conf = write_config(
        "fedora-messaging",
        'callback = "fm_bench_noop:noop"\n' + common_toml(url, "fedora-messaging bench"),
    )
    amqp_url = url.rsplit("/", 1)[0]  # amqp-consume wants no vhost part for "/"
    return [
        Case("baseline", "bare lapin consumer (baseline)",
             [TOOL, "consume", url, QUEUE, PREFETCH, n_fast], n_fast, exits=True),
        Case("fm-noop", "fm consume, Rust noop plugin",
             fm("fm-noop", f'plugin = "{noop}"\n'), n_fast),
        Case("fm-printer-c", "fm consume, C printer plugin > /dev/null",
             fm("fm-printer-c", f'plugin = "{printer}"\n'), n_fast),
        Case("fm-exec-1", "fm consume, exec /bin/true, concurrency 1",
             fm("fm-exec-1", 'command = ["/bin/true"]\nmode = "exec"\nconcurrency = 1\n'), n_slow),
        Case("fm-exec-2", "fm consume, exec /bin/true, concurrency 2",
             fm("fm-exec-2", 'command = ["/bin/true"]\nmode = "exec"\nconcurrency = 2\n'), n_slow),
        Case("fm-worker", "fm consume, Python worker (worker mode)",
             fm("fm-worker", f'command = ["/usr/bin/python3", "{worker}"]\nmode = "worker"\n'),
             n_fast),
        Case("fm-shim", "fm consume, no-op Python callback via the shim",
             fm("fm-shim", f'python = "fm_bench_noop:noop"\ninterpreter = "{python}"\n'),
             n_mid, env=pyenv),
        Case("fedora-messaging", "fedora-messaging consume, same no-op callback",
             [os.path.join(venv, "bin", "fedora-messaging"), "--conf", fedora_conf, "consume"],
             n_slow, env=pyenv, stop=signal.SIGINT),
        Case("amqp-consume", "amqp-consume (amqp-tools) running /bin/cat",
             ["amqp-consume", "-u", amqp_url, "-q", QUEUE, "-p", str(PREFETCH), "-c",
              str(n_slow), "/bin/cat"], n_slow, exits=True),
    ]


# ------------------------------------------------------------------------------------------
# Processes.


def spawn(argv, env_extra=None, logname=None):
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(env_extra or {})
    err = open(os.path.join(OUT, "logs", logname + ".log"), "w") if logname else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [str(a) for a in argv], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    finally:
        if logname:
            err.close()


def stop(proc, sig, grace=30):
    """Ask PROC to stop with SIG; kill its whole group if it does not within GRACE seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed"


def proc_tree(pid):
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------
# Runs.


class Sampler:
    """Reads a process's VmRSS (and its peak, VmHWM) from /proc every `every` seconds, on a
    thread, until stopped: the series shows whether memory stays flat during a run."""

    def __init__(self, pid, every=0.5):
        import threading
        self.pid, self.every, self.samples, self.hwm = pid, every, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.sample(t0)
            self._stop.wait(self.every)

    def sample(self, t0):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith("Vm"))
        except OSError:
            return
        try:
            rss, hwm = int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
        except (KeyError, ValueError):
            return
        self.samples.append((round(time.perf_counter() - t0, 2), rss))
        self.hwm = max(self.hwm, hwm)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self


def consume_run(url, case, sample_every=None):
    queues, per_queue = case.queues, case.count // len(case.queues.split(","))
    tool("fill", url, queues, per_queue, case.size, timeout=1200)
    watcher = subprocess.Popen(
        [TOOL, "watch", url, queues, str(case.count), "1200"], stdout=subprocess.PIPE, text=True
    )
    line = watcher.stdout.readline()
    if '"watching"' not in line:
        watcher.wait()
        raise RuntimeError(f"{case.name}: the watcher did not start")
    proc = spawn(case.argv, case.env, logname=case.name)
    sampler = Sampler(proc.pid, sample_every) if sample_every else None
    # Wait for the watcher's answer, but give up as soon as the consumer dies before the queue
    # is empty (a missing plugin, a crash): no point waiting for the watcher's timeout.
    while not select.select([watcher.stdout], [], [], 0.2)[0]:
        if proc.poll() is not None and not case.exits:
            watcher.kill()
            watcher.wait()
            raise RuntimeError(f"{case.name} exited with status {proc.returncode} before the "
                               f"queue was empty: {log_tail(case.name)}")
    result = json.loads(watcher.stdout.readline() or "null")
    watcher.wait()
    if result is None:
        stop(proc, signal.SIGKILL, 5)
        raise RuntimeError(f"{case.name}: the queue did not drain: {log_tail(case.name)}")
    # Let it ack what it still holds (at most the prefetch window of each queue), then stop it.
    held = case.prefetch * len(queues.split(","))
    time.sleep(min(20.0, max(0.3, 3 * held / max(result["rate"], 1))))
    if sampler and not case.exits:
        sampler.sample(0)
    if case.exits:
        try:
            status = proc.wait(30)
        except subprocess.TimeoutExpired:
            status = stop(proc, signal.SIGTERM)
    else:
        status = stop(proc, case.stop)
    left = leftover(url, queues)
    if left:
        raise RuntimeError(f"{case.name}: {left} messages were not acked (status {status})")
    out = {"rate": result["rate"], "secs": result["secs"], "counted": result["counted"],
           "exit": status}
    if sampler:
        sampler.stop()
        out["hwm_kib"], out["rss_samples"] = sampler.hwm, sampler.samples
    return out


def log_tail(name, lines=5):
    """The end of a consumer's log, for error messages."""
    path = os.path.join(OUT, "logs", name + ".log")
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return f"no log at {path}"
    return f"{path} ends with:\n" + "".join(tail)


def leftover(url, queues=QUEUE):
    """Ready messages once no consumer holds any (unacked ones return when it disconnects)."""
    for _ in range(100):
        d = tool("depth", url, queues)
        if d["consumers"] == 0:
            return d["ready"]
        time.sleep(0.05)
    return tool("depth", url, queues)["ready"]


def publish_runs(url, n_fast, n_slow, venv, rounds, results):
    files = {}
    for n in {n_fast, n_slow}:
        files[n] = os.path.join(OUT, f"records-{n}.jsonl")
        tool("record-file", n, files[n])
    conf = fm_config(url, "fm-publish", f'plugin = "{os.path.join(RELEASE, "libfm_noop.so")}"\n')
    fedora_conf = write_config(
        "fedora-messaging-publish", common_toml(url, "fedora-messaging bench")
    )
    cases = [
        ("pub-baseline", "bare lapin publisher with confirms, window 1000 (baseline)", n_fast,
         [TOOL, "publish", url, n_fast, 1000]),
        ("pub-baseline-all", "bare lapin publisher, no window (all in flight at once)", n_fast,
         [TOOL, "publish", url, n_fast, n_fast]),
        ("pub-fm", "fm publish FILE (window 1000)", n_fast,
         [FM, "--config", conf, "publish", files[n_fast]]),
        ("pub-fedora-messaging", "fedora-messaging publish FILE", n_slow,
         [os.path.join(venv, "bin", "fedora-messaging"), "--conf", fedora_conf, "publish",
          files[n_slow]]),
    ]
    for r in range(rounds):
        for name, label, n, argv in cases:
            tool("fill", url, QUEUE, 0)
            t0 = time.perf_counter()
            proc = spawn(argv, logname=name)
            status = proc.wait(600)
            secs = time.perf_counter() - t0
            depth = tool("depth", url, QUEUE)["ready"]
            if status != 0 or depth != n:
                raise RuntimeError(f"{name}: exit {status}, queue holds {depth} of {n} messages")
            results.setdefault(name, {"label": label, "count": n, "runs": []})["runs"].append(
                {"rate": n / secs, "secs": secs})
            log(f"round {r + 1}: {name:<22} {n / secs:>9.0f} msg/s ({secs:.2f} s)")
    tool("fill", url, QUEUE, 0)


def spool_runs(url, n_fast, rounds):
    """Issue 14: `fm publish --spool` enqueue latency per message (single-message calls, p50 and
    p99), and `fm relay` throughput from a full spool beside `fm publish` of the same file."""
    import shutil
    conf = fm_config(url, "fm-spool", f'plugin = "{os.path.join(RELEASE, "libfm_noop.so")}"\n')
    records = os.path.join(OUT, f"records-{n_fast}.jsonl")
    tool("record-file", n_fast, records)
    with open(records) as f:
        lines = f.readlines()
    batch = 100
    chunks = []
    for i in range(0, len(lines), batch):
        path = os.path.join(OUT, "spool-chunks", f"{i // batch:05}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(lines[i:i + batch])
        chunks.append(path)
    rows = {"latency_ms": [], "relay": [], "publish": []}
    spool = os.path.join(OUT, "spool")
    for r in range(rounds):
        shutil.rmtree(spool, ignore_errors=True)
        os.makedirs(spool)
        # Enqueue latency: one message per call, as a git hook or a cron job publishes.
        for line in lines[:200]:
            one = os.path.join(OUT, "spool-one.jsonl")
            with open(one, "w") as f:
                f.write(line)
            t0 = time.perf_counter()
            status = subprocess.run([FM, "-q", "--config", conf, "publish", one,
                                     f"--spool={spool}"]).returncode
            rows["latency_ms"].append((time.perf_counter() - t0) * 1000)
            if status != 0:
                raise RuntimeError(f"fm publish --spool exited {status}")
        shutil.rmtree(spool, ignore_errors=True)
        os.makedirs(spool)
        for path in chunks:
            subprocess.run([FM, "-q", "--config", conf, "publish", path, f"--spool={spool}"],
                           check=True)
        tool("fill", url, QUEUE, 0)
        t0 = time.perf_counter()
        proc = spawn([FM, "--config", conf, "relay", "--spool", spool], logname="relay")
        while True:
            depth = tool("depth", url, QUEUE)["ready"]
            if depth >= n_fast:
                break
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                raise RuntimeError(f"relay: exit {proc.poll()}, queue holds {depth}")
            time.sleep(0.005)
        secs = time.perf_counter() - t0
        stop(proc, signal.SIGTERM)
        rows["relay"].append(n_fast / secs)
        tool("fill", url, QUEUE, 0)
        t0 = time.perf_counter()
        status = spawn([FM, "--config", conf, "publish", records], logname="spool-publish").wait(600)
        secs_pub = time.perf_counter() - t0
        if status != 0 or tool("depth", url, QUEUE)["ready"] != n_fast:
            raise RuntimeError(f"fm publish: exit {status}")
        rows["publish"].append(n_fast / secs_pub)
        log(f"round {r + 1}: relay {n_fast / secs:.0f} msg/s, fm publish {n_fast / secs_pub:.0f} "
            f"msg/s, enqueue p50 {statistics.median(rows['latency_ms']):.1f} ms")
    tool("fill", url, QUEUE, 0)
    lat = sorted(rows["latency_ms"])
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    relay, publish = med(rows["relay"]), med(rows["publish"])
    text = "\n".join([
        "### Spool and relay (issue 14)", "",
        "| measure | value |", "|---|---:|",
        f"| fm publish --spool, one message per call: enqueue latency p50 | "
        f"{statistics.median(lat):.1f} ms |",
        f"| fm publish --spool, one message per call: enqueue latency p99 | {p99:.1f} ms |",
        f"| fm relay from a full spool ({n_fast:,} messages in batches of {batch}) | "
        f"{relay:,.0f} msg/s |",
        f"| fm publish FILE, same file, same run | {publish:,.0f} msg/s |",
        f"| relay ≥ 0.8× fm publish | {relay / publish:.2f}× "
        f"({'yes' if relay >= 0.8 * publish else '**no**'}) |", ""])
    with open(os.path.join(OUT, "spool.md"), "w") as f:
        f.write(text)
    print(text)


def rpc_runs(url, venv, n_fast, rounds):
    """Issue 13: request/reply. `fm call` asks the attribute store of plugins/attrs served by
    `fm consume`, and the same store served by a pika RPC server written as RabbitMQ's tutorial
    writes one (benches/python/attrs_rpc_server.py), in the same run: round-trip latency (one
    request at a time on one connection, p50 and p99 of the `ms` fm call reports per reply)
    and pipelined throughput (N requests, 100 in flight, the wall time of `fm call FILE`)."""
    queue_fm, queue_py, queue_bare = "fm-rpc-bench", "pika-rpc-bench", "bare-rpc-bench"
    queues = {"fm": queue_fm, "pika": queue_py, "bare": queue_bare}
    conf = write_config("fm-rpc", f"""amqp_url = "{url}"

[client_properties]
app = "fm rpc bench"

[queues.{queue_fm}]
durable = false
auto_delete = false
exclusive = false
arguments = {{}}

[qos]
prefetch_size = 0
prefetch_count = 100

[callback]
plugin = "{os.path.join(RELEASE, "libfm_attrs.so")}"
concurrency = 16

[consumer_config]
attrs = {{k = "a value"}}
""")
    client = write_config("rpc-client", f'amqp_url = "{url}"\n')
    requests = os.path.join(OUT, "rpc-requests.txt")
    with open(requests, "w") as f:
        for i in range(n_fast):
            if i % 10 == 0:
                f.write(json.dumps({"op": "set", "key": f"k{i % 100}", "value": i}) + "\n")
            else:
                f.write(json.dumps({"op": "get", "key": f"k{i % 100}"}) + "\n")
    n_lat = min(2000, n_fast)
    latency_file = os.path.join(OUT, "rpc-latency.txt")
    with open(requests) as f, open(latency_file, "w") as g:
        g.writelines(f.readlines()[:n_lat])

    def serve(name):
        if name == "fm":
            proc = spawn([FM, "--config", conf, "consume"], logname="rpc-fm")
        elif name == "bare":
            proc = spawn([TOOL, "rpc-serve", url, queue_bare, "100"], logname="rpc-bare")
        else:
            proc = subprocess.Popen(
                [os.path.join(venv, "bin", "python"),
                 os.path.join(ROOT, "benches", "python", "attrs_rpc_server.py"),
                 url, queue_py, "100"],
                stdout=subprocess.PIPE, stderr=open(os.path.join(OUT, "logs", "rpc-pika.log"), "w"),
                start_new_session=True, text=True)
        # Ready once a request is answered.
        deadline = time.time() + 60
        while subprocess.run([FM, "-q", "--config", client, "call", "--exchange", "",
                              "--routing-key", queues[name],
                              "--body", '{"op": "get", "key": "k"}', "--timeout", "1"],
                             capture_output=True).returncode != 0:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"rpc server {name} did not answer")
        return proc

    def call(queue, path, in_flight):
        t0 = time.perf_counter()
        out = subprocess.run([FM, "-q", "--config", client, "call", path, "--exchange", "",
                              "--routing-key", queue, "--in-flight", str(in_flight),
                              "--timeout", "60"], capture_output=True, text=True, timeout=900)
        secs = time.perf_counter() - t0
        lines = out.stdout.splitlines()
        if out.returncode != 0 or len(lines) != sum(1 for _ in open(path)):
            raise RuntimeError(f"fm call exited {out.returncode} with {len(lines)} replies: "
                               f"{out.stderr[-500:]}")
        return secs, [json.loads(line)["ms"] for line in lines]

    rows = {name: {"latency": [], "rate": []} for name in queues}
    for r in range(rounds):
        for name, queue in queues.items():
            proc = serve(name)
            try:
                _, ms = call(queue, latency_file, 1)
                rows[name]["latency"].extend(ms)
                secs, _ = call(queue, requests, 100)
                rows[name]["rate"].append(n_fast / secs)
            finally:
                stop(proc, signal.SIGKILL if name == "pika" else signal.SIGTERM)
            lat = sorted(rows[name]["latency"])
            log(f"round {r + 1}: {name:<5} p50 {statistics.median(lat):.3f} ms, "
                f"{n_fast / secs:,.0f} calls/s")

    def pct(name, q):
        lat = sorted(rows[name]["latency"])
        return lat[min(len(lat) - 1, int(len(lat) * q))]

    fm_rate, py_rate = med(rows["fm"]["rate"]), med(rows["pika"]["rate"])
    bare_rate = med(rows["bare"]["rate"])
    text = "\n".join([
        "### Request/reply (issue 13)", "",
        f"fm call against the attribute store (plugins/attrs, fm consume, concurrency 16), "
        f"the same store as a pika RPC server (tutorial style, prefetch 100), and the bare "
        f"lapin server (fm-bench rpc-serve: a fixed reply, no confirm, one call at a time: the "
        f"least work per call), same run, interleaved, {rounds} round(s); latency: {n_lat:,} "
        f"requests one at a time on one connection; throughput: {n_fast:,} requests (1 in 10 a "
        f"set), 100 in flight.", "",
        "| measure | fm consume (attrs plugin) | pika RPC server | bare lapin server | "
        "fm ÷ pika | bare ÷ pika |",
        "|---|---:|---:|---:|---:|---:|",
        f"| round trip p50 | {pct('fm', 0.5):.3f} ms | {pct('pika', 0.5):.3f} ms | "
        f"{pct('bare', 0.5):.3f} ms | {pct('pika', 0.5) / pct('fm', 0.5):.1f}× faster | |",
        f"| round trip p99 | {pct('fm', 0.99):.3f} ms | {pct('pika', 0.99):.3f} ms | "
        f"{pct('bare', 0.99):.3f} ms | {pct('pika', 0.99) / pct('fm', 0.99):.1f}× faster | |",
        f"| pipelined throughput | {fm_rate:,.0f} calls/s | {py_rate:,.0f} calls/s | "
        f"{bare_rate:,.0f} calls/s | {fm_rate / py_rate:.1f}× | {bare_rate / py_rate:.1f}× |",
        "| per round (calls/s) | " + " | ".join(
            ", ".join(f"{x:,.0f}" for x in rows[n]["rate"]) for n in ("fm", "pika", "bare"))
        + " | | |",
        f"| targets: p50 < 1 ms, throughput ≥ 10× pika | "
        f"{'yes' if pct('fm', 0.5) < 1 else '**no**'} | | | "
        f"{'yes' if fm_rate >= 10 * py_rate else '**no**'} | |", ""])
    with open(os.path.join(OUT, "rpc.md"), "w") as f:
        f.write(text)
    print(text)


LEVELS = (1, 4, 16, 64)
#: Messages of the flat-memory run: twice the 50,000 the issue asks for, so that its second half
#: shows the slope once lapin's frame rings (512 KiB each at fm's 16 KiB frames) are walked.
FLAT = 100_000
#: Seconds each latency run should last at the ideal rate (N / 10 ms), and the most messages a
#: run gets (kinds that stop scaling would otherwise take minutes).
LATENCY_SECONDS, LATENCY_MAX = 3, 12000


def latency_cases(url, venv, levels=LEVELS):
    """Issue 15, section 2: a callback that waits 10 ms per message, of every kind, at
    concurrency N; fedora-messaging beside them with the same Python callback."""
    pyenv = {"PYTHONPATH": os.path.join(ROOT, "benches", "python")}
    python = os.path.join(venv, "bin", "python")
    worker = os.path.join(ROOT, "benches", "python", "noop_worker.py")
    kinds = [
        ("plugin", "Rust plugin sleeping 10 ms",
         f'plugin = "{os.path.join(RELEASE, "libfm_bench_sleep.so")}"\n', {}),
        ("exec", "exec sleep 0.01", 'command = ["/bin/sleep", "0.01"]\nmode = "exec"\n', {}),
        ("worker", "Python worker sleeping 10 ms",
         f'command = ["/usr/bin/python3", "{worker}", "0.01"]\nmode = "worker"\n', {}),
        ("python", "Python callback sleeping 10 ms (shim)",
         f'python = "fm_bench_noop:sleep"\ninterpreter = "{python}"\n', pyenv),
    ]
    cases = []
    for kind, label, table, env in kinds:
        for n in levels:
            name = f"lat-{kind}-{n}"
            count = min(LATENCY_MAX, LATENCY_SECONDS * 100 * n)
            argv = [FM, "--config", fm_config(url, name, table + f"concurrency = {n}\n"),
                    "consume"]
            cases.append(Case(name, f"fm, {label}, concurrency {n}", argv, count, env=env))
    conf = write_config("lat-fedora-messaging", 'callback = "fm_bench_noop:sleep"\n'
                        + common_toml(url, "fedora-messaging bench"))
    cases.append(Case("lat-fedora-messaging", "fedora-messaging, same Python callback (serial)",
                      [os.path.join(venv, "bin", "fedora-messaging"), "--conf", conf, "consume"],
                      LATENCY_SECONDS * 100, env=pyenv, stop=signal.SIGINT))
    return cases


def latency_section(url, venv, rounds):
    cases = latency_cases(url, venv)
    runs = {}
    for r in range(rounds):
        for case in cases:
            res = consume_run(url, case)
            runs.setdefault(case.name, []).append(res["rate"])
            log(f"round {r + 1}: {case.name:<22} {res['rate']:>8.0f} msg/s "
                f"({res['counted']} in {res['secs']:.2f} s)")
    rate = {k: med(v) for k, v in runs.items()}
    lines = ["### Concurrency hiding a 10 ms callback (issue 15, section 2)", "",
             "Each message waits 10 ms in the callback (no CPU); ideal rate N × 100 msg/s. "
             "× ideal is the median rate at N over N × the same kind's median concurrency-1 "
             "rate, all runs interleaved (target ≥ 0.75 until the broker is the limit).", "",
             "| callback | concurrency | messages | msg/s | × ideal (N × c1) | "
             "× fedora-messaging | runs (msg/s) |", "|---|---:|---:|---:|---:|---:|---|"]
    fedora = rate.get("lat-fedora-messaging")
    scaling = []
    for case in cases:
        v = rate[case.name]
        if case.name == "lat-fedora-messaging":
            ideal_ratio, n = None, 1
        else:
            kind, n = case.name.split("-")[1], int(case.name.split("-")[2])
            one = rate[f"lat-{kind}-1"]
            ideal_ratio = v / (n * one)
            scaling.append({"kind": kind, "n": n, "rate": v, "x_ideal": ideal_ratio})
        lines.append(
            f"| {case.label} | {n} | {case.count:,} | {v:,.0f} | "
            f"{'—' if ideal_ratio is None else f'{ideal_ratio:.2f}'} | "
            f"{v / fedora:.1f} | {', '.join(f'{x:,.0f}' for x in runs[case.name])} |")
    text = "\n".join(lines) + "\n"
    save_section("latency", text, {"rates": rate, "runs": runs, "scaling": scaling})
    return text


def save_section(name, text, data):
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)
    print(text)


SCALE_QUEUES = (1, 10, 50, 200)
SIZES = ((200, "200 B", 20000), (64 * 1024, "64 KiB", 2000), (1 << 20, "1 MiB", 300),
         (16 << 20, "16 MiB", 30))


def scale_queue_config(url, n, name, callback_extra=""):
    """fm with the noop plugin on N durable queues, each bound to amq.topic by a key of its
    own (fm-bench fill publishes with that key)."""
    names = [f"fm-scale-{i}" for i in range(n)]
    text = f'amqp_url = "{url}"\n\n[client_properties]\napp = "fm bench"\n\n'
    for q in names:
        text += (f'[queues.{q}]\ndurable = true\nauto_delete = false\nexclusive = false\n'
                 f'arguments = {{}}\n\n[[bindings]]\nqueue = "{q}"\nexchange = "amq.topic"\n'
                 f'routing_keys = ["scale.{q}"]\n\n')
    text += (f"[qos]\nprefetch_size = 0\nprefetch_count = {PREFETCH}\n\n[callback]\n"
             f'plugin = "{os.path.join(RELEASE, "libfm_noop.so")}"\n{callback_extra}')
    return write_config(name, text), ",".join(names)


def run_ratio(row, a, b):
    """The median of the runs' a/b ratios (each run's pair measured in the same round); None
    when no run had both."""
    return med([x / y for x, y in zip(row[a], row[b]) if x and y])


def append_all(row, **values):
    """Add one run's figures to the lists of a table row."""
    for key, value in values.items():
        row[key].append(value)


def scale_section(url, rounds, parts):
    """Issue 15, section 3: fm's cost as queues, message sizes and message counts grow."""
    out, data = ["### Cost as work grows (issue 15, section 3)", ""], {}
    noop = os.path.join(RELEASE, "libfm_noop.so")
    if "queues" in parts:
        per = {}
        for r in range(rounds):
            for n in SCALE_QUEUES:
                conf, queues = scale_queue_config(url, n, f"scale-q{n}")
                argv = [FM, "--config", conf, "consume"]
                tool("fill", url, queues, 0)
                ready = ready_run(url, argv)
                total = 20000 // n * n
                fm = consume_run(url, Case(f"scale-q{n}", "", argv, total, queues=queues))
                # fedora-messaging's model (and the bare consumer's): each queue one message at
                # a time, queues side by side.
                conf_pq, _ = scale_queue_config(url, n, f"scale-q{n}-perq",
                                                f"concurrency = {n}\nqueue_concurrency = 1\n")
                pq = consume_run(url, Case(f"scale-q{n}-perq", "",
                                           [FM, "--config", conf_pq, "consume"], total,
                                           queues=queues))
                base = consume_run(url, Case(f"scale-q{n}-base", "",
                                             [TOOL, "consume", url, queues, PREFETCH, total],
                                             total, exits=True, queues=queues))
                row = per.setdefault(n, {"ready_ms": [], "rss_kib": [], "rate": [], "base": [],
                                         "perq": []})
                append_all(row, perq=pq["rate"], ready_ms=ready["ready_ms"],
                           rss_kib=ready["rss_kib"], rate=fm["rate"], base=base["rate"])
                log(f"round {r + 1}: {n:>3} queues: READY {ready['ready_ms']:.0f} ms, idle "
                    f"{ready['rss_kib']} KiB, {fm['rate']:.0f} msg/s, per-queue "
                    f"{pq['rate']:.0f} msg/s (bare {base['rate']:.0f})")
        out += ["#### Queues per process (one binding each; noop plugin; prefetch 10 each; "
                "20,000 messages spread evenly)", "",
                "| queues | start → READY (ms) | idle peak RSS (KiB) | bare lapin msg/s "
                "(same queues) | fm msg/s, concurrency 1 | × bare | fm msg/s, concurrency = "
                "queues, queue_concurrency 1 | × bare |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, row in per.items():
            out.append(f"| {n} | {med(row['ready_ms']):.1f} | {med(row['rss_kib']):,.0f} | "
                       f"{med(row['base']):,.0f} | {med(row['rate']):,.0f} | "
                       f"{run_ratio(row, 'rate', 'base'):.2f} | {med(row['perq']):,.0f} | "
                       f"{run_ratio(row, 'perq', 'base'):.2f} |")
        out.append("")
        data["queues"] = per
    if "sizes" in parts:
        per = {}
        for r in range(rounds):
            for size, label, count in SIZES:
                for prefetch in (10, 100):
                    conf = fm_config(url, f"scale-s{size}-p{prefetch}",
                                     f'plugin = "{noop}"\n', prefetch=prefetch)
                    fm = consume_run(url, Case(f"scale-s{size}-p{prefetch}", "",
                                               [FM, "--config", conf, "consume"], count,
                                               size=size, prefetch=prefetch), sample_every=0.1)
                    base = consume_run(url, Case(
                        f"scale-s{size}-p{prefetch}-base", "",
                        [TOOL, "consume", url, QUEUE, prefetch, count], count, exits=True,
                        size=size, prefetch=prefetch), sample_every=0.1)
                    row = per.setdefault(f"{size}/{prefetch}", {
                        "label": label, "size": size, "prefetch": prefetch, "count": count,
                        "rate": [], "base": [], "hwm": [], "base_hwm": []})
                    append_all(row, rate=fm["rate"], base=base["rate"], hwm=fm["hwm_kib"],
                               base_hwm=base["hwm_kib"])
                    log(f"round {r + 1}: {label:>6} prefetch {prefetch:>3}: "
                        f"{fm['rate'] * size / 1e6:.1f} MB/s (bare "
                        f"{base['rate'] * size / 1e6:.1f}), peak {fm['hwm_kib']} KiB "
                        f"(bare {base['hwm_kib']})")
        out += ["#### Message size (noop plugin; peak RSS is VmHWM sampled every 0.1 s)", "",
                "| body | prefetch | messages | fm MB/s | bare MB/s | × bare | fm peak RSS (KiB) "
                "| bare peak RSS (KiB) | prefetch × size (KiB) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in per.values():
            mb = row["size"] / 1e6
            # A queue that fits in the prefetch window leaves it at once: the watcher sees no
            # steady state to time (rate 0), only the memory figures count then.
            ratio = run_ratio(row, "rate", "base")
            rate, base = med([x for x in row["rate"] if x]), med([x for x in row["base"] if x])
            out.append(f"| {row['label']} | {row['prefetch']} | {row['count']:,} | "
                       f"{'—' if rate is None else f'{rate * mb:,.1f}'} | "
                       f"{'—' if base is None else f'{base * mb:,.1f}'} | "
                       f"{'—' if ratio is None else f'{ratio:.2f}'} | {med(row['hwm']):,.0f} | "
                       f"{med(row['base_hwm']):,.0f} | "
                       f"{row['prefetch'] * row['size'] // 1024:,} |")
        out.append("")
        data["sizes"] = per
    if "flat" in parts:
        conf = fm_config(url, "scale-flat", f'plugin = "{noop}"\n')
        flat = []
        for r in range(rounds):
            res = consume_run(url, Case("scale-flat", "", [FM, "--config", conf, "consume"],
                                        FLAT), sample_every=0.5)
            # From the second second on: the first samples are fm starting (loading, connecting).
            rss = [kib for t, kib in res["rss_samples"] if t >= 1.0] or [0]
            half = rss[len(rss) // 2]
            # The second half of the run, per message (the rate is steady).
            growth = (rss[-1] - half) * 1024 / (FLAT / 2)
            flat.append({"rate": res["rate"], "first": rss[0], "half": half, "last": rss[-1],
                         "max": max(rss), "growth": growth, "samples": res["rss_samples"]})
            log(f"round {r + 1}: {FLAT:,} messages at {res['rate']:.0f} msg/s, RSS first "
                f"{rss[0]} half {half} last {rss[-1]} max {max(rss)} KiB ({len(rss)} samples)")
        out += [f"#### {FLAT:,} small messages: RSS over the run (sampled every 0.5 s from 1 s "
                "after the start)", "",
                "| round | msg/s | samples | first RSS (KiB) | RSS half-way (KiB) | "
                "last RSS (KiB) | max RSS (KiB) | second half: bytes per message |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i, f in enumerate(flat):
            out.append(f"| {i + 1} | {f['rate']:,.0f} | {len(f['samples'])} | "
                       f"{f['first']:,} | {f['half']:,} | {f['last']:,} | {f['max']:,} | "
                       f"{f['growth']:+.1f} |")
        out.append("")
        data["flat"] = flat
    if "publish" in parts:
        per = {}
        conf = fm_config(url, "scale-publish", f'plugin = "{noop}"\n')
        files = {}
        for size, label, count in SIZES:
            files[size] = os.path.join(OUT, f"records-{count}-{size}.jsonl")
            if not os.path.exists(files[size]):
                tool("record-file", count, files[size], size, timeout=1200)
        for r in range(rounds):
            for size, label, count in SIZES:
                row = per.setdefault(size, {"label": label, "count": count, "fm": [],
                                            "base": [], "hwm": []})
                for who, argv in (("base", [TOOL, "publish", url, count, 1000, size]),
                                  ("fm", [FM, "--config", conf, "publish", files[size]])):
                    tool("fill", url, QUEUE, 0)
                    t0 = time.perf_counter()
                    proc = spawn(argv, logname=f"scale-publish-{who}")
                    sampler = Sampler(proc.pid, 0.1)
                    status = proc.wait(1200)
                    secs = time.perf_counter() - t0
                    sampler.stop()
                    depth = tool("depth", url, QUEUE)["ready"]
                    if status != 0 or depth != count:
                        raise RuntimeError(f"publish {label} ({who}): exit {status}, queue "
                                           f"holds {depth} of {count}")
                    row[who].append(count / secs)
                    if who == "fm":
                        row["hwm"].append(sampler.hwm)
                log(f"round {r + 1}: publish {label:>6}: fm {row['fm'][-1]:.0f} msg/s, bare "
                    f"{row['base'][-1]:.0f} msg/s, fm peak {row['hwm'][-1]} KiB")
        tool("fill", url, QUEUE, 0)
        out += ["#### Publish from a record file (wall time, start-up included; bare: "
                "fm-bench publish, window 1000, same sizes)", "",
                "| body | messages | fm publish MB/s | bare MB/s | × bare | fm peak RSS (KiB) |",
                "|---|---:|---:|---:|---:|---:|"]
        for size, row in per.items():
            mb = size / 1e6
            out.append(f"| {row['label']} | {row['count']:,} | {med(row['fm']) * mb:,.1f} | "
                       f"{med(row['base']) * mb:,.1f} | {run_ratio(row, 'fm', 'base'):.2f} | "
                       f"{med(row['hwm']):,.0f} |")
        out.append("")
        data["publish"] = per
    text = "\n".join(out) + "\n"
    save_section("scale", text, data)
    return text


def ready_run(url, argv, env=None, timeout=30):
    """Spawn fm with NOTIFY_SOCKET; the time to READY=1, and VmHWM after a second idle."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(timeout)
        env = dict(env or {}, NOTIFY_SOCKET=path)
        t0 = time.perf_counter()
        proc = spawn(argv, env, logname="ready")
        ready = None
        try:
            while ready is None:
                data = sock.recv(4096)
                if b"READY=1" in data.split(b"\n"):
                    ready = time.perf_counter() - t0
        except socket.timeout:
            pass
        finally:
            sock.close()
        if ready is None:
            stop(proc, signal.SIGKILL, 5)
            raise RuntimeError("fm did not send READY=1 (see target/bench/logs/ready.log)")
        time.sleep(1.0)
        own = vm_hwm_kib(proc.pid)
        tree = sum(vm_hwm_kib(p) for p in proc_tree(proc.pid))
        status = stop(proc, signal.SIGTERM)
        return {"ready_ms": ready * 1e3, "rss_kib": own, "tree_rss_kib": tree, "exit": status}


def idle_run(url, argv, env=None, sig=signal.SIGTERM, timeout=60):
    """Spawn a consumer on an empty queue: the time until the broker shows its consumer, and
    VmHWM (its own and its process tree's) after a second idle."""
    tool("fill", url, QUEUE, 0)
    t0 = time.perf_counter()
    proc = spawn(argv, env, logname="idle")
    consuming = None
    while time.perf_counter() - t0 < timeout:
        if tool("depth", url, QUEUE)["consumers"] > 0:
            consuming = time.perf_counter() - t0
            break
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    if consuming is None:
        stop(proc, signal.SIGKILL, 5)
        raise RuntimeError(f"{argv[0]} never registered a consumer (see target/bench/logs/idle.log)")
    time.sleep(1.0)
    own = vm_hwm_kib(proc.pid)
    tree = sum(vm_hwm_kib(p) for p in proc_tree(proc.pid))
    stop(proc, sig)
    leftover(url)
    return {"consuming_ms": consuming * 1e3, "rss_kib": own, "tree_rss_kib": tree}


# ------------------------------------------------------------------------------------------
# Report.


def machine():
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    rabbit = first(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"])
    erlang = first(["dpkg-query", "-W", "-f=${Version}", "erlang-base"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": first(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "rabbitmq": rabbit,
        "erlang": erlang,
        "rustc": first(["rustc", "--version"]),
        "python": platform.python_version(),
        "fm_commit": first(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
        "fm_tree": "modified" if first(["git", "-C", ROOT, "status", "--porcelain"]) else "clean",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def med(values):
    return statistics.median(values) if values else None


def build_report(consume, publish, idle, ready, handshake, rounds):
    rate = {k: med([r["rate"] for r in v["runs"]]) for k, v in {**consume, **publish}.items()}
    base = rate.get("baseline")
    pub_base = rate.get("pub-baseline")

    def ratio(a, b):
        return rate[a] / rate[b] if rate.get(a) and rate.get(b) else None

    rows = []
    for name, v in consume.items():
        rows.append({"name": name, "label": v["label"], "count": v["count"], "rate": rate[name],
                     "ratio": rate[name] / base if base else None,
                     "spread": [round(r["rate"]) for r in v["runs"]]})
    pub_rows = []
    for name, v in publish.items():
        pub_rows.append({"name": name, "label": v["label"], "count": v["count"],
                         "rate": rate[name], "ratio": rate[name] / pub_base if pub_base else None,
                         "spread": [round(r["rate"]) for r in v["runs"]]})

    fm_ready = med([r["ready_ms"] for r in ready])
    fm_rss = med([r["rss_kib"] for r in ready])
    hs = med(handshake["handshake_ms"]) if handshake else None
    setup = med(handshake["consuming_ms"]) if handshake else None
    targets = [
        ("plugin no-op consume ≥ 0.95× baseline", ratio("fm-noop", "baseline"), 0.95),
        ("exec, concurrency 1 ≥ 1.2× amqp-consume", ratio("fm-exec-1", "amqp-consume"), 1.2),
        ("exec, concurrency 2 ≥ 1.8× amqp-consume", ratio("fm-exec-2", "amqp-consume"), 1.8),
        ("worker mode (Python worker) ≥ 0.8× baseline", ratio("fm-worker", "baseline"), 0.8),
        ("Python shim ≥ 2× fedora-messaging consume", ratio("fm-shim", "fedora-messaging"), 2.0),
        ("fm publish ≥ 0.9× bare publisher", ratio("pub-fm", "pub-baseline"), 0.9),
        ("fm publish ≥ 20× fedora-messaging publish",
         ratio("pub-fm", "pub-fedora-messaging"), 20.0),
    ]
    # A partial run (--only) shows the targets it measured.
    target_rows = [{"target": t, "value": v, "need": need, "met": v >= need}
                   for t, v, need in targets if v is not None]
    if fm_rss is not None:
        target_rows.append({"target": "idle fm consume peak RSS ≤ 8 MB (8192 KiB)",
                            "value": fm_rss, "need": 8192, "met": fm_rss <= 8192, "unit": "KiB"})
    if fm_ready is not None and hs is not None:
        after = fm_ready - hs
        target_rows.append({"target": "READY within 50 ms of the broker's handshake",
                            "value": after, "need": 50, "met": after <= 50, "unit": "ms"})
    return {
        "rounds": rounds,
        "prefetch": PREFETCH,
        "consume": rows,
        "publish": pub_rows,
        "idle": idle,
        "ready": {"fm_start_to_ready_ms": fm_ready, "fm_runs": ready,
                  "bare_handshake_ms": hs, "bare_handshake_to_consuming_ms": setup,
                  "fm_after_handshake_ms_est": (fm_ready - hs) if fm_ready and hs else None},
        "targets": target_rows,
        "raw": {"consume": consume, "publish": publish},
    }


def markdown(report, info):
    def f(v, digits=0):
        return "—" if v is None else f"{v:,.{digits}f}"

    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
        f"{info['os']}, Linux {info['kernel']}; RabbitMQ {info['rabbitmq']} "
        f"(Erlang {info['erlang']}); {info['rustc']}; Python {info['python']}; "
        f"fm {info['fm_commit']} ({info['fm_tree']} tree); {info['date']}.",
        "",
        f"Medians of {report['rounds']} runs; prefetch {report['prefetch']}; 200-byte persistent "
        "JSON messages with fedora-messaging's headers on a durable queue.",
        "",
        "### Consume",
        "",
        "| run | messages | msg/s | × baseline | runs (msg/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report["consume"]:
        lines.append(f"| {r['label']} | {r['count']:,} | {f(r['rate'])} | {f(r['ratio'], 2)} | "
                     f"{', '.join(f'{x:,}' for x in r['spread'])} |")
    lines += ["", "### Publish (from a record file, wall time including start-up)", "",
              "| run | messages | msg/s | × bare publisher | runs (msg/s) |",
              "|---|---:|---:|---:|---|"]
    for r in report["publish"]:
        lines.append(f"| {r['label']} | {r['count']:,} | {f(r['rate'])} | {f(r['ratio'], 2)} | "
                     f"{', '.join(f'{x:,}' for x in r['spread'])} |")
    lines += ["", "### Memory and start-up (idle consumer, empty queue)", "",
              "| consumer | peak RSS (KiB) | with child processes (KiB) | start → consuming (ms) |",
              "|---|---:|---:|---:|"]
    for r in report["idle"]:
        lines.append(f"| {r['label']} | {f(r['rss_kib'])} | {f(r['tree_rss_kib'])} | "
                     f"{f(r['consuming_ms'])} |")
    rd = report["ready"]
    lines += ["", f"fm start → READY=1: {f(rd['fm_start_to_ready_ms'], 1)} ms (median); "
              f"a bare lapin AMQP handshake on the same broker: {f(rd['bare_handshake_ms'], 1)} ms, "
              f"and handshake + declare + bind + qos + consume: "
              f"{f(rd['bare_handshake_to_consuming_ms'], 1)} ms; so fm is ready about "
              f"{f(rd['fm_after_handshake_ms_est'], 1)} ms after the handshake "
              "(an upper bound: it includes fm's process start and configuration loading).",
              "", "### Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for t in report["targets"]:
        unit = t.get("unit")
        value = "—" if t["value"] is None else (
            f"{t['value']:,.1f} {unit}" if unit else f"{t['value']:.2f}×")
        lines.append(f"| {t['target']} | {value} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--venv", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fast", type=int, default=20000, help="messages for fast consumers")
    p.add_argument("--mid", type=int, default=5000, help="messages for the Python shim")
    p.add_argument("--slow", type=int, default=2000,
                   help="messages for per-message processes and the fedora-messaging peers")
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = p.parse_args()
    for d in ("configs", "logs"):
        os.makedirs(os.path.join(OUT, d), exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    # Section names: "exec" is section 1's three cases; "latency" and "scale" (or its parts
    # scale-queues, scale-sizes, scale-flat, scale-publish) are sections 2 and 3 (issue 15).
    if "exec" in only:
        only |= {"fm-exec-1", "fm-exec-2", "amqp-consume"}
    scale_parts = {p for p in ("queues", "sizes", "flat", "publish")
                   if not only or "scale" in only or f"scale-{p}" in only}
    sections_only = only and only <= {"latency", "scale", "scale-queues", "scale-sizes",
                                      "scale-flat", "scale-publish"}
    started = time.time()
    info = machine()

    if only & {"rpc"}:
        phase("request/reply")
        rpc_runs(args.url, args.venv, args.fast, args.rounds)
        return
    extra = []
    if not only or "latency" in only:
        phase(f"latency: 10 ms callbacks at concurrency {', '.join(map(str, LEVELS))}")
        extra.append(latency_section(args.url, args.venv, args.rounds))
    if scale_parts:
        phase(f"scale: {', '.join(sorted(scale_parts))}")
        extra.append(scale_section(args.url, args.rounds, scale_parts))
    if sections_only:
        return

    cases = consume_cases(args.url, args.fast, args.mid, args.slow, args.venv)
    consume = {}
    phase(f"consume: {len(cases)} consumers, {args.rounds} rounds")
    for r in range(args.rounds):
        for case in cases:
            if only and case.name not in only:
                continue
            res = consume_run(args.url, case)
            consume.setdefault(case.name, {"label": case.label, "count": case.count, "runs": []})
            consume[case.name]["runs"].append(res)
            log(f"round {r + 1}: {case.name:<18} {res['rate']:>9.0f} msg/s "
                f"({res['counted']} in {res['secs']:.2f} s)")

    publish = {}
    if not only or only & {"publish"}:
        phase("publish")
        publish_runs(args.url, args.fast, args.slow, args.venv, args.rounds, publish)

    if only & {"spool"}:
        phase("spool and relay")
        spool_runs(args.url, args.fast, args.rounds)
        return

    idle, ready, handshake = [], [], None
    if not only or only & {"idle"}:
        phase("memory and start-up")
        by = {c.name: c for c in cases}
        for name, label in [
            ("baseline", "bare lapin consumer"),
            ("fm-noop", "fm consume (noop plugin)"),
            ("fm-shim", "fm consume (Python shim)"),
            ("fedora-messaging", "fedora-messaging consume"),
            ("amqp-consume", "amqp-consume"),
        ]:
            c = by[name]
            runs = [idle_run(args.url, c.argv, c.env, c.stop) for _ in range(args.rounds)]
            row = {"name": name, "label": label,
                   "rss_kib": med([x["rss_kib"] for x in runs]),
                   "tree_rss_kib": med([x["tree_rss_kib"] for x in runs]),
                   "consuming_ms": med([x["consuming_ms"] for x in runs]), "runs": runs}
            idle.append(row)
            log(f"{name:<18} rss {row['rss_kib']} KiB (tree {row['tree_rss_kib']}), "
                f"consuming after {row['consuming_ms']:.0f} ms")
        tool("fill", args.url, QUEUE, 0)
        for _ in range(max(args.rounds, 5)):
            ready.append(ready_run(args.url, by["fm-noop"].argv))
        handshake = tool("connect-time", args.url, QUEUE, max(args.rounds, 5))
        log(f"fm READY after {med([r['ready_ms'] for r in ready]):.1f} ms; bare handshake "
            f"{med(handshake['handshake_ms']):.1f} ms")

    report = build_report(consume, publish, idle, ready, handshake, args.rounds)
    report["machine"] = info
    report["seconds"] = round(time.time() - started)
    text = markdown(report, info) + "".join("\n" + t for t in extra)
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(text)
    print(text)
    phase(f"done in {report['seconds']} s: target/bench/results.md and results.json")


if __name__ == "__main__":
    main()
