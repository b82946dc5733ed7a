#!/usr/bin/env python3
"""Benchmark for caduceus.py: check-ins against a one-commit reference,
detection lateness, start-up time, memory and database size.

Run it beside caduceus.py::

    python3 bench_caduceus.py            # the full run, under 3 minutes
    python3 bench_caduceus.py --quick    # smaller loads, under 30 seconds
    python3 bench_caduceus.py --smoke    # a few seconds, tiny loads: for the test suite
    python3 bench_caduceus.py --json     # the same figures as JSON on stdout

It measures whatever caduceus.py lies beside it (or ``--caduceus PATH``),
started as a separate process exactly as a user starts it
(``python3 caduceus.py -c CONFIG -b DB -i 127.0.0.1 -p PORT``) with a
generated config, on a free loopback port.  Nothing leaves 127.0.0.1.

What it measures, in this order:

- Check-ins (``GET /reset/NAME/?key=KEY`` over 10 alerts) per second and
  their latency (p50, p99, max) at 1, 10 and 50 concurrent clients, each
  with keep-alive and with a new connection per request.  Every phase runs
  against Caduceus and against a bare reference server written below (one
  ``UPDATE`` committed per request, ``synchronous=FULL``, backlog 128, one
  write per response, no log), both in processes of their own, interleaved:
  Caduceus then the reference, then the reference then Caduceus, for a few
  rounds of a few seconds.  The ratio of requests per second is taken per
  round; its median and spread (min-max) are shown.  The load client is
  closed loop (each connection sends its next request when the answer is
  in), runs in several processes, and reports its own CPU next to the
  server's, so a client-bound figure is not mistaken for the server's.  Any
  answer but 200, and any connection error or timeout, is an error.
- Detection lateness: among 10,000 alerts, 50 fall due 3-6 s after start;
  a loopback stand-in for Telegram stamps each "is failing" notice.
  Lateness = arrival - deadline, the deadline being (last_ping_at or
  first_seen_at) + every, read from the database.  With 50 notices the
  p99 is the maximum.
- Start-up (spawn to the first 200 on a check-in) and resident memory
  (VmRSS) just after it and after load, at 10 alerts (the load: the
  check-in phases), 10,000 (the database load below) and 100,000 (5,000
  check-ins).  The run has a 3-minute budget: the 100,000-alert start-up
  is waited for until the budget is spent (``--startup-cap``, 120 s, at
  most; ``--budget 0`` waits that long) and shown as "> N s" if it takes
  longer.  Also what reading a config of 10,000 alerts keeps and its
  peak, measured with tracemalloc in a Python of its own: no parse peak
  may be left behind.
- Database size: 100,000 POSTs with 1 KiB bodies spread evenly over 10,000
  alerts (so Caduceus keeps every body: at most 100 signals per alert; the
  load stops early after 75 s, and says so), then SIGTERM, which
  checkpoints the WAL; the bytes of the database files per byte of body
  kept.

``--quick`` runs 2 shorter rounds, 5,000 POSTs and no 100,000-alert
start-up; ``--smoke`` runs 1 and 2 clients, 0.15 s phases and tens of
alerts, so a test can run every part of the script in seconds.

Targets are shown as PASS or MISS; they never change the exit status.  The
exit status is 0 when the run completed with no errors, 1 otherwise, 2 for
a bad command line.  Linux (``/proc``) gives memory and CPU figures; other
systems show them as n/a.  Standard library only, Python 3.9+.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import errno
import hmac
import http.server
import json
import math
import multiprocessing
import os
import platform
import re
import selectors
import shlex
import signal
import socket
import socketserver
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Mapping

#: The check-in key in every generated config.
KEY = "bench-key"
#: What a successful check-in answers (the reference answers the same).
RESET_ANSWER = b"Alert reset."
#: A request not answered within this many seconds is an error.
REQUEST_TIMEOUT_S = 10.0
#: How long a server may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
#: Environment variables that could route the servers' loopback HTTP elsewhere.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class BenchError(Exception):
    """The run cannot go on: a server did not start, a worker crashed."""


###############################################################################
# Plans #######################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big each part of a run is."""

    name: str
    #: Concurrent clients of the check-in phases.
    concurrency: tuple[int, ...]
    #: Interleaved rounds per (clients, connection) and the seconds of each phase.
    rounds: int
    phase_s: float
    #: Alerts of the check-in server (and the first start-up row).
    checkin_alerts: int
    #: Lateness: alerts that never fall due, alerts that do, and when (seconds after first seen).
    quiet_alerts: int
    due_alerts: int
    due_from_s: float
    due_to_s: float
    #: Database size: alerts, check-ins (at most PINGS_KEPT per alert) and body bytes;
    #: also the second start-up row.  The load stops early after ``db_max_s``.
    db_alerts: int
    db_checkins: int
    body_bytes: int
    db_max_s: float
    #: The large start-up row (0: skipped) and the check-ins sent to it.
    big_alerts: int
    big_checkins: int
    #: The whole run's time budget (0: none): the large start-up is waited for
    #: only until the budget is spent (but never past --startup-cap).
    budget_s: float = 0.0
    #: Connections of the counted loads (database size, large instance).
    load_clients: int = 10


PLANS = {
    "smoke": Plan("smoke", concurrency=(1, 2), rounds=2, phase_s=0.15, checkin_alerts=10,
                  quiet_alerts=18, due_alerts=2, due_from_s=1.0, due_to_s=1.3,
                  db_alerts=20, db_checkins=200, body_bytes=1024, db_max_s=5.0, big_alerts=30, big_checkins=60,
                  load_clients=2),
    "quick": Plan("quick", concurrency=(1, 10, 50), rounds=2, phase_s=0.4, checkin_alerts=10,
                  quiet_alerts=9_950, due_alerts=50, due_from_s=2.0, due_to_s=3.0,
                  db_alerts=10_000, db_checkins=5_000, body_bytes=1024, db_max_s=4.0, big_alerts=0,
                  big_checkins=0),
    "default": Plan("default", concurrency=(1, 10, 50), rounds=3, phase_s=1.5, checkin_alerts=10,
                    quiet_alerts=9_950, due_alerts=50, due_from_s=3.0, due_to_s=6.0,
                    db_alerts=10_000, db_checkins=100_000, body_bytes=1024, db_max_s=75.0,
                    big_alerts=100_000, big_checkins=5_000, budget_s=175.0),
}


###############################################################################
# Machine and processes #######################################################
###############################################################################


def machine_info(caduceus_path: str) -> dict[str, Any]:
    """The facts that make figures comparable: CPU, cores, how busy the machine
    was at the start (1-minute load average), Python, SQLite, caduceus.py."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    version = "unknown"
    with contextlib.suppress(OSError):
        with open(caduceus_path, encoding="utf-8") as source:
            match = re.search(r'^__version__ = "([^"]+)"', source.read(), re.MULTILINE)
            version = match[1] if match else version
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": _round(load), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "system": platform.platform(),
            "caduceus": os.path.abspath(caduceus_path), "caduceus_version": version}


def alert_names(count: int, prefix: str = "job") -> list[str]:
    """``count`` distinct alert names that sort in order."""
    return [f"{prefix}-{number:06d}" for number in range(count)]


def render_config(every: Mapping[str, float], telegram_url: str | None = None) -> str:
    """A Caduceus config with these alerts (name -> every, in seconds).

    With ``telegram_url`` the alerts notify the Telegram stand-in there,
    once (reminders an hour apart); otherwise they print on the console.
    """
    lines = ["[config]", f'secret_key = "{KEY}"', ""]
    if telegram_url:
        lines += ["[alerting.telegram]", 'apikey = "bench"', 'chat_id = "1"', f'api_url = "{telegram_url}"', ""]
    channel = "telegram" if telegram_url else "console"
    lines += ["[alerts]", f'default_channels = ["{channel}"]', ""]
    for name, every_s in every.items():
        lines += [f"[alerts.{name}]", f'every = "{every_s:g}"', 'notify_every = "1h"', ""]
    return "\n".join(lines)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """The process's resident memory (VmRSS) in MiB; None without /proc."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _answer_status(port: int, request: bytes, timeout_s: float) -> int:
    """Send one request on a fresh connection; return the answer's status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed without an answer")
            answer += chunk
    return int(answer[9:12])


class ServerProcess:
    """A server under test, in its own process on a free loopback port.

    A context manager: the process is stopped (SIGTERM, then SIGKILL after
    STOP_TIMEOUT_S) and waited for on the way out, whatever happened.  Its
    standard output and error go to ``log_path``.
    """

    def __init__(self, label: str, argv: list[str], port: int, log_path: str, db_path: str) -> None:
        self.label = label
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.db_path = db_path
        self.popen: subprocess.Popen | None = None
        self.spawned_at = 0.0
        self.returncode: int | None = None

    def __enter__(self) -> ServerProcess:
        env = {name: value for name, value in os.environ.items() if name not in PROXY_VARIABLES}
        with open(self.log_path, "ab") as log:
            self.spawned_at = time.perf_counter()
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, path: str, cap_s: float) -> float | None:
        """Seconds from spawn to the first 200 on ``GET path``; None after ``cap_s``.

        Raises BenchError when the process exits first or answers anything else.
        """
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nConnection: close\r\n\r\n".encode()
        give_up_at = self.spawned_at + cap_s
        while True:
            if self.popen.poll() is not None:
                raise BenchError(f"{self.label} exited with status {self.popen.returncode} before answering; "
                                 f"its log ends: {self.log_tail()}")
            remaining_s = give_up_at - time.perf_counter()
            if remaining_s <= 0:
                return None
            try:
                status = _answer_status(self.port, request, remaining_s)
            except socket.timeout:
                return None
            except OSError:  # not listening yet
                time.sleep(0.002)
                continue
            if status != 200:
                raise BenchError(f"{self.label} answered {status} to its first check-in")
            return time.perf_counter() - self.spawned_at

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; return the exit status (idempotent)."""
        if self.popen is None or self.returncode is not None:
            return self.returncode
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.returncode = self.popen.returncode
        return self.returncode

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the server's log, on one line."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return " | ".join(log.read().strip().splitlines()[-lines:]) or "(empty)"
        except OSError as exc:
            return f"(unreadable: {exc})"


def caduceus_process(label: str, caduceus_path: str, workdir: str, every: Mapping[str, float],
                     telegram_url: str | None = None) -> ServerProcess:
    """A ServerProcess for caduceus.py with a generated config and a fresh database."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    config_path = os.path.join(workdir, f"{slug}.toml")
    with open(config_path, "w", encoding="utf-8") as config:
        config.write(render_config(every, telegram_url))
    port = free_port()
    db_path = os.path.join(workdir, f"{slug}.sqlite3")
    argv = [sys.executable, caduceus_path, "-c", config_path, "-b", db_path, "-i", "127.0.0.1", "-p", str(port)]
    return ServerProcess(label, argv, port, os.path.join(workdir, f"{slug}.log"), db_path)


def reference_process(workdir: str, alerts: int) -> ServerProcess:
    """A ServerProcess for the reference server below (this script, another interpreter)."""
    port = free_port()
    db_path = os.path.join(workdir, "reference.sqlite3")
    argv = [sys.executable, os.path.abspath(__file__), "_reference", db_path, str(port), str(alerts)]
    return ServerProcess("reference", argv, port, os.path.join(workdir, "reference.log"), db_path)


def checkin_path(name: str) -> str:
    """The URL path of a success check-in of alert ``name``."""
    return f"/reset/{name}/?key={KEY}"


###############################################################################
# Reference server ############################################################
###############################################################################


class ReferenceServer(http.server.ThreadingHTTPServer):
    """The bare one-commit check-in server Caduceus is compared with.

    A thread per connection, backlog 128, one SQLite connection in WAL mode
    with ``synchronous=FULL``, and per check-in exactly one ``UPDATE`` in its
    own transaction.  No logging, no history, no notices.
    """

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, port: int, db_path: str, names: list[str]) -> None:
        self.names = frozenset(names)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=5)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS checks (name TEXT PRIMARY KEY, status TEXT NOT NULL,"
                        " first_seen_at REAL NOT NULL, last_ping_at REAL)")
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT OR IGNORE INTO checks VALUES (?, 'new', ?, NULL)",
                            [(name, now) for name in names])
        self.db.execute("COMMIT")
        super().__init__(("127.0.0.1", port), ReferenceHandler)

    def server_bind(self) -> None:
        # As Caduceus does: skip HTTPServer's reverse DNS lookup (getfqdn).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_close(self) -> None:
        super().server_close()
        self.db.close()

    def record(self, name: str, at: float) -> None:
        """Commit one check-in: one UPDATE, one transaction."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE checks SET last_ping_at = ? WHERE name = ?", (at, name))
            self.db.execute("COMMIT")


class ReferenceHandler(http.server.BaseHTTPRequestHandler):
    """``/reset/NAME/?key=KEY`` (GET or POST): 200 "Alert reset." once committed, else 404."""

    protocol_version = "HTTP/1.1"
    #: Headers and body leave in one write, as Caduceus's do.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    _PATH = re.compile(r"/reset/([^/?]+)/?\?key=(.*)")

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        match = self._PATH.fullmatch(self.path)
        if match and match[1] in self.server.names and hmac.compare_digest(match[2], KEY):
            self.server.record(match[1], time.time())
            self._reply(200, RESET_ANSWER)
        else:
            self._reply(404, b"Not found.\n")

    do_POST = do_GET

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: the reference is the bare minimum."""


def reference_main(argv: list[str]) -> int:
    """``bench_caduceus.py _reference DB PORT ALERTS``: serve until SIGTERM or Ctrl-C."""
    db_path, port, alerts = argv[0], int(argv[1]), int(argv[2])

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        with ReferenceServer(port, db_path, alert_names(alerts)) as server:
            server.serve_forever()
    return 0


###############################################################################
# Load client #################################################################
###############################################################################


class _Connection:
    """One client connection of a load loop and its request in flight."""

    __slots__ = ("sock", "out", "inbuf", "started", "connecting", "events")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.out = b""
        self.inbuf = bytearray()
        self.started = 0.0
        self.connecting = False
        self.events = 0


class LoadLoop:
    """Closed-loop HTTP/1.1 clients on one selector, in one process.

    ``task`` (a dict, so it crosses process boundaries as it is): ``port``,
    ``paths`` (request i of this worker goes to ``paths[(offset + i * stride)
    % len(paths)]``), ``connections``, ``keep_alive``, ``body`` (b"" for GET,
    else POST), ``start_at`` (epoch seconds), ``duration_s`` (the window; None:
    no limit) and ``count`` (requests to send; None: no limit).  ``run()``
    returns the latencies (seconds), the requests answered 200 inside the
    window and in all, errors with a few samples, this process's CPU
    seconds, and the window (or, with a count, the time it took).
    """

    def __init__(self, task: Mapping[str, Any]) -> None:
        self.task = task
        self.selector = selectors.DefaultSelector()
        self.index = task["offset"]
        self.remaining = task.get("count")
        self.latencies = array.array("d")
        self.completed = 0
        self.ok = 0
        self.errors = 0
        self.samples: list[str] = []
        #: Connections whose request failed, to be started again by the loop (not
        #: by the failure itself: a refused connect would recurse without end).
        self.pending: list[_Connection] = []
        self.end = math.inf
        host = f"Host: 127.0.0.1:{task['port']}\r\n"
        close = "" if task["keep_alive"] else "Connection: close\r\n"
        if task["body"]:
            method = "POST"
            extra = f"Content-Type: text/plain\r\nContent-Length: {len(task['body'])}\r\n"
        else:
            method, extra = "GET", ""
        self.heads = [f"{method} {path} HTTP/1.1\r\n{host}{close}{extra}\r\n".encode() for path in task["paths"]]

    def run(self) -> dict[str, Any]:
        cpu_before = time.process_time()
        time.sleep(max(self.task["start_at"] - time.time(), 0.0))
        started = time.perf_counter()
        window_s = self.task.get("duration_s") or 3600.0
        self.end = started + window_s
        try:
            self.pending = [_Connection() for _ in range(self.task["connections"])]
            while self.selector.get_map() or self.pending:
                pending, self.pending = self.pending, []
                for conn in pending:
                    self._next(conn)
                for key, mask in self.selector.select(0.001 if self.pending else 0.05):
                    self._on_event(key.data, mask)
                self._expire(time.perf_counter())
        finally:
            for key in list(self.selector.get_map().values()):
                key.fileobj.close()
            self.selector.close()
        wall_s = window_s if self.remaining is None else time.perf_counter() - started
        return {"latencies": self.latencies.tobytes(), "completed": self.completed, "ok": self.ok,
                "errors": self.errors,
                "samples": self.samples, "cpu_s": time.process_time() - cpu_before, "wall_s": wall_s}

    def _more(self) -> bool:
        if time.perf_counter() >= self.end:
            return False
        if self.remaining is None:
            return True
        self.remaining -= 1
        return self.remaining >= 0

    def _next(self, conn: _Connection) -> None:
        """Send the connection's next request, or close it when the load is over."""
        if not self._more():
            self._close(conn)
            return
        paths = self.task["paths"]
        conn.out = self.heads[self.index % len(paths)] + self.task["body"]
        self.index += self.task["stride"]
        conn.inbuf.clear()
        conn.started = time.perf_counter()
        if conn.sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn.sock, conn.connecting = sock, True
            status = sock.connect_ex(("127.0.0.1", self.task["port"]))
            if status not in (0, errno.EINPROGRESS):
                self._fail(conn, f"connect: {os.strerror(status)}")
                return
            self._watch(conn, selectors.EVENT_WRITE)
        else:
            self._on_event(conn, selectors.EVENT_WRITE)

    def _on_event(self, conn: _Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._write(conn)
            else:
                self._read(conn)
        except (OSError, ValueError) as exc:  # ValueError: an answer that is not HTTP
            self._fail(conn, f"{type(exc).__name__}: {exc}")

    def _write(self, conn: _Connection) -> None:
        if conn.connecting:
            status = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if status:
                raise OSError(status, os.strerror(status))
            conn.connecting = False
        sent = conn.sock.send(conn.out)
        conn.out = conn.out[sent:]
        self._watch(conn, selectors.EVENT_WRITE if conn.out else selectors.EVENT_READ)

    def _read(self, conn: _Connection) -> None:
        chunk = conn.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the answer ended")
        conn.inbuf += chunk
        head_end = conn.inbuf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(conn.inbuf[:head_end]).lower()
        length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
        if length is None:
            raise ConnectionError("answer without Content-Length")
        if len(conn.inbuf) < head_end + 4 + int(length[1]):
            return
        done = time.perf_counter()
        self.latencies.append(done - conn.started)
        status = int(head[9:12])
        if status == 200:
            self.ok += 1
            self.completed += done <= self.end
        else:
            self._error(f"HTTP {status}")
        if not self.task["keep_alive"] or b"\r\nconnection: close" in head:
            self._close(conn)
        self._next(conn)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.events == 0:
            self.selector.register(conn.sock, events, conn)
        elif conn.events != events:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Connection) -> None:
        if conn.sock is not None:
            if conn.events:
                self.selector.unregister(conn.sock)
            conn.sock.close()
        conn.sock, conn.events = None, 0

    def _error(self, reason: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(reason)

    def _fail(self, conn: _Connection, reason: str) -> None:
        """Count a failed request, drop its connection, and go on with a new one."""
        self._error(reason)
        self._close(conn)
        self.pending.append(conn)

    def _expire(self, now: float) -> None:
        for key in list(self.selector.get_map().values()):
            conn = key.data
            if now - conn.started > REQUEST_TIMEOUT_S:
                self._fail(conn, f"no answer within {REQUEST_TIMEOUT_S:g} s")


def _client_worker(pipe: Any) -> None:
    """A load worker process: say it is ready, then run each task received on
    ``pipe``; stop at None or EOF."""
    try:
        pipe.send("ready")
        while True:
            task = pipe.recv()
            if task is None:
                return
            try:
                result = LoadLoop(task).run()
            except Exception:  # the process boundary: hand the traceback to the parent
                result = {"crash": traceback.format_exc()}
            pipe.send(result)
    except (EOFError, OSError, KeyboardInterrupt):
        return
    finally:
        pipe.close()


class ClientPool:
    """Load worker processes, started once ("spawn": each its own interpreter and GIL).

    A context manager; ``run(...)`` spreads connections over the workers,
    starts them at the same moment and merges what they measured.
    """

    def __init__(self, processes: int) -> None:
        self.size = max(1, processes)
        self.workers: list[tuple[Any, Any]] = []

    def __enter__(self) -> ClientPool:
        context = multiprocessing.get_context("spawn")
        for number in range(self.size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_client_worker, args=(child_end,), daemon=True,
                                      name=f"bench-client-{number}")
            process.start()
            child_end.close()
            self.workers.append((process, parent_end))
        # Wait for the interpreters to be up: starting them costs CPU a measurement must not share.
        try:
            for process, pipe in self.workers:
                try:
                    ready = pipe.poll(60) and pipe.recv() == "ready"
                except EOFError:
                    ready = False
                if not ready:
                    raise BenchError(f"load worker {process.name} did not start")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for process, pipe in self.workers:
            with contextlib.suppress(OSError):
                pipe.send(None)
            pipe.close()
        for process, pipe in self.workers:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join()
            process.close()
        self.workers = []

    def run(self, port: int, paths: list[str], connections: int, keep_alive: bool = True,
            duration_s: float | None = None, count: int | None = None, body: bytes = b"") -> dict[str, Any]:
        """Run one load phase; return the merged figures (see LoadLoop)."""
        used = self.workers[:min(self.size, connections)]
        start_at = time.time() + 0.05
        for number, (process, pipe) in enumerate(used):
            share = connections // len(used) + (number < connections % len(used))
            task = {"port": port, "paths": paths, "connections": share, "keep_alive": keep_alive,
                    "body": body, "start_at": start_at, "duration_s": duration_s,
                    "offset": number, "stride": len(used)}
            if count is not None:
                task["count"] = count // len(used) + (number < count % len(used))
            pipe.send(task)
        results = [pipe.recv() for process, pipe in used]
        for result in results:
            if "crash" in result:
                raise BenchError(f"a load worker failed:\n{result['crash']}")
        latencies = array.array("d")
        for result in results:
            latencies.frombytes(result["latencies"])
        wall_s = max(result["wall_s"] for result in results)
        return {"latencies": latencies, "completed": sum(result["completed"] for result in results),
                "ok": sum(result["ok"] for result in results),
                "errors": sum(result["errors"] for result in results),
                "samples": [sample for result in results for sample in result["samples"]][:5],
                "client_cpu_s": sum(result["cpu_s"] for result in results), "wall_s": wall_s}


###############################################################################
# Statistics ##################################################################
###############################################################################


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def latency_ms(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of seconds, in milliseconds."""
    ordered = sorted(values)
    return {"p50_ms": _ms(percentile(ordered, 0.50)), "p99_ms": _ms(percentile(ordered, 0.99)),
            "max_ms": _ms(ordered[-1] if ordered else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


class Tally:
    """The run's errors: a count and the first few reasons, each with where it happened."""

    def __init__(self) -> None:
        self.total = 0
        self.samples: list[str] = []

    def add(self, count: int, where: str, samples: list[str]) -> None:
        self.total += count
        for sample in samples[:max(0, 10 - len(self.samples))]:
            self.samples.append(f"{where}: {sample}")


###############################################################################
# Check-ins ###################################################################
###############################################################################


def measure_checkins(plan: Plan, pool: ClientPool, servers: Mapping[str, ServerProcess], names: list[str],
                     tally: Tally, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Check-in figures per (clients, connection): Caduceus and the reference,
    interleaved round by round (the order alternates), and their ratio."""
    paths = [checkin_path(name) for name in names]
    for label, server in servers.items():  # warm up: threads, caches, the WAL file
        say(f"check-ins: warming up {label}")
        load = pool.run(server.port, paths, max(plan.concurrency), duration_s=min(plan.phase_s, 0.3))
        tally.add(load["errors"], f"{label} warm-up", load["samples"])
    rows = []
    for clients in plan.concurrency:
        for keep_alive in (True, False):
            connection = "keep-alive" if keep_alive else "new"
            phases: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
            for round_number in range(plan.rounds):
                order = list(servers) if round_number % 2 == 0 else list(reversed(list(servers)))
                for label in order:
                    say(f"check-ins: {_clients(clients)}, {connection} connections, "
                        f"round {round_number + 1}/{plan.rounds}: {label}")
                    phase = _phase(pool, servers[label], paths, clients, keep_alive, plan.phase_s)
                    tally.add(phase["errors"], f"{label} {clients} clients {connection}", phase["samples"])
                    phases[label].append(phase)
            rows.append(_checkin_row(clients, connection, phases))
    return rows


def _phase(pool: ClientPool, server: ServerProcess, paths: list[str], clients: int, keep_alive: bool,
           duration_s: float) -> dict[str, Any]:
    """One timed load phase against one server, with both sides' CPU."""
    cpu_before, wall_before = cpu_seconds(server.pid), time.perf_counter()
    load = pool.run(server.port, paths, clients, keep_alive=keep_alive, duration_s=duration_s)
    cpu_after, wall_s = cpu_seconds(server.pid), time.perf_counter() - wall_before
    server_cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / wall_s
    return {"req_s": load["completed"] / duration_s, "latencies": load["latencies"], "errors": load["errors"],
            "samples": load["samples"], "requests": len(load["latencies"]),
            "client_cpu": load["client_cpu_s"] / load["wall_s"], "server_cpu": server_cpu}


def _checkin_row(clients: int, connection: str, phases: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"clients": clients, "connection": connection}
    for label, runs in phases.items():
        latencies = [value for run in runs for value in run["latencies"]]
        server_cpu = [run["server_cpu"] for run in runs if run["server_cpu"] is not None]
        row[label] = {"req_s": round(statistics.median(run["req_s"] for run in runs), 1),
                      "req_s_rounds": [round(run["req_s"], 1) for run in runs],
                      **latency_ms(latencies),
                      "requests": sum(run["requests"] for run in runs),
                      "errors": sum(run["errors"] for run in runs),
                      "client_cpu_cores": _round(statistics.mean(run["client_cpu"] for run in runs)),
                      "server_cpu_cores": _round(statistics.mean(server_cpu) if server_cpu else None)}
    ratios = [ours["req_s"] / theirs["req_s"]
              for ours, theirs in zip(phases["caduceus"], phases["reference"]) if theirs["req_s"]]
    row["ratio"] = {"median": _round(statistics.median(ratios) if ratios else None, 3),
                    "min": _round(min(ratios, default=None), 3), "max": _round(max(ratios, default=None), 3),
                    "rounds": [round(ratio, 3) for ratio in ratios]}
    return row


###############################################################################
# Detection lateness ##########################################################
###############################################################################

#: The subject of a failure notice, as Caduceus 0.0.11 wrote it.
_FAILING = re.compile(r'Caduceus: Alert "(.+)" is failing\.')


class TelegramSink(http.server.ThreadingHTTPServer):
    """A loopback stand-in for the Telegram Bot API that stamps each
    "is failing" notice with ``time.time()`` when its request arrives."""

    daemon_threads = True

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.notices = 0
        self.changed = threading.Condition()
        super().__init__(("127.0.0.1", 0), TelegramSinkHandler)

    def record(self, text: str, arrived_at: float) -> None:
        match = _FAILING.match(text)
        with self.changed:
            self.notices += 1
            if match:
                self.arrivals.setdefault(match[1], arrived_at)
            self.changed.notify_all()

    def wait_for(self, names: list[str], timeout_s: float) -> None:
        """Wait until every name has its notice, or ``timeout_s`` passed."""
        with self.changed:
            self.changed.wait_for(lambda: all(name in self.arrivals for name in names), timeout_s)


class TelegramSinkHandler(http.server.BaseHTTPRequestHandler):
    """``POST /bot<token>/sendMessage``: record the text, answer as Telegram does."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        arrived_at = time.time()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            text = str(json.loads(body).get("text", ""))
        except (ValueError, AttributeError):
            text = ""
        self.server.record(text, arrived_at)
        answer = b'{"ok": true, "result": {}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the benchmark prints its own report."""


def measure_lateness(plan: Plan, workdir: str, caduceus_path: str, tally: Tally,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """Detection lateness of ``due_alerts`` alerts that fall due among
    ``quiet_alerts`` that do not, their deadlines staggered over the run."""
    quiet, due = alert_names(plan.quiet_alerts), alert_names(plan.due_alerts, "due")
    step_s = (plan.due_to_s - plan.due_from_s) / max(plan.due_alerts - 1, 1)
    every = {name: 3600.0 for name in quiet}
    every.update({name: round(plan.due_from_s + number * step_s, 3) for number, name in enumerate(due)})
    sink = TelegramSink()
    thread = threading.Thread(target=sink.serve_forever, kwargs={"poll_interval": 0.05}, name="telegram sink")
    thread.start()
    try:
        url = f"http://127.0.0.1:{sink.server_address[1]}"
        with caduceus_process("caduceus (lateness)", caduceus_path, workdir, every, url) as server:
            say(f"lateness: {len(every):,} alerts, {len(due)} falling due {plan.due_from_s:g}-{plan.due_to_s:g} s "
                "after start")
            if server.wait_ready(checkin_path(quiet[0]), 60.0) is None:
                raise BenchError(f"caduceus with {len(every):,} alerts did not answer within 60 s")
            sink.wait_for(due, plan.due_to_s + 15.0)
            deadlines = read_deadlines(server.db_path, every)
    finally:
        sink.shutdown()
        sink.server_close()
        thread.join()
    with sink.changed:
        arrivals = dict(sink.arrivals)
    lateness = [arrivals[name] - deadlines[name] for name in due if name in arrivals and name in deadlines]
    missing = [name for name in due if name not in arrivals or name not in deadlines]
    tally.add(len(missing), "lateness", [f"no notice for {name}" for name in missing])
    return {"alerts": len(every), "due": len(due), "received": len(lateness), **latency_ms(lateness),
            "min_ms": _ms(min(lateness, default=None))}


def read_deadlines(db_path: str, every: Mapping[str, float]) -> dict[str, float]:
    """Each alert's deadline, (last_ping_at or first_seen_at) + every, read
    from Caduceus's database without writing to it."""
    uri = f"file:{_uri_path(db_path)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT name, first_seen_at, last_ping_at FROM checks").fetchall()
    return {name: (last_ping_at if last_ping_at is not None else first_seen_at) + every[name]
            for name, first_seen_at, last_ping_at in rows if name in every}


def _uri_path(path: str) -> str:
    """Quote a file path for an SQLite URI."""
    return re.sub(r"[?#%]", lambda match: f"%{ord(match[0]):02X}", path)


###############################################################################
# Start-up, memory and database size ##########################################
###############################################################################

#: Caduceus keeps each alert's last 100 signals (with their bodies).
PINGS_KEPT = 100


def start_row(server: ServerProcess, alerts: int, probe: str, cap_s: float) -> dict[str, Any]:
    """Start-up time (None past ``cap_s``) and idle memory of a server just spawned."""
    startup_s = server.wait_ready(checkin_path(probe), cap_s)
    return {"alerts": alerts, "startup_s": _round(startup_s, 3), "cap_s": cap_s,
            "rss_idle_mb": _round(rss_mb(server.pid), 1), "rss_after_mb": None, "load": ""}


def measure_database(plan: Plan, pool: ClientPool, workdir: str, caduceus_path: str, cap_s: float,
                     tally: Tally, say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start-up and memory at ``db_alerts`` alerts, then ``db_checkins`` POSTs
    with ``body_bytes`` bodies spread evenly over them (or as many as fit in
    ``db_max_s``), then a clean stop (SIGTERM: the WAL is checkpointed) and
    the size of the database files.  No alert gets more than PINGS_KEPT
    check-ins, so every body answered 200 is one Caduceus keeps."""
    names = alert_names(plan.db_alerts)
    body = (b"0123456789abcdef" * (plan.body_bytes // 16 + 1))[:plan.body_bytes]
    with caduceus_process("caduceus (database)", caduceus_path, workdir, dict.fromkeys(names, 3600.0)) as server:
        say(f"start-up: {plan.db_alerts:,} alerts")
        row = start_row(server, plan.db_alerts, names[0], cap_s)
        if row["startup_s"] is None:
            raise BenchError(f"caduceus with {plan.db_alerts:,} alerts did not answer within {cap_s:g} s")
        say(f"database: {plan.db_checkins:,} check-ins with {plan.body_bytes} B bodies "
            f"(at most {plan.db_max_s:g} s)")
        load = pool.run(server.port, [checkin_path(name) for name in names], plan.load_clients,
                        count=plan.db_checkins, duration_s=plan.db_max_s, body=body)
        tally.add(load["errors"], "database load", load["samples"])
        row["rss_after_mb"] = _round(rss_mb(server.pid), 1)
        row["load"] = f"{load['ok']:,} POSTs of {plan.body_bytes} B"
        status = server.stop()
    if status != 0:
        tally.add(1, "database", [f"caduceus exited with status {status} after SIGTERM: {server.log_tail()}"])
    files = {suffix or "db": os.path.getsize(server.db_path + suffix)
             for suffix in ("", "-wal", "-shm") if os.path.exists(server.db_path + suffix)}
    kept = load["ok"] * plan.body_bytes
    disk = sum(files.values())
    return row, {"alerts": plan.db_alerts, "checkins": load["ok"], "planned_checkins": plan.db_checkins,
                 "time_limit_s": plan.db_max_s, "body_bytes": plan.body_bytes,
                 "kept_bytes": kept, "disk_bytes": disk, "files": files,
                 "disk_per_kept": _round(disk / kept if kept else None, 3),
                 "load_req_s": round(load["completed"] / load["wall_s"], 1), **latency_ms(load["latencies"])}


#: Run by measure_config_memory in a Python of its own: load the config twice
#: (the first fills caches), and measure the second with tracemalloc.
_CONFIG_MEMORY_PROBE = """
import gc, importlib.util, json, sys, tracemalloc
spec = importlib.util.spec_from_file_location("caduceus_probe", sys.argv[1])
caduceus = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(caduceus)
caduceus.load_config(sys.argv[2])
gc.collect()
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
config = caduceus.load_config(sys.argv[2])
gc.collect()
kept, peak = (size - before for size in tracemalloc.get_traced_memory())
print(json.dumps({"alerts": len(config.checks), "kept_bytes": kept, "peak_bytes": peak}))
"""


def measure_config_memory(plan: Plan, workdir: str, caduceus_path: str, tally: Tally,
                          say: Callable[[str], None]) -> dict[str, Any] | None:
    """What reading a config of ``db_alerts`` alerts keeps, and its peak (tracemalloc):
    no parse peak may be left behind."""
    say(f"config memory: {plan.db_alerts:,} alerts (tracemalloc)")
    path = os.path.join(workdir, "config-memory.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(render_config(dict.fromkeys(alert_names(plan.db_alerts), 3600.0)))
    try:
        probe = subprocess.run([sys.executable, "-c", _CONFIG_MEMORY_PROBE, caduceus_path, path],
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        tally.add(1, "config memory", ["the probe took more than 120 s"])
        return None
    if probe.returncode != 0:
        tally.add(1, "config memory", [f"the probe failed: {probe.stderr.strip()[-300:]}"])
        return None
    figures = json.loads(probe.stdout)
    figures["kept_per_alert_bytes"] = round(figures["kept_bytes"] / max(figures["alerts"], 1))
    return figures


def measure_big(plan: Plan, pool: ClientPool, workdir: str, caduceus_path: str, cap_s: float,
                tally: Tally, say: Callable[[str], None]) -> dict[str, Any]:
    """Start-up and memory at ``big_alerts`` alerts, idle and after ``big_checkins`` check-ins."""
    names = alert_names(plan.big_alerts)
    with caduceus_process(f"caduceus ({plan.big_alerts:,} alerts)", caduceus_path, workdir,
                          dict.fromkeys(names, 3600.0)) as server:
        say(f"start-up: {plan.big_alerts:,} alerts (waiting at most {cap_s:g} s)")
        row = start_row(server, plan.big_alerts, names[0], cap_s)
        if row["startup_s"] is None:  # still starting: its memory is not the idle figure
            row["rss_at_cap_mb"], row["rss_idle_mb"] = row["rss_idle_mb"], None
            row["load"] = f"none: still starting at the cap, RSS {_fmt(row['rss_at_cap_mb'])} MB"
            return row
        load = pool.run(server.port, [checkin_path(name) for name in names], plan.load_clients,
                        count=plan.big_checkins)
        tally.add(load["errors"], f"{plan.big_alerts} alerts load", load["samples"])
        row["rss_after_mb"] = _round(rss_mb(server.pid), 1)
        row["load"] = f"{plan.big_checkins:,} check-ins"
    return row


def run_checkin_servers(plan: Plan, pool: ClientPool, workdir: str, caduceus_path: str, cap_s: float,
                        tally: Tally, say: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start Caduceus (``checkin_alerts`` alerts, also the first start-up row) and the
    reference side by side, and measure check-ins against both."""
    names = alert_names(plan.checkin_alerts)
    with contextlib.ExitStack() as stack:
        caduceus = stack.enter_context(caduceus_process(
            "checkins", caduceus_path, workdir, dict.fromkeys(names, 3600.0)))
        say(f"start-up: {plan.checkin_alerts:,} alerts")
        row = start_row(caduceus, plan.checkin_alerts, names[0], cap_s)
        if row["startup_s"] is None:
            raise BenchError(f"caduceus with {plan.checkin_alerts} alerts did not answer within {cap_s:g} s")
        reference = stack.enter_context(reference_process(workdir, plan.checkin_alerts))
        if reference.wait_ready(checkin_path(names[0]), 30.0) is None:
            raise BenchError("the reference server did not answer within 30 s")
        rows = measure_checkins(plan, pool, {"caduceus": caduceus, "reference": reference}, names, tally, say)
        row["rss_after_mb"] = _round(rss_mb(caduceus.pid), 1)
        row["load"] = "the check-in phases"
        for server in (caduceus, reference):
            status = server.stop()
            if status != 0:
                tally.add(1, server.label, [f"exited with status {status} after SIGTERM: {server.log_tail()}"])
    return rows, row


###############################################################################
# Targets and report ##########################################################
###############################################################################

#: Targets met, missed, or not measured in this plan.
PASS, MISS, SKIP = "PASS", "MISS", "n/a"


def evaluate_targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 10 with the figure it is judged on, its limit and PASS/MISS.

    The top concurrency stands for "50 clients" (2 in a smoke run), so every
    target has a figure in every plan; start-up targets whose alert count a
    plan skips are n/a.
    """
    rows = {(row["clients"], row["connection"]): row for row in result["checkins"]}
    top = max(clients for clients, _ in rows)
    targets = []

    def add(name: str, value: float | None, limit: float | None, higher_is_better: bool, unit: str) -> None:
        if value is None or limit is None:
            verdict = SKIP
        else:
            verdict = PASS if (value >= limit if higher_is_better else value <= limit) else MISS
        targets.append({"target": name, "value": value, "limit": limit, "unit": unit,
                        "direction": ">=" if higher_is_better else "<=", "result": verdict})

    for clients, connection, limit in ((top, "keep-alive", 1.2), (top, "new", 1.0),
                                       (1, "keep-alive", 0.9), (1, "new", 0.9)):
        row = rows[clients, connection]
        add(f"check-ins/s vs reference, {_clients(clients)}, {connection}", row["ratio"]["median"], limit, True, "x")
    for connection in ("keep-alive", "new"):
        row = rows[top, connection]
        add(f"p99 vs reference's, {_clients(top)}, {connection}", row["caduceus"]["p99_ms"],
            row["reference"]["p99_ms"], False, "ms")
    add("errors, whole run", result["errors"], 0, False, "")
    lateness = result["lateness"]
    add(f"detection lateness p99, {lateness['alerts']:,} alerts", lateness["p99_ms"], 10.0, False, "ms")
    startup = {row["alerts"]: row for row in result["startup"]}
    for alerts, limit in ((10_000, 0.5), (100_000, 5.0)):
        row = startup.get(alerts)
        capped = row is not None and row["startup_s"] is None
        add(f"start-up, {alerts:,} alerts", row["cap_s"] if capped else (row or {}).get("startup_s"),
            limit, False, "s")
        if capped:
            targets[-1].update(result=MISS, value_text=f"> {_fmt(row['cap_s'])} s")
    row = startup.get(10_000, {})
    rss = [value for value in (row.get("rss_idle_mb"), row.get("rss_after_mb")) if value is not None]
    add("RSS (idle and after load), 10,000 alerts", max(rss, default=None), 35.0, False, "MB")
    return targets


def _clients(count: int) -> str:
    return f"{count} client" if count == 1 else f"{count} clients"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _with_unit(value: Any, unit: str) -> str:
    # Ratios with 3 digits, so 0.996 is not shown as a missed 1.00.
    return "n/a" if value is None else f"{_fmt(value, 3 if unit == 'x' else 2)} {unit}".rstrip()


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for cells in [headers, *rows]:
        padded = [str(cell).ljust(width) if number == 0 else str(cell).rjust(width)
                  for number, (cell, width) in enumerate(zip(cells, widths))]
        lines.append("  " + "  ".join(padded).rstrip())
    return lines


def _checkin_table(result: Mapping[str, Any]) -> list[str]:
    rows = []
    for row in result["checkins"]:
        for label in ("caduceus", "reference"):
            figures = row[label]
            ratio = row["ratio"]
            rows.append([f"{_clients(row['clients'])}, {row['connection']}" if label == "caduceus" else "", label,
                         _fmt(figures["req_s"], 0), _fmt(figures["p50_ms"], 2), _fmt(figures["p99_ms"], 2),
                         _fmt(figures["max_ms"], 2), _fmt(figures["errors"]),
                         _fmt(figures["server_cpu_cores"], 2), _fmt(figures["client_cpu_cores"], 2),
                         f"{_fmt(ratio['median'], 2)} ({_fmt(ratio['min'], 2)}-{_fmt(ratio['max'], 2)})"
                         if label == "caduceus" else ""])
    return _table(["clients", "server", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "srv CPU",
                   "cli CPU", "ratio (min-max)"], rows)


def format_report(result: Mapping[str, Any]) -> str:
    """The human-readable report of a run."""
    machine, plan = result["machine"], result["plan"]
    lines = [f"Caduceus benchmark: caduceus.py {machine['caduceus_version']} ({machine['caduceus']})",
             f"Machine: {machine['cpu']}, {machine['cores']} cores (load average {_fmt(machine['load_average'], 2)} "
             f"at the start); {machine['system']}; Python {machine['python']}; SQLite {machine['sqlite']}",
             f"Command: {result['command']}",
             f"Plan: {plan['name']}; {result['elapsed_s']:.0f} s; errors: {result['errors']}", ""]
    lines += [f"Check-ins: GET /reset/NAME/?key=..., {plan['checkin_alerts']} alerts; {plan['rounds']} rounds of "
              f"{plan['phase_s']:g} s per server, interleaved; ratio = Caduceus/reference req/s per round,",
              "median (min-max); latencies over all rounds; CPU in cores (srv: the server, cli: the load "
              f"client's {result['client_processes']} processes)"]
    lines += _checkin_table(result) + [""]
    late = result["lateness"]
    lines += [f"Detection lateness (deadline to notice at the Telegram stand-in), {late['due']} alerts falling "
              f"due among {late['alerts']:,}:",
              f"  received {late['received']}/{late['due']}; p50 {_fmt(late['p50_ms'], 2)} ms, "
              f"p99 {_fmt(late['p99_ms'], 2)} ms, max {_fmt(late['max_ms'], 2)} ms, "
              f"min {_fmt(late['min_ms'], 2)} ms", ""]
    lines += ["Start-up (spawn to the first 200 on a check-in) and resident memory (VmRSS):"]
    lines += _table(["alerts", "start-up s", "RSS idle MB", "RSS after MB", "after"],
                    [[_fmt(row["alerts"]), f"> {_fmt(row['cap_s'])}" if row["startup_s"] is None
                      else _fmt(row["startup_s"], 3), _fmt(row["rss_idle_mb"]), _fmt(row["rss_after_mb"]),
                      row["load"]] for row in result["startup"]])
    memory = result.get("config_memory")
    if memory:
        lines += [f"  reading a config of {memory['alerts']:,} alerts (tracemalloc): keeps "
                  f"{memory['kept_bytes'] / 2**20:.1f} MiB ({memory['kept_per_alert_bytes']:,} B per alert) "
                  f"of a peak of {memory['peak_bytes'] / 2**20:.1f} MiB"]
    lines += [""]
    db = result["database"]
    lines += [f"Database: {db['checkins']:,} check-ins with {db['body_bytes']} B bodies over {db['alerts']:,} "
              f"alerts ({db['load_req_s']:,.0f}/s, p99 {_fmt(db['p99_ms'], 2)} ms)"
              + (f", of {db['planned_checkins']:,} planned ({db['time_limit_s']:g} s limit)"
                 if db["checkins"] < db["planned_checkins"] else "") + ", then SIGTERM:",
              f"  {db['disk_bytes']:,} B on disk ({', '.join(f'{k} {v:,}' for k, v in db['files'].items())}) "
              f"for {db['kept_bytes']:,} B of bodies kept: {_fmt(db['disk_per_kept'], 2)} B per byte kept", ""]
    lines += ["Targets (shown, never asserted):"]
    lines += _table(["target", "measured", "limit", "result"],
                    [[target["target"], target.get("value_text") or _with_unit(target["value"], target["unit"]),
                      f"{target['direction']} {_with_unit(target['limit'], target['unit'])}", target["result"]]
                     for target in result["targets"]])
    if result["error_samples"]:
        lines += ["", "Errors:"] + [f"  {sample}" for sample in result["error_samples"]]
    return "\n".join(lines)


###############################################################################
# Command line ################################################################
###############################################################################


def run(plan: Plan, caduceus_path: str, client_processes: int, cap_s: float,
        say: Callable[[str], None]) -> dict[str, Any]:
    """Run every part of the plan; return all figures (see the module docstring)."""
    began = time.perf_counter()
    tally = Tally()
    result: dict[str, Any] = {"machine": machine_info(caduceus_path),
                              "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
                              "plan": dataclasses.asdict(plan), "client_processes": client_processes}
    with tempfile.TemporaryDirectory(prefix="bench-caduceus-") as workdir, ClientPool(client_processes) as pool:
        result["checkins"], first_row = run_checkin_servers(plan, pool, workdir, caduceus_path, cap_s, tally, say)
        result["lateness"] = measure_lateness(plan, workdir, caduceus_path, tally, say)
        db_row, result["database"] = measure_database(plan, pool, workdir, caduceus_path, cap_s, tally, say)
        result["config_memory"] = measure_config_memory(plan, workdir, caduceus_path, tally, say)
        result["startup"] = [first_row, db_row]
        if plan.big_alerts:
            if plan.budget_s:  # what is left of the budget, less the load and the stop after it
                cap_s = round(min(cap_s, max(5.0, plan.budget_s - (time.perf_counter() - began) - 10.0)), 1)
            result["startup"].append(measure_big(plan, pool, workdir, caduceus_path, cap_s, tally, say))
    result["errors"], result["error_samples"] = tally.total, tally.samples
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    result["targets"] = evaluate_targets(result)
    return result


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_caduceus.py", description="Benchmark caduceus.py against a one-commit reference server.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller loads, under 30 s")
    size.add_argument("--smoke", action="store_true", help="tiny loads, a few seconds (for the tests)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caduceus.py")
    parser.add_argument("--caduceus", metavar="PATH", default=beside,
                        help="the caduceus.py to measure (default: the one beside this script)")
    parser.add_argument("--client-processes", metavar="N", type=int, default=max(2, min(4, os.cpu_count() or 2)),
                        help="load client processes (default: the cores, 2 to 4)")
    parser.add_argument("--startup-cap", metavar="SECONDS", type=float, default=120.0,
                        help="seconds to wait for a start-up before reporting '> cap' (default: 120)")
    parser.add_argument("--budget", metavar="SECONDS", type=float,
                        help="seconds the run may take before the large start-up is cut short "
                             "(default: 175 for the full run; 0: wait up to --startup-cap)")
    parser.add_argument("--rounds", metavar="N", type=int, help="interleaved rounds per check-in figure")
    parser.add_argument("--phase-seconds", metavar="SECONDS", type=float, help="seconds of each check-in phase")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.caduceus):
        parser.error(f"--caduceus: no such file: {args.caduceus}")
    if args.client_processes < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--client-processes and --rounds must be at least 1")
    if any(value is not None and value < 0 for value in (args.budget, args.phase_seconds, args.startup_cap)):
        parser.error("--budget, --phase-seconds and --startup-cap cannot be negative")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM too stops every server and worker on the way out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when it completed with no errors, else 1."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_reference"]:
        return reference_main(argv[1:])
    args = _parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "default"]
    overrides = {"rounds": args.rounds, "phase_s": args.phase_seconds, "budget_s": args.budget}
    plan = dataclasses.replace(plan, **{key: value for key, value in overrides.items() if value is not None})
    began = time.perf_counter()

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(plan, args.caduceus, args.client_processes, args.startup_cap, say)
    except BenchError as exc:
        print(f"bench_caduceus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_caduceus: interrupted; all servers stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
