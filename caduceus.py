#!/usr/bin/env python3
"""Caduceus: a dead man's switch for cron jobs.

Each job checks in by fetching a URL when it succeeds; when a job does not
check in on time, Caduceus notifies (email, Telegram, Slack, Mattermost,
Discord, ntfy, Gotify, Pushover, Matrix, PagerDuty, any webhook, a local
command, the console), reminds every ``notify_every`` while it stays down,
and notifies again when it recovers.
One file, standard library only, Python 3.9+ (``tomli`` is needed below 3.11
to read the config).

Run::

    python3 caduceus.py [-c caduceus.toml] [-b database.sqlite3] [-i localhost] [-p 5000] [-d]
    python3 caduceus.py check [-c caduceus.toml] [-b database.sqlite3] [--json]
    python3 caduceus.py status [-c caduceus.toml] [-b database.sqlite3] [--json]   # exit 1: one is down
    python3 caduceus.py run URL -- COMMAND [ARGS...]     # wraps a job: start, exit status, output
    python3 caduceus.py reload [--pid-file F | --url URL]  # re-read the config (as SIGHUP does)
    python3 caduceus.py test-notify [-c caduceus.toml] [ALERT | --channel NAME]

Configuration (the format of Caduceus 0.0.11, read unchanged, plus new keys)::

    [config]
    secret_key = "somelongkey"        # optional; check-ins must then carry it
    timezone = "UTC"                  # default for schedules
    heartbeat_url = "https://hc-ping.com/..."  # fetched every heartbeat_every (1m) while healthy
    trusted_proxies = ["127.0.0.1"]   # whose X-Forwarded-For names the client

    [alerting.email]                  # optional; also telegram, webhook, slack, ...
                                      # ([alerting.KIND.NAME] is the channel "KIND.NAME")
    recipient_emails = ["ops@example.com"]
    from_addr = "caduceus@example.com"
    hostname = "localhost"            # port = 25, username, password,
    encryption = "none"               # "none" | "ssl" | "starttls"

    [alerts]
    default_channels = ["email"]

    [alerts.backups]                  # the name is the URL segment
    every = "1d"                      # "90s", "1h30m", "2 days", "1:30:00"; or
                                      # schedule = "0 3 * * *" with timezone = "Europe/Athens"
    grace = "30m"                     # default 0
    max_runtime = "2h"                # a started run must finish within this
    notify_every = "6h"               # reminder cadence while down; default: every (10s at least)
    channels = ["email", "console"]   # default: default_channels

HTTP endpoints (GET, HEAD and POST; a POST body's last 10 KB are kept):

    /reset/<name>/?key=K                 success: 200 "Alert reset."
    /reset/<name>/<signal>?key=K         signal: start, fail, log, or an exit status 0-255
    /ping/[<K>/]<name>[/<signal>]        the same, as healthchecks.io spells it: 200 "OK"
    GET /                                the dashboard; /alerts/<name>: one alert and its history
    GET /api/v1/alerts[/<name>]          the same as JSON; POST .../<name>/pause[?until=2h], .../resume
    GET /badge/<name>.svg (or .json)     a status badge; GET /metrics: Prometheus text format
    GET /healthz                         200 "OK", or 503 with what is wrong
    POST /api/v1/reload?key=K            re-read the config file, as SIGHUP does

With a secret_key, pages, API and metrics need it too (?key=, a Bearer header,
or the key as a basic-auth password); [config] public_dashboard = true opens
the read-only views, public_badges = false closes the badges.

An unknown name or a wrong key answers 404, a bad signal 400.  A 200 means
the signal is committed to SQLite.  All state (first seen, last success,
status, notices not yet delivered) lives in the database file, so a restart,
even ``kill -9``, resumes exactly where it stopped.  Failed notifications stay
in a durable outbox and are retried with backoff for at least a day.

Licence: MIT.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import decimal
import difflib
import email.message
import email.utils
import errno
import functools
import hashlib
import heapq
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import os
import re
import selectors
import signal
import smtplib
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zoneinfo
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows: no single-instance lock
    fcntl = None

try:
    import resource
except ImportError:  # Windows: the limit on open files cannot be raised
    resource = None

try:
    import tomllib
except ImportError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

__version__ = "1.0.0"
__all__ = [
    "CHANNELS",
    "CaduceusError",
    "Config",
    "CronSchedule",
    "Monitor",
    "Server",
    "Store",
    "load_config",
    "main",
    "parse_duration",
]

log = logging.getLogger("caduceus")

#: Check statuses, stored as text.  NEW: never checked in since it was first seen.
NEW, UP, DOWN, PAUSED = "new", "up", "down", "paused"
#: Statuses that are only shown, never stored (see alert_views): past the
#: deadline without grace but not with it; a run started and not ended.
GRACE, RUNNING = "grace", "running"

#: Kinds of notice; each has its own subject line (kept from 0.0.11: users filter on them).
NOTICE_DOWN, NOTICE_REMINDER, NOTICE_UP = "down", "reminder", "up"

#: Signals a job sends.  An exit status arrives as SUCCESS (0) or FAIL (1-255).
SUCCESS, START, FAIL, LOG = "success", "start", "fail", "log"

#: Why a check went down (an exit status and a run-time limit have their own texts).
REASON_MISSED, REASON_FAILED = "missed deadline", "reported failure"


###############################################################################
# Errors ######################################################################
###############################################################################


class CaduceusError(Exception):
    """Root of every error Caduceus raises on purpose."""


class ConfigError(CaduceusError):
    """The configuration cannot be used.  The message names file, key and problem."""


class NotifyError(CaduceusError):
    """A channel could not deliver a notice.

    ``permanent`` means retrying cannot help (the recipient or the token was
    refused); ``retry_after_s`` is the wait the remote side asked for, if any.
    """

    def __init__(self, message: str, permanent: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after_s = retry_after_s


class HTTPError(CaduceusError):
    """An answer other than success, raised by a page (bottle's ``HTTPError``).

    ``text`` is one short sentence for people, without a trailing newline:
    it is sent as plain text, or as ``{"error": text}`` under /api/.
    ``headers`` go with it (``Allow``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


###############################################################################
# Durations ###################################################################
###############################################################################

#: Seconds per unit, in the order 0.0.11 (pytimeparse 1.1.10) added them up.
_UNIT_SECONDS = {"weeks": 7 * 86400, "days": 86400, "hours": 3600, "mins": 60, "secs": 1}

#: How each unit may be written: pytimeparse 1.1.10's spellings, any case.
_UNIT_WORDS = {
    "weeks": "weeks?|wks?|w",
    "days": "days?|dys?|d",
    "hours": "hours?|hrs?|h",
    "mins": "minutes?|mins?|m",
    "secs": "seconds?|secs?|s",
}


def _unit_term(unit: str) -> str:
    """An optional ``"<number> <unit>"`` with an optional "," or "/" after it, as 0.0.11 read it."""
    return rf"(?:(?P<{unit}>[\d.]+)\s*(?:{_UNIT_WORDS[unit]})\s*(?:[,/]\s*)?)?"


_CLOCK_SECONDS = r"(?P<secs>\d{2}(?:\.\d+)?)"

#: The forms Caduceus 0.0.11 read (through pytimeparse 1.1.10), each matched
#: whole, after an optional sign.  ``[\d.]+`` is its number: one such as
#: "1.2.3" matches here and is then refused when it is converted.
_DURATION_FORMS = tuple(re.compile(rf"\s*{form}\s*", re.IGNORECASE) for form in (
    # "1w 3d 2h 32m 5s", "5 hours, 34 minutes", "1.5h": units in this order.
    rf"{_unit_term('weeks')}\s*{_unit_term('days')}\s*{_unit_term('hours')}\s*"
    rf"{_unit_term('mins')}\s*(?:(?P<secs>[\d.]+)\s*(?:{_UNIT_WORDS['secs']}))?",
    rf"(?P<mins>\d{{1,2}}):{_CLOCK_SECONDS}",  # "4:13", minutes and seconds
    # "4:13:02", "2 days, 4:13:02", "1w 1:00:00"
    rf"{_unit_term('weeks')}\s*{_unit_term('days')}\s*"
    rf"(?P<hours>\d+):(?P<mins>\d{{2}}):{_CLOCK_SECONDS}",
    # "2:04:13:02", "1-04:18:35"
    rf"(?P<days>\d+)[:-](?P<hours>\d{{2}}):(?P<mins>\d{{2}}):{_CLOCK_SECONDS}",
    rf":{_CLOCK_SECONDS}",  # ":13"
))

#: Forms 0.0.11 refused that Caduceus also reads, none of them ambiguous: a bare
#: number of seconds ("90"), and clocks with fields of any width ("1:2",
#: "123:45", "1:2:3", "2 days, 4:1:2", "1:2:3:4").
_EXTRA_DURATION_FORMS = tuple(re.compile(rf"\s*{form}\s*", re.IGNORECASE) for form in (
    r"(?P<secs>[\d.]+)",
    r"(?P<mins>\d+):(?P<secs>\d+(?:\.\d+)?)",
    rf"(?:(?P<days>\d+)\s*(?:{_UNIT_WORDS['days']})\s*,?\s*)?"
    r"(?P<hours>\d+):(?P<mins>\d+):(?P<secs>\d+(?:\.\d+)?)",
    r"(?P<days>\d+):(?P<hours>\d+):(?P<mins>\d+):(?P<secs>\d+(?:\.\d+)?)",
))

#: Also read: unit terms in any order, and "and" between them ("30m and 1h").
_ANY_ORDER_TERM = re.compile(
    r"\s*([\d.]+)\s*(?:%s)(?![^\W\d_])\s*(?:(?:[,/]|and\b)\s*)?"
    % "|".join(f"(?P<{unit}>{words})" for unit, words in _UNIT_WORDS.items()),
    re.IGNORECASE)

#: Longer durations are surely typos (and would overflow dates).
MAX_DURATION_S = 3650 * 86400.0

#: What a duration looks like, for error messages.
DURATION_HINT = 'a duration such as "90s", "1h30m", "2 days" or "1:30:00"'


# Cached: 10,000 alerts share a handful of durations ("1h"), so a config is read
# faster and its alerts share one float each.  A refused text raises, so is not kept.
@functools.lru_cache(maxsize=256)
def parse_duration(text: str) -> float:
    """Return the seconds in a duration, read as Caduceus 0.0.11 read it.

    0.0.11 used pytimeparse 1.1.10, and every duration it read gives the same
    seconds here: unit terms in the order weeks, days, hours, minutes, seconds
    (``"1h30m"``, ``"1.5h"``, ``"2 days, 4 hours"``, ``"1w 3d 2h 32m"``; units
    w/wk/week, d/dy/day, h/hr/hour, m/min/minute, s/sec/second and their
    plurals; "," or "/" between terms), clocks (``"4:13"`` is m:ss,
    ``"1:30:00"`` h:mm:ss, ``"2:04:13:02"`` and ``"1-04:18:35"`` d:hh:mm:ss,
    ``":13"`` seconds, ``"2 days, 4:13:02"``, ``"1w 1:00:00"``), each after an
    optional ``+``.  As there, fractional units with whole seconds drop the
    fraction of a second (``"1.33333h"`` is 4799 s).  Also read: a bare number
    of seconds (``"90"``), unit terms in any order or joined by "and", and
    clock fields of any width.  Raises ``ValueError`` for anything else and for
    durations that are not positive (a leading ``-``) or longer than 10 years.
    """
    seconds = _parse_duration(text)
    if seconds is None:
        raise ValueError(f"expected {DURATION_HINT}, got {json.dumps(text)}")
    if seconds <= 0:
        raise ValueError(f"expected a positive duration, got {json.dumps(text)}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"expected a duration of at most 10 years, got {json.dumps(text)}")
    return float(seconds)


def _parse_duration(text: str) -> int | float | None:
    """The signed seconds in ``text`` (an int when 0.0.11 gave one), or None."""
    signed = re.fullmatch(r"\s*([+-]?)(.*)", text, re.DOTALL)
    sign = -1 if signed.group(1) == "-" else 1
    body = signed.group(2)
    for form in _DURATION_FORMS + _EXTRA_DURATION_FORMS:
        found = form.fullmatch(body)
        if found and found.group().strip():
            seconds = _add_up(found.groupdict())
            if seconds is not None:
                return sign * seconds
    fields: dict[str, str] = {}
    position = 0
    while position < len(body):
        term = _ANY_ORDER_TERM.match(body, position)
        if not term or term.lastgroup in fields:
            return None
        fields[term.lastgroup] = term.group(1)
        position = term.end()
    seconds = _add_up({unit: fields.get(unit) for unit in _UNIT_SECONDS}) if fields else None
    return None if seconds is None else sign * seconds


def _add_up(fields: dict[str, str | None]) -> int | float | None:
    """Add up matched fields exactly as pytimeparse 1.1.10 did; None if a number is malformed.

    All whole numbers: an int.  Whole (or no) seconds: the other units summed
    in decimal and truncated to whole seconds, plus the seconds.  Fractional
    seconds: a float sum, in unit order.
    """
    present = [(unit, number) for unit, number in fields.items() if number is not None]
    try:
        if all(number.isdigit() for _, number in present):
            return sum(_UNIT_SECONDS[unit] * int(number, 10) for unit, number in present)
        secs = fields.get("secs")
        if secs is None or secs.isdigit():
            whole = int(sum(_UNIT_SECONDS[unit] * decimal.Decimal(number)
                            for unit, number in present if unit != "secs"))
            return whole + (int(secs, 10) if secs else 0)
        return sum(_UNIT_SECONDS[unit] * float(number) for unit, number in present)
    except (ValueError, decimal.InvalidOperation):
        return None


def format_duration(seconds: float, parts: int = 4) -> str:
    """Write seconds as ``"1d 2h 3m 4s"``, keeping the ``parts`` largest units.

    ``format_duration(5400) == "1h 30m"``; ``format_duration(93784, 2) == "1d 2h"``.
    Tenths of a second show only below ten seconds (``"0.5s"``).
    """
    if seconds < 10 and round(seconds, 1) != int(seconds):
        return f"{round(seconds, 1):g}s"
    remaining = int(round(seconds))
    words = []
    for suffix, unit in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, unit)
        if count and len(words) < parts:
            words.append(f"{count}{suffix}")
    return " ".join(words) or "0s"


def format_time(at: float) -> str:
    """Write epoch seconds as UTC ISO 8601 to the second: ``2026-11-24T03:00:00Z``."""
    moment = datetime.datetime.fromtimestamp(at, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


###############################################################################
# Cron schedules ##############################################################
###############################################################################

#: Per field: name for error messages, lowest and highest value, and the names
#: accepted in place of numbers (``names[i]`` stands for ``lowest + i``).
_CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun",
                      "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)

#: The @-aliases of Vixie cron.  @reboot is refused: it names no time to expect.
_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: Longest day in each month; February counts its leap day, which some year has.
_CRON_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

#: The Gregorian calendar, weekdays included, repeats every 146097 days (400
#: years), so a schedule that has not fired within that many days never will.
_CRON_SCAN_DAYS = 146097

_CRON_WEEKDAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday",
                       "Friday", "Saturday")
_CRON_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July",
                     "August", "September", "October", "November", "December")


@dataclasses.dataclass(frozen=True)
class CronSchedule:
    """A five-field cron schedule (Vixie cron syntax), evaluated in a time zone.

    Fields are minute, hour, day of month, month (``1-12`` or ``jan-dec``) and
    day of week (``0-7`` or ``sun-sat``; 0 and 7 are Sunday), each ``*``, a
    value, a range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (``a``-last/n),
    or a comma-separated list of those; ``@hourly``, ``@daily``/``@midnight``,
    ``@weekly``, ``@monthly`` and ``@yearly``/``@annually`` stand for their
    usual expansions.  As in Vixie cron, a day field is *restricted* unless it
    begins with ``*``: when both day fields are restricted a day matches if
    either matches (``0 0 13 * fri`` runs on the 13th and on every Friday);
    otherwise a day must match both (``0 0 */2 * mon`` runs on Mondays that fall
    on an odd day of the month).

    Daylight saving time, as Vixie cron, cronie and healthchecks.io's cronsim
    treat it.  A *wildcard* schedule, one whose minute or hour field begins
    with ``*`` (``*/15 * * * *``, ``45 * * * *``, ``0 */3 * * *``, ``@hourly``),
    follows the clock as it is: a time the clock skips when it springs forward
    does not fire at all (``45 * * * *`` in New York on 2026-03-08 fires at
    01:45 EST and next at 03:45 EDT), and a time the clock shows twice when it
    falls back fires both times, so the job keeps its real-time rhythm.  A
    *fixed-time* schedule, any other (``30 2 * * *``, ``0 0-23/3 * * *``),
    fires each matching wall-clock time once: a skipped time fires at the
    instant of the jump (02:30 in New York on 2026-03-08 fires at 03:00 EDT),
    skipped times in the same gap collapse into that one instant, and a
    repeated time fires at its first occurrence only.
    """

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  #: 0 is Sunday, 6 Saturday
    day_restricted: bool
    weekday_restricted: bool
    wildcard: bool = False  #: minute or hour field begins with "*": see DST above

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse ``expression``; raise ``ValueError`` naming the field and the fault.

        Also refuses schedules that can never fire, such as ``0 0 30 2 *``.
        """
        text = expression.strip()
        if text.startswith("@"):
            alias = text.lower()
            if alias == "@reboot":
                raise ValueError('"@reboot" is not supported: it names no time '
                                 "at which to expect a ping")
            if alias not in _CRON_ALIASES:
                raise ValueError(f'unknown cron alias "{text}"; expected one of '
                                 f"{', '.join(_CRON_ALIASES)}")
            text = _CRON_ALIASES[alias]
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(f'cron expression "{expression}": expected 5 fields '
                             "(minute hour day-of-month month day-of-week), "
                             f"got {len(fields)}")
        minutes, hours, days, months, weekdays = (
            _parse_cron_field(field, index) for index, field in enumerate(fields))
        day_restricted = not fields[2].startswith("*")
        weekday_restricted = not fields[4].startswith("*")
        # Only with the day-of-month alone deciding can the days miss every month:
        # a star day field always contains day 1, and any weekday occurs in any month.
        if day_restricted and not weekday_restricted and not any(
                day <= _CRON_MONTH_DAYS[month - 1] for day in days for month in months):
            raise ValueError(f'cron expression "{expression}" never fires: '
                             f'no month in "{fields[3]}" has day '
                             f"{_join([str(day) for day in sorted(days)], 'or')}")
        # cron's own test (MIN_STAR, HR_STAR): on the text, so "0-59 * * * *" is
        # wildcard and "0 0-23 * * *" is not, though both run every hour.
        wildcard = fields[0].startswith("*") or fields[1].startswith("*")
        return cls(expression, minutes, hours, days, months, weekdays,
                   day_restricted, weekday_restricted, wildcard)

    def next_after(self, at: float, tz: datetime.tzinfo) -> float:
        """Return the first scheduled instant strictly after epoch seconds ``at``.

        Fields are read as wall-clock time in ``tz`` (a ``zoneinfo.ZoneInfo`` or
        a fixed ``datetime.timezone``), with the daylight saving rules in the
        class docstring.  Raises ``ValueError`` if nothing matches within 400
        years, which ``parse`` rules out.
        """
        start_at = at
        if self.wildcard:
            # Inside the first run of a repeated hour the clock will show times
            # before its current one again, and a wildcard job runs then too.
            moment = datetime.datetime.fromtimestamp(at, tz)
            start_at -= (moment.utcoffset() - moment.replace(fold=1).utcoffset()).total_seconds()
        # Wall times up to start's own minute map to instants at or before `at`
        # (the first instant of a wall time never runs backwards), so skip them.
        best = None
        for wall in self._walls_after(datetime.datetime.fromtimestamp(start_at, tz)):
            instants = _wall_instants(wall) if self.wildcard else (_wall_to_epoch(wall),)
            for fire_at in instants:
                if fire_at > at and (best is None or fire_at < best):
                    best = fire_at
            # First instants rise with the wall time: no later wall time fires sooner.
            if best is not None and instants and instants[0] >= best:
                return best
        if best is not None:
            return best
        raise ValueError(f'cron expression "{self.expression}" never fires')

    def _walls_after(self, start: datetime.datetime) -> Iterator[datetime.datetime]:
        """Yield matching wall times after ``start``'s minute, in order, for 400 years."""
        first_ordinal = start.toordinal()
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        ordinal = first_ordinal
        while ordinal <= first_ordinal + _CRON_SCAN_DAYS:
            day = datetime.date.fromordinal(ordinal)
            if day.month not in self.months:
                ordinal = datetime.date(day.year + day.month // 12, day.month % 12 + 1,
                                        1).toordinal()
                continue
            done = (start.hour, start.minute) if ordinal == first_ordinal else (-1, -1)
            if self._day_matches(day):
                for hour in (hour for hour in hours if hour >= done[0]):
                    for minute in minutes:
                        if (hour, minute) > done:
                            yield datetime.datetime(day.year, day.month, day.day, hour,
                                                    minute, tzinfo=start.tzinfo)
            ordinal += 1

    def describe(self) -> str:
        """Return short English for the schedule, or ``"cron: <expression>"``.

        For example ``"at 03:00 every day"``, ``"every 15 minutes"`` or
        ``"at 09:30 on Monday-Friday"``.
        """
        every_hour = self.hours == frozenset(range(24))
        periodic = True
        if every_hour and self.minutes == frozenset(range(60)):
            when = "every minute"
        elif every_hour and _cron_step(self.minutes, 60):
            when = f"every {_cron_step(self.minutes, 60)} minutes"
        elif every_hour and len(self.minutes) == 1:
            when = f"every hour at :{min(self.minutes):02d}"
        elif self.minutes == {0} and _cron_step(self.hours, 24):
            when = f"every {_cron_step(self.hours, 24)} hours"
        elif len(self.hours) * len(self.minutes) <= 4:
            periodic = False
            when = "at " + _join([f"{hour:02d}:{minute:02d}" for hour in sorted(self.hours)
                                  for minute in sorted(self.minutes)])
        else:
            return f"cron: {self.expression}"

        in_months = ""
        of_months = "the month"
        if self.months != frozenset(range(1, 13)):
            of_months = _join(_cron_runs(sorted(self.months), 1, _CRON_MONTH_NAMES))
            in_months = f" in {of_months}"
        all_days = self.days == frozenset(range(1, 32))
        all_weekdays = self.weekdays == frozenset(range(7))
        # Monday first, as people list working days; cron counts from Sunday.
        weekday_words = _join(_cron_runs(sorted((wd - 1) % 7 for wd in self.weekdays),
                                         0, _CRON_WEEKDAY_NAMES[1:] + _CRON_WEEKDAY_NAMES[:1]))
        plural = "s" if len(self.days) > 1 else ""
        day_words = f"day{plural} {_join(_cron_runs(sorted(self.days), 1, None))}"
        either = self.day_restricted and self.weekday_restricted
        if (all_days and all_weekdays) or (either and (all_days or all_weekdays)):
            on = "" if periodic else " every day"
        elif either:
            on = f" on {day_words} of the month and on {weekday_words}"
        elif all_days:
            on = f" on {weekday_words}"
        elif all_weekdays:
            return f"{when} on {day_words} of {of_months}"
        else:
            return f"cron: {self.expression}"
        return f"{when}{on}{in_months}"

    def _day_matches(self, day: datetime.date) -> bool:
        day_ok = day.day in self.days
        weekday_ok = day.isoweekday() % 7 in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok


def _parse_cron_field(text: str, index: int) -> frozenset[int]:
    name, lowest, highest, names = _CRON_FIELDS[index]
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        problem = None
        if not part:
            problem = "empty list item"
        elif slash and not re.fullmatch(r"[0-9]+", step_text):
            problem = f'step "{step_text}" is not a whole number'
        elif slash and int(step_text) == 0:
            problem = "step must be at least 1"
        elif base.count("-") > 1:
            problem = f'"{base}" has more than one "-"'
        if problem:
            raise ValueError(f'{name} field "{text}": {problem}')
        step = int(step_text) if slash else 1
        if base == "*":
            first, last = lowest, highest
        else:
            first_text, dash, last_text = base.partition("-")
            first = _parse_cron_value(first_text, text, index)
            # "5/10" means "5-59/10" (Vixie cron itself rejects "a/n" without a range).
            last = highest if slash else first
            if dash:
                last = _parse_cron_value(last_text, text, index)
                if first > last:
                    hint = ", and Sunday is also 7" if index == 4 else ""
                    raise ValueError(f'{name} field "{text}": range {base} is reversed '
                                     f"(write the smaller value first{hint})")
        values.update(range(first, last + 1, step))
    if 7 in values and index == 4:
        values.discard(7)
        values.add(0)
    return frozenset(values)


def _parse_cron_value(text: str, field_text: str, index: int) -> int:
    name, lowest, highest, names = _CRON_FIELDS[index]
    if re.fullmatch(r"[0-9]+", text):
        value = int(text)
    elif text.lower() in names:
        value = lowest + names.index(text.lower())
    elif not text:
        raise ValueError(f'{name} field "{field_text}": a value is missing')
    else:
        noun = "month" if index == 3 else "day"
        expected = f"a number or a {noun} name ({names[0]}-{names[-1]})" if names else "a number"
        raise ValueError(f'{name} field "{field_text}": "{text}" is not {expected}')
    if not lowest <= value <= highest:
        raise ValueError(f'{name} field "{field_text}": {value} is out of range '
                         f"{lowest}-{highest}")
    return value


def _wall_instants(wall: datetime.datetime) -> tuple[float, ...]:
    """Every instant at which the clock in ``wall.tzinfo`` shows ``wall``, in order:
    none for a time it skips, two for a time it repeats (the wildcard rule)."""
    first = wall.replace(fold=0)
    second = wall.replace(fold=1)
    if first.utcoffset() == second.utcoffset():
        return (first.timestamp(),)
    if first.utcoffset() > second.utcoffset():
        return (first.timestamp(), second.timestamp())
    return ()


def _wall_to_epoch(wall: datetime.datetime) -> float:
    """Return when the clock in ``wall.tzinfo`` shows ``wall``, by the fixed-time DST rule."""
    first = wall.replace(fold=0)
    second = wall.replace(fold=1)
    if first.utcoffset() >= second.utcoffset():
        # Equal offsets: an ordinary time.  Larger under fold=0: a repeated
        # time (PEP 495), and fold=0 is its first occurrence.
        return first.timestamp()
    # A skipped time.  PEP 495 reads it with the offset from before the jump
    # under fold=0 (an instant after the jump) and from after it under fold=1
    # (an instant before it); bisect between them for the jump, to the second.
    before, after = second.timestamp(), first.timestamp()
    offset_before = datetime.datetime.fromtimestamp(before, wall.tzinfo).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.datetime.fromtimestamp(middle, wall.tzinfo).utcoffset() == offset_before:
            before = middle
        else:
            after = middle
    return after


def _cron_step(values: frozenset[int], period: int) -> int | None:
    """Return n if ``values`` is exactly every n-th of 0..period-1, n dividing period."""
    for step in range(2, period // 2 + 1):
        if period % step == 0 and values == frozenset(range(0, period, step)):
            return step
    return None


def _cron_runs(positions: list[int], offset: int, labels: tuple[str, ...] | None) -> list[str]:
    """Label sorted positions, writing three or more in a row as ``first-last``."""
    def label(position: int) -> str:
        return labels[position - offset] if labels else str(position)

    runs: list[list[int]] = []
    for position in positions:
        if runs and position == runs[-1][-1] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    words: list[str] = []
    for run in runs:
        if len(run) >= 3:
            words.append(f"{label(run[0])}-{label(run[-1])}")
        else:
            words.extend(label(position) for position in run)
    return words


def _join(words: list[str], conjunction: str = "and") -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


###############################################################################
# Reading settings ############################################################
###############################################################################


_REQUIRED = object()

#: Values of [alerting.email] encryption: plain SMTP, TLS from the start, or STARTTLS.
ENCRYPTIONS = ("none", "ssl", "starttls")


class _Table:
    """One TOML table being read: every error names the file and the key path.

    ``take()`` each known key; ``finish()`` then rejects whatever is left,
    suggesting the closest known key (``evry`` -> ``every``).
    """

    def __init__(self, file: str, where: str, data: Any) -> None:
        self.file = file
        self.where = where
        if not isinstance(data, dict):
            raise self.error(where, "a table", data)
        self.data = data
        self.known: list[str] = []

    def error(self, key_path: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.file}: {key_path}: expected {expected}, got {_show(got)}")

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def take(self, key: str, expected: str, check: Callable[[Any], Any], default: Any = _REQUIRED) -> Any:
        """Return ``check(value)``; ``check`` raises ValueError/TypeError to reject it."""
        self.known.append(key)
        if key not in self.data:
            if default is _REQUIRED:
                typo = difflib.get_close_matches(key, list(self.data), n=1)
                hint = f'; found "{typo[0]}": did you mean "{key}"?' if typo else ""
                raise ConfigError(f"{self.file}: {self.path(key)}: missing; expected {expected}{hint}")
            return default
        value = self.data[key]
        try:
            return check(value)
        except (TypeError, ValueError) as exc:
            detail = str(exc)
            if detail.startswith("expected "):
                raise ConfigError(f"{self.file}: {self.path(key)}: {detail}") from None
            raise self.error(self.path(key), expected, value) from None

    def finish(self, extra_known: tuple[str, ...] = ()) -> None:
        known = self.known + list(extra_known)
        members = set(known)  # a set: [alerts] passes every alert's name (a list made this quadratic)
        for key in self.data:
            if key not in members:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f'; did you mean "{close[0]}"?' if close else f"; known keys: {', '.join(known)}"
                raise ConfigError(f"{self.file}: {self.path(key)}: unknown key{hint}")


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _table(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError
    return value


def _encryption(value: Any) -> str:
    choice = _string(value).strip().lower()
    if choice not in ENCRYPTIONS:
        raise ValueError
    return choice


def _port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError
    return value


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise TypeError
    return parse_duration(value)


#: Characters that cannot go into an email header (nor into a log line).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _address(value: Any) -> str:
    """An email address, plain or with a display name; it must contain an @."""
    if not isinstance(value, str):
        raise TypeError
    if _CONTROL_CHARACTERS.search(value):
        # A line break here would fail every email, or add a header to it.
        raise ValueError(f"expected an email address without line breaks or control characters, "
                         f"got {_show(value)}")
    addr = email.utils.parseaddr(value)[1]
    local, at, domain = addr.rpartition("@")
    if not (local and at and domain) or any(c.isspace() for c in addr):
        raise ValueError
    return value


def _address_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError
    for item in value:
        try:
            _address(item)
        except (TypeError, ValueError) as exc:
            detail = str(exc)  # keep _address's own "expected ..." when it has one
            if not detail.startswith("expected "):
                detail = f"expected email addresses containing @, got {_show(item)}"
            raise ValueError(detail) from None
    return tuple(value)


def _channel_list(value: Any) -> tuple[str, ...]:
    """Channel instance names, in lower case; whether they are configured is
    checked with the alert (see _check_channels)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError
    # Listed twice means the same as once; dict keeps the order.
    return tuple(dict.fromkeys(item.strip().lower() for item in value))


def _chat_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise TypeError
    return str(value).strip()


def _http_url(value: Any) -> str:
    if not isinstance(value, str) or urllib.parse.urlsplit(value).scheme not in ("http", "https"):
        raise ValueError
    return value.rstrip("/")


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of addresses and CIDR blocks: ``["127.0.0.1", "10.0.0.0/8", "::1"]``."""
    if not isinstance(value, list):
        raise TypeError
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item).strip(), strict=False))
        except (TypeError, ValueError):
            raise ValueError(f'expected IP addresses or CIDR blocks such as "10.0.0.0/8", '
                             f"got {_show(item)}") from None
    return tuple(networks)


def _http_url_as_is(value: Any) -> str:
    """An http(s) URL kept exactly as written (a webhook's path may end in /)."""
    parts = urllib.parse.urlsplit(_string(value))
    if parts.scheme not in ("http", "https") or not parts.hostname or _CONTROL_CHARACTERS.search(value) \
            or " " in value:
        raise ValueError
    return value


def _secret(value: Any) -> str:
    """A token or key: a non-empty string without spaces or control characters
    (it goes into a header or a URL); the message never shows it."""
    if not isinstance(value, str) or not value or _CONTROL_CHARACTERS.search(value) or " " in value:
        raise ValueError("expected a token: text without spaces or control characters (not shown here)")
    return value


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError
    return seconds


def _argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value) \
            or not value[0] or any("\0" in item for item in value):
        raise ValueError
    return tuple(value)


#: An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    """A table of HTTP headers: names are tokens, values single-line Latin-1 text."""
    for name, text in _table(value).items():
        if not _HEADER_NAME.fullmatch(name) or not isinstance(text, str) or _CONTROL_CHARACTERS.search(text):
            raise ValueError(f"expected header names and single-line text values, got {json.dumps(name)}")
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"expected header values in Latin-1, got non-Latin-1 text in "
                             f"{json.dumps(name)}") from None
    return tuple(value.items())


#: The methods a webhook may use.
HTTP_METHODS = ("POST", "PUT", "PATCH", "GET", "DELETE")


def _http_method(value: Any) -> str:
    method = _string(value).strip().upper()
    if method not in HTTP_METHODS:
        raise ValueError
    return method


def _room_id(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"![^\s:]+:\S+", value):
        raise ValueError
    return value


def _setting(expected: str, check: Callable[[Any], Any], default: Any = dataclasses.MISSING,
             key: str = "", secret: bool = False) -> Any:
    """A field of a config dataclass that is read from its TOML table: ``check``
    turns the value into the field's (raising ValueError or TypeError to refuse
    it, see _Table.take), ``expected`` says what it must be, and ``key`` is the
    TOML key when it is not the field's name.  Without a default the key is
    required; a ``secret`` is left out of the dataclass's repr."""
    return dataclasses.field(default=default, repr=not secret,
                             metadata={"expected": expected, "check": check, "key": key or None})


def _read_conf(table: _Table, conf_type: type) -> Any:
    """Build ``conf_type`` from ``table``: every field made with _setting is taken
    (fields without one keep their defaults: they are not settings).  A
    ``__post_init__`` that raises ``ValueError(key, problem)`` refuses a
    combination of settings.  The caller calls ``table.finish()``."""
    values = {}
    for field in dataclasses.fields(conf_type):
        if "check" in field.metadata:
            default = _REQUIRED if field.default is dataclasses.MISSING else field.default
            values[field.name] = table.take(field.metadata["key"] or field.name, field.metadata["expected"],
                                            field.metadata["check"], default)
    try:
        return conf_type(**values)
    except ValueError as exc:
        key, problem = exc.args
        raise ConfigError(f"{table.file}: {table.path(key)}: {problem}") from None


###############################################################################
# Notices #####################################################################
###############################################################################


#: What a notice tells: an alert went down, is still down (a reminder), is back, or a test.
FAILING, STILL_FAILING, RECOVERED, TEST = "failing", "still failing", "recovered", "test"
#: The outbox's kind of each event (the kinds of 0.0.11's subjects; a reminder replaces an older one).
EVENT_KINDS = {FAILING: NOTICE_DOWN, STILL_FAILING: NOTICE_REMINDER, RECOVERED: NOTICE_UP, TEST: "test"}


@dataclasses.dataclass(frozen=True)
class Notice:
    """The facts of one notice about one alert, decided when it is queued (and
    kept in the outbox as JSON), so every attempt sends the same thing; each
    channel renders them its own way when it sends.

    Times are epoch seconds, None when unknown.  ``since`` is when the alert
    went down (a recovery keeps it); ``due_at`` is the deadline a failure
    notice reports missing (None when the job reported its failure itself);
    ``status`` is the alert's (down, up), or "test" in a test notice.
    ``incident`` is the same for every notice about one failure, and differs
    between failures.  ``text`` is the finished subject and body of a notice
    queued by an older Caduceus, which kept only those.
    """

    alert: str
    event: str
    at: float
    status: str = DOWN
    reason: str = ""
    since: float | None = None
    watched_since: float | None = None
    last_checkin: float | None = None
    due_at: float | None = None
    schedule: str = ""
    interval_s: float | None = None
    timezone: str = "UTC"
    notify_every_s: float | None = None
    last_duration_s: float | None = None
    last_exit_status: int | None = None
    body_tail: str = ""
    url: str = ""
    checkin_url: str = ""
    recipients: tuple[str, ...] = ()
    incident: str = ""
    text: tuple[str, str] | None = None
    #: When Caduceus itself was not running, if the deadline passed then (see Monitor.downtime).
    monitor_down_from: float | None = None
    monitor_down_to: float | None = None

    @property
    def overdue_s(self) -> float | None:
        """How late the job was when the notice was made, for a missed deadline."""
        return None if self.due_at is None else max(self.at - self.due_at, 0.0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Notice:
        """The notice ``to_json`` wrote; fields it does not know are ignored."""
        data = json.loads(text)
        names = {field.name for field in dataclasses.fields(cls)}
        data = {key: value for key, value in data.items() if key in names}
        data["recipients"] = tuple(data.get("recipients") or ())
        data["text"] = tuple(data["text"]) if data.get("text") else None
        return cls(**data)


def render_text(notice: Notice) -> tuple[str, str]:
    """The subject and plain-text body of a notice, for email, console and chats.

    The subjects are those of Caduceus 0.0.11, to the character: users filter on them.
    """
    if notice.text is not None:
        return notice.text
    subject, lines = _text_lines(notice)
    return subject, "Hello,\n\n" + "\n".join(lines) + "\n\nThanks,\nCaduceus\n"


def _text_lines(notice: Notice) -> tuple[str, list[str]]:
    """The subject and the lines that say what happened (render_text's body without its greeting)."""
    if notice.text is not None:
        return notice.text[0], notice.text[1].strip().splitlines()
    name, at = notice.alert, notice.at
    lines = []
    if notice.event == TEST:
        subject = f"Caduceus: Test notice for alert \"{name}\"."
        lines += [f"This is a test of the channels of your alert \"{name}\"; nothing has happened to it.",
                  "If you read this, the channel works.", "",
                  f"Schedule:      {notice.schedule}"]
    elif notice.event == RECOVERED:
        down_at = notice.since if notice.since is not None else at
        subject = f"Caduceus: Alert {name} is reporting again."
        lines += [f"Your alert \"{name}\" is reporting again. All is well.", "",
                  f"Checked in:    {format_time(at)}",
                  f"Was down for:  {format_duration(max(at - down_at, 0), 2)} (since {format_time(down_at)}, "
                  f"{notice.reason})"]
    else:
        still = "still " if notice.event == STILL_FAILING else ""
        subject = f"Caduceus: Alert \"{name}\" is {still}failing."
        lines += [f"Your alert \"{name}\" is {still}failing: {notice.reason}.", ""]
        if notice.monitor_down_from is not None and notice.monitor_down_to is not None:
            lines += [f"Caduceus itself was not running from {format_time(notice.monitor_down_from)} to "
                      f"{format_time(notice.monitor_down_to)}, when this deadline passed: check-ins sent "
                      "then were not received, so the job may have run.", ""]
        lines += [f"Schedule:      {notice.schedule}",
                  f"Last success:  {_last_success(notice)}"]
        if notice.due_at is not None:
            lines.append(f"Overdue by:    {format_duration(notice.overdue_s, 2)} "
                         f"(due at {format_time(notice.due_at)})")
        elif notice.event == STILL_FAILING and notice.since is not None:
            lines.append(f"Down for:      {format_duration(max(at - notice.since, 0), 2)} "
                         f"(since {format_time(notice.since)})")
    if notice.last_duration_s is not None:
        lines.append(f"Last run took: {format_duration(notice.last_duration_s, 2)}")
    if notice.body_tail:
        lines += ["", "Last output:"] + [f"| {line}" for line in notice.body_tail.split("\n")]
    if notice.url:
        lines += ["", f"Alert page:    {notice.url}"]
    if notice.checkin_url:
        lines += [f"Check-in URL:  {notice.checkin_url}"]
    if notice.event in (FAILING, STILL_FAILING) and notice.notify_every_s is not None:
        lines += ["", f"You will be reminded every {format_duration(notice.notify_every_s)} while it "
                      "stays down, and told when it reports again."]
    return subject, lines


def _last_success(notice: Notice) -> str:
    if notice.last_checkin is not None:
        ago = format_duration(max(notice.at - notice.last_checkin, 0), 2)
        return f"{format_time(notice.last_checkin)} ({ago} ago)"
    if notice.watched_since is None:
        return "never"
    return (f"never (watched since {format_time(notice.watched_since)}, "
            f"{format_duration(max(notice.at - notice.watched_since, 0), 2)} ago)")


#: The fields of a notice that a webhook template (``{name}``) or a command
#: (``CADUCEUS_NAME``, and its JSON input) sees, all text, "" when unknown.
NOTICE_FIELDS = ("name", "event", "status", "reason", "subject", "message", "at", "since", "last_checkin",
                 "due_at", "overdue", "schedule", "interval", "timezone", "last_duration", "exit_status",
                 "body_tail", "url", "checkin_url")


def notice_fields(notice: Notice) -> dict[str, str]:
    """The notice as NOTICE_FIELDS: times in UTC ISO 8601 (``2026-11-24T03:00:00Z``),
    durations in words (``1h 30m``); ``subject`` and ``message`` are what
    email would say, without the greeting."""
    subject, lines = _text_lines(notice)

    def when(at: float | None) -> str:
        return format_time(at) if at is not None else ""

    def took(seconds: float | None) -> str:
        return format_duration(seconds, 2) if seconds is not None else ""

    return {
        "name": notice.alert, "event": notice.event, "status": notice.status, "reason": notice.reason,
        "subject": subject, "message": "\n".join(lines),
        "at": when(notice.at), "since": when(notice.since), "last_checkin": when(notice.last_checkin),
        "due_at": when(notice.due_at), "overdue": took(notice.overdue_s), "schedule": notice.schedule,
        "interval": format_duration(notice.interval_s) if notice.interval_s else "",
        "timezone": notice.timezone, "last_duration": took(notice.last_duration_s),
        "exit_status": "" if notice.last_exit_status is None else str(notice.last_exit_status),
        "body_tail": notice.body_tail, "url": notice.url, "checkin_url": notice.checkin_url,
    }


#: A field in a template: ``{name}``.  Other braces (a JSON body's) are left as they are.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, fields: Mapping[str, str], escape: Callable[[str], str]) -> str:
    """``template`` with each ``{field}`` replaced by ``escape(value)``: escaped for
    where it lands, so no value can change the shape of what it lands in."""
    return _PLACEHOLDER.sub(lambda match: escape(fields[match.group(1)]) if match.group(1) in fields
                            else match.group(0), template)


def _json_text(value: str) -> str:
    """A value inside a JSON string: quotes, backslashes, control characters and
    non-ASCII escaped."""
    return json.dumps(value)[1:-1]


def _url_part(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _template(value: Any) -> str:
    """A template: text whose ``{field}``s are NOTICE_FIELDS."""
    text = _string(value)
    for field in _PLACEHOLDER.findall(text):
        if field not in NOTICE_FIELDS:
            close = difflib.get_close_matches(field, NOTICE_FIELDS, n=1)
            hint = f' (did you mean "{{{close[0]}}}"?)' if close else ""
            raise ValueError(f"expected a template over the fields {', '.join(NOTICE_FIELDS)}; "
                             f"got {json.dumps('{' + field + '}')}{hint}")
    return text


###############################################################################
# Transports ##################################################################
###############################################################################


#: The longest wait a channel may ask for before the next attempt (Telegram once asked for 1e9 s).
RETRY_AFTER_MAX_S = 3600.0

def _retry_wait_s(value: object) -> float | None:
    """The wait a remote side asked for, made safe: at most RETRY_AFTER_MAX_S, and
    None for anything but a finite number >= 0 (NaN, infinity, a bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not 0 <= value < math.inf:  # False for NaN too
        return None
    return float(min(value, RETRY_AFTER_MAX_S))


#: The most of an HTTP answer read: a channel needs its status and a short reason.
HTTP_MAX_ANSWER_BYTES = 1 << 20


class _Deadline:
    """One time limit for a whole network attempt.  Socket timeouts count per
    read, so a server that drips a byte at a time would never trip them: every
    socket operation is given only the time that is left."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises ``socket.timeout`` (an OSError) when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return left


class _DeadlineReader(io.RawIOBase):
    """A socket's input, each read waiting only for what is left of the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        """What smtplib and http.client.HTTPResponse read through (as socket.makefile)."""
        return io.BufferedReader(self)


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    """Open a TCP connection within the deadline, trying each address in turn
    (socket.create_connection would give every address the whole timeout)."""
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(address)
            sock.settimeout(deadline.remaining())  # a TLS handshake comes next
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _MaybeDelivered(smtplib.SMTPException):
    """The server took the whole message but did not say whether it accepted it."""


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP held to one deadline for the whole conversation, speaking TLS
    from the start when given ``tls``.  Only the reply to the message itself
    gets ``data_reply_s`` of its own: a server may take 10 minutes to accept a
    message (RFC 5321 4.5.3.2.6), and giving up sooner sends it twice."""

    def __init__(self, host: str, port: int, deadline: _Deadline, data_reply_s: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self._deadline = deadline
        self._data_reply_s = data_reply_s
        self._tls = tls
        self._data_replies: int | None = None
        super().__init__(host, port)

    def _get_socket(self, host: str, port: int, timeout: object) -> socket.socket:
        sock = _connect(host, port, self._deadline)
        if self._tls is None:
            return sock
        try:
            return self._tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise

    def send(self, s: bytes | str) -> None:
        if self.sock is not None:
            try:
                self.sock.settimeout(self._deadline.remaining())
            except OSError as exc:  # as smtplib reports a failed send
                self.close()
                raise smtplib.SMTPServerDisconnected(str(exc)) from None
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _DeadlineReader(self.sock, self._deadline).makefile("rb")
        if self._data_replies is not None:
            self._data_replies += 1
            if self._data_replies == 2:  # the reply to the message, not to DATA
                self._deadline.at = time.monotonic() + self._data_reply_s
        return super().getreply()

    def data(self, msg: bytes | str) -> tuple[int, bytes]:
        self._data_replies = 0
        at = self._deadline.at
        try:
            return super().data(msg)
        except smtplib.SMTPServerDisconnected as exc:
            if self._data_replies < 2:
                raise
            raise _MaybeDelivered(f"no reply after the message was sent ({exc})") from None
        finally:
            self._data_replies = None
            self._deadline.at = at


def _proxy_for(scheme: str, host: str) -> tuple[str, int, str] | None:
    """The proxy the environment names for a URL (``http_proxy``, ``https_proxy``
    and ``no_proxy``, read as urllib reads them): ``(host, port,
    Proxy-Authorization or "")``, or None to go direct.  Only http:// proxies
    are spoken to; an https URL goes through them in a CONNECT tunnel."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        # The proxy URL may hold a password: say which variable, not what it says.
        raise OSError(f"{scheme}_proxy is not an http:// proxy URL")
    auth = ""
    if parts.username is not None:
        user_password = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(user_password.encode()).decode("ascii")
    return parts.hostname, parts.port or 80, auth


def _tunnel(sock: socket.socket, host: str, port: int, auth: str, deadline: _Deadline) -> None:
    """Ask the proxy at the other end of ``sock`` for a tunnel to ``host:port``
    (CONNECT); raises OSError unless it answers 2xx.  The answer is read a byte
    at a time so that nothing of the tunnelled stream is read with it."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if auth:
        request += f"Proxy-Authorization: {auth}\r\n"
    sock.settimeout(deadline.remaining())
    sock.sendall((request + "\r\n").encode("ascii"))
    answer = b""
    while not answer.endswith(b"\r\n\r\n"):
        if len(answer) > 65536:
            raise OSError("the proxy's answer to CONNECT is too long")
        sock.settimeout(deadline.remaining())
        byte = sock.recv(1)
        if not byte:
            raise OSError("the proxy closed the connection instead of opening a tunnel")
        answer += byte
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    words = status_line.split(None, 2)
    if len(words) < 2 or not words[1].startswith("2"):
        raise OSError(f"the proxy refused the tunnel: {_CONTROL_CHARACTERS.sub(' ', status_line)[:200]}")


def _http_request(method: str, url: str, body: bytes | None, headers: Mapping[str, str],
                  timeout_s: float) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Make one HTTP(S) request and read the answer, all within ``timeout_s``.

    Returns ``(status, headers, body)`` whatever the status, with at most
    HTTP_MAX_ANSWER_BYTES of the body.  Certificates are verified and
    redirects are not followed.  The proxy of ``http_proxy``/``https_proxy``
    is used unless ``no_proxy`` names the host (see _proxy_for).  Raises
    OSError (``socket.timeout`` when time is up), ``http.client.HTTPException``,
    or ValueError for a URL that is not http(s); the messages of the latter
    two may quote the URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    deadline = _Deadline(timeout_s)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    authority = parts.netloc.rpartition("@")[2]
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    headers = {"Host": authority, **headers}
    proxy = _proxy_for(parts.scheme, parts.hostname)
    connection = http.client.HTTPConnection(parts.hostname, port)
    with contextlib.closing(connection):
        if proxy is None:
            connection.sock = sock = _connect(parts.hostname, port, deadline)
        else:
            proxy_host, proxy_port, proxy_auth = proxy
            connection.sock = sock = _connect(proxy_host, proxy_port, deadline)
            if parts.scheme == "https":
                _tunnel(sock, parts.hostname, port, proxy_auth, deadline)
            else:  # a plain request goes to the proxy whole: the absolute URL as its target
                target = urllib.parse.urlunsplit(("http", authority, parts.path or "/", parts.query, ""))
                if proxy_auth:
                    headers["Proxy-Authorization"] = proxy_auth
        if parts.scheme == "https":
            tls = ssl.create_default_context()
            connection.sock = sock = tls.wrap_socket(sock, server_hostname=parts.hostname)
        sock.settimeout(deadline.remaining())
        connection.request(method, target, body, headers)
        with http.client.HTTPResponse(_DeadlineReader(sock, deadline), method=method) as response:
            response.begin()
            return response.status, response.headers, response.read(HTTP_MAX_ANSWER_BYTES)


def _http_send(service: str, method: str, url: str, body: bytes | None, headers: Mapping[str, str],
               timeout_s: float, secrets: Collection[str] = ()) -> bytes:
    """One attempt of an HTTP channel: the answer's body when the status is 2xx.

    Otherwise raises NotifyError: a 429 with the wait the service asked for
    (its Retry-After header, or ``retry_after`` seconds or ``retry_after_ms``
    in a JSON answer; see _retry_wait_s), a 5xx or a network error to be
    retried, any other status as permanent.  The message names the service,
    the server (scheme, host and port: never the rest of the URL, which may
    hold a token), the status and the start of the answer, with ``secrets``
    (and any long part of the URL's path or query) blanked out of it.
    """
    parts = urllib.parse.urlsplit(url)
    where = f"{service} at {parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    # A webhook's URL is its secret: an answer quoting a long part of it is blanked there.
    url_words = re.split(r"[/?&=;]", f"{parts.path}?{parts.query}")
    secrets = [*secrets, *(word for word in url_words if len(word) >= 8)]
    try:
        status, answer_headers, answer = _http_request(
            method, url, body, {"User-Agent": f"caduceus/{__version__}", **headers}, timeout_s)
    except OSError as exc:  # socket and TLS errors never quote the URL
        raise NotifyError(f"{where}: {_redact(str(exc) or type(exc).__name__, secrets)}") from None
    except (http.client.HTTPException, ValueError) as exc:
        # Only the type: these messages may quote the URL or a header, and so a token.
        raise NotifyError(f"{where}: {type(exc).__name__}") from None
    if 200 <= status < 300:
        return answer
    message = f"{where} answered {status} {http.client.responses.get(status, '')}".rstrip()
    start = _redact(_CONTROL_CHARACTERS.sub(" ", answer[:400].decode("utf-8", "replace")).strip(), secrets)
    if start:
        message += f": {start[:200]}"
    if status == 429:
        raise NotifyError(message, retry_after_s=_retry_wait_s(_retry_after(answer_headers, answer)))
    raise NotifyError(message, permanent=not 500 <= status < 600)


def _redact(text: str, secrets: Collection[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:  # blanking a shorter one would blank common words, and hide little
            text = text.replace(secret, "***").replace(urllib.parse.quote(secret, safe=""), "***")
    return text


def _retry_after(headers: http.client.HTTPMessage, answer: bytes) -> object:
    """The wait a 429 answer asks for, in seconds, unchecked (None if it names none)."""
    value = headers.get("Retry-After")
    if value is not None:
        try:
            return float(value.strip())
        except ValueError:
            return None  # an HTTP date: the backoff will do
    data = _json_object(answer)
    if "retry_after_ms" in data:  # Matrix
        wait = data["retry_after_ms"]
        return wait / 1000 if isinstance(wait, (int, float)) and not isinstance(wait, bool) else None
    return data.get("retry_after")  # Discord, in seconds


def _json_object(answer: bytes) -> dict:
    """An answer's JSON object, or {} when it is anything else."""
    try:
        data = json.loads(answer or b"{}")
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _header_text(value: str) -> str:
    """Text for an HTTP header: as it is when printable ASCII, else an RFC 2047
    encoded word (UTF-8, base64), so no character can break the request."""
    if re.fullmatch(r"[\x20-\x7e]*", value):
        return value
    return f"=?UTF-8?B?{base64.b64encode(value.encode()).decode('ascii')}?="


###############################################################################
# Channels: console, email, Telegram, commands ################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Channel:
    """A kind of channel: its settings, a frozen dataclass whose _setting fields
    are read from ``[alerting.KIND]`` (and ``[alerting.KIND.NAME]``), and
    ``send(conf, notice)``.  ``send`` returns None once the notice is handed
    over and raises NotifyError (never anything else it can foresee) when it
    is not, with ``permanent`` when retrying cannot help and ``retry_after_s``
    when the other side asked for a wait; it never logs, raises or returns a
    secret, and holds one deadline for the whole attempt."""

    conf_type: type
    send: Callable[[Any, Notice], None]


@dataclasses.dataclass(frozen=True)
class ConsoleConf:
    """``[alerting.console]``: standard output, with nothing to set."""


def send_console(conf: ConsoleConf, notice: Notice) -> None:
    """Print the notice on standard output."""
    try:
        print("\n".join(render_text(notice)), flush=True)
    except OSError as exc:
        raise NotifyError(f"cannot write to standard output: {exc}") from None


@dataclasses.dataclass(frozen=True)
class EmailConf:
    """``[alerting.email]``: the SMTP server and the default recipients."""

    from_addr: str = _setting("an email address", _address)
    recipient_emails: tuple[str, ...] = _setting("a list of email addresses", _address_list, ())
    hostname: str = _setting("a host name", _string, "localhost")
    port: int = _setting("a port number (1-65535)", _port, 25)
    username: str = _setting("a string", _string, "")
    password: str = _setting("a string", _string, "", secret=True)
    encryption: str = _setting('one of "none", "ssl", "starttls"', _encryption, "none")
    timeout_s: float = 30.0  #: for the whole attempt, connect to QUIT, except:
    data_reply_timeout_s: float = 600.0  #: the reply to the message itself (RFC 5321 4.5.3.2.6)


def send_email(conf: EmailConf, notice: Notice) -> None:
    """Mail the notice through ``[alerting.email]``, one SMTP connection per message.

    Recipients are the notice's (the alert's ``recipient_emails``), else the
    channel's, and the ``To`` header says the same.  Certificates are verified for ssl and
    starttls.  The attempt, from connecting to QUIT, must end within
    ``timeout_s``; only the server's reply to the message itself is given
    ``data_reply_timeout_s`` (10 minutes, as RFC 5321 asks), and an attempt
    that times out there is retried with a note that it may have been delivered.
    """
    recipients = notice.recipients or conf.recipient_emails
    if not recipients:
        raise NotifyError("no email recipients", permanent=True)
    message = email.message.EmailMessage()
    subject, body = render_text(notice)
    message["Subject"] = subject
    message["From"] = conf.from_addr
    message["To"] = ", ".join(recipients)
    message["Date"] = email.utils.formatdate(usegmt=True)
    sender = email.utils.parseaddr(conf.from_addr)[1]
    message["Message-ID"] = email.utils.make_msgid("caduceus", domain=sender.rpartition("@")[2])
    message.set_content(body)
    context = ssl.create_default_context()
    try:
        smtp = _SMTP(conf.hostname, conf.port, _Deadline(conf.timeout_s), conf.data_reply_timeout_s,
                     tls=context if conf.encryption == "ssl" else None)
        with contextlib.closing(smtp):
            if conf.encryption == "starttls":
                smtp.starttls(context=context)
            if conf.username:
                smtp.login(conf.username, conf.password)
            refused = smtp.send_message(message, from_addr=sender, to_addrs=list(recipients))
            # Accepted: a failed goodbye must not turn it into a failure, and a second copy.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
    except _MaybeDelivered as exc:
        raise NotifyError(f"SMTP {conf.hostname}:{conf.port}: {exc}; it may have been delivered") from None
    except smtplib.SMTPRecipientsRefused as exc:
        permanent = all(code >= 500 for code, _ in exc.recipients.values())
        raise NotifyError(f"all recipients refused: {_smtp_refusals(exc.recipients)}",
                          permanent=permanent) from None
    except smtplib.SMTPAuthenticationError as exc:
        raise NotifyError(f"SMTP login refused: {exc.smtp_code} {_smtp_text(exc.smtp_error)}",
                          permanent=exc.smtp_code >= 500) from None
    except smtplib.SMTPResponseException as exc:
        raise NotifyError(f"SMTP server said {exc.smtp_code} {_smtp_text(exc.smtp_error)}",
                          permanent=exc.smtp_code >= 500) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise NotifyError(f"SMTP {conf.hostname}:{conf.port}: {exc or type(exc).__name__}") from None
    except ValueError as exc:  # e.g. a password smtplib cannot encode
        raise NotifyError(f"SMTP {conf.hostname}:{conf.port}: {type(exc).__name__}: {exc}",
                          permanent=True) from None
    if refused:
        log.warning("%s: some recipients refused the email: %s", notice.alert, _smtp_refusals(refused))


def _smtp_text(error: bytes | str) -> str:
    return error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)


def _smtp_refusals(refused: Mapping[str, tuple[int, bytes]]) -> str:
    return ", ".join(f"{addr} ({code} {_smtp_text(text)})" for addr, (code, text) in refused.items())


@dataclasses.dataclass(frozen=True)
class TelegramConf:
    """``[alerting.telegram]``: the bot token and the chat to post in."""

    apikey: str = _setting("the bot token, a string", _string, secret=True)
    chat_id: str = _setting("a chat id", _chat_id)
    api_url: str = _setting("an http(s) URL", _http_url, "https://api.telegram.org")
    timeout_s: float = 30.0  #: for the whole attempt, connect to the end of the answer


#: Telegram refuses messages longer than this.
TELEGRAM_MAX_CHARS = 4096


def send_telegram(conf: TelegramConf, notice: Notice) -> None:
    """Post the notice as plain text through the Bot API's ``sendMessage``.

    A 429 answer raises with the ``retry_after`` Telegram asked for (at most
    an hour; None if it makes no sense); other 4xx answers are permanent.  The
    attempt, from connecting to the end of the answer, must end within
    ``timeout_s``.  The bot token is part of the URL, so it never appears in
    an error message.
    """
    text = "\n\n".join(render_text(notice))[:TELEGRAM_MAX_CHARS]
    where = urllib.parse.urlsplit(conf.api_url).netloc
    try:
        # Quoted: a stray space or # in a pasted token must not bend the URL.
        status, _, answer_bytes = _http_request(
            "POST", f"{conf.api_url}/bot{urllib.parse.quote(conf.apikey, safe=':')}/sendMessage",
            json.dumps({"chat_id": conf.chat_id, "text": text}).encode(),
            {"Content-Type": "application/json"}, conf.timeout_s)
    except OSError as exc:  # socket errors never quote the URL
        raise NotifyError(f"talking to Telegram at {where} failed: {exc or type(exc).__name__}") from None
    except (http.client.HTTPException, ValueError) as exc:
        # Only the type: these messages may quote the URL, and so the token.
        raise NotifyError(f"talking to Telegram at {where} failed: {type(exc).__name__}") from None
    if 200 <= status < 300:
        return
    answer = _json_object(answer_bytes)
    description = answer.get("description") or http.client.responses.get(status, "")
    if status == 429:
        parameters = answer.get("parameters")
        retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
        raise NotifyError(f"Telegram rate limit: {description}", retry_after_s=_retry_wait_s(retry_after))
    raise NotifyError(f"Telegram answered {status}: {description}", permanent=400 <= status < 500)


@dataclasses.dataclass(frozen=True)
class CommandConf:
    """``[alerting.command]``: a program run for each notice, without a shell."""

    argv: tuple[str, ...] = _setting(
        'a command as a list of strings, e.g. ["/usr/local/bin/page-me", "--urgent"]', _argv)
    timeout_s: float = _setting(f"{DURATION_HINT}, more than 0", _positive_duration, 30.0, key="timeout")


#: Characters of a command's standard error quoted when it fails.
COMMAND_STDERR_CHARS = 500


def send_command(conf: CommandConf, notice: Notice) -> None:
    """Run ``argv`` with the notice as ``CADUCEUS_<FIELD>`` environment variables
    (see NOTICE_FIELDS: ``CADUCEUS_NAME``, ``CADUCEUS_EVENT``, ...) and as one
    JSON object of the same fields on standard input.

    Exit status 0 means delivered; any other, or not finishing within
    ``timeout_s`` (the command and everything it started are then killed),
    is a failure to be retried, reported with the end of its standard error.
    """
    fields = notice_fields(notice)
    env = dict(os.environ)
    env.update({f"CADUCEUS_{key.upper()}": value.replace("\0", "") for key, value in fields.items()})
    program = conf.argv[0]
    try:
        # Its own session: a timeout kills whatever it started too.
        process = subprocess.Popen(conf.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise NotifyError(f"cannot run {program}: {exc.strerror or exc}") from None
    with process:
        try:
            _, errors = process.communicate(json.dumps(fields).encode(), timeout=conf.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_session(process)
            raise NotifyError(f"{program} did not finish within {format_duration(conf.timeout_s)}; "
                              "killed") from None
    if process.returncode == 0:
        return
    status = process.returncode
    how = f"exit status {status}" if status > 0 else f"signal {-status}"
    tail = _CONTROL_CHARACTERS.sub(" ", errors.decode("utf-8", "replace")[-COMMAND_STDERR_CHARS:]).strip()
    raise NotifyError(f"{program} failed with {how}" + (f": {tail}" if tail else ""))


def _kill_session(process: subprocess.Popen) -> None:
    """Kill a command started in its own session, and all it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # Windows
            process.kill()
    process.wait()


###############################################################################
# Channels: webhooks and services #############################################
###############################################################################


#: Colours of chat attachments and embeds: down, up, test.
COLOURS = {FAILING: 0xD92D20, STILL_FAILING: 0xD92D20, RECOVERED: 0x2E9E44, TEST: 0x1F6FEB}
#: The most characters of a notice's details a chat message carries.
CHAT_MAX_CHARS = 3500


def _details(notice: Notice, limit: int = CHAT_MAX_CHARS) -> tuple[str, str]:
    """The subject, and the lines that say what happened, cut to ``limit`` characters."""
    subject, lines = _text_lines(notice)
    text = "\n".join(lines)
    return subject, text if len(text) <= limit else text[:limit - 1] + "…"


#: A body template that is JSON: an array, or an object (not a text starting with a {field}).
_LOOKS_LIKE_JSON = re.compile(r'\s*(\[|\{\s*["}])')


def _url_template(value: Any) -> str:
    return _http_url_as_is(_template(value))


@dataclasses.dataclass(frozen=True)
class WebhookConf:
    """``[alerting.webhook]``: any HTTP endpoint, with the notice in a template.

    Values go into ``url`` URL-encoded, and into ``body`` escaped for its
    Content-Type: JSON-escaped for JSON (the default when the body is a JSON
    object or array), form-encoded for a form, as they are for text.
    Without ``body``, a JSON object of every field is sent.
    """

    url: str = _setting("an http(s) URL (a template)", _url_template)
    method: str = _setting(f"one of {', '.join(HTTP_METHODS)}", _http_method, "POST")
    headers: tuple[tuple[str, str], ...] = _setting("a table of headers", _headers, (), secret=True)
    body: str | None = _setting("a template (text)", _template, None)
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.body is not None and self.body_format() == "json":
            # Filled in with the worst a name or an output can hold, it must still be JSON.
            hostile = dict.fromkeys(NOTICE_FIELDS, '"}\\{x}\n\u2028é')
            try:
                json.loads(fill_template(self.body, hostile, _json_text))
            except ValueError:
                raise ValueError("body", "expected JSON once the fields are filled in, with each {field} "
                                         "inside quotes; got " + _show(self.body)) from None

    def content_type(self) -> str:
        given = [value for name, value in self.headers if name.lower() == "content-type"]
        if given:
            return given[0]
        if self.body is None or _LOOKS_LIKE_JSON.match(self.body):
            return "application/json"
        return "text/plain; charset=utf-8"

    def body_format(self) -> str:
        """How values are escaped in the body: "json", "form" or "text"."""
        kind = self.content_type().lower()
        return "json" if "json" in kind else "form" if "x-www-form-urlencoded" in kind else "text"


def send_webhook(conf: WebhookConf, notice: Notice) -> None:
    """Send the notice to ``conf.url`` (no body with GET)."""
    fields = notice_fields(notice)
    url = fill_template(conf.url, fields, _url_part)
    if conf.method == "GET":
        body = None
    elif conf.body is None:
        body = json.dumps(fields).encode()
    else:
        escape = {"json": _json_text, "form": urllib.parse.quote_plus, "text": str}[conf.body_format()]
        body = fill_template(conf.body, fields, escape).encode()
    headers = {"Content-Type": conf.content_type(), **dict(conf.headers)}
    _http_send("webhook", conf.method, url, body, headers, conf.timeout_s, secrets=[v for _, v in conf.headers])


@dataclasses.dataclass(frozen=True)
class SlackConf:
    """``[alerting.slack]`` and ``[alerting.mattermost]``: an incoming webhook."""

    url: str = _setting("the incoming webhook's http(s) URL", _http_url_as_is, secret=True)
    timeout_s: float = 30.0


def _slack_text(text: str) -> str:
    """Text for Slack, which reads <...> as links and mentions (<!channel>)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def send_slack(conf: SlackConf, notice: Notice) -> None:
    """Post the subject as ``text`` and the details in an attachment coloured for down or up."""
    _post_attachment("Slack", conf, notice, _slack_text)


def send_mattermost(conf: SlackConf, notice: Notice) -> None:
    """As Slack: Mattermost takes Slack's attachments."""
    _post_attachment("Mattermost", conf, notice, str)


def _post_attachment(service: str, conf: SlackConf, notice: Notice, escape: Callable[[str], str]) -> None:
    subject, details = _details(notice)
    attachment = {"fallback": escape(subject), "color": f"#{COLOURS[notice.event]:06x}",
                  "title": escape(subject), "text": escape(details)}
    if notice.url:
        attachment["title_link"] = notice.url
    payload = {"text": escape(subject), "attachments": [attachment]}
    _http_send(service, "POST", conf.url, json.dumps(payload).encode(), {"Content-Type": "application/json"},
               conf.timeout_s)


@dataclasses.dataclass(frozen=True)
class DiscordConf:
    """``[alerting.discord]``: a channel's webhook."""

    url: str = _setting("the webhook's http(s) URL", _http_url_as_is, secret=True)
    timeout_s: float = 30.0


def send_discord(conf: DiscordConf, notice: Notice) -> None:
    """Post the subject as ``content`` and the details in an embed coloured for
    down or up; no name or output can mention anyone (``allowed_mentions``)."""
    subject, details = _details(notice)
    embed = {"title": subject[:256], "description": details, "color": COLOURS[notice.event],
             "timestamp": format_time(notice.at)}
    if notice.url:
        embed["url"] = notice.url
    payload = {"content": subject[:2000], "embeds": [embed], "allowed_mentions": {"parse": []}}
    _http_send("Discord", "POST", conf.url, json.dumps(payload).encode(), {"Content-Type": "application/json"},
               conf.timeout_s)


@dataclasses.dataclass(frozen=True)
class NtfyConf:
    """``[alerting.ntfy]``: a topic on an ntfy server, e.g. ``https://ntfy.sh/my-topic``."""

    url: str = _setting("the topic's http(s) URL", _http_url_as_is, secret=True)  #: the topic is its password
    token: str = _setting("an access token", _secret, "", secret=True)
    timeout_s: float = 30.0


#: Characters of an ntfy message: a body over 4096 bytes would arrive as an attachment.
NTFY_MAX_CHARS = 1000
#: ntfy's tags (shown as emoji) and priorities by event.
NTFY_TAGS = {FAILING: "rotating_light", STILL_FAILING: "rotating_light", RECOVERED: "white_check_mark",
             TEST: "test_tube"}
NTFY_PRIORITIES = {FAILING: "high", STILL_FAILING: "high", RECOVERED: "default", TEST: "default"}


def send_ntfy(conf: NtfyConf, notice: Notice) -> None:
    """Publish the details with the subject as Title (RFC 2047 when not ASCII),
    tags and priority by event, and the alert page as Click."""
    subject, details = _details(notice, NTFY_MAX_CHARS)
    headers = {"Title": _header_text(subject), "Tags": NTFY_TAGS[notice.event],
               "Priority": NTFY_PRIORITIES[notice.event], "Content-Type": "text/plain; charset=utf-8"}
    if notice.url:
        headers["Click"] = notice.url
    if conf.token:
        headers["Authorization"] = f"Bearer {conf.token}"
    _http_send("ntfy", "POST", conf.url, details.encode(), headers, conf.timeout_s, secrets=[conf.token])


@dataclasses.dataclass(frozen=True)
class GotifyConf:
    """``[alerting.gotify]``: a Gotify server and an application token."""

    url: str = _setting("the server's http(s) URL", _http_url)
    token: str = _setting("the application token", _secret, secret=True)
    timeout_s: float = 30.0


#: Gotify's priorities (0-10; 8 and above ring) by event.
GOTIFY_PRIORITIES = {FAILING: 8, STILL_FAILING: 8, RECOVERED: 5, TEST: 5}


def send_gotify(conf: GotifyConf, notice: Notice) -> None:
    """POST /message, the token in X-Gotify-Key (never in the URL)."""
    subject, details = _details(notice)
    payload: dict[str, Any] = {"title": subject, "message": details, "priority": GOTIFY_PRIORITIES[notice.event]}
    if notice.url:
        payload["extras"] = {"client::notification": {"click": {"url": notice.url}}}
    _http_send("Gotify", "POST", f"{conf.url}/message", json.dumps(payload).encode(),
               {"Content-Type": "application/json", "X-Gotify-Key": conf.token}, conf.timeout_s,
               secrets=[conf.token])


@dataclasses.dataclass(frozen=True)
class PushoverConf:
    """``[alerting.pushover]``: a user (or group) key and an application token."""

    user_key: str = _setting("the user key", _secret, secret=True)
    app_token: str = _setting("the application token", _secret, secret=True)
    api_url: str = _setting("an http(s) URL", _http_url, "https://api.pushover.net")
    timeout_s: float = 30.0


#: Pushover's priorities by event: 1 is high (it sounds in quiet hours), 0 normal.
PUSHOVER_PRIORITIES = {FAILING: 1, STILL_FAILING: 1, RECOVERED: 0, TEST: 0}


def send_pushover(conf: PushoverConf, notice: Notice) -> None:
    """POST /1/messages.json, form-encoded (title at most 250 characters, message 1024)."""
    subject, details = _details(notice, 1024)
    form = {"token": conf.app_token, "user": conf.user_key, "title": subject[:250], "message": details,
            "priority": str(PUSHOVER_PRIORITIES[notice.event]), "timestamp": str(int(notice.at))}
    if notice.url:
        form.update(url=notice.url, url_title="Alert page")
    _http_send("Pushover", "POST", f"{conf.api_url}/1/messages.json", urllib.parse.urlencode(form).encode(),
               {"Content-Type": "application/x-www-form-urlencoded"}, conf.timeout_s,
               secrets=[conf.app_token, conf.user_key])


@dataclasses.dataclass(frozen=True)
class MatrixConf:
    """``[alerting.matrix]``: a room, and the access token of an account in it."""

    homeserver: str = _setting("the homeserver's http(s) URL", _http_url)
    room_id: str = _setting('a room id such as "!abcdef:example.org"', _room_id)
    access_token: str = _setting("an access token", _secret, secret=True)
    timeout_s: float = 30.0


def send_matrix(conf: MatrixConf, notice: Notice) -> None:
    """Send an ``m.notice`` through the client-server API.  The transaction id
    comes from the notice itself, so a retry after a lost answer is the same
    event, not a second one."""
    subject, details = _details(notice)
    txn_id = "caduceus-" + hashlib.sha256(notice.to_json().encode()).hexdigest()[:32]
    url = (f"{conf.homeserver}/_matrix/client/v3/rooms/{urllib.parse.quote(conf.room_id, safe='')}"
           f"/send/m.room.message/{txn_id}")
    payload = {"msgtype": "m.notice", "body": f"{subject}\n\n{details}"}
    _http_send("Matrix", "PUT", url, json.dumps(payload).encode(),
               {"Content-Type": "application/json", "Authorization": f"Bearer {conf.access_token}"},
               conf.timeout_s, secrets=[conf.access_token])


@dataclasses.dataclass(frozen=True)
class PagerDutyConf:
    """``[alerting.pagerduty]``: the routing (integration) key of an Events API v2 integration."""

    routing_key: str = _setting("the routing key", _secret, secret=True)
    api_url: str = _setting("an http(s) URL", _http_url, "https://events.pagerduty.com")
    source: str = _setting("a string", _string, "caduceus")
    timeout_s: float = 30.0


#: What PagerDuty is told for each event: a reminder would add nothing to the open incident.
PAGERDUTY_ACTIONS = {FAILING: ("trigger",), STILL_FAILING: (), RECOVERED: ("resolve",),
                     TEST: ("trigger", "resolve")}


def send_pagerduty(conf: PagerDutyConf, notice: Notice) -> None:
    """Trigger an incident when an alert fails and resolve it when it recovers,
    with the same ``dedup_key`` (one per failure of one alert), so the
    incident closes itself; reminders send nothing.  A test triggers an
    "info" incident and resolves it at once."""
    key = _dedup_key(notice)
    for action in PAGERDUTY_ACTIONS[notice.event]:
        event: dict[str, Any] = {"routing_key": conf.routing_key, "event_action": action, "dedup_key": key}
        if action == "trigger":
            subject, _ = _text_lines(notice)
            details = {name: value for name, value in notice_fields(notice).items() if value}
            event["payload"] = {"summary": subject[:1024], "source": conf.source,
                                "severity": "info" if notice.event == TEST else "critical",
                                "timestamp": format_time(notice.at), "custom_details": details}
            event["client"] = "Caduceus"
            if notice.url:
                event.update(client_url=notice.url, links=[{"href": notice.url, "text": "Alert page"}])
        _http_send("PagerDuty", "POST", f"{conf.api_url}/v2/enqueue", json.dumps(event).encode(),
                   {"Content-Type": "application/json"}, conf.timeout_s, secrets=[conf.routing_key])


def _dedup_key(notice: Notice) -> str:
    """The same for every notice about one failure of one alert (at most 255 bytes)."""
    incident = f"test-{notice.at:.0f}" if notice.event == TEST else notice.incident or "0"
    key = f"caduceus/{notice.alert}/{incident}"
    return key if len(key.encode()) <= 255 else "caduceus/" + hashlib.sha256(key.encode()).hexdigest()


#: Every kind of channel, by the name used in ``[alerting.KIND]``: the only list of them.
CHANNELS: Mapping[str, Channel] = {
    "console": Channel(ConsoleConf, send_console),
    "email": Channel(EmailConf, send_email),
    "telegram": Channel(TelegramConf, send_telegram),
    "webhook": Channel(WebhookConf, send_webhook),
    "slack": Channel(SlackConf, send_slack),
    "mattermost": Channel(SlackConf, send_mattermost),
    "discord": Channel(DiscordConf, send_discord),
    "ntfy": Channel(NtfyConf, send_ntfy),
    "gotify": Channel(GotifyConf, send_gotify),
    "pushover": Channel(PushoverConf, send_pushover),
    "matrix": Channel(MatrixConf, send_matrix),
    "pagerduty": Channel(PagerDutyConf, send_pagerduty),
    "command": Channel(CommandConf, send_command),
}


###############################################################################
# Configuration ###############################################################
###############################################################################

#: Default grace of a ``schedule`` alert (or half the gap between its runs, if shorter).
SCHEDULE_GRACE_S = 3600.0
#: A success this long before a scheduled time (or a tenth of the gap between
#: runs, if shorter) counts for that run: the job's clock may be a little ahead.
SCHEDULE_EARLY_S = 60.0

#: The shortest ``every``, ``notify_every`` and ``max_runtime``: shorter ones
#: only flood the channels (``every = "0.0001s"`` once sent 1,655 notices in 5 s).
MIN_CADENCE_S = 1.0

#: Without ``notify_every``, reminders come every ``every`` but at most this
#: often: 0.0.11's 10-second sweep gave that floor, so ``every = "1s"`` did not flood.
DEFAULT_NOTIFY_FLOOR_S = 10.0


#: Slots where dataclasses have them (3.10+): each alert's spec then takes 112
#: bytes instead of 156 (0.45 MB less at 10,000 alerts).
_SLOTS: dict[str, bool] = {"slots": True} if sys.version_info >= (3, 10) else {}


@dataclasses.dataclass(frozen=True, **_SLOTS)
class CheckSpec:
    """One ``[alerts.NAME]`` table: a job that must succeed every ``every_s``, or
    by each time of its cron ``schedule`` (in ``tz``), within ``grace_s``."""

    name: str
    every_s: float | None
    notify_every_s: float
    channels: tuple[str, ...]
    recipient_emails: tuple[str, ...] = ()
    schedule: CronSchedule | None = None
    tz: datetime.tzinfo = datetime.timezone.utc
    grace_s: float = 0.0
    max_runtime_s: float | None = None
    early_s: float = 0.0

    def due_after(self, since: float) -> float:
        """The deadline of a job whose last success (or first sighting) was at ``since``.

        For a schedule, a success up to ``early_s`` before a scheduled time
        counts for that run, so a job host whose clock runs ahead is not late.
        """
        if self.schedule is not None:
            return self.schedule.next_after(since + self.early_s, self.tz) + self.grace_s
        return since + self.every_s + self.grace_s

    def describe(self) -> str:
        """The schedule in words: ``"every 1h, 10m grace"``, ``"at 03:00 every day (Europe/Athens)"``."""
        if self.schedule is not None:
            words = f"{self.schedule.describe()} ({self.tz})"
        else:
            words = f"every {format_duration(self.every_s)}"
        if self.grace_s:
            words += f", {format_duration(self.grace_s)} grace"
        if self.max_runtime_s is not None:
            words += f", runs at most {format_duration(self.max_runtime_s)}"
        return words


@dataclasses.dataclass(frozen=True)
class ChannelInstance:
    """One configured destination: ``[alerting.KIND]`` is the instance named
    KIND, ``[alerting.KIND.NAME]`` the instance KIND.NAME (names in lower case)."""

    name: str
    kind: str
    conf: Any


def _console_only() -> dict[str, ChannelInstance]:
    return {"console": ChannelInstance("console", "console", ConsoleConf())}


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole, validated configuration file.  Build it with ``load_config``.

    ``channels`` holds every configured channel instance by name; "console"
    is always there.
    """

    checks: Mapping[str, CheckSpec]
    secret_key: str = dataclasses.field(default="", repr=False)
    channels: Mapping[str, ChannelInstance] = dataclasses.field(default_factory=_console_only)
    path: str = ""
    max_connections: int = 512
    base_url: str = ""  #: where users reach this Caduceus, for links in notices; "" for none
    #: Fetched every ``heartbeat_every_s`` while Caduceus is healthy ("": none).
    heartbeat_url: str = dataclasses.field(default="", repr=False)
    heartbeat_every_s: float = 60.0
    #: Proxies whose X-Forwarded-For is believed (see Exchange._client_of).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    public_dashboard: bool = False  #: the read-only views open without the key
    public_badges: bool = True  #: badges open without the key
    history: int = 100  #: events kept per alert (check-ins, state changes, notices)


def _zone(value: Any) -> datetime.tzinfo:
    name = _string(value).strip()
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return datetime.timezone.utc  # needs no zone database
    try:
        return zoneinfo.ZoneInfo(name)
    # RecursionError: a name of hundreds of parts, which zoneinfo looks up as a tzdata module path
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, RecursionError):
        raise ValueError(f'expected an IANA time zone such as "Europe/Athens", got {json.dumps(name)}'
                         " (is the tzdata package installed?)") from None


def _cron(value: Any) -> CronSchedule:
    try:
        return CronSchedule.parse(_string(value))
    except ValueError as exc:
        raise ValueError(f"expected a cron schedule such as \"0 3 * * *\" or \"@daily\", "
                         f"got {json.dumps(value)}: {exc}") from None


def _cadence(value: Any) -> float:
    seconds = _duration(value)
    if seconds < MIN_CADENCE_S:
        raise ValueError(f"expected a duration of at least {MIN_CADENCE_S:g}s, got {_show(value)}")
    return seconds


def _non_negative_duration(value: Any) -> float:
    if isinstance(value, str) and _parse_duration(value) == 0:
        return 0.0
    return _duration(value)


#: What a secret_key may hold: characters that pass unencoded through both a
#: path segment (/ping/KEY/name) and a query value (?key=KEY).  Not / ? # % & +
#: (+ reads as a space in a query), spaces, quotes, brackets or non-ASCII.
_SECRET_KEY_CHARACTERS = "-._~!$'()*,;:@="
_SECRET_KEY = re.compile(rf"[A-Za-z0-9{re.escape(_SECRET_KEY_CHARACTERS)}]*")


def _secret_key(value: Any) -> str:
    key = _string(value)
    if not _SECRET_KEY.fullmatch(key):
        # Name the characters, never the key: this message is printed.
        bad = sorted({c for c in key if not _SECRET_KEY.fullmatch(c)})
        raise ValueError(f"expected letters, digits and {' '.join(_SECRET_KEY_CHARACTERS)} only, "
                         f"as the key goes into URLs (/ping/KEY/name and ?key=KEY); got a key "
                         f"containing {', '.join(json.dumps(c) for c in bad)}")
    return key


def _alert_name(file: str, name: str) -> str:
    # Control characters (C0, C1), line and paragraph separators, surrogates and
    # non-characters would forge log lines or break the XML of a badge.  Printable
    # ASCII has none of them: the usual name skips the scan (10,000 names at start-up).
    plain = name.isascii() and name.isprintable()
    if not name or "/" in name or not plain and any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")
                                                    or 0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE
                                                    for c in name):
        raise ConfigError(f"{file}: alerts.{json.dumps(name)}: an alert name is a URL segment; "
                          "it must be non-empty, without / or control characters")
    return name


def load_config(path: str) -> Config:
    """Read and validate a Caduceus TOML file; raise ``ConfigError`` on any mistake.

    Everything is checked here, so a config that loads cannot fail later:
    the encoding (UTF-8, a byte order mark allowed), unknown keys, durations
    (``every``, ``notify_every`` and ``max_runtime`` at least 1 s), channel
    names, channels used but not configured, email addresses (no line breaks
    or control characters) and recipients, ports, and a ``secret_key`` that
    fits unencoded in a URL.  A config without alerts loads, watching nothing.
    Messages look like
    ``caduceus.toml: alerts.backups.every: expected a duration ..., got "soon"``.
    """
    if tomllib is None:
        raise ConfigError("reading the config needs Python 3.11+, or the tomli package "
                          "on older Pythons: pip install tomli")
    data = _read_toml(path)

    top = _Table(path, "", data)
    settings = _Table(path, "config", top.take("config", "a table", _table, {}))
    secret_key = settings.take("secret_key", "a string", _secret_key, "")
    default_tz = settings.take("timezone", "an IANA time zone", _zone, datetime.timezone.utc)
    base_url = settings.take("base_url", "an http(s) URL", _http_url, "")
    max_connections = settings.take("max_connections", "a whole number, at least 1", _positive_int, 512)
    heartbeat_url = settings.take("heartbeat_url", "an http(s) URL", _http_url_as_is, "")
    heartbeat_every_s = settings.take("heartbeat_every", DURATION_HINT, _cadence, 60.0)
    trusted_proxies = settings.take("trusted_proxies", "a list of addresses or CIDR blocks, "
                                    'such as ["127.0.0.1"]', _networks, ())
    public_dashboard = settings.take("public_dashboard", "true or false", _boolean, False)
    public_badges = settings.take("public_badges", "true or false", _boolean, True)
    history = settings.take("history", "a whole number, at least 1", _positive_int, 100)
    settings.finish()

    channels = _read_channels(_Table(path, "alerting", top.take("alerting", "a table", _table, {})))

    # No alerts is a valid, if idle, config (main warns): a new install starts so.
    alerts = _Table(path, "alerts", top.take("alerts", "a table of alerts", _table, {}))
    default_channels = alerts.take("default_channels", "a list of channel names", _channel_list, ("email",))
    checks = {}
    for name, table in alerts.data.items():
        if name == "default_channels":
            continue
        _alert_name(path, name)
        alerts.known.append(name)
        spec = _check_spec(path, name, table, default_channels, default_tz)
        _check_channels(path, spec, channels, "channels" in table)
        checks[name] = spec
    alerts.finish()
    top.finish()
    return Config(checks=checks, secret_key=secret_key, channels=channels, path=path, base_url=base_url,
                  max_connections=max_connections, heartbeat_url=heartbeat_url,
                  heartbeat_every_s=heartbeat_every_s, trusted_proxies=trusted_proxies,
                  public_dashboard=public_dashboard,
                  public_badges=public_badges, history=history)


def _read_channels(alerting: _Table) -> dict[str, ChannelInstance]:
    """Every channel instance of ``[alerting]``, by name.

    In ``[alerting.KIND]``, a key holding a table that is not one of the
    kind's settings is a named instance ``[alerting.KIND.NAME]``; the table's
    own settings, if any, make the instance KIND.  Console always exists.
    """
    instances = _console_only()
    for kind, data in alerting.data.items():
        channel = CHANNELS.get(kind)
        if channel is None:
            close = difflib.get_close_matches(kind, list(CHANNELS), n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise ConfigError(f"{alerting.file}: {alerting.path(kind)}: unknown kind of channel; {hint}"
                              f"known kinds: {', '.join(CHANNELS)}")
        alerting.known.append(kind)
        section = _Table(alerting.file, alerting.path(kind), data)
        settings = {field.metadata["key"] or field.name for field in dataclasses.fields(channel.conf_type)
                    if "check" in field.metadata}
        named = [key for key, value in section.data.items() if isinstance(value, dict) and key not in settings]
        if len(named) < len(section.data) or not named:
            instances[kind] = ChannelInstance(kind, kind, _read_conf(section, channel.conf_type))
        section.finish(extra_known=tuple(named))
        for name in named:
            table = _Table(alerting.file, section.path(name), section.data[name])
            instance = f"{kind}.{name}".lower()
            if instance in instances:
                raise ConfigError(f"{alerting.file}: {section.path(name)}: a second channel named {instance}")
            instances[instance] = ChannelInstance(instance, kind, _read_conf(table, channel.conf_type))
            table.finish()
    alerting.finish()
    return instances


def _read_toml(path: str) -> dict:
    """The parsed TOML file: UTF-8, with or without a byte order mark."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    # Windows editors save a byte order mark, which TOML does not allow.
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: expected a UTF-8 text file, got byte 0x{raw[exc.start]:02x} on line "
                          f"{line} (save the config as UTF-8)") from None
    data = _plain_toml(text)
    if data is not None:
        return data
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except ValueError:  # from int(): Python reads no integer of over 4,300 digits
        raise ConfigError(f"{path}: invalid TOML: an integer of over 4,300 digits") from None
    except RecursionError:  # tomllib reads nested lists and inline tables by recursion
        raise ConfigError(f"{path}: invalid TOML: lists or inline tables nested too deeply") from None


#: Each line of plain TOML (see _plain_toml), matched whole: a table header of
#: bare keys, or a bare key and a one-line value, either with a comment, or a
#: comment or nothing.  TOML's whitespace is spaces and tabs only; strings and
#: comments hold no control character but tab ({C}, which takes in the line feed).
_PLAIN_TOML_LINES = re.compile(r"""^[ \t]*(?:
    \[[ \t]*([A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*)[ \t]*\]  # [table.name]
  | ([A-Za-z0-9_-]+)[ \t]*=[ \t]*(                                    # key = value:
        "[^"\\{C}]*"                                                 # a string without escapes,
      | '[^'{C}]*'                                                   # a literal string,
      | [+-]?(?:0|[1-9][0-9]{0,18})                                  # an integer of up to 19 digits,
      | true | false                                                 # a boolean,
      | \[[ \t]*(?:"[^"\\{C}]*"[ \t]*,[ \t]*)*(?:"[^"\\{C}]*"[ \t]*)?\]  # a list of strings
    )
)?[ \t]*(?:\#[^{C}]*)?$""".replace("{C}", r"\x00-\x08\x0a-\x1f\x7f"), re.VERBOSE | re.MULTILINE)


def _plain_toml(text: str) -> dict | None:
    """``tomllib.loads(text)`` for the plain TOML configs are written in, or
    None for anything else (the caller then runs tomllib, whose answer or
    error stands).

    Plain is: table headers of bare keys, and lines of ``key = value`` with a
    bare key and a value that is a basic string without escapes or a literal
    string, a decimal integer of up to 19 digits (longer ones go to tomllib),
    true or false, or a one-line list of basic strings without escapes.  Any
    other construct, and anything TOML forbids (a key or table defined twice,
    a table through a value), gives None, so a config reads the same either
    way.  Why: tomllib takes about 4 us a line here, 0.16 s at start-up for a
    config of 10,000 alerts; this reader takes about a third of that.
    """
    text = text.replace("\r\n", "\n")  # a lone CR is not plain: it is a control character
    root: dict = {}
    table = root
    headers = set()  # tables defined by a header; implicit super-tables may still get one
    lines = 0
    for match in _PLAIN_TOML_LINES.finditer(text):  # not findall: a list of all lines is 8 MiB at 10,000 alerts
        lines += 1
        header, key, value = match.groups()
        if key:
            if key in table:
                return None
            # 10,000 alerts share one "every".  Not the values: some are secrets, and
            # Python 3.12.0-3.12.4 never free an interned string.
            key = sys.intern(key)
            if value[0] in "\"'":
                table[key] = value[1:-1]
            elif value[0] == "[":
                table[key] = re.findall(r'"([^"]*)"', value)
            elif value[0] in "tf":
                table[key] = value == "true"
            else:
                table[key] = int(value)
        elif header:
            header = header.replace(" ", "").replace("\t", "")  # bare keys hold neither
            if header in headers:
                return None
            headers.add(header)
            table = root
            for name in header.split("."):
                table = table.setdefault(name, {})
                if not isinstance(table, dict):
                    return None
    # ^...$ match at most once a line, so as many matches as lines is all of them.
    return root if lines == text.count("\n") + 1 else None


def _check_spec(path: str, name: str, table: Any, default_channels: tuple[str, ...],
                default_tz: datetime.tzinfo) -> CheckSpec:
    section = _Table(path, f"alerts.{name}", table)
    if "every" in section.data and "schedule" in section.data:
        raise ConfigError(f"{path}: alerts.{name}: give either every or schedule, not both")
    if "schedule" in section.data:
        every_s = None
        schedule = section.take("schedule", "a cron schedule", _cron)
        section.known.append("every")
    else:
        every_s = section.take("every", f'{DURATION_HINT} (or a cron schedule = "0 3 * * *")', _cadence)
        schedule = None
        section.known.append("schedule")
    tz = section.take("timezone", "an IANA time zone", _zone, default_tz)
    if schedule is not None:
        # A cron job's natural reminder cadence is the gap between two of its runs
        # (measured from a fixed point, so loading a config is repeatable).
        first = schedule.next_after(0.0, tz)
        period_s = schedule.next_after(first, tz) - first
        # A scheduled job reports after it has run, so it needs time past its
        # minute: without grace every run would be late (healthchecks.io: 1h).
        default_grace_s = min(SCHEDULE_GRACE_S, period_s / 2)
        early_s = min(SCHEDULE_EARLY_S, period_s / 10)
    else:
        period_s = every_s
        default_grace_s = 0.0  # what 0.0.11 did: existing configs behave as before
        early_s = 0.0
    spec = CheckSpec(
        name=name,
        every_s=every_s,
        schedule=schedule,
        tz=tz,
        grace_s=section.take("grace", DURATION_HINT, _non_negative_duration, default_grace_s),
        early_s=early_s,
        max_runtime_s=section.take("max_runtime", DURATION_HINT, _cadence, None),
        notify_every_s=section.take("notify_every", DURATION_HINT, _cadence,
                                    max(period_s, DEFAULT_NOTIFY_FLOOR_S)),
        channels=section.take("channels", "a list of channel names", _channel_list, default_channels),
        recipient_emails=section.take("recipient_emails", "a list of email addresses", _address_list, ()),
    )
    section.finish()
    return spec


def _check_channels(path: str, spec: CheckSpec, channels: Mapping[str, ChannelInstance],
                    own_channels: bool) -> None:
    """Every channel the alert uses is configured, and its email has recipients."""
    key = f"alerts.{spec.name}.channels" if own_channels else "alerts.default_channels"
    for name in spec.channels:
        if name in channels:
            continue
        close = difflib.get_close_matches(name, list(channels), n=1)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        configured = f"configured channels: {', '.join(channels)}"
        if name.partition(".")[0] in CHANNELS:
            raise ConfigError(f"{path}: {key}: alert {json.dumps(spec.name)} uses the {name} channel, but "
                              f"there is no [alerting.{name}] section; {hint}{configured}")
        raise ConfigError(f"{path}: {key}: unknown channel {json.dumps(name)}; {hint}{configured}; "
                          f"kinds of channel: {', '.join(CHANNELS)}")
    for name in spec.channels:
        instance = channels[name]
        if instance.kind == "email" and not (spec.recipient_emails or instance.conf.recipient_emails):
            raise ConfigError(f"{path}: alerts.{spec.name}.recipient_emails: alert {json.dumps(spec.name)} "
                              f"sends email but has no recipients here or in [alerting.{name}]")


def config_changes(old: Config, new: Config) -> list[str]:
    """What a reload from ``old`` to ``new`` changes, in words for the log:
    ``["added alert backups (every 1d)", "changed alert hourly: every 1h -> every 2h"]``.

    Secrets (``secret_key``, passwords, tokens, the heartbeat URL) are named,
    never shown.
    """
    changes = [f"added alert {name} ({spec.describe()})" for name, spec in new.checks.items()
               if name not in old.checks]
    changes += [f"removed alert {name}" for name in old.checks if name not in new.checks]
    for name, spec in new.checks.items():
        before = old.checks.get(name)
        if before is not None and before != spec:
            changes.append(f"changed alert {name}: {_spec_changes(before, spec)}")
    changes += [f"added channel {name}" for name in new.channels if name not in old.channels]
    changes += [f"removed channel {name}" for name in old.channels if name not in new.channels]
    changes += [f"changed channel {name}" for name, instance in new.channels.items()
                if name in old.channels and old.channels[name] != instance]
    for key in ("secret_key", "base_url", "max_connections", "heartbeat_url", "heartbeat_every", "trusted_proxies"):
        field = "heartbeat_every_s" if key == "heartbeat_every" else key
        if getattr(old, field) != getattr(new, field):
            changes.append(f"changed [config] {key}")
    return changes


def _spec_changes(old: CheckSpec, new: CheckSpec) -> str:
    parts = []
    if old.describe() != new.describe():
        parts.append(f"{old.describe()} -> {new.describe()}")
    if old.notify_every_s != new.notify_every_s:
        parts.append(f"notify_every {format_duration(old.notify_every_s)} -> "
                     f"{format_duration(new.notify_every_s)}")
    if old.channels != new.channels:
        parts.append(f"channels {', '.join(old.channels) or 'none'} -> {', '.join(new.channels) or 'none'}")
    if old.recipient_emails != new.recipient_emails:
        parts.append("recipient_emails changed")
    return "; ".join(parts) or "changed"


###############################################################################
# Storage: signals and the schema #############################################
###############################################################################

#: Check-ins, state changes and delivery results kept per alert, by default
#: (``[config] history``): older ones are pruned as new ones are written, so
#: the database does not grow per check-in.
HISTORY = 100
#: Bytes of a request body kept with a signal (the tail, where errors are).
MAX_PING_BODY = 10 * 1024
#: Bytes of bodies kept per alert, newest first: an older signal beyond them
#: keeps its time, kind and exit status but loses its body.  So the database
#: is bounded in bytes (HISTORY full bodies would be 1 MiB per alert).
HISTORY_BYTES = 100 * 1024
#: Notices that could not be delivered at all, kept for inspection.
FAILED_NOTICE_HISTORY = 100

@dataclasses.dataclass(frozen=True)
class Ping:
    """One signal from a job, as it is stored: kind, exit status, body, and who sent it."""

    kind: str = SUCCESS
    exit_status: int | None = None
    body: str = ""
    remote_addr: str = ""
    user_agent: str = ""


def parse_signal(text: str) -> tuple[str, int | None]:
    """Read the signal part of a check-in URL: "" is success, then start, fail, log,
    or an exit status (0 success, 1-255 failure).  Raises ValueError otherwise."""
    if text in ("", START, FAIL, LOG):
        return text or SUCCESS, None
    if re.fullmatch(r"[0-9]{1,3}", text) and int(text) <= 255:
        status = int(text)
        return (FAIL if status else SUCCESS), status
    shown = json.dumps(text[:40]) + ("..." if len(text) > 40 else "")  # an answer never echoes much
    raise ValueError(f"unknown signal {shown}: use start, fail, log or an exit status 0-255")


#: Caduceus's tables as they are now: a new database file is made with them
#: (an older one with MIGRATIONS).  A 0.0.11 database's own tables (alert,
#: notification) are left alone.
SCHEMA = """
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
    n_pings       INTEGER NOT NULL DEFAULT 0,
    clock_step_s  REAL NOT NULL DEFAULT 0,
    paused_until  REAL,
    resumed_at    REAL
);
CREATE TABLE IF NOT EXISTS pings (
    id          INTEGER PRIMARY KEY,
    check_name  TEXT NOT NULL,
    slot        INTEGER NOT NULL,
    at          REAL NOT NULL,
    kind        TEXT NOT NULL,
    exit_status INTEGER,
    duration_s  REAL,
    remote_addr TEXT NOT NULL,
    user_agent  TEXT NOT NULL,
    body_bytes  INTEGER NOT NULL DEFAULT 0,
    body        TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS pings_by_slot ON pings (check_name, slot);
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
    failed          INTEGER NOT NULL DEFAULT 0,
    facts           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (channel, failed, id);
CREATE TABLE IF NOT EXISTS deliveries (
    id         INTEGER PRIMARY KEY,
    check_name TEXT NOT NULL,
    at         REAL NOT NULL,
    channel    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    result     TEXT NOT NULL,
    error      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_by_check ON deliveries (check_name, id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value
);
"""
#: The steps from each schema to the next, ``(version, statements)`` in order: a
#: file of schema N gets every step above N, in one transaction.  Schema 1 is
#: the first release's.  Every change to SCHEMA adds a step here, and a test
#: that a file of each earlier schema upgrades to the same tables.
MIGRATIONS = (
    # 2: wall clock steps since the last success, see Monitor.
    (2, ["ALTER TABLE checks ADD COLUMN clock_step_s REAL NOT NULL DEFAULT 0"]),
    # 3: notices are queued as facts (Notice.to_json), rendered by each channel
    # as it sends; older rows keep only their text in subject and body.
    (3, ["ALTER TABLE outbox ADD COLUMN facts TEXT NOT NULL DEFAULT ''"]),
    # 4: pauses; each delivery attempt's result; a ping's slot is its arrival
    # number (it was that modulo 100, in a ring), so any history length works.
    (4, ["ALTER TABLE checks ADD COLUMN paused_until REAL",
         "ALTER TABLE checks ADD COLUMN resumed_at REAL",
         "CREATE TABLE deliveries (id INTEGER PRIMARY KEY, check_name TEXT NOT NULL, at REAL NOT NULL, "
         "channel TEXT NOT NULL, kind TEXT NOT NULL, result TEXT NOT NULL, error TEXT NOT NULL DEFAULT '')",
         "CREATE INDEX deliveries_by_check ON deliveries (check_name, id)",
         # Negative first, so no two rows ever share a slot on the way.
         "UPDATE pings SET slot = -1 - (SELECT n_pings - 100 + (pings.slot + 100 - n_pings % 100) % 100 "
         "FROM checks WHERE name = pings.check_name) "
         "WHERE (SELECT n_pings FROM checks WHERE name = pings.check_name) > 100",
         "UPDATE pings SET slot = -1 - slot WHERE slot < 0"]),
    # 5: small facts about Caduceus itself: last_alive_at, see Monitor.downtime.
    (5, ["CREATE TABLE meta (key TEXT PRIMARY KEY, value)"]),
    # 6: pings in an ordinary rowid table (WITHOUT ROWID gave each row with a
    # body its own overflow page: 4.7 bytes on disk per byte of body), the
    # body last and its size beside it, for the byte budget (HISTORY_BYTES).
    (6, ["CREATE TABLE pings_6 (id INTEGER PRIMARY KEY, check_name TEXT NOT NULL, slot INTEGER NOT NULL, "
         "at REAL NOT NULL, kind TEXT NOT NULL, exit_status INTEGER, duration_s REAL, remote_addr TEXT NOT NULL, "
         "user_agent TEXT NOT NULL, body_bytes INTEGER NOT NULL DEFAULT 0, body TEXT NOT NULL)",
         "INSERT INTO pings_6 (check_name, slot, at, kind, exit_status, duration_s, remote_addr, user_agent, "
         "body_bytes, body) SELECT check_name, slot, at, kind, exit_status, duration_s, remote_addr, user_agent, "
         "length(CAST(body AS BLOB)), body FROM pings ORDER BY check_name, slot",
         "DROP TABLE pings",
         "ALTER TABLE pings_6 RENAME TO pings",
         "CREATE UNIQUE INDEX pings_by_slot ON pings (check_name, slot)"]),
)
#: The schema this release writes (PRAGMA user_version).
SCHEMA_VERSION = MIGRATIONS[-1][0]


#: 512 KiB of page cache, not SQLite's 2 MiB, on every connection (the readers'
#: too): once filled, a cache stays resident for the life of the process, and
#: a check-in touches a few pages whose B-tree's inner pages stay cached (the
#: OS caches the file as well).  Measured at 10,000 alerts: 3 MB less RSS after
#: 40,000 check-ins with 1 KiB bodies, at the same rate.
PAGE_CACHE_PRAGMA = "PRAGMA cache_size = -512"

#: PRAGMAs set on the connection, each a choice for running next to Litestream
#: (deploy/litestream.yml), which reads the WAL from another process and now
#: and then takes the write lock to checkpoint.  (Its other advice: WAL mode,
#: set in Store.__init__, and a busy timeout of 5 s, the connection's timeout.)
SQLITE_PRAGMAS = (
    # FULL, not the NORMAL that Litestream's tips offer for speed: in WAL mode
    # NORMAL may lose the last commits at a power cut, and a check-in answered
    # 200 must be on disk.  The load is small enough to fsync every commit.
    "PRAGMA synchronous = FULL",
    # SQLite's default, made explicit: a PASSIVE checkpoint after 1000 WAL
    # pages, which never waits for Litestream's readers and never blocks
    # writers.  Not 0 (Litestream's tip for heavy writers): Caduceus also runs
    # without Litestream, and its WAL would then grow without end.  Caduceus
    # never runs a RESTART or TRUNCATE checkpoint itself: those wait for every
    # reader, Litestream's included, while holding off writes.
    "PRAGMA wal_autocheckpoint = 1000",
    # A new file's pages (an existing one keeps its own: WAL mode cannot change
    # it): a check-in with a 1 KiB body is about 1.1 KiB, so 4 KiB pages hold 3
    # (80 % full), 8 KiB pages hold 7 (92 %).
    "PRAGMA page_size = 8192",
    PAGE_CACHE_PRAGMA,
)


###############################################################################
# Storage: the outbox #########################################################
###############################################################################

class _Outbox:
    """The outbox half of ``Store``: notices queued per channel instance, their
    delivery attempts and history.  A mixin: it uses the store's ``transaction()``,
    ``_all()`` and ``history``."""

    def enqueue(self, name: str, channel: str, kind: str, subject: str, facts: str, now: float) -> None:
        """Queue a notice (its facts, as JSON) for a channel instance; ``subject``
        is for people reading the outbox.  A reminder replaces an undelivered older one."""
        with self.transaction() as conn:
            if kind == NOTICE_REMINDER:
                conn.execute("DELETE FROM outbox WHERE check_name = ? AND channel = ? AND kind = ? "
                             "AND failed = 0", (name, channel, NOTICE_REMINDER))
            conn.execute("INSERT INTO outbox (check_name, channel, kind, subject, body, facts, created_at,"
                         " next_attempt_at) VALUES (?, ?, ?, ?, '', ?, ?, ?)",
                         (name, channel, kind, subject, facts, now, now))

    def next_notice(self, channel: str, skip: Collection[int] = ()) -> sqlite3.Row | None:
        """The oldest undelivered notice for a channel whose id is not in ``skip``:
        notices leave in order."""
        rows = self._all("SELECT * FROM outbox WHERE channel = ? AND failed = 0 ORDER BY id LIMIT ?",
                         (channel, len(skip) + 1))
        return next((row for row in rows if row["id"] not in skip), None)

    def pending_channels(self) -> list[str]:
        """The channel instances with notices still to be delivered."""
        return [row["channel"] for row in self._all("SELECT DISTINCT channel FROM outbox WHERE failed = 0")]

    def pending_notices(self) -> list[sqlite3.Row]:
        """Notices still to be delivered, all channels, in queue order."""
        return self._all("SELECT * FROM outbox WHERE failed = 0 ORDER BY id")

    def failed_notices(self) -> list[sqlite3.Row]:
        """Notices given up on, newest FAILED_NOTICE_HISTORY of them."""
        return self._all("SELECT * FROM outbox WHERE failed = 1 ORDER BY id")

    def notice_sent(self, notice_id: int, at: float | None = None) -> None:
        """Drop a delivered notice from the outbox; with ``at``, add "sent" to
        the alert's delivery history, in the same transaction."""
        with self.transaction() as conn:
            if at is not None:
                self._add_delivery(conn, notice_id, at, "sent", "")
            conn.execute("DELETE FROM outbox WHERE id = ?", (notice_id,))

    def notice_failed(self, notice_id: int, attempts: int, error: str, retry_at: float | None,
                      at: float | None = None) -> None:
        """Record that the notice failed ``attempts`` times so far (a count, not an
        increment, so recording it again changes nothing): retry at ``retry_at``,
        or give up when it is None.  With ``at``, the attempt joins the alert's
        delivery history ("failed" or "given_up", with the error)."""
        with self.transaction() as conn:
            if at is not None:
                self._add_delivery(conn, notice_id, at, "failed" if retry_at is not None else "given_up", error)
            if retry_at is None:
                conn.execute("UPDATE outbox SET attempts = ?, last_error = ?, failed = 1 WHERE id = ?",
                             (attempts, error, notice_id))
                conn.execute("DELETE FROM outbox WHERE failed = 1 AND id NOT IN "
                             "(SELECT id FROM outbox WHERE failed = 1 ORDER BY id DESC LIMIT ?)",
                             (FAILED_NOTICE_HISTORY,))
            else:
                conn.execute("UPDATE outbox SET attempts = ?, last_error = ?, next_attempt_at = ? "
                             "WHERE id = ?", (attempts, error, retry_at, notice_id))


###############################################################################
# Storage: group commit #######################################################
###############################################################################

class _GroupCall:
    """One caller's work in a group commit, and how it ended (see Store.group_commit).

    ``wait()`` returns once ``wake()`` has been called: when the batch with
    this call is committed (or failed), or ``lead`` is set.  Each ``wait()``
    is paired with one ``wake()``.  A bare lock, held from the start, is the
    cheapest one-shot wake-up there is (an Event is a lock, a condition and a
    second lock per waiter), and every check-in makes one.
    """

    __slots__ = ("work", "result", "error", "lead", "_done")

    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        #: Handed the lead: this caller runs the next batch itself.
        self.lead = False
        self._done = threading.Lock()
        self._done.acquire()

    def wait(self) -> None:
        self._done.acquire()

    def wake(self) -> None:
        self._done.release()


class _GroupCommit:
    """The group-commit half of ``Store``: concurrent check-ins committed
    together, so the fsync is paid once per batch.  A mixin: it uses the
    store's ``_conn``, its ``_lock`` (held while a batch runs), ``_depth`` and
    ``_owner`` (so store methods called by the work join the batch), and
    ``_group_lock``, ``_group_queue`` and ``_group_leading``."""

    def group_commit(self, work: Callable[[], Any]) -> Any:
        """Run ``work()`` in a transaction shared with the callers that arrive while
        another batch commits (group commit); return its result once committed.

        The first caller to find no commit in progress leads: it takes every
        queued call, runs each in its own SAVEPOINT (a call that raises is
        rolled back alone and its caller gets its own exception), commits once,
        wakes each caller of the batch (one wake-up each), and hands the lead to
        the first caller queued meanwhile.  So the fsync is paid once per
        batch, and a return still means committed: if the COMMIT fails (or
        SQLite aborts the transaction), every call of the batch that had not
        failed already raises that error.  ``work`` runs in the leader's thread
        with the store's lock held; store methods it calls join the batch.
        """
        call = _GroupCall(work)
        with self._group_lock:
            self._group_queue.append(call)
            lead = not self._group_leading
            self._group_leading = True
        if not lead:
            call.wait()
            lead = call.lead
        if lead:
            self._lead_batch()
        if call.error is not None:
            raise call.error
        return call.result

    def _lead_batch(self) -> None:
        """Commit every queued call as one transaction, then wake their callers
        and hand the lead on (see group_commit)."""
        with self._group_lock:
            batch, self._group_queue = self._group_queue, []
        try:
            with self._lock:
                self._run_batch(batch)
        finally:
            with self._group_lock:
                if self._group_queue:
                    self._group_queue[0].lead = True
                    self._group_queue[0].wake()
                else:
                    self._group_leading = False
            for call in batch:
                call.wake()

    def _run_batch(self, batch: list[_GroupCall]) -> None:
        """Run each call in a SAVEPOINT of one transaction and commit (store lock held)."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            for call in batch:
                call.error = exc
            return
        self._depth, self._owner = 1, threading.get_ident()
        try:
            if len(batch) == 1:  # alone: the transaction is its savepoint
                batch[0].result = batch[0].work()
            else:
                for call in batch:
                    self._run_savepoint(call)
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            for call in batch:
                if call.error is None or call.error is exc:
                    call.result, call.error = None, exc
        finally:
            self._depth, self._owner = 0, None

    def _run_savepoint(self, call: _GroupCall) -> None:
        """Run one call of a batch in its own SAVEPOINT: if it raises, only it is rolled back."""
        self._conn.execute("SAVEPOINT checkin")
        try:
            call.result = call.work()
        except BaseException as exc:  # handed to its own caller, in its own thread
            call.error = exc
            if not self._conn.in_transaction:  # SQLite gave up the whole transaction
                raise
            self._conn.execute("ROLLBACK TO checkin")
        self._conn.execute("RELEASE checkin")


###############################################################################
# Storage #####################################################################
###############################################################################


def _create_private(path: str) -> None:
    """Create an empty database file readable by its owner only, unless there is one.

    It holds job output and client addresses, and SQLite gives the -wal and
    -shm files the database file's permissions.  An existing file keeps its
    own.  Any other problem is left for SQLite to report as it opens the file.
    """
    try:
        os.close(os.open(os.path.realpath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # FileExistsError is the usual case
        pass


#: Idle read-only connections a Store keeps (see Store._reading); more are opened when needed.
READERS_KEPT = 4
#: UPDATE ... RETURNING (SQLite 3.35, 2021) saves a SELECT per check-in; older ones select.
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35)


class Store(_Outbox, _GroupCommit):
    """The SQLite file that holds all state.

    One connection shared by all threads; every write goes through
    ``transaction()`` (``BEGIN IMMEDIATE``, so a second process on the same file
    waits instead of failing), and the re-entrant lock serialises this
    process's threads.  Methods called inside a transaction join it.  The
    store never formats values into SQL.
    """

    def __init__(self, path: str, history: int = HISTORY) -> None:
        self.path = path
        #: Check-ins, state changes and delivery results kept per alert.
        self.history = history
        #: Bytes of check-in bodies kept per alert (see HISTORY_BYTES).
        self.history_bytes = HISTORY_BYTES
        self._lock = threading.RLock()
        self._depth = 0
        # Group commit (see group_commit): the calls waiting for the next batch,
        # and whether a leader is running one; both under _group_lock.
        self._group_lock = threading.Lock()
        self._group_queue: list[_GroupCall] = []
        self._group_leading = False
        #: The thread running the transaction in progress (its reads see its writes).
        self._owner: int | None = None
        # Read-only connections for reads outside a transaction (pages, the API,
        # metrics, couriers): WAL lets them read beside the writer, so a page
        # never waits for a commit.  Idle ones wait here (at most READERS_KEPT).
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        if path not in ("", ":memory:"):
            _create_private(path)
        # timeout=5 is SQLite's busy timeout (5000 ms, what Litestream asks for):
        # a write waits out Litestream's short checkpoint lock instead of failing.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        try:
            self._conn.row_factory = sqlite3.Row
            for pragma in SQLITE_PRAGMAS:
                self._conn.execute(pragma)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                # Still correct, but check-ins and sweeps then block each other's readers.
                log.warning("%s: SQLite kept journal mode %r instead of WAL", path, mode)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CaduceusError(f"{path}: written by a newer Caduceus (schema {version}); "
                                    "upgrade caduceus.py")
            with self.transaction() as conn:
                # executescript() would commit on its own; run the statements inside ours.
                if version == 0:  # a new file, or one of Caduceus 0.0.11
                    statements = [statement for statement in SCHEMA.split(";") if statement.strip()]
                else:
                    statements = [statement for number, steps in MIGRATIONS if number > version
                                  for statement in steps]
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        """Close the database once any running transaction has finished.  The
        readers go first: the last connection to close checkpoints the WAL."""
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection to read committed state through: the transaction's own,
        in the thread running it (under the lock); else a read-only one of the
        pool, without the lock (a file in memory has only the one connection)."""
        if self.path in ("", ":memory:") or self._owner == threading.get_ident():
            with self._lock:
                yield self._conn
            return
        with self._readers_lock:
            reader = self._readers.pop() if self._readers else None
        if reader is None:
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
            reader = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=5)
            reader.row_factory = sqlite3.Row
            reader.execute(PAGE_CACHE_PRAGMA)
        try:
            yield reader
        finally:
            with self._readers_lock:
                keep = not self._closed and len(self._readers) < READERS_KEPT
                if keep:
                    self._readers.append(reader)
            if not keep:
                reader.close()

    @property
    def write_lock(self) -> threading.RLock:
        """The lock every write holds (re-entrant): held across a transaction and
        what must follow it before another write begins."""
        return self._lock

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block as one transaction: all of it is committed, or none.

        A transaction opened inside another joins it.  If COMMIT itself fails
        (the disk is full, the file is locked), everything is rolled back and
        the error raised, so nothing is reported as saved that was not.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth, self._owner = 1, threading.get_ident()
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth, self._owner = 0, None

    def _all(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._reading() as conn:
            return conn.execute(sql, params).fetchall()

    # Checks ----------------------------------------------------------------

    def sync_checks(self, names: list[str], now: float) -> None:
        """Add rows for new alert names (first seen ``now``); forget removed ones."""
        with self.transaction() as conn:
            known = {row[0] for row in conn.execute("SELECT name FROM checks")}
            # One statement for all new names: a start over 10,000 alerts adds (or finds) them at once.
            conn.executemany("INSERT OR IGNORE INTO checks (name, status, first_seen_at) VALUES (?, ?, ?)",
                             [(name, NEW, now) for name in names if name not in known])
            for name in known - set(names):
                for table, column in (("checks", "name"), ("pings", "check_name"), ("flips", "check_name"),
                                      ("outbox", "check_name"), ("deliveries", "check_name")):
                    conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

    def ensure_check(self, name: str, now: float) -> None:
        """Add a row for an alert first seen at ``now``, unless it has one."""
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO checks (name, status, first_seen_at) VALUES (?, ?, ?)",
                         (name, NEW, now))

    def is_empty(self) -> bool:
        """True while no alert has ever been recorded: the time to import 0.0.11's state."""
        return not self._all("SELECT 1 FROM checks LIMIT 1")

    def checks(self) -> list[sqlite3.Row]:
        """All check rows, in name order."""
        return self._all("SELECT * FROM checks ORDER BY name")

    @contextlib.contextmanager
    def checks_as_committed(self) -> Iterator[Iterator[sqlite3.Row]]:
        """All check rows as the last commit left them, read without holding up
        writers: the snapshot is taken under the write lock, so no transaction
        is half done in it, and read beside the writer (WAL).  The rows come
        one at a time, inside the block: a list of 10,000 would be a peak of
        4 MiB, which the process then keeps."""
        with self._reading() as reader:
            rows = None
            try:
                with self._lock:
                    reader.execute("BEGIN")
                    reader.execute("SELECT 1 FROM checks LIMIT 1").fetchall()  # the snapshot begins here
                rows = reader.execute("SELECT * FROM checks ORDER BY name")
                yield rows
            finally:
                # A reader left in a transaction, or with a statement not read to
                # its end (the block raised), would read this snapshot for ever.
                if rows is not None:
                    rows.close()
                if reader.in_transaction:
                    reader.execute("ROLLBACK")

    def check(self, name: str) -> sqlite3.Row | None:
        """One check's row, or None."""
        rows = self._all("SELECT * FROM checks WHERE name = ?", (name,))
        return rows[0] if rows else None

    def record_ping(self, name: str, at: float, ping: Ping) -> sqlite3.Row | None:
        """Store a signal in the alert's ring of recent pings and update its run
        state; return the check's row as it is now (None, storing nothing, when
        the alert has no row).

        A success moves ``last_ping_at`` (and clears ``clock_step_s``); a
        start sets ``started_at``; a success or failure ends the run and
        records its duration (None when no run was started; never negative).
        A log changes nothing but the history.
        """
        with self.transaction() as conn:
            # One UPDATE (its SET reads the row as it was): on the hot path of every check-in.
            # Monitor moves started_at with a wall clock step; 0 only if one went unseen (a restart).
            # A run without a start has no known duration: forget the previous one.
            update = ("UPDATE checks SET n_pings = n_pings + 1, "
                      "last_ping_at = CASE WHEN :kind = 'success' THEN :at ELSE last_ping_at END, "
                      "clock_step_s = CASE WHEN :kind = 'success' THEN 0 ELSE clock_step_s END, "
                      "last_duration_s = CASE WHEN :kind NOT IN ('success', 'fail') THEN last_duration_s "
                      "WHEN started_at IS NULL THEN NULL ELSE MAX(:at - started_at, 0.0) END, "
                      "started_at = CASE :kind WHEN 'start' THEN :at WHEN 'log' THEN started_at END "
                      "WHERE name = :name")
            params = {"kind": ping.kind, "at": at, "name": name}
            if _HAS_RETURNING:
                row = conn.execute(update + " RETURNING *", params).fetchone()
            else:
                conn.execute(update, params)
                row = conn.execute("SELECT * FROM checks WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            duration_s = row["last_duration_s"] if ping.kind in (SUCCESS, FAIL) else None
            row_n_pings = row["n_pings"] - 1
            # slot: the arrival number (the clock may step back, so not ``at``).
            body_bytes = len(ping.body.encode("utf-8", "surrogatepass"))
            conn.execute("INSERT OR REPLACE INTO pings (check_name, slot, at, kind, exit_status, duration_s,"
                         " body_bytes, body, remote_addr, user_agent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (name, row_n_pings, at, ping.kind, ping.exit_status, duration_s,
                          body_bytes, ping.body, ping.remote_addr, ping.user_agent))
            if row_n_pings >= self.history:  # the ring is full
                conn.execute("DELETE FROM pings WHERE check_name = ? AND slot <= ?",
                             (name, row_n_pings - self.history))
            if body_bytes:  # an empty body cannot take the alert over its budget
                self._trim_bodies(conn, name)
        return row

    def _trim_bodies(self, conn: sqlite3.Connection, name: str) -> None:
        """Empty the bodies of the alert's older signals beyond HISTORY_BYTES
        (counted from the newest; the newest keeps its body whatever its size)."""
        conn.execute("UPDATE pings SET body = '', body_bytes = 0 WHERE check_name = :name AND body_bytes > 0 "
                     "AND slot < (SELECT MAX(slot) FROM pings WHERE check_name = :name) AND slot <= "
                     "(SELECT slot FROM (SELECT slot, SUM(body_bytes) OVER (ORDER BY slot DESC) AS kept "
                     "FROM pings WHERE check_name = :name) WHERE kept > :budget ORDER BY slot DESC LIMIT 1)",
                     {"name": name, "budget": self.history_bytes})

    def pings(self, name: str) -> list[sqlite3.Row]:
        """The alert's recent signals in the order they arrived (not by ``at``:
        the wall clock may have been set back in between)."""
        return self._all("SELECT * FROM pings WHERE check_name = ? ORDER BY slot", (name,))

    def recent_pings(self) -> dict[str, list[sqlite3.Row]]:
        """Every alert's recent signals, in arrival order (see read_recent_pings)."""
        with self._reading() as conn:
            return read_recent_pings(conn)

    def last_ping(self, name: str) -> sqlite3.Row | None:
        """The alert's latest-arrived signal, or None: an older run's output would
        mislead a notice about this one."""
        rows = self._all("SELECT * FROM pings WHERE check_name = ? ORDER BY slot DESC LIMIT 1", (name,))
        return rows[0] if rows else None

    def last_body(self, name: str) -> str:
        """The body of the alert's latest-arrived signal ("" if none)."""
        ping = self.last_ping(name)
        return ping["body"] if ping is not None else ""

    def set_status(self, name: str, old: str, new: str, down_at: float | None = None,
                   notified_at: float | None = None, down_reason: str | None = None) -> bool:
        """Compare-and-swap the status from ``old`` to ``new``; False if it was not ``old``.

        ``down_at``, ``notified_at`` and ``down_reason`` are set too when given
        (None keeps them).
        """
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE checks SET status = ?, down_at = COALESCE(?, down_at), "
                "notified_at = COALESCE(?, notified_at), down_reason = COALESCE(?, down_reason) "
                "WHERE name = ? AND status = ?",
                (new, down_at, notified_at, down_reason, name, old))
            return cursor.rowcount == 1

    def pause(self, name: str, old: str, until: float | None) -> bool:
        """Compare-and-swap the status from ``old`` to paused until ``until``
        (None: until resumed); a run in progress is forgotten."""
        with self.transaction() as conn:
            cursor = conn.execute("UPDATE checks SET status = ?, paused_until = ?, started_at = NULL "
                                  "WHERE name = ? AND status = ?", (PAUSED, until, name, old))
            return cursor.rowcount == 1

    def resume(self, name: str, new: str, at: float) -> bool:
        """Compare-and-swap a paused check to ``new``, its deadline counted from ``at``."""
        with self.transaction() as conn:
            cursor = conn.execute("UPDATE checks SET status = ?, paused_until = NULL, resumed_at = ? "
                                  "WHERE name = ? AND status = ?", (new, at, name, PAUSED))
            return cursor.rowcount == 1

    def set_notified(self, name: str, at: float) -> None:
        """Record when the latest failure notice (or reminder) about a check was queued."""
        with self.transaction() as conn:
            conn.execute("UPDATE checks SET notified_at = ? WHERE name = ?", (at, name))

    def add_flip(self, name: str, at: float, old: str, new: str, reason: str) -> None:
        """Record a state change, keeping the newest ``history`` per alert."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO flips (check_name, at, old, new, reason) VALUES (?, ?, ?, ?, ?)",
                         (name, at, old, new, reason))
            conn.execute("DELETE FROM flips WHERE check_name = ? AND id NOT IN "
                         "(SELECT id FROM flips WHERE check_name = ? ORDER BY id DESC LIMIT ?)",
                         (name, name, self.history))

    def notice_history(self, name: str) -> list[sqlite3.Row]:
        """The alert's recent delivery attempts (at, channel, kind, result, error), oldest first."""
        return self._all("SELECT * FROM deliveries WHERE check_name = ? ORDER BY id", (name,))

    def _add_delivery(self, conn: sqlite3.Connection, notice_id: int, at: float, result: str,
                      error: str) -> None:
        """Record how an attempt to deliver a queued notice ended (in the caller's
        transaction, before the notice may leave the outbox), keeping the newest
        ``history`` per alert."""
        conn.execute("INSERT INTO deliveries (check_name, at, channel, kind, result, error) "
                     "SELECT check_name, ?, channel, kind, ?, ? FROM outbox WHERE id = ?",
                     (at, result, error, notice_id))
        conn.execute("DELETE FROM deliveries WHERE check_name = (SELECT check_name FROM outbox WHERE id = :id) "
                     "AND id NOT IN (SELECT id FROM deliveries WHERE check_name = "
                     "(SELECT check_name FROM outbox WHERE id = :id) ORDER BY id DESC LIMIT :kept)",
                     {"id": notice_id, "kept": self.history})

    def paused_from(self, name: str) -> str | None:
        """The status the alert had when its latest pause began, or None."""
        rows = self._all("SELECT old FROM flips WHERE check_name = ? AND new = ? AND old != ? "
                         "ORDER BY id DESC LIMIT 1", (name, PAUSED, PAUSED))
        return rows[0]["old"] if rows else None

    def last_down_flip(self, name: str) -> int | None:
        """The id of the alert's latest change to down: it names the failure
        (the same for its reminders and its recovery)."""
        rows = self._all("SELECT MAX(id) AS id FROM flips WHERE check_name = ? AND new = ?", (name, DOWN))
        return rows[0]["id"]

    def flips(self, name: str) -> list[sqlite3.Row]:
        """A check's recent state changes, oldest first."""
        return self._all("SELECT * FROM flips WHERE check_name = ? ORDER BY id", (name,))

    def shift_times(self, step_s: float) -> None:
        """Move every time that something is timed from by ``step_s``, because the
        wall clock stepped by that much: each check's first sighting, last
        success, run start, down time and last notice, and the outbox's retry
        times, so every wait keeps its elapsed time.  ``clock_step_s`` adds the
        step up until the next success (a schedule needs it, see ``deadline``).
        History (pings, flips) keeps the times it was recorded at.
        """
        with self.transaction() as conn:
            conn.execute("UPDATE checks SET first_seen_at = first_seen_at + :step, "
                         "last_ping_at = last_ping_at + :step, started_at = started_at + :step, "
                         "down_at = down_at + :step, notified_at = notified_at + :step, "
                         "paused_until = paused_until + :step, resumed_at = resumed_at + :step, "
                         "clock_step_s = clock_step_s + :step", {"step": step_s})
            conn.execute("UPDATE outbox SET created_at = created_at + :step, "
                         "next_attempt_at = next_attempt_at + :step WHERE failed = 0", {"step": step_s})

    # Liveness --------------------------------------------------------------

    def record_alive(self, at: float) -> None:
        """Record that Caduceus was running at ``at`` (written every ALIVE_EVERY_S,
        so a restart knows when the previous run stopped)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_alive_at', ?)", (at,))

    def last_signal_at(self) -> float | None:
        """When the latest success or start of any alert arrived, or None."""
        rows = self._all("SELECT MAX(MAX(COALESCE(last_ping_at, 0), COALESCE(started_at, 0))) AS at "
                         "FROM checks")
        return rows[0]["at"] if rows else None

    def last_alive_at(self) -> float | None:
        """When Caduceus was last recorded running, or None if never."""
        rows = self._all("SELECT value FROM meta WHERE key = 'last_alive_at'")
        return float(rows[0]["value"]) if rows else None

    # Caduceus 0.0.11 -------------------------------------------------------

    def legacy_state(self) -> dict[str, tuple[float | None, float | None]]:
        """Read a Caduceus 0.0.11 database in the same file, without changing it
        (see read_legacy_state)."""
        with self._lock:
            return read_legacy_state(self._conn)

    def import_legacy(self, name: str, status: str, last_ping_at: float | None,
                      down_at: float | None, notified_at: float | None) -> None:
        """Set a check's state from Caduceus 0.0.11's tables (see legacy_state)."""
        with self.transaction() as conn:
            conn.execute("UPDATE checks SET status = ?, last_ping_at = ?, down_at = ?, notified_at = ?, "
                         "down_reason = ? WHERE name = ?",
                         (status, last_ping_at, down_at, notified_at,
                          REASON_MISSED if status == DOWN else "", name))


###############################################################################
# Caduceus 0.0.11's tables ####################################################
###############################################################################

def read_legacy_state(conn: sqlite3.Connection) -> dict[str, tuple[float | None, float | None]]:
    """Read the tables of Caduceus 0.0.11 through ``conn``, without changing them.

    Returns ``{alert: (last check-in, last failure notice)}`` as epoch seconds
    (None for none); 0.0.11 wrote naive local times, read here in the local
    zone.  A row whose time cannot be read is skipped, so one bad row hides
    no good one.  Empty when the file has no 0.0.11 tables.  The server (at
    its first start) and ``check`` (before it) both read the file this way.
    """
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    latest: dict[str, dict[str, float]] = {"alert": {}, "notification": {}}
    for table, times in latest.items():
        if table not in tables:
            continue
        for alert_id, text in conn.execute(f"SELECT alert_id, timestamp FROM {table}"):
            at = _legacy_time(text)
            if at is not None and at > times.get(alert_id, -math.inf):
                times[alert_id] = at
    checked_in, notified = latest["alert"], latest["notification"]
    return {name: (checked_in.get(name), notified.get(name)) for name in checked_in.keys() | notified.keys()}


def read_recent_pings(conn: sqlite3.Connection) -> dict[str, list[sqlite3.Row]]:
    """``{alert: [its recent signals in the order they arrived]}`` through ``conn``
    (the server's, or ``status``'s read-only one)."""
    pings: dict[str, list[sqlite3.Row]] = {}
    # Before schema 4 a slot was the arrival number modulo 100, in a ring.
    ring = conn.execute("PRAGMA user_version").fetchone()[0] < 4
    order = "(slot + 100 - checks.n_pings % 100) % 100" if ring else "slot"
    for row in conn.execute("SELECT pings.* FROM pings JOIN checks ON checks.name = pings.check_name "
                            f"ORDER BY check_name, {order}"):
        pings.setdefault(row["check_name"], []).append(row)
    return pings


def _legacy_time(text: Any) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(str(text)).timestamp()
    except (ValueError, OverflowError, OSError):  # not a time, or one the platform cannot place
        return None


def legacy_check_state(spec: CheckSpec, last_ping_at: float | None, notified_at: float | None
                       ) -> tuple[str, float | None, float | None, float | None] | None:
    """What an alert's 0.0.11 state means here: ``(status, last_ping_at, down_at,
    notified_at)``, or None when there is nothing to take over.

    A failure notice means down since its deadline (or the notice, if that
    is earlier or there was no check-in); a check-in alone means up.
    """
    if notified_at is None:
        return None if last_ping_at is None else (UP, last_ping_at, None, None)
    down_at = spec.due_after(last_ping_at) if last_ping_at is not None else notified_at
    return DOWN, last_ping_at, min(down_at, notified_at), notified_at


###############################################################################
# Rules: deadlines and notices ################################################
###############################################################################

#: First retry of a failed notice after this, then doubling ...
RETRY_FIRST_S = 5.0
#: ... up to this between attempts ...
RETRY_MAX_S = 300.0
#: ... for at least this long before giving up.
RETRY_FOR_S = 24 * 3600.0
#: Lines and characters of a job's output quoted in a notice.
TAIL_LINES, TAIL_CHARS = 10, 2000
#: A change of the wall clock against elapsed time larger than this is a step (NTP
#: slews by at most 0.5 ms per second, and a sweep runs at least every minute).
CLOCK_STEP_TOLERANCE_S = 1.0
#: The sweep rebuilds its heap of next events from every row this often (elapsed
#: time), as a safety net; also after a start, a reload, a clock step or a failure.
#: Each rebuild reads beside the writer: check-ins go on meanwhile.
REINDEX_EVERY_S = 600.0


def elapsed_time() -> float:
    """Seconds on a clock nobody can set, that keeps counting while the machine
    sleeps (Linux's CLOCK_BOOTTIME; ``time.monotonic`` elsewhere): a suspended
    machine's lost hours are real time that passed, not a wall clock step."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


@dataclasses.dataclass(frozen=True)
class Flip:
    """A status change of one check, stamped with when it really happened."""

    check: str
    old: str
    new: str
    reason: str
    at: float


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """How one delivery attempt ended, as the outbox is to record it."""

    notice_id: int
    attempts: int
    sent: bool = False
    error: str = ""
    retry_at: float | None = None  #: None, when not sent: given up
    at: float | None = None  #: when the attempt ended, for the delivery history

    @property
    def result(self) -> str:
        """``sent``, ``failed`` (to be retried) or ``given_up``."""
        return "sent" if self.sent else "failed" if self.retry_at is not None else "given_up"

    @property
    def settled(self) -> bool:
        """Sent or given up: never to be attempted again."""
        return self.sent or self.retry_at is None

    def record(self, store: Store) -> None:
        """Write the outcome to the outbox; raises sqlite3.Error when it cannot."""
        if self.sent:
            store.notice_sent(self.notice_id, self.at)
        else:
            store.notice_failed(self.notice_id, self.attempts, self.error, self.retry_at, self.at)


def deadline(spec: CheckSpec, row: Mapping[str, Any]) -> tuple[float, str]:
    """When a check that is not down goes down if nothing arrives, and why.

    The due time follows the last success (or, never having succeeded, the
    time the check was first seen; or the end of a pause, if later): plus ``every``, or the next ``schedule``
    time, plus ``grace``.  A run started more than ``max_runtime`` ago is due
    earlier, for running too long.

    After a wall clock step (``clock_step_s``, see Monitor) an ``every``
    deadline keeps its elapsed time.  A ``schedule`` deadline stays that of
    the run the last success counted for; a forward step moves it on with the
    clock, a backward one leaves it at the scheduled time on the new clock (a
    cron whose clock stepped back runs the job that much later in real time:
    an earlier deadline would cry wolf).
    """
    since = row["last_ping_at"] if row["last_ping_at"] is not None else row["first_seen_at"]
    # A pause's end counts as a fresh start (a file not yet migrated has no resumed_at).
    resumed_at = row["resumed_at"] if "resumed_at" in row.keys() else None
    if resumed_at is not None and resumed_at > since:
        since = resumed_at
    # A read-only `check` of a file not yet migrated has no clock_step_s.
    step_s = row["clock_step_s"] if "clock_step_s" in row.keys() else 0.0
    if spec.schedule is None or not step_s:
        due = spec.due_after(since)
    else:
        # since moved with the clock; the run it counted for is found from where it was.
        due = spec.due_after(since - step_s) + max(step_s, 0.0)
    if spec.max_runtime_s is not None and row["started_at"] is not None:
        run_due = row["started_at"] + spec.max_runtime_s
        if run_due < due:
            return run_due, (f"ran too long: started at {format_time(row['started_at'])} "
                             f"and has not finished within {format_duration(spec.max_runtime_s)}")
    return due, REASON_MISSED


def next_event_at(spec: CheckSpec, row: Mapping[str, Any]) -> float:
    """When a check next needs the sweeper: its reminder if down, the end of its
    pause if paused (infinity: no end), else its deadline."""
    if row["status"] == DOWN:
        return row["notified_at"] + spec.notify_every_s
    if row["status"] == PAUSED:
        return math.inf if row["paused_until"] is None else row["paused_until"]
    return deadline(spec, row)[0]


def notice_facts(event: str, spec: CheckSpec, row: Mapping[str, Any], reason: str,
                 last_ping: Mapping[str, Any] | None, now: float, config: Config,
                 incident: str = "", monitor_down: tuple[float, float] | None = None) -> Notice:
    """The facts of a notice about ``row`` (the check as it is after the change)
    at ``now``; ``last_ping`` is the latest signal (its output and exit status);
    ``monitor_down`` when Caduceus itself was not running as the deadline passed.

    A recovery reports the reason the alert was down for; a failure that
    missed its deadline (not one the job reported) says by how much.
    Recipients (the alert's own; the channel adds its default) and links are
    decided here, so every attempt sends the same notice.
    """
    due_at = None
    if event == FAILING and not reason.startswith((REASON_FAILED, "exit status")):
        due_at = deadline(spec, row)[0]
    if event == RECOVERED:
        reason = row["down_reason"] or REASON_MISSED
    output = last_ping["body"] if last_ping is not None else ""
    url, checkin_url = _links(config, spec.name)
    return Notice(
        alert=spec.name, event=event, at=now, status=row["status"], reason=reason,
        since=row["down_at"] if row["status"] == DOWN or event == RECOVERED else None,
        watched_since=row["first_seen_at"], last_checkin=row["last_ping_at"], due_at=due_at,
        schedule=spec.describe(), interval_s=spec.every_s, timezone=str(spec.tz),
        notify_every_s=spec.notify_every_s, last_duration_s=row["last_duration_s"],
        last_exit_status=last_ping["exit_status"] if last_ping is not None else None,
        body_tail="\n".join(_tail(output)), url=url, checkin_url=checkin_url,
        recipients=spec.recipient_emails, incident=incident,
        monitor_down_from=monitor_down[0] if monitor_down else None,
        monitor_down_to=monitor_down[1] if monitor_down else None)


def test_notice(config: Config, spec: CheckSpec | None, now: float) -> Notice:
    """A clearly marked test notice about ``spec`` (or about no alert), for
    ``test-notify``: made from the config alone, as the alert's state is not read."""
    if spec is None:
        return Notice(alert="test-notify", event=TEST, at=now, status=TEST, reason="a test notice")
    url, checkin_url = _links(config, spec.name)
    return Notice(alert=spec.name, event=TEST, at=now, status=TEST, reason="a test notice",
                  schedule=spec.describe(), interval_s=spec.every_s, timezone=str(spec.tz),
                  notify_every_s=spec.notify_every_s, url=url, checkin_url=checkin_url,
                  recipients=spec.recipient_emails)


def _links(config: Config, name: str) -> tuple[str, str]:
    """The alert's page and its check-in URL under ``base_url`` ("" without one).
    The check-in URL is given without the key: notices travel further than the key may."""
    if not config.base_url:
        return "", ""
    quoted = urllib.parse.quote(name, safe="")
    return f"{config.base_url}/alerts/{quoted}", f"{config.base_url}/reset/{quoted}/"


def _for_channel(notice: Notice, config: Config, channel: str) -> Notice:
    """The notice as queued for one channel instance: the alert's recipients, else
    the instance's own (an email channel's ``recipient_emails``)."""
    instance = config.channels.get(channel)
    default = getattr(instance.conf, "recipient_emails", ()) if instance is not None else ()
    return dataclasses.replace(notice, recipients=notice.recipients or default)


def _tail(output: str) -> list[str]:
    text = output[-TAIL_CHARS:].rstrip()
    return text.splitlines()[-TAIL_LINES:] if text else []


###############################################################################
# Delivery ####################################################################
###############################################################################

class _Delivery:
    """The delivery half of ``Monitor``: sending the outbox's notices through the
    channels, with retries and backoff, and recording how each attempt went.  A
    mixin: it uses the monitor's ``store``, ``config``, ``senders``, ``clock``,
    ``sending``, ``tally`` and ``_unrecorded``."""

    def deliver(self, channel: str) -> float | None:
        """Send the queued notices of a channel instance, oldest first; return when
        to call again.

        Stops at the first failure, so notices never overtake each other: the
        failed one is retried after 5 s, doubling up to 5 minutes (or after the
        wait the channel asked for, at most an hour), and given up (and logged
        as an error) after a day or at a permanent error.  Returns None when
        nothing is queued.

        When the database cannot record an outcome (disk full, read-only), this
        process keeps it and tries again every RETRY_FIRST_S: a notice that was
        sent is not sent again, and a failure still counts.  Only one courier
        may call this for a given channel instance at a time.
        """
        unrecorded = self._unrecorded.setdefault(channel, {})
        for outcome in list(unrecorded.values()):
            if not self._record(outcome, unrecorded):
                break  # the next write would fail too (and a locked database makes each wait)
        while True:
            settled = [notice_id for notice_id, outcome in unrecorded.items() if outcome.settled]
            row = self.store.next_notice(channel, skip=settled)
            now = self.clock()
            if row is None:
                return self._come_back(unrecorded, None, now)
            known = unrecorded.get(row["id"])
            attempts = known.attempts if known else row["attempts"]
            next_attempt_at = known.retry_at if known else row["next_attempt_at"]
            if next_attempt_at > now:
                return self._come_back(unrecorded, next_attempt_at, now)
            outcome = self._attempt(channel, row, attempts + 1)
            self.tally.add("notifications", (channel, outcome.result))
            self._record(outcome, unrecorded)
            if not outcome.settled:
                return self._come_back(unrecorded, outcome.retry_at, self.clock())

    def _attempt(self, channel: str, row: Mapping[str, Any], attempt: int) -> _Outcome:
        """Send one queued notice and log how it went."""
        notice = self._queued_notice(row)
        subject = render_text(notice)[0]
        try:
            instance = self.config.channels.get(channel)
            if instance is None:
                raise NotifyError(f"channel {channel!r} is no longer configured", permanent=True)
            send = self.senders.get(instance.kind)
            if send is None:
                raise NotifyError(f"no notifier for channel {channel!r}", permanent=True)
            self.sending[channel] = self.clock()
            try:
                send(instance.conf, notice)
            except NotifyError:
                raise
            except Exception as exc:
                # A notifier bug must cost an attempt, not block its channel forever.
                log.exception("%s: %s notifier failed unexpectedly", notice.alert, channel)
                raise NotifyError(f"unexpected {type(exc).__name__}") from None
            finally:
                self.sending.pop(channel, None)
        except NotifyError as exc:
            now = self.clock()  # a send can take its whole timeout before failing
            delay = min(RETRY_FIRST_S * 2 ** min(attempt - 1, 32), RETRY_MAX_S)
            delay = max(delay, _retry_wait_s(exc.retry_after_s) or 0.0)
            if exc.permanent or now - row["created_at"] >= RETRY_FOR_S:
                log.error("%s: gave up sending %r to %s after %d attempts: %s",
                          notice.alert, subject, channel, attempt, exc)
                return _Outcome(row["id"], attempt, error=str(exc), at=now)
            log.warning("%s: could not send %r to %s (attempt %d): %s; retrying in %s",
                        notice.alert, subject, channel, attempt, exc, format_duration(delay))
            return _Outcome(row["id"], attempt, error=str(exc), retry_at=now + delay, at=now)
        log.info("%s: sent %r to %s (attempt %d)", notice.alert, subject, channel, attempt)
        return _Outcome(row["id"], attempt, sent=True, at=self.clock())

    def _queued_notice(self, row: Mapping[str, Any]) -> Notice:
        """The notice an outbox row holds.  One queued by schema 1 or 2 (before
        facts were kept) has only its finished text: its recipients are the
        alert's.  Facts that cannot be read leave the subject: a notice with
        too little said beats a channel blocked for ever."""
        if row["facts"]:
            try:
                return Notice.from_json(row["facts"])
            except (ValueError, TypeError, RecursionError):  # the file was edited: send what is left
                log.error("%s: notice %d's facts cannot be read; sending its subject alone",
                          row["check_name"], row["id"])
                row = {**dict(row), "body": "(The details of this notice could not be read.)\n"}
        spec = self.config.checks.get(row["check_name"])
        events = {kind: event for event, kind in EVENT_KINDS.items()}
        notice = Notice(alert=row["check_name"], event=events.get(row["kind"], FAILING), at=row["created_at"],
                        status=UP if row["kind"] == NOTICE_UP else DOWN,
                        recipients=spec.recipient_emails if spec else (), text=(row["subject"], row["body"]))
        return _for_channel(notice, self.config, row["channel"])

    def _record(self, outcome: _Outcome, unrecorded: dict[int, _Outcome]) -> bool:
        """Write an outcome to the outbox, or keep it in ``unrecorded`` to try again
        (and return False)."""
        try:
            outcome.record(self.store)
        except sqlite3.Error as exc:
            if outcome.notice_id not in unrecorded:
                log.error("the database cannot record that notice %d was %s (%s); "
                          "keeping it in memory and trying again every %s", outcome.notice_id,
                          "sent" if outcome.sent else "attempted", exc, format_duration(RETRY_FIRST_S))
            unrecorded[outcome.notice_id] = outcome
            return False
        if unrecorded.pop(outcome.notice_id, None) is not None:
            log.info("the database recorded notice %d after all", outcome.notice_id)
        return True

    @staticmethod
    def _come_back(unrecorded: dict[int, _Outcome], at: float | None, now: float) -> float | None:
        """``at``, or sooner when there are outcomes still to record."""
        if not unrecorded:
            return at
        return now + RETRY_FIRST_S if at is None else min(at, now + RETRY_FIRST_S)


###############################################################################
# Monitor: the heap of next events ############################################
###############################################################################

class _NextEvents:
    """The heap half of ``Monitor``: each alert's next event (``next_event_at``)
    in a heap of ``(at, version, name)``, so a sweep takes only what is due.
    An entry counts while its version is the alert's latest (lazy
    invalidation).  A mixin: it uses the monitor's ``store``, ``config`` and
    ``monotonic``, and ``_heap``, ``_heap_version``, ``_heap_dirty``,
    ``_heap_dirtied``, ``_indexed_at`` and ``_rescheduled``, all under
    ``_heap_lock``.
    """

    def _schedule(self, spec: CheckSpec, row: Mapping[str, Any] | None) -> float:
        """Put the check's next event in the heap (in the transaction that changed it),
        replacing its earlier entry; none while paused without an end.  Returns it."""
        at = next_event_at(spec, row) if row is not None else math.inf
        with self._heap_lock:
            version = self._heap_version.get(spec.name, 0) + 1
            self._heap_version[spec.name] = version
            if self._rescheduled is not None:
                self._rescheduled.add(spec.name)
            if at != math.inf:
                heapq.heappush(self._heap, (at, version, spec.name))
            if len(self._heap) > 2 * len(self._heap_version) + 1024:  # mostly stale: compact
                self._heap = [entry for entry in self._heap if self._heap_version.get(entry[2]) == entry[1]]
                heapq.heapify(self._heap)
        return at

    @staticmethod
    def _next_events(rows: Iterable[Mapping[str, Any]], config: Config) -> dict[str, float]:
        """Each alert of ``config`` that has a row: its next event (inf: none)."""
        # spec.name, not row["name"]: 10,000 entries share the config's strings instead of copies.
        return {spec.name: next_event_at(spec, row) for row in rows
                for spec in (config.checks.get(row["name"]),) if spec is not None}

    def _reindex(self, config: Config) -> None:
        """Rebuild the heap from every row (in the caller's transaction)."""
        events = self._next_events(self.store.checks(), config)
        with self._heap_lock:
            self._heap = [(at, 1, name) for name, at in events.items() if at != math.inf]
            heapq.heapify(self._heap)
            self._heap_version = dict.fromkeys(events, 1)
            self._heap_dirty = False
            self._indexed_at = self.monotonic()

    def _heap_may_be_wrong(self) -> None:
        """Have the heap rebuilt from every row before it is used again (a start,
        a reload, a clock step, an operation that failed with its entries in)."""
        with self._heap_lock:
            self._heap_dirty = True
            self._heap_dirtied += 1

    def _reindex_beside(self) -> None:
        """Rebuild the heap from every row as committed, read without the write
        lock, so check-ins go on meanwhile (at 100,000 alerts a rebuild takes
        0.7 s): after a start, a reload or a failure, and every REINDEX_EVERY_S.

        An alert scheduled after the rebuild began keeps its own entry, which is
        at least as new as the row read.  Any schedule before that belongs to a
        transaction that had ended when the snapshot was taken (under the write
        lock), so the snapshot has it.  A rebuild that the heap went wrong
        again during (or a reload) gives way: the heap stays marked for a
        rebuild, which the caller then makes under the lock.  Called outside
        any transaction; one rebuild at a time (the sweeper's, a reload's).
        """
        with self._rebuilding:
            config = self.config
            with self._heap_lock:
                self._rescheduled = set()
                dirtied = self._heap_dirtied
            try:
                with self.store.checks_as_committed() as rows:
                    events = self._next_events(rows, config)
            except BaseException:
                with self._heap_lock:
                    self._rescheduled = None
                raise
            self._install(events, dirtied, config)

    def _install(self, events: dict[str, float], dirtied: int, config: Config) -> None:
        """Make ``events`` the heap, but for the alerts rescheduled since the rebuild
        began (up to this moment: under the same hold of the lock); not if the heap
        went wrong again (or the config changed) meanwhile."""
        with self._heap_lock:
            rescheduled, self._rescheduled = self._rescheduled, None
            if self._heap_dirtied != dirtied or config is not self.config:
                return
            versions = dict(self._heap_version)
            heap = [entry for entry in self._heap if entry[2] in rescheduled and versions.get(entry[2]) == entry[1]]
            for name, at in events.items():
                if name not in rescheduled:
                    versions[name] = versions.get(name, 0) + 1
                    if at != math.inf:
                        heap.append((at, versions[name], name))
            heapq.heapify(heap)
            self._heap, self._heap_version = heap, versions
            self._heap_dirty = False
            self._indexed_at = self.monotonic()

    def _pop_due(self, now: float) -> list[str]:
        """Take the alerts whose next event is at or before ``now`` off the heap
        (the sweep puts each back with its new next event)."""
        due = []
        with self._heap_lock:
            while self._heap and self._heap[0][0] <= now:
                _, version, name = heapq.heappop(self._heap)
                if self._heap_version.get(name) == version:
                    # A version of its own, not none: counting again from 1 would
                    # bring back an older entry still in the heap.
                    self._heap_version[name] = version + 1
                    due.append(name)
        return due

    def next_sweep_at(self) -> float | None:
        """When the next check goes overdue, is due a reminder or ends its pause;
        None with nothing to wait for (no checks, or all paused without an end).
        Read from the heap (rebuilt first when it may be wrong)."""
        if self._heap_dirty:
            self._reindex_beside()
        if self._heap_dirty:  # it went wrong again while being rebuilt: rebuild it under the lock
            with self.store.transaction():
                self._reindex(self.config)
        with self._heap_lock:
            heap = self._heap
            while heap and self._heap_version.get(heap[0][2]) != heap[0][1]:
                heapq.heappop(heap)
            return heap[0][0] if heap else None


###############################################################################
# Monitor #####################################################################
###############################################################################


class _Tally:
    """Counters since the start, for /metrics: ``add(family, key)``, ``counts(family)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[Any, int]] = {}

    def add(self, family: str, key: Any) -> None:
        with self._lock:
            counts = self._counts.setdefault(family, {})
            counts[key] = counts.get(key, 0) + 1

    def counts(self, family: str) -> dict[Any, int]:
        with self._lock:
            return dict(self._counts.get(family, {}))


class Monitor(_Delivery, _NextEvents):
    """The rules: signals, deadlines, and which notices to send.

    =============  ====================  =====================================
    from           event                 to, and what is sent
    =============  ====================  =====================================
    new, up        success               up, silently
    down           success               up: "is reporting again"
    new, up        fail / exit 1-255     down at once: "is failing"
    new, up        deadline passes       down: "is failing" (the flip is
                                         stamped with the deadline, not the
                                         time of the sweep)
    down           notify_every since    down: "is still failing"
                   the previous notice
    any            start                 unchanged; the run is timed, and
                                         with max_runtime, due to finish
    any            log                   unchanged; kept in the history
    any            pause()               paused, silently: nothing is judged
    paused         resume(), success,    up (new if it never succeeded), its
                   the end of ``until``  deadline counted from then; a
                                         failure then goes down as above
    =============  ====================  =====================================

    State changes and the notices they cause are committed in one
    transaction; notices go to the outbox and ``deliver()`` sends them later,
    so no check-in waits on a channel.  ``senders`` maps a kind of channel to
    its ``send(conf, notice)`` (see CHANNELS; each configured instance of the
    kind is sent to with its own conf); ``clock`` returns epoch seconds and is
    read once per operation.

    Wall clock steps.  Deadlines are kept in elapsed time: each operation
    compares ``clock`` with ``monotonic`` (an elapsed-time clock nobody can
    set), and when their difference moved by more than
    CLOCK_STEP_TOLERANCE_S since the previous operation, the wall clock was
    stepped (set by hand or by NTP): it logs a warning and moves every stored
    time that a wait counts from by the step (``Store.shift_times``).  So an
    alert due in 10 minutes before a step, either way, is due 10 minutes of
    real time after it; runs, ``max_runtime``, reminders and notice retries
    keep their real length.  A ``schedule`` alert stays on its wall-clock
    schedule except for the run it is waiting for: a forward step moves that
    deadline on with the clock, a backward step leaves it at the scheduled
    time as the new clock shows it (cron runs the job by that clock), so no
    step fakes a failure; see ``deadline``.  History and a notice's "Last
    output" follow the order signals arrived in, not their times.  Elapsed
    time does not survive a restart: a step while Caduceus is stopped is not
    seen.  ``monotonic`` defaults to ``elapsed_time`` when ``clock`` is
    ``time.time``, and else to ``clock`` itself (a clock given alone is
    trusted never to step).
    """

    def __init__(self, store: Store, config: Config,
                 senders: Mapping[str, Callable[[Any, Notice], None]],
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.store = store
        self.config = config
        self.senders = senders
        self.clock = clock
        if monotonic is None:
            monotonic = elapsed_time if clock is time.time else clock
        self.monotonic = monotonic
        #: clock() - monotonic() at the latest operation; None before the first.
        self._clock_offset: float | None = None
        self._deadline_listeners: list[Callable[[float], None]] = []
        self._outbox_listeners: list[Callable[[float], None]] = []
        #: Per channel, outcomes the database refused to record (disk full, read-only),
        #: by notice id: kept until it takes them, so a sent notice is not sent again.
        self._unrecorded: dict[str, dict[int, _Outcome]] = {}
        #: When Caduceus itself last stopped and started again, (from, to), as
        #: found by ``start()``; None at a first start.
        self.downtime: tuple[float, float] | None = None
        #: Per channel, when the send in progress began (``clock``): see Watchdog.
        self.sending: dict[str, float] = {}
        #: Signals by (alert, kind) and deliveries by (channel, result) since the start.
        self.tally = _Tally()
        # The heap of next events (see _NextEvents): updated inside the
        # transactions that change a check; rebuilt from every row, beside the
        # writer, when it may be wrong (a failed operation, a start, a reload, a
        # clock step) and every REINDEX_EVERY_S.  Under _heap_lock.
        self._heap_lock = threading.Lock()
        self._heap: list[tuple[float, int, str]] = []
        self._heap_version: dict[str, int] = {}
        self._heap_dirty = True
        self._heap_dirtied = 0  # times it went dirty: a rebuild that began before the last gives way
        self._rebuilding = threading.Lock()  # one _reindex_beside at a time
        self._indexed_at = -math.inf
        #: While a rebuild reads beside the writer (_reindex_beside): the alerts
        #: scheduled since it began, whose entries are newer than what it read.
        self._rescheduled: set[str] | None = None

    def on_deadline(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(at)`` when a check's next event may have moved to ``at``."""
        self._deadline_listeners.append(listener)

    def on_outbox(self, listener: Callable[[float], None]) -> None:
        """Call ``listener(now)`` after notices were queued."""
        self._outbox_listeners.append(listener)

    def start(self) -> None:
        """Bring the database in line with the config: add new alerts, forget removed
        ones, and on the first run over a Caduceus 0.0.11 file, import its state."""
        with self._operation() as now:
            first_run = self.store.is_empty()
            self.store.sync_checks(list(self.config.checks), now)
            self._heap_may_be_wrong()
            if first_run:
                self._import_legacy()
            last_alive_at = self.store.last_alive_at()
            if last_alive_at is not None:
                # Alive is written every few seconds: a later check-in proves it ran longer.
                last_alive_at = max(last_alive_at, self.store.last_signal_at() or last_alive_at)
            if last_alive_at is not None and last_alive_at < now:
                self.downtime = (last_alive_at, now)
            self.store.record_alive(now)

    def record_alive(self) -> float:
        """Record that Caduceus is running now (a small write: it also proves the
        database writable); return the time recorded.  Raises sqlite3.Error."""
        with self._operation() as now:
            self.store.record_alive(now)
        return now

    def reload(self, config: Config) -> tuple[list[str], list[str], list[str]]:
        """Switch to ``config``; return the names of the alerts added, removed and changed.

        Added alerts start as first seen now; removed ones are forgotten with
        their history and queued notices; a changed ``every`` or ``schedule``
        counts from the stored last check-in (the sweeper is told of the new
        earliest deadline).  The switch happens inside one transaction, so a
        check-in is recorded wholly under the old config or the new one.
        Channels and recipients apply from the next notice sent.
        """
        with self._operation() as now:
            old = self.config.checks
            added = [name for name in config.checks if name not in old]
            removed = [name for name in old if name not in config.checks]
            changed = [name for name in config.checks if name in old and config.checks[name] != old[name]]
            self.store.sync_checks(list(config.checks), now)
            self.config = config
            self._heap_may_be_wrong()
        next_at = self.next_sweep_at()
        if next_at is not None:
            self._tell(self._deadline_listeners, next_at)
        return added, removed, changed

    def _down_while(self, due: float) -> tuple[float, float] | None:
        """``downtime``, if the deadline ``due`` passed while Caduceus was not running."""
        if self.downtime is None or not self.downtime[0] <= due <= self.downtime[1]:
            return None
        return self.downtime

    def _import_legacy(self) -> None:
        for name, (last_ping_at, notified_at) in self.store.legacy_state().items():
            spec = self.config.checks.get(name)
            state = legacy_check_state(spec, last_ping_at, notified_at) if spec is not None else None
            if state is None:
                continue
            self.store.import_legacy(name, *state)
            if state[0] == UP:
                log.info("%s: imported last check-in %s from Caduceus 0.0.11", name, format_time(last_ping_at))
            else:
                log.info("%s: imported failing state (notified %s) from Caduceus 0.0.11", name,
                         format_time(notified_at))

    # Signals ---------------------------------------------------------------

    def ping(self, name: str, ping: Ping = Ping()) -> Flip | None:
        """Record a signal from a job; return the flip it caused, if any.

        Raises ``KeyError`` for a name that is not configured (read inside the
        transaction, so a reload cannot remove it halfway).  When it returns,
        the signal is committed and any notice it caused is queued.  Signals
        from several threads at once are committed together (Store.group_commit).
        """
        offsets: list[tuple[float | None, float | None]] = []

        def record() -> tuple[Flip | None, str, float, float]:
            before = self._clock_offset
            result = self._record_signal(name, ping)
            offsets.append((before, self._clock_offset))
            return result

        try:
            flip, status, next_at, now = self.store.group_commit(record)
        except BaseException:
            # The batch's commit failed: a clock step found in it was rolled back too,
            # and so was the heap's new entry.
            self._heap_may_be_wrong()
            if offsets and self._clock_offset == offsets[0][1]:
                self._clock_offset = offsets[0][0]
            raise
        self.tally.add("checkins", (name, ping.kind))
        if flip:
            self._tell(self._outbox_listeners, now)
        if status != DOWN:
            self._tell(self._deadline_listeners, next_at)
        return flip

    def _record_signal(self, name: str, ping: Ping) -> tuple[Flip | None, str, float, float]:
        """Ping's work in the database: ``(flip, status after, next event, now)``."""
        flip = None
        with self._operation() as now:
            spec = self.config.checks[name]
            # ``after`` serves as the row before too: recording changes only run fields,
            # not the status, the pause or the down fields read below.
            row = after = self.store.record_ping(name, now, ping)
            if after is None:  # lost (the database was edited): start the alert afresh
                self.store.ensure_check(name, now)
                row = after = self.store.record_ping(name, now, ping)
            changed = True  # the status or the pause: read the row again
            unpaused = row["status"] == PAUSED and ping.kind in (SUCCESS, FAIL)
            if unpaused:
                # A paused alert's next check-in ends the pause (healthchecks.io's rule).  One
                # paused while down ends down: a success is then its recovery, told (so a
                # PagerDuty incident closes), and a failure is no new failure.
                back_to = DOWN if self.store.paused_from(name) == DOWN else None
                self._unpause(spec, after, now, f"{ping.kind} from {ping.remote_addr or 'a job'}", back_to)
                row = self.store.check(name)
            if ping.kind == SUCCESS and row["status"] == NEW:
                self.store.set_status(name, NEW, UP)
            elif ping.kind == SUCCESS and row["status"] == DOWN:
                flip = self._flip(spec, row, UP, row["down_reason"], now, now)
            elif ping.kind == FAIL and row["status"] != DOWN:
                reason = f"exit status {ping.exit_status}" if ping.exit_status else REASON_FAILED
                flip = self._flip(spec, row, DOWN, reason, now, now)
            else:
                changed = unpaused
            row = self.store.check(name) if changed else after
            next_at = self._schedule(spec, row)
        return flip, row["status"], next_at, now

    # Pauses ----------------------------------------------------------------

    def pause(self, name: str, until: float | None = None, by: str = "") -> None:
        """Stop judging the alert: it sends nothing and stays paused until
        ``resume()``, its next success or failure, or ``until`` (epoch seconds;
        None: no end), after which its deadline counts from the pause's end.
        Pausing a paused alert moves its end.  The pause is kept in the state
        changes with ``by`` (who asked).  Raises ``KeyError`` for a name that is
        not configured and ``ValueError`` for an ``until`` not in the future.
        """
        if name not in self.config.checks:
            raise KeyError(name)
        with self._operation() as now:
            if until is not None and until <= now:
                raise ValueError(f"until: {format_time(until)} is not in the future")
            if until is not None and until > now + MAX_DURATION_S:
                raise ValueError("until: expected at most 10 years from now")
            row = self.store.check(name)
            if row is None:  # lost (the database was edited): start the alert afresh
                self.store.ensure_check(name, now)
                row = self.store.check(name)
            self.store.pause(name, row["status"], until)
            words = f"paused by {by or 'someone'}" + (f" until {format_time(until)}" if until is not None else "")
            self.store.add_flip(name, now, row["status"], PAUSED, words)
            self._schedule(self.config.checks[name], self.store.check(name))
        log.warning("%s: %s", name, words)
        if until is not None:
            self._tell(self._deadline_listeners, until)

    def resume(self, name: str, by: str = "") -> bool:
        """End the alert's pause now; False if it was not paused.  Raises
        ``KeyError`` for a name that is not configured."""
        if name not in self.config.checks:
            raise KeyError(name)
        with self._operation() as now:
            spec = self.config.checks[name]  # in the transaction: a reload may have changed it
            row = self.store.check(name)
            resumed = row is not None and row["status"] == PAUSED
            if resumed:
                self._unpause(spec, row, now, f"resumed by {by or 'someone'}")
                row = self.store.check(name)
                self._schedule(spec, row)
        if resumed:
            self._tell(self._deadline_listeners, next_event_at(spec, row))
        return resumed

    def _unpause(self, spec: CheckSpec, row: Mapping[str, Any], at: float, why: str,
                 back_to: str | None = None) -> None:
        """End a pause at ``at`` (in the caller's transaction): ``back_to``, or up
        (new, never having succeeded), with its deadline counted from ``at``."""
        new = back_to or (UP if row["last_ping_at"] is not None else NEW)
        if self.store.resume(spec.name, new, at):
            self.store.add_flip(spec.name, at, PAUSED, new, f"pause ended: {why}")
            log.warning("%s: pause ended: %s", spec.name, why)

    # Deadlines -------------------------------------------------------------

    def sweep(self) -> list[Flip]:
        """Mark overdue checks down and queue the notices that are due; return the flips."""
        flips = []
        reminded = False
        if self._heap_dirty or self.monotonic() - self._indexed_at >= REINDEX_EVERY_S:
            self._reindex_beside()
        with self._operation() as now:
            config = self.config  # once: a reload waits for the transaction
            if self._heap_dirty:  # it went wrong again while being rebuilt: rebuild it under the lock
                self._reindex(config)
            # Only what is due, not a scan of every row; in name order, as always.
            for name in sorted(self._pop_due(now)):
                spec, row = config.checks.get(name), self.store.check(name)
                if spec is None or row is None:
                    continue
                flip, reminder = self._sweep_one(spec, row, now)
                flips += [flip] if flip else []
                reminded = reminded or reminder
                self._schedule(spec, self.store.check(name))
        if flips or reminded:
            self._tell(self._outbox_listeners, now)
        return flips

    def _sweep_one(self, spec: CheckSpec, row: Mapping[str, Any], now: float) -> tuple[Flip | None, bool]:
        """Sweep one check (in the caller's transaction): its flip, and whether a reminder was queued."""
        if row["status"] == PAUSED:
            if row["paused_until"] is None or now < row["paused_until"]:
                return None, False
            self._unpause(spec, row, row["paused_until"], "maintenance window over")
            row = self.store.check(spec.name)
        if row["status"] != DOWN:
            due, reason = deadline(spec, row)
            return (self._flip(spec, row, DOWN, reason, due, now) if now >= due else None), False
        if now - row["notified_at"] >= spec.notify_every_s:
            # Keep reminders on their grid, even after Caduceus was stopped for a while.
            missed = (now - row["notified_at"]) // spec.notify_every_s
            self.store.set_notified(spec.name, row["notified_at"] + missed * spec.notify_every_s)
            self._enqueue(NOTICE_REMINDER, spec, row["down_reason"], now)
            log.warning("%s: still down since %s", spec.name, format_time(row["down_at"]))
            return None, True
        return None, False

    @contextlib.contextmanager
    def _operation(self) -> Iterator[float]:
        """One transaction, and the time it happens at: the clock is read inside
        it, after any wall clock step since the previous operation was applied.
        A failed one is accounted for before the next begins (the write lock is
        held until then), so that one finds the step this one rolled back."""
        offset = previous = None
        with self.store.write_lock:
            try:
                with self.store.transaction():
                    previous, now = self._clock_offset, self.clock()
                    offset = self._clock_offset = now - self.monotonic()
                    if previous is not None and abs(offset - previous) > CLOCK_STEP_TOLERANCE_S:
                        self._clock_stepped(offset - previous)
                    yield now
            except BaseException:
                self._heap_may_be_wrong()  # its entries may have gone with the rollback
                # The shift was rolled back with the rest: let the next operation find the step again.
                if offset is not None and self._clock_offset == offset:
                    self._clock_offset = previous
                raise

    def _clock_stepped(self, step_s: float) -> None:
        log.warning("wall clock stepped %s by %s; deadlines keep their elapsed time",
                    "forward" if step_s > 0 else "back", format_duration(abs(step_s), 2))
        self.store.shift_times(step_s)
        self._heap_may_be_wrong()

    def _flip(self, spec: CheckSpec, row: Mapping[str, Any], new: str, reason: str, at: float,
              now: float) -> Flip | None:
        """Change a check's status (in the caller's transaction) and queue its notice."""
        old = row["status"]
        if new == DOWN:
            changed = self.store.set_status(spec.name, old, DOWN, down_at=at, notified_at=now,
                                            down_reason=reason)
        else:
            changed = self.store.set_status(spec.name, old, new)
        if not changed:
            return None
        flip = Flip(spec.name, old, new, reason, at)
        self.store.add_flip(spec.name, at, old, new, reason)
        # A signal's flip happens now; only a deadline can pass while Caduceus was not running.
        monitor_down = self._down_while(at) if new == DOWN and at < now else None
        self._enqueue(NOTICE_DOWN if new == DOWN else NOTICE_UP, spec, reason, now, monitor_down)
        if new == DOWN:
            log.warning("%s: down: %s", spec.name, reason)
        else:
            log.warning("%s: up again after %s down", spec.name,
                        format_duration(now - (row["down_at"] or now), 2))
        return flip

    # Notices ---------------------------------------------------------------

    def _enqueue(self, kind: str, spec: CheckSpec, reason: str, now: float,
                 monitor_down: tuple[float, float] | None = None) -> None:
        """Queue a notice about the check as it is now (in the caller's transaction).

        The flip keeps what the notice needs (``down_at`` and ``down_reason``
        survive a recovery), and a run that just ended has its duration.
        """
        row = self.store.check(spec.name)
        event = {NOTICE_DOWN: FAILING, NOTICE_REMINDER: STILL_FAILING, NOTICE_UP: RECOVERED}[kind]
        notice = notice_facts(event, spec, row, reason, self.store.last_ping(spec.name), now, self.config,
                              incident=str(self.store.last_down_flip(spec.name) or ""),
                              monitor_down=monitor_down)
        subject = render_text(notice)[0]
        for channel in spec.channels:
            facts = _for_channel(notice, self.config, channel).to_json()
            self.store.enqueue(spec.name, channel, kind, subject, facts, now)

    @staticmethod
    def _tell(listeners: list[Callable[[float], None]], at: float) -> None:
        for listener in listeners:
            listener(at)


###############################################################################
# Status ######################################################################
###############################################################################

#: The dashboard lists the worst first.
STATUS_ORDER = (DOWN, GRACE, RUNNING, NEW, UP, PAUSED)


@dataclasses.dataclass(frozen=True)
class AlertView:
    """One alert as every page, the API, badges, metrics, ``status`` and
    ``check`` show it: its settings, and its state at one moment.  Times are
    epoch seconds (None: never, or not applicable)."""

    name: str
    status: str  #: one of STATUS_ORDER
    description: str  #: the schedule in words
    schedule: str | None
    every_s: float | None
    tz: datetime.tzinfo
    grace_s: float
    notify_every_s: float
    max_runtime_s: float | None
    channels: tuple[str, ...]
    first_seen_at: float
    last_checkin_at: float | None  #: the latest signal of any kind
    last_success_at: float | None
    next_due_at: float | None  #: when it will be considered failing; None while down or paused
    next_reminder_at: float | None  #: while down
    started_at: float | None  #: of the run in progress
    last_duration_s: float | None
    last_exit_status: int | None
    reason: str | None  #: why it is down
    down_since: float | None
    paused_until: float | None

    @property
    def failing(self) -> bool:
        return self.status == DOWN

    def as_json(self) -> dict[str, Any]:
        """The API's fields: times as ISO 8601 UTC, durations in seconds."""
        return {
            "name": self.name, "status": self.status, "description": self.description,
            "last_checkin": _iso(self.last_checkin_at), "last_success": _iso(self.last_success_at),
            "next_due": _iso(self.next_due_at), "next_reminder": _iso(self.next_reminder_at),
            "every": self.every_s, "schedule": self.schedule, "timezone": str(self.tz),
            "grace": self.grace_s, "notify_every": self.notify_every_s, "max_runtime": self.max_runtime_s,
            "channels": list(self.channels), "started_at": _iso(self.started_at),
            "last_duration": self.last_duration_s, "last_exit_status": self.last_exit_status,
            "reason": self.reason, "down_since": _iso(self.down_since), "paused_until": _iso(self.paused_until),
        }


def _iso(at: float | None) -> str | None:
    return None if at is None else format_time(at)


def _column(row: Mapping[str, Any], name: str) -> Any:
    """A column that a file not yet migrated (read by ``check``) may lack."""
    return row[name] if name in row.keys() else None


def alert_views(config: Config, rows: Mapping[str, Mapping[str, Any]], now: float,
                pings: Mapping[str, list[Mapping[str, Any]]] | None = None,
                legacy: Mapping[str, tuple[float | None, float | None]] | None = None) -> list[AlertView]:
    """Every configured alert's view at ``now``, in config order.

    ``rows`` are the stored check rows by name, ``pings`` each alert's recent
    signals in arrival order (for the last check-in and exit status).  An
    alert missing from ``rows`` is shown as the server would start it at
    ``now``: with its Caduceus 0.0.11 state from ``legacy``, if any, or as
    first seen.  An alert past its deadline is down even before the sweeper
    has marked it so, with the reason the sweeper will give.
    """
    views = []
    for spec in config.checks.values():
        row = rows.get(spec.name) or _first_row(spec, (legacy or {}).get(spec.name, (None, None)), now)
        recent = (pings or {}).get(spec.name, [])
        views.append(_view(spec, row, recent, now))
    return views


def _view(spec: CheckSpec, row: Mapping[str, Any], recent: list[Mapping[str, Any]], now: float) -> AlertView:
    if row["status"] == PAUSED and _column(row, "paused_until") is not None and now >= row["paused_until"]:
        # Over, though the sweeper has not said so yet: as it will (Monitor._unpause).
        row = {**{key: row[key] for key in row.keys()}, "paused_until": None, "resumed_at": row["paused_until"],
               "status": UP if row["last_ping_at"] is not None else NEW}
    status, reason = row["status"], None
    due = reminder = None
    paused_until = _column(row, "paused_until")
    if status == DOWN:
        reason = row["down_reason"] or REASON_MISSED
        reminder = next_event_at(spec, row)
    elif status == PAUSED:
        due = spec.due_after(paused_until) if paused_until is not None else None
    else:
        due, why = deadline(spec, row)
        if now >= due:
            status, reason, due = DOWN, why, None
            reminder = now + spec.notify_every_s
        elif row["started_at"] is not None:
            status = RUNNING
        elif spec.grace_s and now >= due - spec.grace_s:
            status = GRACE
    ends = [ping for ping in recent if ping["kind"] in (SUCCESS, FAIL)]
    return AlertView(
        name=spec.name, status=status, description=spec.describe(),
        schedule=spec.schedule.expression if spec.schedule else None, every_s=spec.every_s, tz=spec.tz,
        grace_s=spec.grace_s, notify_every_s=spec.notify_every_s, max_runtime_s=spec.max_runtime_s,
        channels=tuple(spec.channels), first_seen_at=row["first_seen_at"],
        last_checkin_at=recent[-1]["at"] if recent else None, last_success_at=row["last_ping_at"],
        next_due_at=due, next_reminder_at=reminder,
        started_at=row["started_at"] if status != PAUSED else None,
        last_duration_s=_column(row, "last_duration_s"),
        last_exit_status=ends[-1]["exit_status"] if ends else None, reason=reason,
        down_since=row["down_at"] if row["status"] == DOWN else None,
        paused_until=paused_until if status == PAUSED else None)


def _first_row(spec: CheckSpec, legacy: tuple[float | None, float | None], now: float) -> dict[str, Any]:
    """The row the server would give an alert at its first start at ``now``."""
    row = {"status": NEW, "first_seen_at": now, "last_ping_at": None, "started_at": None, "notified_at": None,
           "down_at": None, "down_reason": ""}
    state = legacy_check_state(spec, *legacy)
    if state is not None:
        status, last_ping_at, down_at, notified_at = state
        row.update(status=status, last_ping_at=last_ping_at, down_at=down_at, notified_at=notified_at,
                   down_reason=REASON_MISSED if status == DOWN else "")
    return row


def sort_views(views: list[AlertView]) -> list[AlertView]:
    """The worst first (STATUS_ORDER), then by name."""
    return sorted(views, key=lambda view: (STATUS_ORDER.index(view.status), view.name))


def relative_time(at: float | None, now: float) -> str:
    """``"5m ago"``, ``"in 2h"``, ``"now"`` or ``"never"``: the largest unit only,
    as the dashboard and ``status`` show times."""
    if at is None:
        return "never"
    delta = now - at
    if abs(delta) < 1:
        return "now"
    return f"{format_duration(delta, 1)} ago" if delta > 0 else f"in {format_duration(-delta, 1)}"


###############################################################################
# Connections #################################################################
###############################################################################

#: Connections open at once (``[config] max_connections``); each holds a file
#: descriptor and a buffer, and no thread while it waits.
MAX_CONNECTIONS = 512
#: A request's line, headers and body must all arrive within this many seconds
#: of its first byte, however slowly they trickle in; an answer must be taken
#: within as long.
REQUEST_TIMEOUT_S = 10.0
#: A connection waiting for its (next) request is closed after this many seconds.
IDLE_TIMEOUT_S = 30.0
#: At the connection limit, a request still arriving after this many seconds may
#: be cut off to make room, once no idle connection is left to close.
SLOW_REQUEST_S = 2.0
#: File descriptors kept for everything but connections: the database, the log,
#: notifiers, and connections being closed or refused.
RESERVED_FDS = 64
#: Threads that answer requests.  Connections wait for requests in one thread
#: (the connection loop), so a connection costs a thread only while its
#: complete request is being answered.  Check-ins being answered at once are
#: committed together (Store.group_commit), so more threads make bigger
#: batches: at 50 keep-alive clients 32 answered about 10 % more check-ins
#: than 16 and as many as 64 (bench_caduceus.py); each idle one costs a few
#: dozen KiB.
HANDLER_THREADS = 32

#: States of a connection: waiting for a request, receiving one, being
#: answered by a handler thread, sending the rest of an answer.
IDLE, READING, HANDLING, WRITING, CLOSED = "idle", "reading", "handling", "writing", "closed"


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard limit; return how many
    connections fit under it: ``max_connections``, or fewer with a warning.

    Each connection holds a file descriptor, and RESERVED_FDS are kept for the
    rest.  systemd and most shells start services with a soft limit of 1024.
    Without the ``resource`` module (Windows) nothing changes.
    """
    if resource is None:
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, max_connections + RESERVED_FDS)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # macOS refuses more than OPEN_MAX
            pass
    if soft == resource.RLIM_INFINITY or soft - RESERVED_FDS >= max_connections:
        return max_connections
    fit = max(soft - RESERVED_FDS, soft // 2)
    log.warning("the limit on open files (%d) leaves room for %d connections, not max_connections = %d: "
                "raise it (ulimit -n, or LimitNOFILE=%d under systemd)", soft, fit, max_connections,
                max_connections + RESERVED_FDS)
    return fit


class _Connection:
    """One open connection: its state since ``since`` (monotonic seconds), the
    bytes received and not yet used (``inbuf``), the request being read
    (``reading``) and the answer still to send (``out``)."""

    __slots__ = ("sock", "peer", "state", "since", "inbuf", "reading", "out", "close_after", "ended", "watched")

    def __init__(self, sock: socket.socket, peer: str, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.state = IDLE
        self.since = now
        self.inbuf = bytearray()
        self.reading: _Incoming | None = None
        self.out = b""
        self.close_after = False
        #: The client has closed its side (it may still read the answer).
        self.ended = False
        #: Registered with the loop's selector.
        self.watched = True

    def move(self, state: str, now: float) -> None:
        # ``since`` first: the loop reads a connection a handler thread has
        # just made IDLE without a lock, and must not pair IDLE with the time
        # its answer began.
        self.since = now
        self.state = state


class _Connections:
    """The open connections of a server, the connection loop's to change.

    ``admit()`` registers a new connection.  At ``max_connections`` it first
    makes room by closing the connection idle the longest, else the one that
    has been sending its request the longest, if for over ``slow_request_s``;
    if there is none, it returns None and the caller refuses the newcomer.
    Closing to make room and refusing are logged at most every ``log_every_s``.
    ``close`` is how the loop closes a connection (unregistering it first).
    """

    log_every_s = 10.0

    def __init__(self, max_connections: int, slow_request_s: float) -> None:
        self.max_connections = max_connections
        self.slow_request_s = slow_request_s
        self._lock = threading.Lock()  # states() is read from other threads
        self._open: dict[socket.socket, _Connection] = {}
        self._closed = self._refused = 0
        self._logged_at = -math.inf

    def all(self) -> list[_Connection]:
        with self._lock:
            return list(self._open.values())

    def admit(self, sock: socket.socket, peer: str, now: float,
              close: Callable[[_Connection], None]) -> _Connection | None:
        """Register ``sock`` as IDLE, making room if need be; None if there was none to make."""
        full = len(self._open) >= self.max_connections
        if full and not self.make_room(now, close):
            self._refused += 1
            self._log(now, "too many connections")
            return None
        if full:
            self._log(now, "too many connections")
        conn = _Connection(sock, peer, now)
        with self._lock:
            self._open[sock] = conn
        return conn

    def make_room(self, now: float, close: Callable[[_Connection], None]) -> bool:
        """Close the connection idle the longest, else the oldest slow request; False if there is none."""
        conns = self._open.values()
        victim = min((conn for conn in conns if conn.state == IDLE), key=lambda conn: conn.since, default=None)
        if victim is None:
            victim = min((conn for conn in conns if conn.state == READING
                          and now - conn.since > self.slow_request_s), key=lambda conn: conn.since, default=None)
        if victim is None:
            return False
        self._closed += 1
        close(victim)
        return True

    def out_of_files(self, now: float, close: Callable[[_Connection], None]) -> None:
        """Accepting failed for want of file descriptors: an idle connection gives one back."""
        self.make_room(now, close)
        self._log(now, "out of file descriptors")

    def remove(self, conn: _Connection) -> None:
        with self._lock:
            self._open.pop(conn.sock, None)

    def states(self) -> dict[str, int]:
        """How many connections are in each state now."""
        with self._lock:
            states = [conn.state for conn in self._open.values()]
        return {state: states.count(state) for state in (IDLE, READING, HANDLING, WRITING)}

    def _log(self, now: float, what: str) -> None:
        if now - self._logged_at < self.log_every_s:
            return
        self._logged_at = now
        log.warning("%s (max_connections = %d): %d idle or slow connections closed to make room and "
                    "%d new ones refused so far", what, self.max_connections, self._closed, self._refused)


class _HandlerPool:
    """``size`` threads that run the calls given to ``submit``, in order of arrival.

    A call goes straight to one idle thread, the one idle the shortest (its
    memory is the warmest), and wakes that thread alone; with none idle it
    waits for the first thread to finish.  (``queue.SimpleQueue`` wakes a
    second waiting thread for every call it hands out, only for it to find
    nothing and sleep again: two wake-ups per request where one will do.)
    """

    def __init__(self, size: int, name: str) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()  # calls no thread has taken yet
        self._idle: list[_Hand] = []  # threads waiting for a call, the last idle the shortest
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{name} {number}", daemon=True)
                         for number in range(size)]
        try:
            for thread in self._threads:
                thread.start()
        except BaseException:  # "can't start new thread": end those that did start
            self.stop()
            raise

    def submit(self, call: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if not self._idle:
                self._waiting.append((call, args))
                return
            hand = self._idle.pop()
        hand.give((call, args))

    def stop(self) -> None:
        """Let each thread finish its call in progress (and the calls waiting) and end."""
        with self._lock:
            self._stopping = True
            idle, self._idle = self._idle, []
        for hand in idle:
            hand.give(None)

    def _work(self) -> None:
        hand = _Hand()
        while True:
            with self._lock:
                if self._waiting:
                    item = self._waiting.popleft()
                elif self._stopping:
                    return
                else:
                    self._idle.append(hand)
                    item = _Hand.EMPTY
            if item is _Hand.EMPTY:
                item = hand.take()
                if item is None:
                    return
            call, args = item
            call(*args)  # the caller's own boundary logs what it raises


class _Hand:
    """One pool thread's mailbox: ``give`` one item, ``take`` waits for it (a
    bare lock, held while empty, is the cheapest one-shot wake-up)."""

    EMPTY = object()
    __slots__ = ("_item", "_full")

    def __init__(self) -> None:
        self._item: Any = None
        self._full = threading.Lock()
        self._full.acquire()

    def give(self, item: Any) -> None:
        self._item = item
        self._full.release()

    def take(self) -> Any:
        self._full.acquire()
        item, self._item = self._item, None
        return item


###############################################################################
# HTTP: addresses and keys ####################################################
###############################################################################

#: Largest request body accepted (only its last MAX_PING_BODY bytes are kept).
MAX_BODY_BYTES = 16 << 20
#: Largest request line and headers together: http.server alone allows 100
#: lines of 64 KiB each, 6.5 MB a request, which a few hundred connections
#: could turn into gigabytes of memory.
MAX_HEADER_BYTES = 64 << 10

#: Rejected check-ins are logged once a minute per client and alert; so are
#: database faults.
REJECTION_LOG_S = DATABASE_LOG_S = 60.0
#: Longest piece of a request quoted in a log line (a request line may be 64 KB).
LOG_QUOTE_MAX = 300
#: Any run of this many characters of the secret is masked in logs, so a key
#: split by a stray space (``?key=a bcdef...``) does not show most of itself.
SECRET_PIECE = 4

_KEY_IN_QUERY = re.compile(r"([?&]key=)[^&\s]*", re.IGNORECASE)
#: A /ping/ path's first segment is the key only when a secret is set (else it is the name).
_KEY_IN_PING_PATH = re.compile(r"(/ping/+)[^/?\s]+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")

#: What a check-in under /reset/ answers, by signal (under /ping/ it is always "OK").
_RESET_ANSWERS = {SUCCESS: "Alert reset.", START: "Run started.", FAIL: "Failure recorded.",
                  LOG: "Message recorded."}

#: What a connection that arrives when none can be closed to make room gets.
_BUSY_TEXT = b"Too many connections; try again later.\n"
_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT))

#: sqlite3's words for why the database failed, and how a 503 answer says it.
_DATABASE_PROBLEMS = (("database or disk is full", "disk full"),
                      ("attempt to write a readonly database", "read-only"),
                      ("database is locked", "busy"))


def mask_keys(text: str, secret: str = "", key_in_ping_path: bool = True) -> str:
    """Make a URL or request line safe to log or print.

    Keys are hidden (``?key=...``, the first segment after ``/ping/`` when
    ``key_in_ping_path``, and ``secret`` wherever it is, or any run of
    SECRET_PIECE of its characters), first in the raw text, where a key is one
    token even if it holds an encoded space or &, then again after
    percent-decoding, so ``?%6Bey=`` cannot slip past.  Control characters are
    escaped, so a request cannot forge log lines with ``%0A``.
    """
    for decode in (False, True):
        if decode:
            text = urllib.parse.unquote(text)
        if secret:
            text = _mask_secret(text, secret)
        if key_in_ping_path:
            text = _KEY_IN_PING_PATH.sub(r"\1***", text)
        text = _KEY_IN_QUERY.sub(r"\1***", text)
    return _CONTROL_CHARS.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def _mask_secret(text: str, secret: str) -> str:
    """Replace every stretch of ``text`` made of overlapping SECRET_PIECE-long
    pieces of ``secret`` (the whole secret included) with ``***``."""
    size = min(len(secret), SECRET_PIECE)
    pieces = {secret[i:i + size] for i in range(len(secret) - size + 1)}
    # A lookahead finds overlapping pieces: "xbcdefy" holds "bcde" and "cdef".
    finder = re.compile("(?=(?:%s))" % "|".join(map(re.escape, sorted(pieces))))
    spans: list[list[int]] = []
    for match in finder.finditer(text):
        start = match.start()
        if spans and start <= spans[-1][1]:
            spans[-1][1] = start + size
        else:
            spans.append([start, start + size])
    if not spans:
        return text
    kept, end = [], 0
    for start, stop in spans:
        kept += [text[end:start], "***"]
        end = stop
    return "".join(kept) + text[end:]


def _database_problem(exc: sqlite3.OperationalError) -> str:
    text = str(exc)
    for words, problem in _DATABASE_PROBLEMS:
        if words in text.lower():
            return problem
    return text


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address (an IPv4 address mapped into IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
             trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    return any(address in network for network in trusted)


###############################################################################
# HTTP: reading requests ######################################################
###############################################################################

#: Longest request line, as http.server allows (longer: 414).
MAX_REQUEST_LINE = 65536
#: Most header lines in a request, as http.client allows (more: 431).
MAX_HEADER_LINES = 100
#: Methods a route may list; any other is answered 501.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,5})\.([0-9]{1,5})")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


class _BadRequest(Exception):
    """A request that cannot be read: answered ``status`` with ``text``, then the connection closes."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text
        #: The request line, as far as it came (for the log, masked).
        self.line = ""


class Headers:
    """A request's header fields: names compared without case, values with
    surrounding whitespace removed, in the order they came.  ``get`` gives
    the first of a name, as ``email.message.Message`` does."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields  # (lower-case name, value)

    def get(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        for key, value in self._fields:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._fields if key == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


@dataclasses.dataclass
class _Incoming:
    """A request whose head has been read: what it asks, how its body is
    framed, and (as the body arrives) the body's kept tail."""

    method: str
    target: str
    headers: Headers
    #: The connection closes after the answer (HTTP/1.0 without keep-alive, Connection: close).
    close: bool
    body_length: int
    body: bytes = b""
    remaining: int = 0


def find_head(data: bytearray) -> int:
    """Where the head (request line and headers) of the request at the start
    of ``data`` ends (the index after its empty line), or -1 while it is still
    arriving; raises _BadRequest (414, 431) when it is longer than allowed."""
    match = _END_OF_HEAD.search(data, 0, MAX_HEADER_BYTES + 4)
    line_end = data.find(b"\n", 0, MAX_REQUEST_LINE + 1)
    if (line_end < 0 and len(data) > MAX_REQUEST_LINE) or line_end >= MAX_REQUEST_LINE:
        raise _BadRequest(414, "Request-URI Too Long")
    if match is None or match.end() > MAX_HEADER_BYTES + 2:
        if match is None and len(data) <= MAX_HEADER_BYTES:
            return -1
        raise _BadRequest(431, "Line too long")
    return match.end()


def _check_request_line(data: bytearray) -> None:
    """Refuse a request whose line has come and is not ``METHOD TARGET HTTP/x.y``
    at once, without waiting for headers (an HTTP/0.9 request has none)."""
    end = data.find(b"\n")
    if end >= 0:
        _request_line(bytes(data[:end]))


def _request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    """``(method, target, (major, minor))`` of a request line; raises _BadRequest."""
    text = line.decode("iso-8859-1")
    words = text.split()
    problem = None
    if len(words) == 2:  # HTTP/0.9, "GET /path": no status line, no headers
        problem = _BadRequest(400, "Bad request line: expected METHOD PATH HTTP/1.1")
    elif len(words) != 3:
        problem = _BadRequest(400, "Bad request syntax")
    else:
        match = _HTTP_VERSION.fullmatch(words[2])
        if match is None:
            problem = _BadRequest(400, "Bad request version")
        elif int(match[1]) >= 2:
            problem = _BadRequest(505, "Invalid HTTP version")
    if problem is not None:
        problem.line = text.rstrip("\r")
        raise problem
    return words[0], words[1], (int(match[1]), int(match[2]))


def parse_head(head: bytes) -> _Incoming:
    """Read a request's line and headers (``head``, up to its empty line) and
    its body's framing; raise _BadRequest for anything not plain HTTP/1.x.

    A header line that cannot be read ("Content-Length : 5", a line that starts
    with a space) is a 400, as RFC 9112 section 5 asks: passing over it could
    hide a framing header, and a body would be read as the next request.
    Only one Content-Length is trusted, of digits only; any Transfer-Encoding
    is refused, as two parties reading a body's end differently is how a
    request is smuggled inside another.
    """
    lines = head.split(b"\n")
    method, target, version = _request_line(lines[0])
    fields = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _BadRequest(400, "Malformed header line")
        if len(fields) == MAX_HEADER_LINES:
            raise _BadRequest(431, "Too many headers")
        fields.append((name.decode("ascii").lower(), value.decode("iso-8859-1").strip(" \t")))
    headers = Headers(fields)
    if method not in METHODS:
        raise _BadRequest(501, "Unsupported method")
    connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    close = "close" in connection or (version < (1, 1) and "keep-alive" not in connection)
    length = _body_length(headers)
    return _Incoming(method, target, headers, close, length, remaining=length)


def _body_length(headers: Headers) -> int:
    """The body's length from Content-Length (0 without); raises _BadRequest
    (400, 411, 413) when the framing is not one plain Content-Length."""
    lengths = set(headers.get_all("Content-Length"))
    if "transfer-encoding" in headers:
        if lengths:
            raise _BadRequest(400, "Transfer-Encoding and Content-Length together")
        raise _BadRequest(411, "Send a Content-Length")
    if len(lengths) > 1:
        raise _BadRequest(400, "Conflicting Content-Length headers")
    if not lengths:
        return 0
    text = next(iter(lengths))
    if not _CONTENT_LENGTH.fullmatch(text):
        raise _BadRequest(400, "Bad Content-Length")
    if int(text) > MAX_BODY_BYTES:
        raise _BadRequest(413, "Body too large")
    return int(text)


###############################################################################
# HTTP: requests and answers ##################################################
###############################################################################

#: Sent with every answer.  Nothing is loaded from elsewhere (a page is one
#: request: inline CSS, inline SVG); no type sniffing; no Referer leaves with a
#: ``?key=`` in it; no framing.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
#: The Content-Type of plain text answers (check-ins, errors).
TEXT_TYPE = "text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True)
class Response:
    """What a page returns: status, body, its Content-Type and any extra headers.
    ``Exchange._encode`` adds Content-Length and SECURITY_HEADERS."""

    status: int = 200
    body: bytes = b""
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


def text_response(text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A plain text answer, exactly ``text``."""
    return Response(status, text.encode(), TEXT_TYPE, tuple((headers or {}).items()))


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer (UTF-8, indented, with a final newline)."""
    body = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return Response(status, body.encode(), "application/json; charset=utf-8", tuple((headers or {}).items()))


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as a page sees it.  ``config`` is read once per request, so a
    reload is never seen half-way; ``path`` is percent-decoded; ``query`` is
    ``parse_qs``'s; ``body`` is the kept tail of ``body_length`` bytes."""

    method: str
    target: str
    path: str
    query: Mapping[str, list[str]]
    headers: Headers
    body: bytes
    body_length: int
    client: str
    config: Config
    server: Server

    @property
    def monitor(self) -> Monitor:
        return self.server.monitor

    def header_key(self) -> str | None:
        """The key from an ``X-Caduceus-Key`` or ``Authorization: Bearer`` header, if any."""
        key = self.headers.get("X-Caduceus-Key")
        if key is None:
            scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        return key


class _AccessLog:
    """The check-in log lines ("backups: success from 10.0.0.5"), written by
    a thread of their own rather than the request's.

    A log line costs a lock shared by every thread and a write to stderr; on
    the request thread, fifty check-ins at once queue up behind each other's
    lines.  ``add`` only appends to a deque; the writer emits the lines every
    ``every_s``, in order and each with the time it was added, and
    ``stop()`` emits what is left.
    """

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self._lines: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, message: str, *args: Any) -> None:
        """Log ``message % args`` at INFO, stamped now, soon."""
        self._lines.append((time.time(), message, args))

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="access log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    def flush(self) -> None:
        """Emit every line added so far."""
        lines = self._lines
        while lines:
            created, message, args = lines.popleft()
            if log.isEnabledFor(logging.INFO):
                record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, args, None)
                record.created, record.msecs = created, created % 1 * 1000
                log.handle(record)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.flush()


class _RateLimit:
    """Lets one event per key through every ``interval_s``, and counts the rest.

    At most ``max_keys`` keys are remembered, so whoever chooses the keys (a
    client, an alert name in a URL) cannot grow it without bound: when it is
    full, keys whose interval is over are forgotten, and if that frees
    nothing, new keys share one overflow key.
    """

    def __init__(self, interval_s: float, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[Any, tuple[float, int]] = {}  # key -> (let through at, held back since)

    def __len__(self) -> int:
        return len(self._seen)

    def allow(self, key: Any, now: float) -> int | None:
        """None to hold this event back; else how many were held back for ``key`` since its last."""
        with self._lock:
            if key not in self._seen and len(self._seen) >= self.max_keys:
                self._seen = {k: v for k, v in self._seen.items() if 0 <= now - v[0] < self.interval_s}
                if len(self._seen) >= self.max_keys:
                    key = None
            allowed_at, held = self._seen.get(key, (-math.inf, 0))
            if 0 <= now - allowed_at < self.interval_s:  # a clock that went back lets it through
                self._seen[key] = (allowed_at, held + 1)
                return None
            self._seen[key] = (now, 0)
            return held


###############################################################################
# HTTP: the server and its connection loop ####################################
###############################################################################

class Server(http.server.ThreadingHTTPServer):
    """The check-in server: one connection loop, a pool of handler threads, keep-alive, one ``Monitor``.

    The loop (``serve_forever``) accepts connections and reads requests from
    all of them without blocking; a complete request (head and body) goes to
    one of HANDLER_THREADS threads, which answers it and hands the connection
    back.  So a connection costs no thread while it is idle or its request
    trickles in, and a slow client holds no thread.

    At most ``max_connections`` are open at once (see ``_Connections`` for
    what makes room; a connection that finds none gets a ``503`` at once).  A
    connection must send the first byte of a request within
    ``idle_timeout_s`` of connecting or of its last answer, and all of the
    request within ``request_timeout_s`` of that, and take its answer within
    ``request_timeout_s``.  ``drain()`` waits for requests being answered,
    for a clean shutdown.
    """

    #: Connections the kernel holds until they are accepted: the default of 5
    #: (and even 128) drops some under a burst, which then wait a second or more.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], monitor: Monitor | None = None,
                 max_connections: int = MAX_CONNECTIONS, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, slow_request_s: float = SLOW_REQUEST_S,
                 listen_socket: socket.socket | None = None, routes: tuple | None = None,
                 handler_threads: int = HANDLER_THREADS) -> None:
        #: Set before serve_forever() when the server is bound first (see main).
        self.monitor = monitor
        #: What /healthz asks (None: healthy while it answers), and what
        #: POST /api/v1/reload calls: ``reloader() -> (done, message)``.
        self.watchdog: Watchdog | None = None
        self.reloader: Callable[[], tuple[bool, str]] | None = None
        #: ``(methods, pattern, page)`` (see Exchange); ROUTES, at the end of the Pages section.
        self.routes = ROUTES if routes is None else routes
        self.connections = _Connections(max_connections, slow_request_s)
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.handler_threads = handler_threads
        self.rejections = _RateLimit(REJECTION_LOG_S)
        self.access_log = _AccessLog()
        self._database_log = _RateLimit(DATABASE_LOG_S)
        self._loop_log = _RateLimit(DATABASE_LOG_S)
        self._database_failing = False
        self._date = (0, "")  # (second, its Date header value); see http_date
        self._busy = 0
        self._idle = threading.Condition()
        # The loop's own: connections handed back by handler threads, and how they wake it.
        self._selector: selectors.BaseSelector | None = None
        self._returned: list[_Connection] = []
        self._returned_lock = threading.Lock()
        self._looping = False
        self._stop_loop = False
        self._loop_ended = threading.Event()
        self._loop_ended.set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if listen_socket is not None:
            self._adopt(listen_socket)
            return
        host, port = address
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # Prefer IPv4, as "localhost" may list ::1 first while cron jobs use 127.0.0.1.
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        self.address_family = infos[0][0]
        try:
            super().__init__(infos[0][4][:2], None)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise

    def _adopt(self, sock: socket.socket) -> None:
        """Serve on a socket that is already listening (socket activation)."""
        self.address_family = sock.family
        socketserver.BaseServer.__init__(self, sock.getsockname()[:2], None)
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = self.server_address[:2]

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_close(self) -> None:
        super().server_close()
        self.access_log.flush()  # lines of requests answered after the loop ended
        self._wake_r.close()
        self._wake_w.close()

    # The connection loop ---------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept, read and dispatch until ``shutdown()``; then close the
        connections not being answered (those being answered close after it).
        After a ``shutdown()`` that came first it returns at once, touching
        nothing (the socket may be closed already)."""
        with self._returned_lock:  # against shutdown(): it either finds the loop begun, or stops it here
            if self._stop_loop:
                self._stop_loop = False
                return
            self._loop_ended.clear()
        selector = pool = None
        try:  # a set-up that fails (out of threads or descriptors) must not leave shutdown() waiting
            self._selector = selector = selectors.DefaultSelector()
            self.socket.setblocking(False)
            selector.register(self.socket, selectors.EVENT_READ, "listen")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            pool = _HandlerPool(self.handler_threads, "http handler")
            self.access_log.start()
        except BaseException:
            if pool is not None:
                pool.stop()
            if selector is not None:
                selector.close()
            self._selector = None
            self._stop_loop = False
            self._loop_ended.set()
            raise
        self._looping = True
        #: Deadlines are checked this often, so a short one is kept within a quarter.
        every_s = min(0.1, self.request_timeout_s / 4, self.idle_timeout_s / 4)
        checked_at = time.monotonic()
        try:
            while not self._stop_loop:
                for key, events in selector.select(min(poll_interval, every_s)):
                    self._on_event(key.data, events, pool)
                now = time.monotonic()
                if now - checked_at >= every_s:
                    checked_at = now
                    self._expire(now)
        finally:
            with self._returned_lock:
                self._looping = False
            self._take_returned(pool)
            for conn in self.connections.all():
                if conn.state != HANDLING:
                    self._close(conn)
            pool.stop()
            self.access_log.stop()
            selector.close()
            self._selector = None
            self._stop_loop = False
            self._loop_ended.set()

    def _on_event(self, what: _Connection | str, events: int, pool: _HandlerPool) -> None:
        """Serve one ready socket.  A bug met serving one connection closes
        it and is logged; the loop, and every other connection, goes on."""
        try:
            if what == "listen":
                self._accept(pool)
            elif what == "wake":
                self._take_returned(pool)
            elif what.state == CLOSED:  # by an earlier event of the same round
                return
            elif events & selectors.EVENT_WRITE:
                self._flush(what, pool)
            else:
                self._receive(what, pool)
        except Exception:
            now = time.monotonic()
            if isinstance(what, _Connection):
                log.exception("error serving the connection from %s; closed", what.peer)
                self._close(what)
            elif self._loop_log.allow(what, now) is not None:
                log.exception("error in the connection loop (%s)", what)

    def shutdown(self) -> None:
        """Stop the loop and wait until it has ended (requests being answered go on).
        Called before the loop began, it stops the loop from beginning."""
        with self._returned_lock:
            self._stop_loop = True
        self._wake()
        self._loop_ended.wait()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _accept(self, pool: _HandlerPool) -> None:
        """Take the connections waiting to be accepted (or refuse them with a 503)."""
        for _ in range(64):  # then serve the others before taking more
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.connections.out_of_files(time.monotonic(), self._close)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise  # logged by _on_event, at most once a minute
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # AF_UNIX has no Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = address[0] if isinstance(address, tuple) else "local"
            conn = self.connections.admit(sock, peer, time.monotonic(), self._close)
            if conn is None:
                self._refuse(sock)
                continue
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _refuse(self, sock: socket.socket) -> None:
        """Answer 503 and close, without waiting."""
        # Take what the client has sent already: closing with unread data would
        # reset the connection, and the client could lose the answer.
        with contextlib.suppress(OSError):
            sock.recv(64 * 1024)
        with contextlib.suppress(OSError):
            sock.send(_BUSY_REPLY)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.close()

    def _receive(self, conn: _Connection, pool: _HandlerPool) -> None:
        """Read what a connection has sent, and dispatch its request once whole.

        A connection stays registered while its request is answered, so what
        it sends meanwhile (a pipelined request, the end of its stream) is
        read into its buffer, under ``_returned_lock``, for after the answer.
        """
        try:
            data = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("connection from %s failed: %s", conn.peer, exc)
            data = b""
        with self._returned_lock:
            conn.inbuf += data
            answering = conn.state == HANDLING
            if answering and (not data or len(conn.inbuf) > MAX_HEADER_BYTES):
                # Wait for the answer before reading more (or seeing the end again).
                self._selector.unregister(conn.sock)
                conn.watched = False
            conn.ended = not data
        if answering:
            return
        if not data:  # a request cut short is dropped, never acted on or answered
            if conn.state == READING:
                log.debug("%s closed the connection during a request", conn.peer)
            self._close(conn)
            return
        if conn.state == IDLE:
            conn.move(READING, time.monotonic())
        self._advance(conn, pool)

    def _advance(self, conn: _Connection, pool: _HandlerPool) -> bool:
        """Read the request in ``conn.inbuf`` as far as it has arrived; give it
        to a handler thread once whole (or answer its error).  True if it did."""
        head = b""
        try:
            incoming = conn.reading
            if incoming is None:
                while conn.inbuf[:2] == b"\r\n":  # RFC 9112 section 2.2: empty lines before a request
                    del conn.inbuf[:2]
                end = find_head(conn.inbuf)
                if end < 0:
                    _check_request_line(conn.inbuf)
                    return False
                head = bytes(conn.inbuf[:end])
                del conn.inbuf[:end]
                conn.reading = incoming = parse_head(head)
                if incoming.remaining and incoming.headers.get("Expect", "").lower() == "100-continue":
                    with contextlib.suppress(OSError):
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            if incoming.remaining:
                take = conn.inbuf[:incoming.remaining]
                del conn.inbuf[:len(take)]
                incoming.remaining -= len(take)
                incoming.body = (incoming.body + take)[-MAX_PING_BODY:]
                if incoming.remaining:
                    return False
        except _BadRequest as exc:
            if not exc.line:  # for the log: the request line, as far as it came
                first = head if incoming is None and head else conn.inbuf
                exc.line = bytes(first[:LOG_QUOTE_MAX + 1]).partition(b"\n")[0].decode("iso-8859-1")
            conn.reading = None
            self._dispatch(conn, pool, exc)
            return True
        conn.reading = None
        self._dispatch(conn, pool, incoming)
        return True

    def _dispatch(self, conn: _Connection, pool: _HandlerPool, work: _Incoming | _BadRequest) -> None:
        conn.move(HANDLING, time.monotonic())
        pool.submit(self._answer, conn, work)

    def _answer(self, conn: _Connection, work: _Incoming | _BadRequest) -> None:
        """In a handler thread: answer one request, send what the socket takes
        at once, and hand the connection back to the loop for the rest."""
        with self.busy():
            try:
                exchange = Exchange(self, conn.peer)
                data, close = exchange.answer(work)
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except Exception:  # a bug (Exchange answers every fault of a page): keep serving
                log.exception("error answering %s", conn.peer)
                data, close, sent = b"", True, 0
            conn.out, conn.close_after = data[sent:], close
            with self._returned_lock:
                alone = not self._looping  # the server is shutting down: finish here
                if alone:
                    pass
                elif conn.out or close or conn.inbuf or not conn.watched:
                    self._returned.append(conn)
                    self._wake()
                else:  # the usual case: the loop sees the next request come
                    conn.move(IDLE, time.monotonic())
        if alone:
            self._finish_alone(conn)

    def _finish_alone(self, conn: _Connection) -> None:
        with contextlib.suppress(OSError):
            conn.sock.settimeout(self.request_timeout_s)
            conn.sock.sendall(conn.out)
        self._close(conn)

    def _take_returned(self, pool: _HandlerPool) -> None:
        """Connections answered: send the rest of each answer, or wait for the next request."""
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)
        with self._returned_lock:
            returned, self._returned = self._returned, []
        for conn in returned:
            now = time.monotonic()
            if conn.out:
                conn.move(WRITING, now)
                self._watch(conn, selectors.EVENT_WRITE)
            elif conn.close_after:
                self._close(conn)
            else:
                self._next_request(conn, pool)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.watched:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
            conn.watched = True

    def _next_request(self, conn: _Connection, pool: _HandlerPool) -> None:
        """An answer has gone: read the next request (it may be in the buffer already)."""
        if conn.ended and not conn.inbuf:
            self._close(conn)
            return
        conn.move(READING if conn.inbuf else IDLE, time.monotonic())
        if not conn.ended:
            self._watch(conn, selectors.EVENT_READ)
        if conn.inbuf:  # pipelined: the next request may be here already
            if not self._advance(conn, pool) and conn.ended:  # and it will never be whole
                self._close(conn)

    def _flush(self, conn: _Connection, pool: _HandlerPool) -> None:
        """Send more of an answer the socket would not take at once."""
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        if conn.close_after:
            self._close(conn)
            return
        if conn.ended:
            self._selector.unregister(conn.sock)
            conn.watched = False
        self._next_request(conn, pool)

    def _expire(self, now: float) -> None:
        """Close connections past their deadline: idle too long, or a request or answer too slow."""
        for conn in self.connections.all():
            limit_s = self.idle_timeout_s if conn.state == IDLE else self.request_timeout_s
            if conn.state != HANDLING and now - conn.since > limit_s:
                log.debug("%s: connection %s for over %s; closed", conn.peer, conn.state,
                          format_duration(limit_s))
                self._close(conn)

    def _close(self, conn: _Connection) -> None:
        """Forget a connection and close it (from the loop, or a handler once the loop has ended)."""
        if conn.state == CLOSED:
            return
        self.connections.remove(conn)
        conn.move(CLOSED, time.monotonic())
        if self._selector is not None and conn.watched:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
            conn.watched = False
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.sock.close()

    # Faults and shutdown ---------------------------------------------------

    def database_failed(self, problem: str, now: float) -> None:
        """Log a database fault answered 503: at once, then once a minute with a count."""
        self._database_failing = True
        held = self._database_log.allow("failed", now)
        if held is not None:
            more = f" ({held} more since the last such line)" if held else ""
            log.warning("database unavailable: %s; answering 503, and check-ins are not recorded "
                        "until it recovers%s", problem, more)

    def database_worked(self, now: float) -> None:
        """Note a database write that worked; log it if the database had been failing."""
        if self._database_failing:
            self._database_failing = False
            if self._database_log.allow("recovered", now) is not None:
                log.warning("database available again: check-ins are recorded")

    def http_date(self) -> str:
        """The Date header's value for now (RFC 9110 section 5.6.7): whole
        seconds, so formatted once a second rather than for every answer."""
        second = int(time.time())
        date = self._date
        if date[0] != second:
            date = self._date = (second, email.utils.formatdate(second, usegmt=True))
        return date[1]

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until no request is being answered; False if that took too long."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)


###############################################################################
# HTTP: answering one request #################################################
###############################################################################

class Exchange:
    """One request and its answer, in a handler thread: routes the request to
    the first of ``server.routes`` whose pattern matches its whole path:
    ``(methods, pattern, page)``, where ``page(request, match)`` returns a
    ``Response`` or raises ``HTTPError``.

    Every answer, errors included, is written by ``_encode``.  Errors are
    short plain text, or JSON under /api/.  OPTIONS answers with ``Allow``;
    another method not listed gets 405 with ``Allow``.
    """

    server_version = f"Caduceus/{__version__}"

    def __init__(self, server: Server, peer: str) -> None:
        self.server = server
        self.peer = peer
        #: The client's address: the peer's, or from X-Forwarded-For (see _client_of).
        self.client = peer
        self.target = ""

    def answer(self, work: _Incoming | _BadRequest) -> tuple[bytes, bool]:
        """The answer's bytes, and whether the connection closes after it."""
        if isinstance(work, _BadRequest):
            log.info("%s code %d, message %s: %s", self.client, work.status, work.text, self._mask(work.line))
            return self._encode(text_response(f"{work.text}.\n", work.status), "GET", True), True
        self.target = work.target
        close = work.close
        try:
            response = self._dispatch(work)
        except sqlite3.OperationalError as exc:
            response = error_response(work.target, database_unavailable(self.server, exc, ""))
        except Exception:
            log.exception("error handling %s %s", work.method, self._mask(work.target))
            response, close = text_response("Internal server error.\n", 500), True
        if log.isEnabledFor(logging.DEBUG):  # masking is not free; skip it when unused
            log.debug('%s "%s %s" %s', self.client, work.method, self._mask(work.target), response.status)
        return self._encode(response, work.method, close), close

    def _dispatch(self, work: _Incoming) -> Response:
        # The config is read once per request: a reload swaps it whole.
        config = self.server.monitor.config
        self.client = self._client_of(work.headers, config.trusted_proxies)
        split = urllib.parse.urlsplit(work.target)
        request = Request(work.method, work.target, urllib.parse.unquote(split.path),
                          urllib.parse.parse_qs(split.query, keep_blank_values=True), work.headers,
                          work.body, work.body_length, self.client, config, self.server)
        try:
            return self._page(request)
        except HTTPError as exc:
            return error_response(request.target, exc)

    def _page(self, request: Request) -> Response:
        """The answer of the first route whose pattern matches the whole path."""
        for methods, pattern, page in self.server.routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            allow = ", ".join((*methods, "OPTIONS"))
            if request.method == "OPTIONS":
                return Response(headers=(("Allow", allow),))
            if request.method not in methods:
                raise HTTPError(405, "Method not allowed.", {"Allow": allow})
            return page(request, match)
        raise HTTPError(404, "Not found.")

    def _client_of(self, headers: Headers,
                   trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
        """The client's address: the peer's, unless the peer is a trusted proxy.

        Then X-Forwarded-For is read from the right (each proxy appends the
        address it got the request from), skipping trusted proxies: the first
        address that is not one is the client's.  Everything left of it may be
        forged by the client, so it is not believed.  An entry that is not an
        IP address stops the walk at the last trusted hop.
        """
        peer = self.peer
        if not trusted:  # the usual case: no parsing on every request
            return peer
        hop = _ip(peer)
        if hop is None or not _trusted(hop, trusted):
            return peer
        entries = [entry.strip() for header in headers.get_all("X-Forwarded-For")
                   for entry in header.split(",")]
        for entry in reversed(entries):
            address = _ip(entry)
            if address is None:
                break
            hop = address
            if not _trusted(hop, trusted):
                break
        return str(hop)

    def _encode(self, response: Response, method: str, close: bool) -> bytes:
        """An answer's bytes: status, headers (Content-Type, Content-Length, the
        security headers, the page's own) and body (not for HEAD)."""
        reason = _REASONS.get(response.status, "")
        lines = [f"HTTP/1.1 {response.status} {reason}", f"Server: {self.server_version}",
                 f"Date: {self.server.http_date()}", f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}", *_SECURITY_LINES]
        lines += [f"{name}: {value}" for name, value in response.headers]
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1")
        return head if method == "HEAD" else head + response.body

    def _mask(self, text: str) -> str:
        monitor = self.server.monitor
        return _log_quote(text, monitor.config.secret_key if monitor else "")


#: Reason phrases of status lines.
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_SECURITY_LINES = tuple(f"{name}: {value}" for name, value in SECURITY_HEADERS)


def database_unavailable(server: Server, exc: sqlite3.OperationalError, consequence: str) -> HTTPError:
    """The 503 for a database fault (which the server logs, rate-limited)."""
    problem = _database_problem(exc)
    server.database_failed(problem, server.monitor.clock())
    return HTTPError(503, f"Database unavailable: {problem}{consequence}.")


def error_response(path: str, exc: HTTPError) -> Response:
    """An HTTPError as an answer: ``{"error": text}`` under /api/, else plain text."""
    if urllib.parse.unquote(urllib.parse.urlsplit(path).path).startswith("/api/"):
        return json_response({"error": exc.text}, exc.status, exc.headers)
    return text_response(exc.text + "\n", exc.status, exc.headers)


def _log_quote(text: str, secret: str) -> str:
    """``text`` cut to LOG_QUOTE_MAX characters, with every key in it masked."""
    cut = len(text) > LOG_QUOTE_MAX
    masked = mask_keys(text[:LOG_QUOTE_MAX], secret, key_in_ping_path=bool(secret))
    return f"{masked}... ({len(text)} characters)" if cut else masked


###############################################################################
# Pages: check-ins ############################################################
###############################################################################


def reset_page(request: Request, match: re.Match) -> Response:
    """Caduceus's own URLs: /reset/<name>/[<signal>]?key=<secret_key>, or the key in a header."""
    key = request.header_key()
    if key is None:
        key = request.query.get("key", [""])[0]
    kind, note = _check_in(request, match["name"], key, match["signal"] or "")
    if key and not request.config.secret_key:
        note += ("\nWarning: this server has no secret_key configured, so the key was ignored;"
                 " the check-in counted.\n")
    return text_response(_RESET_ANSWERS[kind] + note)


def ping_page(request: Request, match: re.Match) -> Response:
    """healthchecks.io's URLs: /ping/[<secret_key>/]<name>[/<signal>]; with the
    key in a header, /ping/<name>[/<signal>]."""
    parts = match["rest"].split("/")
    key = request.header_key()
    if key is None and request.config.secret_key:
        key = parts.pop(0)
    if not 1 <= len(parts) <= 2:
        raise _refused(request, 404, "Not found.", "", "not a check-in URL")
    _, note = _check_in(request, parts[0], key or "", parts[1] if len(parts) == 2 else "")
    return text_response("OK" + note)


def _check_in(request: Request, name: str, key: str, signal_text: str) -> tuple[str, str]:
    """Check the key and record the signal with the body's kept tail.

    Returns its kind and a note for the answer ("" or that the body was
    truncated); raises HTTPError (404 for an unknown name or a wrong key,
    alike; 400 for a bad signal; 503 when the database failed).
    """
    monitor, config = request.monitor, request.config
    secret = config.secret_key
    # Compare even for unknown names, so timing does not tell which names exist.
    key_ok = hmac.compare_digest(key.encode(), secret.encode())
    if name not in config.checks or (secret and not key_ok):
        why = "no such alert" if name not in config.checks else "wrong key" if key else "no key"
        raise _refused(request, 404, "Not found.", name, why)
    try:
        kind, exit_status = parse_signal(signal_text)
    except ValueError as exc:
        message = str(exc)
        raise _refused(request, 400, f"{message[0].upper()}{message[1:]}.", name, "bad signal") from None
    data, length = request.body, request.body_length
    note = (f"\nThe body was truncated: its last {len(data)} of {length} bytes were kept.\n"
            if length > len(data) else "")
    ping = Ping(kind, exit_status, data.decode("utf-8", "replace"), request.client,
                request.headers.get("User-Agent", "")[:200])
    try:
        monitor.ping(name, ping)
    except sqlite3.OperationalError as exc:
        raise database_unavailable(request.server, exc, "; the check-in was not recorded") from None
    except KeyError:  # removed by a reload since this request read the config
        raise _refused(request, 404, "Not found.", name, "no such alert") from None
    request.server.database_worked(monitor.clock())
    what = kind if exit_status is None else f"{kind} (exit status {exit_status})"
    request.server.access_log.add("%s: %s from %s", name, what, request.client)
    return kind, note


def _refused(request: Request, code: int, text: str, name: str, why: str) -> HTTPError:
    """The answer to a refused check-in; it is logged once a minute per client and alert."""
    held = request.server.rejections.allow((request.client, name[:LOG_QUOTE_MAX]), request.monitor.clock())
    if held is not None:
        more = f" ({held} more since the last such line)" if held else ""
        log.warning("refused check-in from %s: %s %s: %s%s", request.client, request.method,
                    _log_quote(request.target, request.config.secret_key), why, more)
    return HTTPError(code, text)


###############################################################################
# Pages: HTML #################################################################
###############################################################################

# Access ----------------------------------------------------------------------


def _key_matches(request: Request, basic: bool = True) -> bool:
    """True when no secret_key is set, or the request carries it: ``?key=``, an
    ``X-Caduceus-Key`` or ``Authorization: Bearer`` header, or (with ``basic``)
    HTTP basic auth with the key as the password, any user name."""
    secret = request.config.secret_key.encode()
    if not secret:
        return True
    given = [request.query.get("key", [None])[0], request.header_key()]
    if basic:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "basic":
            with contextlib.suppress(ValueError):  # binascii.Error is a ValueError
                given.append(base64.b64decode(token.strip(), validate=True).partition(b":")[2])
    matched = False
    for key in given:  # compare every candidate, so timing tells nothing
        if key is not None:
            key = key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")
            matched |= hmac.compare_digest(key, secret)
    return matched


def require_key(request: Request, public: bool = False, html: bool = False) -> None:
    """Raise 401 unless the view is ``public`` or the request has the key.

    An HTML page asks the browser to log in (basic auth, the key as the
    password); the API and metrics ask for a bearer token.  The answer names
    no alert and counts none.
    """
    if public or _key_matches(request):
        return
    challenge = 'Basic realm="Caduceus", charset="UTF-8"' if html else 'Bearer realm="Caduceus"'
    raise HTTPError(401, "The key is needed: log in with it as the password, or send ?key=KEY "
                         "or Authorization: Bearer KEY.", {"WWW-Authenticate": challenge})


def read_views(request: Request) -> tuple[list[AlertView], dict[str, list[sqlite3.Row]], float]:
    """Every alert's view now, with the recent pings it was computed from."""
    store = request.monitor.store
    now = request.monitor.clock()
    pings = store.recent_pings()
    rows = {row["name"]: row for row in store.checks()}
    return alert_views(request.config, rows, now, pings), pings, now


def _find_view(request: Request, name: str) -> tuple[AlertView, list[sqlite3.Row], float]:
    if name not in request.config.checks:
        raise HTTPError(404, "No such alert.")
    views, pings, now = read_views(request)
    return next(view for view in views if view.name == name), pings.get(name, []), now


# Dashboard and alert page ----------------------------------------------------

#: Seconds between the dashboard's reloads of itself.
REFRESH_S = 30
#: Cells in a dashboard row's strip of recent runs; bars in an alert page's chart.
STRIP_CELLS, CHART_BARS = 30, 50
#: Characters of a check-in's body shown in the alert page's history.
BODY_EXCERPT = 300

#: The whole style sheet: system fonts, light and dark, a table on a desktop, cards on a phone.
_CSS = """
:root{color-scheme:light dark;--bg:#f6f8fa;--card:#fff;--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;
--up:#1a7f37;--grace:#9a6700;--running:#0969da;--down:#cf222e;--paused:#6e7781;--new:#8250df;--missed:#bc4c00}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--card:#151b23;--fg:#e6edf3;--muted:#9198a1;
--line:#3d444d;--up:#3fb950;--grace:#d29922;--running:#4493f8;--down:#f85149;--paused:#9198a1;--new:#ab7df8;
--missed:#db6d28;--on-badge:#0d1117}}
*{box-sizing:border-box}
body{margin:0;padding:16px;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1200px;margin:0 auto}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px}
a{color:var(--running)}.muted,.sub{color:var(--muted)}.sub{font-size:13px}
.summary{margin:0 0 16px;color:var(--muted)}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);border-radius:8px}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:13px;color:var(--muted);font-weight:600}
tr:last-child td{border-bottom:0}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:var(--on-badge,#fff);font-size:13px;
font-weight:600}
.up{background:var(--up)}.grace{background:var(--grace)}.running{background:var(--running)}
.down{background:var(--down)}.paused{background:var(--paused)}.new{background:var(--new)}
tr.is-down td:first-child{box-shadow:inset 4px 0 var(--down)}
.name{font-weight:600;word-break:break-all}
svg{display:block;max-width:100%}
.chart{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:6px;height:auto}
pre{margin:0;white-space:pre-wrap;word-break:break-all;font-size:13px}
pre.code{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:8px;user-select:all}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:var(--muted)}dd{margin:0}
.reason{color:var(--down);font-weight:600}.scroll{overflow-x:auto}
@media (max-width:700px){body{padding:10px}table.cards,table.cards tbody,table.cards tr,table.cards td{display:block}
table.cards{border:0;background:none}table.cards thead{display:none}
table.cards tr{background:var(--card);border:1px solid var(--line);border-radius:8px;margin-bottom:10px}
table.cards tr{display:grid;grid-template-columns:1fr 1fr;padding:6px 0}
table.cards td{border:0;padding:4px 12px;min-width:0}table.cards td:first-child{grid-column:1/3}
table.cards td[data-label]::before{content:attr(data-label);display:block;color:var(--muted);font-size:12px}
.wide{display:none}}
"""

#: Colours of a run strip's cells, by outcome (the CSS variables above).
_OUTCOME_COLOURS = {"success": "var(--up)", "fail": "var(--down)", "missed": "var(--missed)"}


def _page(title: str, body: str, refresh: bool = False) -> Response:
    """A whole HTML page: ``title`` and ``body`` must be escaped already."""
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    text = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="color-scheme" content="light dark">{meta}<title>{title}</title>'
            f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>\n")
    return Response(200, text.encode(), "text/html; charset=utf-8")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(at: float | None, now: float) -> str:
    """A time relative to now ("5m ago", "in 2h"), the exact UTC time on hover."""
    if at is None:
        return '<span class="muted">never</span>'
    words = relative_time(at, now)
    return f'<time datetime="{format_time(at)}" title="{format_time(at)}">{words}</time>'


def _badge(status: str) -> str:
    return f'<span class="badge {status}">{status}</span>'


def _signal_words(ping: Mapping[str, Any]) -> str:
    """"success", or "fail (exit status 3)"."""
    if ping["exit_status"] is None:
        return ping["kind"]
    return f"{ping['kind']} (exit status {ping['exit_status']})"


def _runs(pings: list[Mapping[str, Any]], flips: list[Mapping[str, Any]]) -> list[tuple[float, str, str]]:
    """Recent runs, oldest first: (at, outcome, words), one per success or
    failure and one per missed deadline."""
    runs = [(ping["at"], ping["kind"], _signal_words(ping)) for ping in pings if ping["kind"] in (SUCCESS, FAIL)]
    runs += [(flip["at"], "missed", flip["reason"]) for flip in flips
             if flip["new"] == DOWN and not flip["reason"].startswith((REASON_FAILED, "exit status"))]
    return sorted(runs, key=lambda run: run[0])


def run_strip(runs: list[tuple[float, str, str]]) -> str:
    """An inline SVG strip, one cell per run (the latest STRIP_CELLS), coloured by outcome."""
    runs = runs[-STRIP_CELLS:]
    if not runs:
        return '<span class="muted">no runs yet</span>'
    cells = "".join(f'<rect x="{i * 7}" y="0" width="5" height="18" rx="1" fill="{_OUTCOME_COLOURS[outcome]}">'
                    f"<title>{format_time(at)}: {_e(words)}</title></rect>"
                    for i, (at, outcome, words) in enumerate(runs))
    width = len(runs) * 7 - 2
    return (f'<svg role="img" aria-label="recent runs" width="{width}" height="18" '
            f'viewBox="0 0 {width} 18">{cells}</svg>')


def _last_run(view: AlertView, now: float) -> str:
    parts = []
    if view.last_duration_s is not None:
        parts.append(f"took {format_duration(view.last_duration_s, 2)}")
    if view.last_exit_status is not None:
        parts.append(f"exit status {view.last_exit_status}")
    text = _e(", ".join(parts)) or '<span class="muted">-</span>'
    if view.status == RUNNING:
        text += f'<div class="sub">running, started {_when(view.started_at, now)}</div>'
    return text


def _due(view: AlertView, now: float) -> str:
    if view.status == PAUSED:
        return f"paused until {_when(view.paused_until, now)}" if view.paused_until else "paused"
    if view.next_due_at is None:
        return f"reminder {_when(view.next_reminder_at, now)}"
    return _when(view.next_due_at, now)


def dashboard_page(request: Request, match: re.Match) -> Response:
    """Every alert, the worst first: status, last check-in, next deadline,
    schedule, last run, recent runs, channels.  It reloads itself."""
    require_key(request, request.config.public_dashboard, html=True)
    views, pings, now = read_views(request)
    store = request.monitor.store
    rows = []
    for view in sort_views(views):
        link = f"/alerts/{urllib.parse.quote(view.name, safe='')}"
        reason = f'<div class="sub reason">{_e(view.reason)}</div>' if view.reason else ""
        strip = run_strip(_runs(pings.get(view.name, []), store.flips(view.name)))
        rows.append(
            f'<tr class="is-{view.status}"><td><a class="name" href="{_e(link)}">{_e(view.name)}</a>'
            f'<div class="sub">{_e(view.description)}</div></td>'
            f'<td data-label="Status">{_badge(view.status)}{reason}</td>'
            f'<td data-label="Last check-in">{_when(view.last_checkin_at, now)}</td>'
            f'<td data-label="Next deadline">{_due(view, now)}</td>'
            f'<td data-label="Last run">{_last_run(view, now)}</td>'
            f'<td data-label="Recent runs">{strip}</td>'
            f'<td data-label="Channels">{_e(", ".join(view.channels))}</td></tr>')
    counts = {status: sum(view.status == status for view in views) for status in STATUS_ORDER}
    down = counts[DOWN]
    title = f"{down} down · Caduceus" if down else "All good · Caduceus"
    summary = ", ".join(f"{count} {status}" for status, count in counts.items() if count) or "no alerts"
    table = ('<table class="cards"><thead><tr><th>Alert</th><th>Status</th><th>Last check-in</th>'
             '<th>Next deadline</th><th>Last run</th><th>Recent runs</th><th>Channels</th></tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>') if rows else "<p>No alerts are configured.</p>"
    body = (f'<h1>Caduceus</h1><p class="summary">{_e(summary)} · updated '
            f'<time title="{format_time(now)}">{format_time(now)}</time></p>{table}')
    return _page(_e(title), body, refresh=True)


def duration_chart(pings: list[Mapping[str, Any]], max_runtime_s: float | None) -> str:
    """An inline SVG bar chart of the last CHART_BARS run durations, with
    ``max_runtime`` as a dashed line."""
    runs = [ping for ping in pings if ping["duration_s"] is not None][-CHART_BARS:]
    if not runs:
        return '<p class="muted">No timed runs yet: send a start signal before the job (or use run).</p>'
    longest = max(ping["duration_s"] for ping in runs)
    # A limit far above every run would flatten the bars: then it is named, not drawn.
    drawn = max_runtime_s is not None and max_runtime_s <= 4 * longest
    top = max(longest, max_runtime_s if drawn else 0.0) * 1.1 or 1.0
    height, bar = 120, 12
    bars = []
    for i, ping in enumerate(runs):
        tall = max(ping["duration_s"] / top * height, 1.0)
        colour = _OUTCOME_COLOURS["fail" if ping["kind"] == FAIL else "success"]
        bars.append(f'<rect x="{i * (bar + 3)}" y="{height - tall:.1f}" width="{bar}" height="{tall:.1f}" '
                    f'fill="{colour}"><title>{format_time(ping["at"])}: '
                    f'{format_duration(ping["duration_s"], 2)}</title></rect>')
    width = max(len(runs) * (bar + 3), 60)
    if drawn:
        y = height - max_runtime_s / top * height
        bars.append(f'<line x1="0" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="var(--down)" '
                    f'stroke-dasharray="4 3"><title>max_runtime {format_duration(max_runtime_s)}</title></line>')
    return (f'<svg class="chart" role="img" aria-label="run durations" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{"".join(bars)}</svg>'
            f'<p class="sub">Longest: {format_duration(longest, 2)}; max_runtime: '
            f'{format_duration(max_runtime_s) + ("" if drawn else " (far above)") if max_runtime_s else "none"}</p>')


def _examples(request: Request, name: str) -> str:
    """The check-in URL (under ``base_url``, else the Host the browser used) and
    copyable curl, wget and run lines, with KEY for the key."""
    base = request.config.base_url or f"http://{request.headers.get('Host', '') or 'localhost:5000'}"
    quoted = urllib.parse.quote(name, safe="")
    url = f"{base}/ping/KEY/{quoted}" if request.config.secret_key else f"{base}/ping/{quoted}"
    lines = [f'curl -fsS -m 10 --retry 5 -o /dev/null "{url}"',
             f'curl -fsS -m 10 --retry 5 -o /dev/null --data-binary @job.log "{url}/fail"',
             f'wget -q -T 10 -O /dev/null "{url}"',
             f'python3 caduceus.py run "{url}" -- /path/to/job.sh',
             f'curl -fsS -X POST -H "Authorization: Bearer KEY" "{base}/api/v1/alerts/{quoted}/pause?until=2h"']
    return "".join(f'<pre class="code">{_e(line)}</pre>' for line in lines)


def _history_table(title: str, headings: list[str], rows: list[list[str]]) -> str:
    """A titled table, newest row first; cells must be escaped already.  A
    heading starting with "~" is hidden on a phone."""
    head = "".join(f'<th class="wide">{heading[1:]}</th>' if heading.startswith("~") else f"<th>{heading}</th>"
                   for heading in headings)
    wide = [heading.startswith("~") for heading in headings]
    body = "".join("<tr>" + "".join(f'<td class="wide">{cell}</td>' if hide else f"<td>{cell}</td>"
                                    for cell, hide in zip(row, wide)) + "</tr>" for row in reversed(rows))
    return (f'<h2>{title}</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{body or "<tr><td class=muted>none yet</td></tr>"}</tbody></table></div>')


def _history_tables(pings: list[Mapping[str, Any]], flips: list[Mapping[str, Any]],
                    notices: list[Mapping[str, Any]]) -> str:
    checkins = [[format_time(ping["at"]), _e(_signal_words(ping)),
                 "" if ping["duration_s"] is None else format_duration(ping["duration_s"], 2),
                 _e(ping["remote_addr"]), _e(ping["user_agent"]), f'<pre>{_e(ping["body"][-BODY_EXCERPT:])}</pre>']
                for ping in pings]
    changes = [[format_time(flip["at"]), f'{_e(flip["old"])} → {_e(flip["new"])}', _e(flip["reason"])]
               for flip in flips]
    sent = [[format_time(notice["at"]), _e(notice["channel"]), _e(notice["kind"]), _e(notice["result"]),
             _e(notice["error"])] for notice in notices]
    return (_history_table("Check-ins", ["When (UTC)", "Signal", "Took", "From", "~User agent", "Body"], checkins)
            + _history_table("State changes", ["When (UTC)", "Change", "Reason"], changes)
            + _history_table("Notifications", ["When (UTC)", "Channel", "Notice", "Result", "Error"], sent))


def alert_page(request: Request, match: re.Match) -> Response:
    """One alert: status, settings, run durations, check-in examples, history."""
    require_key(request, request.config.public_dashboard, html=True)
    view, pings, now = _find_view(request, match["name"])
    store = request.monitor.store
    settings = [("Schedule", _e(view.description)), ("Time zone", _e(view.tz)),
                ("Grace", format_duration(view.grace_s)),
                ("Reminders", f"every {format_duration(view.notify_every_s)}"),
                ("Max runtime", format_duration(view.max_runtime_s) if view.max_runtime_s else "none"),
                ("Channels", _e(", ".join(view.channels))), ("Last check-in", _when(view.last_checkin_at, now)),
                ("Last success", _when(view.last_success_at, now)), ("Next deadline", _due(view, now)),
                ("Last run", _last_run(view, now)), ("Watched since", _when(view.first_seen_at, now))]
    reason = f'<p class="reason">{_e(view.reason)}</p>' if view.reason else ""
    body = (f'<p><a href="/">← all alerts</a></p><h1>{_e(view.name)} {_badge(view.status)}</h1>{reason}'
            f'<dl>{"".join(f"<dt>{key}</dt><dd>{value}</dd>" for key, value in settings)}</dl>'
            f"<h2>Run durations</h2>{duration_chart(pings, view.max_runtime_s)}"
            f"<h2>Checking in</h2>{_examples(request, view.name)}"
            f"{_history_tables(pings, store.flips(view.name), store.notice_history(view.name))}")
    return _page(f"{_e(view.name)}: {view.status} · Caduceus", body, refresh=True)


###############################################################################
# Pages: API, badges, metrics #################################################
###############################################################################


def api_alerts_page(request: Request, match: re.Match) -> Response:
    """``GET /api/v1/alerts``: ``{"alerts": [every alert's fields]}``, in config order."""
    require_key(request, request.config.public_dashboard)
    return json_response({"alerts": [view.as_json() for view in read_views(request)[0]]})


def api_alert_page(request: Request, match: re.Match) -> Response:
    """``GET /api/v1/alerts/<name>``: one alert's fields and its ``history``."""
    require_key(request, request.config.public_dashboard)
    view, pings, _ = _find_view(request, match["name"])
    store = request.monitor.store
    data = view.as_json()
    data["history"] = {
        "checkins": [{"at": format_time(ping["at"]), "signal": ping["kind"], "exit_status": ping["exit_status"],
                      "duration": ping["duration_s"], "remote_addr": ping["remote_addr"],
                      "user_agent": ping["user_agent"], "body": ping["body"][-BODY_EXCERPT:]} for ping in pings],
        "flips": [{"at": format_time(flip["at"]), "old": flip["old"], "new": flip["new"], "reason": flip["reason"]}
                  for flip in store.flips(view.name)],
        "notifications": [{"at": format_time(notice["at"]), "channel": notice["channel"], "kind": notice["kind"],
                           "result": notice["result"], "error": notice["error"]}
                          for notice in store.notice_history(view.name)],
    }
    return json_response(data)


def _may_change(request: Request) -> None:
    """Raise 401 unless the request has the key in the query or a header.  Not
    basic auth: a browser sends that by itself, so another site's form could
    pause an alert for a logged-in user."""
    if not _key_matches(request, basic=False):
        raise HTTPError(401, "The key is needed: send ?key=KEY or Authorization: Bearer KEY.",
                        {"WWW-Authenticate": 'Bearer realm="Caduceus"'})


def parse_until(text: str, now: float) -> float:
    """A pause's end: an ISO 8601 time (UTC unless it names an offset) or a
    duration from ``now`` ("2h", "1d 12h").  Raises ValueError."""
    seconds = _parse_duration(text)
    if seconds is not None and seconds > 0:
        return now + min(seconds, MAX_DURATION_S + 1)  # past the cap: Monitor.pause says so
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"until: expected an ISO 8601 time such as 2026-12-24T18:00:00Z or a duration "
                         f"such as 2h, got {json.dumps(text)}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    try:
        return moment.timestamp()
    except (OverflowError, ValueError):
        return now + MAX_DURATION_S + 1


def api_pause_page(request: Request, match: re.Match) -> Response:
    """``POST /api/v1/alerts/<name>/pause[?until=2h]``: pause it (see Monitor.pause); the alert."""
    _may_change(request)
    name = match["name"]
    if name not in request.config.checks:
        raise HTTPError(404, "No such alert.")
    until = request.query.get("until", [""])[0]
    try:
        request.monitor.pause(name, parse_until(until, request.monitor.clock()) if until else None,
                              by=request.client)
    except ValueError as exc:
        raise HTTPError(400, f"{exc}.") from None
    except KeyError:  # the config changed meanwhile
        raise HTTPError(404, "No such alert.") from None
    return json_response(_find_view(request, name)[0].as_json())


def api_resume_page(request: Request, match: re.Match) -> Response:
    """``POST /api/v1/alerts/<name>/resume``: end its pause, if any; the alert."""
    _may_change(request)
    name = match["name"]
    try:
        request.monitor.resume(name, by=request.client)
    except KeyError:
        raise HTTPError(404, "No such alert.") from None
    return json_response(_find_view(request, name)[0].as_json())


#: What a badge says, and its colour (shields.io's names), by status.
_BADGE_WORDS = {UP: ("up", "brightgreen"), RUNNING: ("up", "brightgreen"), GRACE: ("late", "yellow"),
                DOWN: ("down", "red"), PAUSED: ("paused", "lightgrey"), NEW: ("new", "blue")}
#: shields.io's colour names as SVG colours.
_BADGE_COLOURS = {"brightgreen": "#4c1", "yellow": "#dfb317", "red": "#e05d44", "lightgrey": "#9f9f9f",
                  "blue": "#007ec6"}


def _badge_view(request: Request, match: re.Match) -> AlertView:
    require_key(request, request.config.public_badges)
    return _find_view(request, match["name"])[0]


def _text_width(text: str) -> int:
    """About the width of ``text`` in 11px Verdana, as shields.io lays it out."""
    return sum(4 if c in "ijlt.:,;!|'()[] " else 9 if c in "mwMW" else 7 for c in text) + 10


def badge_svg_page(request: Request, match: re.Match) -> Response:
    """``GET /badge/<name>.svg``: a shields-style badge, name | up, late, down, paused or new."""
    view = _badge_view(request, match)
    message, colour = _BADGE_WORDS[view.status]
    left, right = _text_width(view.name), _text_width(message)
    label = _e(view.name)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right}" height="20" role="img" '
           f'aria-label="{label}: {message}"><title>{label}: {message}</title>'
           f'<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
           f'<stop offset="1" stop-opacity=".1"/></linearGradient>'
           f'<clipPath id="r"><rect width="{left + right}" height="20" rx="3" fill="#fff"/></clipPath>'
           f'<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>'
           f'<rect x="{left}" width="{right}" height="20" fill="{_BADGE_COLOURS[colour]}"/>'
           f'<rect width="{left + right}" height="20" fill="url(#s)"/></g>'
           f'<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" '
           f'font-size="11"><text x="{left / 2:.1f}" y="14">{label}</text>'
           f'<text x="{left + right / 2:.1f}" y="14">{message}</text></g></svg>\n')
    return Response(200, svg.encode(), "image/svg+xml; charset=utf-8", (("Cache-Control", "no-cache"),))


def badge_json_page(request: Request, match: re.Match) -> Response:
    """``GET /badge/<name>.json``: the badge in shields.io's endpoint format."""
    view = _badge_view(request, match)
    message, colour = _BADGE_WORDS[view.status]
    return json_response({"schemaVersion": 1, "label": view.name, "message": message, "color": colour},
                         headers={"Cache-Control": "no-cache"})


def _label_value(value: str) -> str:
    """A Prometheus label value, escaped as the text format asks: \\\\, \\" and \\n."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{key}="{_label_value(str(label))}"' for key, label in labels.items())
        lines.append(f"{name}{{{text}}} {value!r}" if text else f"{name} {value!r}")


def metrics_page(request: Request, match: re.Match) -> Response:
    """``GET /metrics``: Prometheus text exposition format 0.0.4."""
    require_key(request, request.config.public_dashboard)
    views = read_views(request)[0]
    monitor = request.monitor
    lines: list[str] = []
    alert = [({"alert": view.name}, view) for view in views]
    _metric(lines, "caduceus_alert_up", "gauge", "1 unless the alert is down.",
            [(labels, float(not view.failing)) for labels, view in alert])
    _metric(lines, "caduceus_alert_status", "gauge", "The alert's status: 1 for the current one.",
            [({"alert": view.name, "status": status}, float(view.status == status))
             for view in views for status in STATUS_ORDER])
    for name, field, help_text in (
            ("caduceus_alert_last_checkin_timestamp_seconds", "last_checkin_at", "When the latest signal came."),
            ("caduceus_alert_next_due_timestamp_seconds", "next_due_at", "When the alert will be down."),
            ("caduceus_alert_last_duration_seconds", "last_duration_s", "How long the last timed run took.")):
        _metric(lines, name, "gauge", help_text, [(labels, float(getattr(view, field)))
                                                  for labels, view in alert if getattr(view, field) is not None])
    checkins = monitor.tally.counts("checkins")
    _metric(lines, "caduceus_checkins_total", "counter", "Signals received since the start, by alert and signal.",
            [({"alert": view.name, "signal": kind}, float(checkins.get((view.name, kind), 0)))
             for view in views for kind in (SUCCESS, FAIL, START, LOG)])
    _metric(lines, "caduceus_notifications_total", "counter",
            "Notice deliveries since the start, by channel and result (sent, failed, given_up).",
            [({"channel": channel, "result": result}, float(count))
             for (channel, result), count in sorted(monitor.tally.counts("notifications").items())])
    _metric(lines, "caduceus_outbox_pending", "gauge", "Notices waiting to be delivered.",
            [({}, float(len(monitor.store.pending_notices())))])
    _metric(lines, "caduceus_build_info", "gauge", "The running version.", [({"version": __version__}, 1.0)])
    body = "\n".join(lines) + "\n"
    return Response(200, body.encode(), "text/plain; version=0.0.4; charset=utf-8")


def healthz_page(request: Request, match: re.Match) -> Response:
    """200 "OK" while the sweeper, the database and the couriers work; else
    503 with the reasons (see Watchdog).  For Docker's and Kubernetes' checks;
    open to all, as it names no alert."""
    watchdog = request.server.watchdog
    problems = watchdog.problems() if watchdog is not None else []
    if problems:
        return text_response(f"Unhealthy: {'; '.join(problems)}.\n", 503)
    return text_response("OK\n")


def api_reload_page(request: Request, match: re.Match) -> Response:
    """Re-read the config file, as SIGHUP does: ``{"reloaded": true, "message":
    what changed}``, or 400 with the config's one-line error (the running
    config is kept).  Needs ``secret_key``, in the query or a header."""
    if not request.config.secret_key:
        raise HTTPError(403, "Reloading over HTTP needs a secret_key in [config]; send SIGHUP instead.")
    if not _key_matches(request, basic=False):
        why = "reload with a wrong key" if request.header_key() or request.query.get("key") else \
            "reload without a key"
        raise _refused(request, 403, "Wrong or missing key.", "", why)
    if request.server.reloader is None:
        raise HTTPError(503, "Reloading is not available here.")
    done, message = request.server.reloader()
    if not done:
        raise HTTPError(400, message)
    return json_response({"reloaded": True, "message": message})


#: The routes, one line each: (methods, pattern of the decoded path, page).
ROUTES = (
    (("GET", "HEAD"), re.compile(r"/"), dashboard_page),
    (("GET", "HEAD"), re.compile(r"/alerts/(?P<name>[^/]+)"), alert_page),
    (("GET", "HEAD", "POST"), re.compile(r"/reset/(?P<name>[^/]+)(?:/(?P<signal>[^/]*))?"), reset_page),
    (("GET", "HEAD", "POST"), re.compile(r"/ping/(?P<rest>.+)"), ping_page),
    (("GET", "HEAD"), re.compile(r"/api/v1/alerts"), api_alerts_page),
    (("GET", "HEAD"), re.compile(r"/api/v1/alerts/(?P<name>[^/]+)"), api_alert_page),
    (("POST",), re.compile(r"/api/v1/alerts/(?P<name>[^/]+)/pause"), api_pause_page),
    (("POST",), re.compile(r"/api/v1/alerts/(?P<name>[^/]+)/resume"), api_resume_page),
    (("GET", "HEAD"), re.compile(r"/badge/(?P<name>[^/]+)\.svg"), badge_svg_page),
    (("GET", "HEAD"), re.compile(r"/badge/(?P<name>[^/]+)\.json"), badge_json_page),
    (("GET", "HEAD"), re.compile(r"/metrics"), metrics_page),
    (("GET", "HEAD"), re.compile(r"/healthz"), healthz_page),
    (("POST",), re.compile(r"/api/v1/reload"), api_reload_page),
)


###############################################################################
# Workers #####################################################################
###############################################################################

#: Caduceus records that it is running this often (see Monitor.downtime); the
#: write also proves the database writable.
ALIVE_EVERY_S = 5.0
#: The database counts as unwritable when no such write has worked for this long.
WRITE_STALE_S = 3 * ALIVE_EVERY_S
#: A loop counts as dead when it has not run for its longest wait plus this.
HEALTH_SLACK_S = 30.0
#: A sweep running longer than this is stuck.
SWEEP_STUCK_S = 60.0
#: A send in progress longer than this is wedged: every channel's whole attempt
#: has a shorter deadline (email: 30 s, plus 600 s for the reply to the message).
SEND_WEDGED_S = 15 * 60.0
#: One heartbeat request must be answered within this.
HEARTBEAT_TIMEOUT_S = 10.0


#: A poke for a run less than this much sooner than the one set changes nothing:
#: the same deadline, read again through two clocks, must not wake the thread.
POKE_SLACK_S = 0.001


class Sweeper:
    """Calls ``work()`` in a thread of its own, when ``work`` asks to.

    ``work()`` returns the epoch time it wants to run again (or None: nothing
    to wait for).  The wait is capped at ``max_wait_s``, so it runs at least
    that often whatever it asked, and a wall clock step cannot stall it.
    ``poke(at)`` brings the next run forward when something (a check-in, a
    queued notice) needs it sooner.  An exception in ``work`` is logged and
    retried after ``retry_s``: a sweeper that dies silently is a dead man's
    switch that never fires.

    One thread waits on a condition for the whole life of the sweeper: a poke
    wakes it, with no thread started per run (a notice is due within
    milliseconds of its deadline, and a thread start costs some of them).
    """

    def __init__(self, work: Callable[[], float | None], name: str = "sweeper",
                 clock: Callable[[], float] = time.time, max_wait_s: float = 60.0,
                 retry_s: float = 5.0) -> None:
        self._work = work
        self._name = name
        self._clock = clock
        self._max_wait_s = max_wait_s
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._poked = threading.Condition(self._lock)
        self._running = threading.Lock()
        self._thread: threading.Thread | None = None
        #: When the next run happens, in ``time.monotonic()`` seconds, so that a
        #: wall clock step neither postpones a run nor keeps a poke from bringing it forward.
        self._next_monotonic = math.inf
        self._stopped = False
        #: When ``work`` last started (``clock``), and since when it runs now (None: it does not).
        self._ran_at: float | None = None
        self._running_since: float | None = None

    def problem(self, stuck_after_s: float) -> str | None:
        """Why this loop is not alive, or None: it is, when it is not stopped, runs
        ``work`` no longer than ``stuck_after_s``, and last ran within its longest
        wait (``max_wait_s``) plus HEALTH_SLACK_S."""
        now = self._clock()
        with self._lock:
            stopped, ran_at, running_since = self._stopped, self._ran_at, self._running_since
        if stopped:
            return f"the {self._name} is stopped"
        if running_since is not None:
            if now - running_since > stuck_after_s:
                return f"the {self._name} has been running for {format_duration(now - running_since)}"
            return None
        if ran_at is None:
            return f"the {self._name} has not started"
        if now - ran_at > self._max_wait_s + HEALTH_SLACK_S:
            return f"the {self._name} has not run for {format_duration(now - ran_at)}"
        return None

    def start(self) -> None:
        """Run ``work`` now, and from then on when it asks."""
        with self._lock:
            self._ran_at = self._clock()  # the first run is due at once: alive
        self.poke(self._clock())

    def poke(self, at: float) -> None:
        """Make sure ``work`` runs no later than ``at`` (epoch seconds).  The
        first poke (or ``start()``) starts the thread, as does a poke that finds
        it killed."""
        with self._lock:
            if self._stopped:
                return
            due = time.monotonic() + min(max(at - self._clock(), 0.0), self._max_wait_s)
            if due >= self._next_monotonic - POKE_SLACK_S:
                return
            self._next_monotonic = due
            self._poked.notify()
            if self._thread is None or not self._thread.is_alive():  # not yet started, or killed
                thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                thread.start()
                self._thread = thread

    def _loop(self) -> None:
        while self._wait_for_next_run():
            with self._running:
                if self._stopped:
                    return
                with self._lock:
                    self._ran_at = self._running_since = self._clock()
                try:
                    next_at = self._work()
                except BaseException:  # SystemExit too: this thread must outlive what its work raises
                    log.exception("%s failed; trying again in %s", self._name, format_duration(self._retry_s))
                    next_at = self._clock() + self._retry_s
                finally:
                    with self._lock:
                        self._running_since = None
            self.poke(self._clock() + self._max_wait_s if next_at is None else next_at)

    def _wait_for_next_run(self) -> bool:
        """Wait until the next run is due and take it (False: stopped)."""
        with self._lock:
            while not self._stopped:
                wait_s = self._next_monotonic - time.monotonic()
                if wait_s <= 0:
                    self._next_monotonic = math.inf
                    return True
                self._poked.wait(min(wait_s, self._max_wait_s))
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop running ``work``, and wait up to ``timeout_s`` for a run in progress."""
        with self._lock:
            self._stopped = True
            self._poked.notify()
        if self._running.acquire(timeout=timeout_s):
            self._running.release()


class Couriers:
    """One courier (a Sweeper sending one channel instance's notices, see
    Monitor.deliver) per channel instance, so a dead destination delays no
    other.  Couriers are made as instances appear: those of the config, those
    with notices still queued (an instance since removed gives them up), and
    those of a config that replaced it (looked for whenever notices are
    queued).  ``start`` and ``stop`` are a Sweeper's, for all of them.
    """

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor
        self._lock = threading.Lock()
        self._couriers: dict[str, Sweeper] = {}
        self._running: set[str] = set()
        self._started = self._stopped = False
        monitor.on_outbox(self.poke)

    def names(self) -> list[str]:
        """The channel instances that have a courier."""
        with self._lock:
            return sorted(self._couriers)

    def start(self) -> None:
        with self._lock:
            self._started = True
        self._start_new()

    def poke(self, at: float) -> None:
        """Notices were queued: run each courier by ``at`` (a new one at once)."""
        self._start_new()
        with self._lock:
            couriers = list(self._couriers.values())
        for courier in couriers:
            courier.poke(at)

    def sync(self) -> None:
        """After a reload: start couriers for new channel instances, and stop those
        of removed ones that have no notices left to send or give up."""
        self._start_new()
        monitor = self._monitor
        keep = set(monitor.config.channels) | set(monitor.store.pending_channels())
        with self._lock:
            retired = [self._couriers.pop(name) for name in sorted(set(self._couriers) - keep)]
            self._running &= set(self._couriers)
        for courier in retired:
            courier.stop(timeout_s=0)  # a send in progress finishes; nothing is queued after it

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop them all, and wait up to ``timeout_s`` in all for sends in progress."""
        give_up_at = time.monotonic() + timeout_s
        with self._lock:
            self._stopped = True
            couriers = list(self._couriers.values())
        for courier in couriers:
            courier.stop(timeout_s=0)
        for courier in couriers:
            courier.stop(timeout_s=max(give_up_at - time.monotonic(), 0.0))

    def _start_new(self) -> None:
        """Make the couriers missing, and start those not yet running (none before start())."""
        monitor = self._monitor
        wanted = set(monitor.config.channels) | set(monitor.store.pending_channels())
        with self._lock:
            if self._stopped:
                return
            for channel in sorted(wanted - set(self._couriers)):
                self._couriers[channel] = Sweeper(lambda channel=channel: monitor.deliver(channel),
                                                  name=f"{channel} courier")
            if not self._started:
                return
            fresh = [self._couriers[channel] for channel in sorted(set(self._couriers) - self._running)]
            self._running.update(self._couriers)
        for courier in fresh:
            courier.start()


def _fetch(url: str, timeout_s: float) -> None:
    """GET ``url``, all of it within ``timeout_s`` (a server that drips its answer
    must not stall the heartbeat, or the outside monitor would think Caduceus
    dead); raise OSError or http.client.HTTPException unless it answers 2xx."""
    status, _, _ = _http_request("GET", url, None, {"User-Agent": f"caduceus/{__version__}"}, timeout_s)
    if not 200 <= status < 300:
        raise http.client.HTTPException(f"HTTP {status} {http.client.responses.get(status, '')}".rstrip())


def _origin(url: str) -> str:
    """Scheme and host of a URL, for logs: a heartbeat URL's path is a secret (hc-ping.com/UUID)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}/..."


#: While the database cannot be written, the sweeper tries again after this,
#: doubling up to OUTAGE_RETRY_MAX_S ...
OUTAGE_RETRY_S, OUTAGE_RETRY_MAX_S = 5.0, 60.0
#: ... and says so in the log at most this often.
OUTAGE_LOG_EVERY_S = 60.0


class GuardedSweep:
    """The sweeper's work: ``Monitor.sweep()``, and what to do while the
    database cannot be written (disk full, read-only, locked).

    Then no state change can be recorded and no notice queued, so without
    more a dead man's switch would go quiet, just when a full disk (a common
    reason for jobs to fail) needs saying.  So each alert that is overdue is
    announced straight through its channels, once per channel per outage,
    with a reason that says why; the database being back, the ordinary sweep
    records the failure and queues its notice, which may repeat the
    announcement: twice is better than never.  The outage is logged at most
    once a minute, without a traceback.  Call it; it returns when to run again.
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self._since: float | None = None
        self._failures = 0
        self._logged_at = -math.inf
        self._announced: set[tuple[str, str]] = set()

    def __call__(self) -> float | None:
        try:
            self.monitor.sweep()
        except sqlite3.OperationalError as exc:
            return self._failed(exc)
        if self._since is not None:
            log.warning("the database works again after %s; state changes are recorded again",
                        format_duration(self.monitor.clock() - self._since, 2))
            self._since, self._failures, self._logged_at = None, 0, -math.inf
            self._announced.clear()
        return self.monitor.next_sweep_at()

    def _failed(self, exc: sqlite3.OperationalError) -> float:
        now = self.monitor.clock()
        problem = _database_problem(exc)
        if self._since is None:
            self._since = now
        self._failures += 1
        if now - self._logged_at >= OUTAGE_LOG_EVERY_S:
            self._logged_at = now
            log.error("cannot record state changes, the database is unavailable: %s (%d failed sweeps since "
                      "%s); overdue alerts are announced directly", problem, self._failures,
                      format_time(self._since))
        self._announce_overdue(problem, now)
        return now + min(OUTAGE_RETRY_S * 2 ** min(self._failures - 1, 16), OUTAGE_RETRY_MAX_S)

    def _announce_overdue(self, problem: str, now: float) -> None:
        monitor = self.monitor
        config = monitor.config
        for row in monitor.store.checks():
            spec = config.checks.get(row["name"])
            if spec is None or row["status"] in (DOWN, PAUSED):
                continue
            due, reason = deadline(spec, row)
            if now < due:
                continue
            reason = (f"{reason} (Caduceus cannot write its database: {problem}; this notice was sent "
                      "directly and may come again once the database works)")
            notice = notice_facts(FAILING, spec, row, reason, monitor.store.last_ping(spec.name), now, config)
            for channel in spec.channels:
                instance = config.channels.get(channel)
                send = monitor.senders.get(instance.kind) if instance is not None else None
                if send is None or (spec.name, channel) in self._announced:
                    continue
                try:
                    send(instance.conf, _for_channel(notice, config, channel))
                except Exception as exc:  # NotifyError, or a channel's bug: try again next time
                    log.error("%s: could not announce the failure to %s directly: %s", spec.name, channel,
                              exc)
                    continue
                self._announced.add((spec.name, channel))
                log.warning("%s: down: %s; announced to %s directly, as it cannot be recorded", spec.name,
                            reason, channel)


class Watchdog:
    """Is this Caduceus working?  The answer ``GET /healthz`` gives, and the
    condition for fetching ``[config] heartbeat_url``.

    Healthy means: the sweeper is alive (it ran within its longest wait, or
    has been running a sweep for under SWEEP_STUCK_S); the database is
    writable (``record_alive()``, run every ALIVE_EVERY_S, wrote within
    WRITE_STALE_S and its latest attempt worked); and no courier is wedged (no
    send has been in progress for over SEND_WEDGED_S).  ``problems()`` lists
    what is wrong, in words.  ``heartbeat()`` fetches the heartbeat URL every
    ``heartbeat_every`` while healthy, and logs (never raises) when that fails.
    Both are meant to run on their own ``Sweeper``.
    """

    def __init__(self, monitor: Monitor, sweeper: Sweeper | None,
                 fetch: Callable[[str, float], None] = _fetch,
                 clock: Callable[[], float] = time.time) -> None:
        self.monitor = monitor
        self.sweeper = sweeper
        self._fetch = fetch
        self._clock = clock
        self._written_at: float | None = None
        self._write_error = ""
        self._beat_due_at = -math.inf
        self._beat_problem = ""

    def record_alive(self) -> float:
        """Record that Caduceus is running (Monitor.record_alive); return when to do it again."""
        try:
            self._written_at = self.monitor.record_alive()
        except sqlite3.Error as exc:
            problem = _database_problem(exc) if isinstance(exc, sqlite3.OperationalError) else str(exc)
            if not self._write_error:
                log.error("the database is not writable: %s", problem)
            self._write_error = problem
        else:
            if self._write_error:
                log.warning("the database is writable again")
            self._write_error = ""
        return self._clock() + ALIVE_EVERY_S

    def problems(self) -> list[str]:
        """What keeps this Caduceus from being healthy; [] when it is."""
        now = self._clock()
        problems = []
        if self.sweeper is not None:
            problem = self.sweeper.problem(SWEEP_STUCK_S)
            if problem:
                problems.append(problem)
        if self._write_error:
            problems.append(f"the database is not writable ({self._write_error})")
        elif self._written_at is None or not 0 <= now - self._written_at <= WRITE_STALE_S:
            problems.append(f"no database write has worked for over {format_duration(WRITE_STALE_S)}")
        for channel, since in sorted(dict(self.monitor.sending).items()):
            if now - since > SEND_WEDGED_S:
                problems.append(f"the {channel} courier has been sending one notice for "
                                f"{format_duration(now - since)}")
        return problems

    def heartbeat(self) -> float | None:
        """Fetch the heartbeat URL if it is due and Caduceus is healthy; return
        when to come back (None: no heartbeat configured)."""
        config = self.monitor.config
        if not config.heartbeat_url:
            return None
        now = self._clock()
        # A due time further off than a whole period means the wall clock was set back.
        if now < self._beat_due_at <= now + config.heartbeat_every_s:
            return self._beat_due_at
        self._beat_due_at = now + config.heartbeat_every_s
        problem = "; ".join(self.problems())
        if problem != self._beat_problem:
            if problem:
                log.error("unhealthy, so not sending the heartbeat: %s", problem)
            else:
                log.warning("healthy again: sending the heartbeat")
            self._beat_problem = problem
        if not problem:
            try:
                self._fetch(config.heartbeat_url, min(HEARTBEAT_TIMEOUT_S, config.heartbeat_every_s))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                log.warning("heartbeat to %s failed: %s", _origin(config.heartbeat_url), exc)
        return self._beat_due_at


###############################################################################
# Run wrapper #################################################################
###############################################################################


#: How long one attempt of a signal from ``run`` may take, and the first wait between attempts.
RUN_TIMEOUT_S, RUN_BACKOFF_S = 10.0, 1.0
#: The largest --retries and --timeout the wrapper accepts.
RUN_MAX_RETRIES, RUN_MAX_TIMEOUT_S = 100, 3600.0


def _signal_url(url: str, signal_text: str) -> str:
    """Turn a check-in URL into the URL of a signal, keeping the query:
    ``http://h/reset/backups/?key=K`` and ``"start"`` -> ``http://h/reset/backups/start?key=K``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{signal_text}"))


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a check-in URL, or None if it can."""
    if re.search(r"[\x00-\x20\x7f]", url):
        return "it contains a space or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "expected an http:// or https:// URL"
    if not parts.hostname:
        return "it has no host"
    return None


def _post(url: str, body: bytes, timeout_s: float) -> tuple[str | None, bool]:
    """POST once, all of it (connect through the last byte of the answer) within
    ``timeout_s``; return (None, _) on a 2xx, else (the problem, whether it is
    final: an answer other than 5xx, or a request that cannot be made)."""
    headers = {"User-Agent": f"caduceus-run/{__version__}", "Content-Type": "text/plain; charset=utf-8"}
    try:
        status, _, _ = _http_request("POST", url, body, headers, timeout_s)
    except (http.client.HTTPException, OSError) as exc:
        # Some of these messages quote the URL: mask the keys in them too.
        return mask_keys(str(exc) or type(exc).__name__), False
    except ValueError as exc:
        return mask_keys(str(exc)), True
    if 200 <= status < 300:
        return None, True
    return f"HTTP {status} {http.client.responses.get(status, '')}".rstrip(), status < 500


def _send_signal(url: str, body: bytes, retries: int, timeout_s: float, sleep: Callable[[float], Any],
                 clock: Callable[[], float], may_try: Callable[[float], bool] = lambda ends_at: True) -> bool:
    """POST a signal, trying again on network errors and 5xx after waits of 1 s, 2 s, 4 s...

    All of it, waits included, ends within ``timeout_s * (retries + 1)``
    seconds: an attempt gets what is left of that (at most ``timeout_s``), and
    a retry whose wait would reach past it is not made.  ``may_try(ends_at)``
    is asked before each attempt, with the time the attempt will end at the
    latest; False ends the signal quietly.  Problems are reported on stderr,
    never raised: the job matters more than its monitoring.
    """
    give_up_at = clock() + timeout_s * (retries + 1)
    attempts = 0
    while attempts <= retries:
        if attempts:
            wait_s = RUN_BACKOFF_S * 2 ** (attempts - 1)
            if clock() + wait_s >= give_up_at:
                break
            sleep(wait_s)
        attempt_s = min(timeout_s, give_up_at - clock())
        if attempt_s <= 0:
            break
        if not may_try(clock() + attempt_s):
            return False
        attempts += 1
        problem, final = _post(url, body, attempt_s)
        if problem is None:
            return True
        print(f"caduceus run: {mask_keys(url)}: {problem}", file=sys.stderr)
        if final:
            return False
    print(f"caduceus run: {mask_keys(url)}: gave up after {_count(attempts, 'attempt')}", file=sys.stderr)
    return False


def _count(n: int, noun: str) -> str:
    """``1 alert``, ``2 alerts``: the plural only when needed."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class _StartSignal(threading.Thread):
    """The start signal, sent in the background so a slow server never delays the job.

    ``abandon()``, when the job has ended, stops it: no new attempt begins (a
    wait between attempts ends at once), and the one in flight is waited for
    only until its own timeout, so the start still arrives before the end
    whenever it can.
    """

    def __init__(self, url: str, retries: int, timeout_s: float, clock: Callable[[], float]) -> None:
        super().__init__(name="start signal", daemon=True)
        self._args = (_signal_url(url, START), b"", retries, timeout_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._attempt_ends_at = -math.inf

    def run(self) -> None:
        _send_signal(*self._args, sleep=self._ended.wait, clock=self._clock, may_try=self._may_try)

    def _may_try(self, ends_at: float) -> bool:
        with self._lock:  # an attempt begins before abandon() looks, or not at all
            if not self._ended.is_set():
                self._attempt_ends_at = ends_at
            return not self._ended.is_set()

    def abandon(self) -> None:
        with self._lock:
            self._ended.set()
            wait_s = self._attempt_ends_at - self._clock()
        self.join(max(wait_s, 0.0))


def _pump(source: Any, sink: Any, tail: bytearray, lock: threading.Lock) -> None:
    """Copy a child's output to our own as it comes, keeping the last MAX_PING_BODY bytes.

    If our own output is closed (``run ... | head -1``), stop reading, so the
    child gets SIGPIPE just as it would without the wrapper.
    """
    with source:
        for chunk in iter(lambda: source.read1(64 * 1024), b""):
            with lock:
                tail += chunk
                del tail[:-MAX_PING_BODY]
            if sink is None:
                continue
            try:
                sink.write(chunk)
                sink.flush()
            except OSError:
                return


def run_command(url: str, command: list[str], retries: int = 3, timeout_s: float = RUN_TIMEOUT_S,
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> int:
    """Run ``command`` between a start signal and its exit status; return that status.

    The command runs without a shell, with its output passed through as it
    comes; the last 10 KB of it go with the exit status.  A command killed by
    signal N counts as exit status 128+N, one that cannot be started as 127
    (not found) or 126.  Monitoring trouble never changes what the command
    does, and delays the wrapper's exit by at most ``timeout_s`` for the start
    signal plus ``timeout_s * (retries + 1)`` for the exit status (see
    _send_signal).  ``clock`` times the signals and ``sleep`` is the wait
    between attempts of the exit status.
    """
    starting = _StartSignal(url, retries, timeout_s, clock)
    starting.start()
    tail = bytearray()
    status = _run_child(command, tail)
    starting.abandon()  # the job has ended: its exit status is the news now
    _send_signal(_signal_url(url, str(status)), bytes(tail), retries, timeout_s, sleep, clock)
    return status


def _run_child(command: list[str], tail: bytearray) -> int:
    """Run the command to its end, passing its output through and keeping its tail."""
    lock = threading.Lock()
    # Ctrl-C reaches the whole process group, so the wrapper lets the command
    # decide and reports what it did.  SIGTERM (cron, timeout, systemd) is passed
    # on, also one that arrives before the command has started.  Both are Python
    # handlers, not SIG_IGN, which the command would inherit.
    children: list[subprocess.Popen] = []
    terms: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        terms.append(signum)
        for child in children:
            child.send_signal(signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in ((signal.SIGINT, lambda signum, frame: None), (signal.SIGTERM, forward)):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored stays ignored, for the command too
                handlers[signum] = signal.signal(signum, handler)
    try:
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            message = f"caduceus run: cannot run {command[0]}: {exc.strerror or exc}\n"
            sys.stderr.write(message)
            tail += message.encode()
            return 127 if isinstance(exc, FileNotFoundError) else 126
        with process:
            children.append(process)
            for signum in terms:
                process.send_signal(signum)
            # sys.stdout is None when the wrapper was started with fd 1 closed.
            pumps = [threading.Thread(target=_pump, args=(process.stdout, getattr(sys.stdout, "buffer", None),
                                                          tail, lock)),
                     threading.Thread(target=_pump, args=(process.stderr, getattr(sys.stderr, "buffer", None),
                                                          tail, lock))]
            for pump in pumps:
                pump.start()
            status = process.wait()
            for pump in pumps:
                pump.join()
        return 128 - status if status < 0 else status
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


class _RunArgumentParser(argparse.ArgumentParser):
    """Usage errors in one line, before anything runs."""

    def error(self, message: str) -> Any:
        self.exit(2, f"caduceus run: {message} (see --help)\n")


def _retries_arg(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > RUN_MAX_RETRIES:
        raise argparse.ArgumentTypeError(f"expected a whole number 0-{RUN_MAX_RETRIES}, got {text!r}")
    return int(text)


def _timeout_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= RUN_MAX_TIMEOUT_S:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"expected seconds, more than 0 and at most {RUN_MAX_TIMEOUT_S:g}, got {text!r}")
    return seconds


#: The end of ``run --help``.
RUN_EPILOG = """\
Caduceus is told "start" before COMMAND runs, then its exit status (0 is
success) with the last 10 KB of its output; the wrapper exits with COMMAND's
own status.  A check-in that cannot be sent never stops the job.

examples:
  # in a crontab: the backup, reported to Caduceus
  0 3 * * * python3 caduceus.py run http://monitor:5000/reset/backups/?key=K -- /usr/local/bin/backup
  # more patience with a slow network: 5 tries, 30 s each
  python3 caduceus.py run --retries 5 --timeout 30 http://monitor:5000/ping/K/backups -- ./backup.sh
"""


def _run_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options and URL, then the command: everything after the first ``--``.

    Without ``--``, the command starts after the URL, and an option there is an
    error rather than the start of the command.
    """
    parser = _RunArgumentParser(
        prog="caduceus.py run", usage="%(prog)s [--retries N] [--timeout SECONDS] URL -- COMMAND [ARGS...]",
        description="Run a command and report its start, exit status and output.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EPILOG)
    parser.add_argument("--retries", type=_retries_arg, default=3, metavar="N",
                        help="tries again on network errors and 5xx, with doubling waits from 1s (default: 3)")
    parser.add_argument("--timeout", type=_timeout_arg, default=RUN_TIMEOUT_S, metavar="SECONDS",
                        help="for each attempt; all attempts of the exit status, waits included, "
                             "end within SECONDS x (N + 1) (default: 10)")
    parser.add_argument("url", help="the check-in URL, e.g. http://host:5000/reset/backups/?key=K")
    if "--" in argv:
        split = argv.index("--")
        return parser.parse_args(argv[:split]), argv[split + 1:]
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    if args.command[:1] and args.command[0].startswith("-"):
        parser.error(f"got {args.command[0]!r} where the command should be: options go before the URL")
    return args, args.command


def _run_main(argv: list[str]) -> int:
    args, command = _run_args(argv)
    problem = _url_problem(args.url)
    if problem is not None:
        print(f"caduceus run: bad URL {json.dumps(mask_keys(args.url))}: {problem}", file=sys.stderr)
        return 2
    if not command:
        print("caduceus run: no command: run URL -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    return run_command(args.url, command, args.retries, args.timeout)


###############################################################################
# Command line ################################################################
###############################################################################


# The check command -------------------------------------------------------------


#: What ``check`` and ``status`` read: check rows by name, the 0.0.11 state, recent pings by name.
_State = "tuple[dict[str, Mapping[str, Any]], dict[str, tuple[float | None, float | None]], dict[str, list]]"


def _read_state(db: str) -> _State:
    """The check rows of a database, the Caduceus 0.0.11 state the server
    would import at its next start (see read_legacy_state) and the recent
    pings, read-only; all {} when there is no such file.  Raises sqlite3.Error
    if it cannot be read."""
    if not os.path.exists(db):
        return {}, {}, {}
    uri = f"file:{urllib.parse.quote(os.path.abspath(db))}"
    try:
        return _read_checks(f"{uri}?mode=ro")
    except sqlite3.OperationalError:
        # A WAL database needs its -shm file even to read; a user who may not
        # write beside it can still read a snapshot of the file itself.
        return _read_checks(f"{uri}?immutable=1")


def _read_checks(uri: str) -> _State:
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        checks = {row["name"]: row for row in conn.execute("SELECT * FROM checks")} if "checks" in tables else {}
        pings = read_recent_pings(conn) if "pings" in tables else {}
        # The server imports 0.0.11's state while no alert is recorded (Monitor.start).
        return checks, ({} if checks else read_legacy_state(conn)), pings


def check_report(views: list[AlertView]) -> list[dict]:
    """What ``check`` prints, per alert view: schedule, channels, status (with
    the reason, when down) and next deadline or reminder."""
    report = []
    for view in views:
        report.append({
            "name": view.name,
            "schedule": view.schedule,
            "every": view.every_s,
            "description": view.description,
            "timezone": str(view.tz),
            "grace": view.grace_s,
            "max_runtime": view.max_runtime_s,
            "notify_every": view.notify_every_s,
            "channels": list(view.channels),
            "status": view.status,
            "reason": view.reason,
            "last_success": _iso(view.last_success_at),
            "next_due": _iso(view.next_due_at),
            "next_due_local": _local_time(view.next_due_at, view.tz) if view.next_due_at is not None else None,
            "next_reminder": _iso(view.next_reminder_at),
        })
    return report


def _local_time(at: float, tz: datetime.tzinfo) -> str:
    return datetime.datetime.fromtimestamp(at, tz).strftime("%Y-%m-%d %H:%M:%S %Z")


#: The end of ``test-notify --help``.
TEST_NOTIFY_EPILOG = """\
One line per channel says whether it delivered.  Exit status 0: every channel
delivered; 1: one failed; 2: a usage or config error.

examples:
  python3 caduceus.py test-notify backups                  # the channels of alert "backups"
  python3 caduceus.py test-notify --channel webhook.ops    # one channel instance
  python3 caduceus.py test-notify -c /etc/caduceus/caduceus.toml   # every configured channel
"""


def _test_notify_main(argv: list[str], clock: Callable[[], float] = time.time) -> int:
    """``test-notify``: send a test notice now through an alert's channels, one
    channel, or every configured channel; print one line per channel.  Alert
    state and the outbox are not touched (the database is not opened).
    Returns 0 if every channel delivered, 1 if any failed, 2 for a usage or
    config error."""
    parser = argparse.ArgumentParser(
        prog="caduceus.py test-notify", description="Send a test notice through an alert's channels (or one "
        "channel, or every\nchannel) now, without touching alert state or the outbox.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TEST_NOTIFY_EPILOG)
    parser.add_argument("-c", "--config", metavar="CONFIG", default="caduceus.toml",
                        help="the configuration file (default: caduceus.toml)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("alert", nargs="?", help="test the channels of this alert")
    which.add_argument("--channel", metavar="NAME", help="test this channel (e.g. email or webhook.ops)")
    args = parser.parse_args(argv)
    config = _load_config_or_say(args.config)
    if config is None:
        return 2
    spec = config.checks.get(args.alert) if args.alert is not None else None
    if args.alert is not None and spec is None:
        print(f"caduceus: {args.config}: no alert named {json.dumps(args.alert)}; alerts: "
              f"{', '.join(config.checks) or 'none'}", file=sys.stderr)
        return 2
    channels = spec.channels if spec is not None else tuple(config.channels)
    if args.channel is not None:
        channels = (args.channel.strip().lower(),)
        if channels[0] not in config.channels:
            print(f"caduceus: {args.config}: no channel named {json.dumps(args.channel)}; configured channels: "
                  f"{', '.join(config.channels)}", file=sys.stderr)
            return 2
    notice = test_notice(config, spec, clock())
    failed = 0
    for name in channels:
        problem = _try_channel(config, name, notice)
        print(f"{name}: {'delivered' if problem is None else 'failed: ' + problem}", flush=True)
        failed += problem is not None
    return 1 if failed else 0


def _try_channel(config: Config, name: str, notice: Notice) -> str | None:
    """Send the notice through one channel instance now: None, or what went wrong."""
    instance = config.channels[name]
    try:
        CHANNELS[instance.kind].send(instance.conf, _for_channel(notice, config, name))
    except NotifyError as exc:
        return f"{exc}{' (permanent)' if exc.permanent else ''}"
    except Exception as exc:  # a channel's bug, reported as the courier reports it (Monitor._attempt)
        log.exception("%s: the channel failed unexpectedly", name)
        return f"unexpected {type(exc).__name__}"
    return None


def _add_file_args(parser: argparse.ArgumentParser) -> None:
    """-c and -b, the same for the service and ``check``."""
    parser.add_argument("-c", "--config", metavar="CONFIG", default="caduceus.toml",
                        help="the configuration file (default: caduceus.toml)")
    parser.add_argument("-b", "--db", metavar="DATABASE", default="database.sqlite3",
                        help="the SQLite database file (default: database.sqlite3)")


def _usable_db_name(db: str) -> bool:
    """False, after saying so on stderr, for a -b that SQLite would take as a
    throwaway database rather than a file."""
    if db in ("", ":memory:"):
        print(f"caduceus: -b/--db: expected a database file name, got {json.dumps(db)}", file=sys.stderr)
        return False
    return True


def _load_config_or_say(path: str) -> Config | None:
    """The config, or None after printing its one-line error on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"caduceus: {exc}", file=sys.stderr)
        return None


#: The end of ``check --help``.
CHECK_EPILOG = """\
The database is only read, so this is safe while the service runs.  Exit
status 0: the config is valid; 2: it is not (one line on stderr says where).

examples:
  python3 caduceus.py check -c /etc/caduceus/caduceus.toml -b /var/lib/caduceus/database.sqlite3
  python3 caduceus.py check --json | jq '.alerts[] | select(.status == "down")'
"""


def _read_command(name: str, description: str, argv: list[str], clock: Callable[[], float],
                  epilog: str = "") -> tuple[argparse.Namespace, Config, list[AlertView], float] | None:
    """Parse ``check``'s or ``status``'s arguments, read config and database
    (read-only) and return each alert's view now; None after printing a
    one-line error (exit status 2)."""
    parser = argparse.ArgumentParser(prog=f"caduceus.py {name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    _add_file_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    if not _usable_db_name(args.db):
        return None
    config = _load_config_or_say(args.config)
    if config is None:
        return None
    now = clock()
    try:
        rows, legacy, pings = _read_state(args.db)
        views = alert_views(config, rows, now, pings, legacy)  # rows of another program fail here
    except sqlite3.Error as exc:
        print(f"caduceus: {args.db}: cannot read the database: {exc}", file=sys.stderr)
        return None
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        print(f"caduceus: {args.db}: cannot read the database: it is not Caduceus's "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    return args, config, views, now


def _printed(write: Callable[[], None]) -> bool:
    """Run ``write`` and flush stdout; False if the reader went away (``| head``)."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        # As the Python docs advise (signal module, "Note on SIGPIPE"), for
        # check | head: no traceback, and no second error when Python flushes
        # stdout on its way out.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


def _check_main(argv: list[str], clock: Callable[[], float] = time.time) -> int:
    read = _read_command("check", "Validate the config and show each alert's next deadline.", argv, clock,
                         CHECK_EPILOG)
    if read is None:
        return 2
    args, _, views, _ = read
    report = check_report(views)
    return 0 if _printed(lambda: _print_report(args.config, report, args.json)) else 1


# The status command ------------------------------------------------------------


def status_report(views: list[AlertView], now: float) -> tuple[int, list[str]]:
    """The exit status (0, or 1 when any alert is down) and the lines of ``status``:
    a Nagios-style summary, then the dashboard's table, the worst first."""
    down = [view.name for view in sort_views(views) if view.failing]
    if down:
        first = f"CADUCEUS CRITICAL - {len(down)} of {len(views)} down: {', '.join(down)}"
    elif all(view.status == UP for view in views):
        first = f"CADUCEUS OK - {_count(len(views), 'alert')} up"
    else:
        counts = ", ".join(f"{sum(view.status == status for view in views)} {status}"
                           for status in STATUS_ORDER if any(view.status == status for view in views))
        first = f"CADUCEUS OK - {_count(len(views), 'alert')}, none down ({counts})"
    table = [("ALERT", "STATUS", "LAST CHECK-IN", "NEXT DEADLINE", "LAST RUN", "SCHEDULE")]
    for view in sort_views(views):
        status = f"{view.status} ({view.reason})" if view.reason else view.status
        if view.status == PAUSED:
            due = f"paused until {format_time(view.paused_until)}" if view.paused_until else "paused"
        elif view.next_due_at is None:
            due = f"reminder {relative_time(view.next_reminder_at, now)}"
        else:
            due = relative_time(view.next_due_at, now)
        run = format_duration(view.last_duration_s, 2) if view.last_duration_s is not None else "-"
        if view.last_exit_status is not None:
            run += f", exit {view.last_exit_status}"
        table.append((view.name, status, relative_time(view.last_checkin_at, now), due, run, view.description))
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]) - 1)]
    lines = [first] + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                       for row in table] if views else [first]
    return (1 if down else 0), lines


def _status_main(argv: list[str], clock: Callable[[], float] = time.time) -> int:
    read = _read_command("status", "Show every alert's status; exit 0 when none is down, 1 when any is, "
                                   "2 on error.", argv, clock)
    if read is None:
        return 2
    args, _, views, now = read
    if not os.path.exists(args.db):
        # A check run from the wrong directory, or with -b mistyped, must not say OK forever.
        print(f"CADUCEUS UNKNOWN - no database at {args.db} (has the service started? is -b right?)")
        return 2
    code, lines = status_report(views, now)
    if args.json:
        text = json.dumps({"status": "critical" if code else "ok",
                           "alerts": [view.as_json() for view in sort_views(views)]}, indent=2)
    else:
        text = "\n".join(lines)
    return code if _printed(lambda: print(text)) else 2


def _print_report(config_path: str, report: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"alerts": report}, indent=2))
        return
    print(f"{config_path}: OK, {_count(len(report), 'alert')}")
    for alert in report:
        status = f"{alert['status']} ({alert['reason']})" if alert["reason"] else alert["status"]
        print(f"\n{alert['name']}: {alert['description']}")
        print(f"  channels:      {', '.join(alert['channels'])}")
        print(f"  status:        {status}, last success {alert['last_success'] or 'never'}")
        if alert["next_due"]:
            print(f"  next deadline: {alert['next_due_local']} ({alert['next_due']})")
        elif alert["next_reminder"]:
            print(f"  next reminder: {alert['next_reminder']}")


###############################################################################
# Service #####################################################################
###############################################################################

def _port_arg(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return int(text)


#: The end of ``caduceus.py --help``.
SERVICE_EPILOG = """\
commands (each has its own --help):
  caduceus.py run URL -- COMMAND   run a job and report its start, exit status and output
  caduceus.py check                validate the config and show each alert's next deadline
  caduceus.py status               each alert's status, Nagios-style (exit 1 when any is down)
  caduceus.py test-notify          send a test notice through an alert's channels now
  caduceus.py reload               make the running service re-read its config

signals: SIGTERM and SIGINT stop the service cleanly; SIGHUP re-reads the
config (as does POST /api/v1/reload with the key).  Under systemd socket
activation (LISTEN_FDS), the socket systemd passes is served and -i/-p are
not used.

examples:
  python3 caduceus.py                                  # caduceus.toml, database.sqlite3, localhost:5000
  python3 caduceus.py -c /etc/caduceus/caduceus.toml -b /var/lib/caduceus/database.sqlite3 \\
      -i 0.0.0.0 -p 8080 --pid-file /run/caduceus.pid
  python3 caduceus.py -d                               # with debug messages (every request)
"""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="caduceus.py", description="A dead man's switch for cron jobs: serves check-ins, and notifies\n"
        "when a job does not check in on time.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVICE_EPILOG)
    parser.add_argument("--version", action="version", version=f"caduceus {__version__}")
    _add_file_args(parser)
    parser.add_argument("-i", "--host", default="localhost",
                        help="the address to listen on, e.g. 0.0.0.0 for all (default: localhost)")
    parser.add_argument("-p", "--port", type=_port_arg, default=5000,
                        help="the port to listen on (default: 5000; 0 picks a free one)")
    parser.add_argument("--pid-file", metavar="FILE",
                        help="write the process id here while running, for 'caduceus.py reload "
                             "--pid-file FILE' (e.g. /run/caduceus.pid)")
    parser.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    return parser.parse_args(argv)


#: How long a shutdown waits for requests and notices in progress.
SHUTDOWN_WAIT_S = 10.0


class _InstanceLock:
    """Hold ``DB.lock`` until closed.

    Two services on one database would each forget the other's alerts and
    send every notice twice; the second one is refused instead
    (CaduceusError; OSError if the file cannot be opened).  The lock file
    sits beside the database's real path, so a symlink to the database is
    the same database, and is created readable by its owner only.  Closed
    before ``keep()``, the lock removes the file if it created it: a failed
    start changes nothing.  Where fcntl is missing (Windows) nothing is
    locked or removed.
    """

    def __init__(self, db: str) -> None:
        self.path = os.path.realpath(db) + ".lock"
        self._keep = False
        while True:
            self._created = False
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                self._created = True
            except FileExistsError:
                try:
                    self._fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # removed by a failed start just now: try again
                    continue
            if fcntl is None or self._locked(db):
                return

    def _locked(self, db: str) -> bool:
        """Take the lock on the open file: True, or False to start over because a
        failed start removed the file meanwhile (its lock protects nothing)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise CaduceusError(f"{db}: another Caduceus is already using this database") from None
        try:
            same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
        return same

    def keep(self) -> None:
        """The service has started: the lock file stays after close()."""
        self._keep = True

    def close(self) -> None:
        if self._created and not self._keep and fcntl is not None:
            os.unlink(self.path)  # still locked, so no one else is using it
        os.close(self._fd)

    def __enter__(self) -> _InstanceLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


#: The first file descriptor systemd passes to a socket-activated service (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


def systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed to this process, or None.

    systemd sets ``LISTEN_FDS`` (how many) and ``LISTEN_PID`` (for which
    process) and passes the sockets from fd 3 on; the first is served.  The
    variables are removed, as sd_listen_fds() does, so that no child takes
    them for its own.  Raises OSError if fd 3 is not a socket.
    """
    count, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count is None or pid != str(os.getpid()) or not count.isdigit() or int(count) < 1:
        return None
    if int(count) > 1:
        log.warning("systemd passed %s sockets; serving the first only", count)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(errno.ENOTSOCK, "expected a listening TCP socket at fd 3")
    log.info("serving on the socket passed by systemd")
    return sock


class _PidFile:
    """The process id, written to ``path`` (if given) now and removed on leaving
    the ``with`` block.  Raises OSError if it cannot be written."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            temporary = f"{path}.{os.getpid()}.tmp"
            try:
                with open(temporary, "w", encoding="ascii") as file:
                    file.write(f"{os.getpid()}\n")
                os.replace(temporary, path)  # never half-written for a reader
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise

    def __enter__(self) -> _PidFile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


#: The end of ``reload --help``.
RELOAD_EPILOG = """\
With --pid-file, the service gets SIGHUP (as from "systemctl reload caduceus"
or "kill -HUP PID") and its log says what changed.  Otherwise the request
POST URL/api/v1/reload carries the key (--key, or the secret_key of the
config given with -c) and this prints the answer: what changed, or why the
new config was refused (the running one is kept).  Exit status 0: reloaded;
1: refused or not reached; 2: a usage error.

examples:
  python3 caduceus.py reload --pid-file /run/caduceus.pid
  python3 caduceus.py reload --url http://127.0.0.1:5000/ -c /etc/caduceus/caduceus.toml
  python3 caduceus.py reload --url http://monitor:5000/ --key "$CADUCEUS_KEY" --timeout 30
"""


def _answer_text(body: bytes, field: str) -> str:
    """``field`` of a JSON answer of the API, or the answer as text."""
    text = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get(field), str):
            return data[field]
    return text


def _reload_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="caduceus.py reload", description="Make the running service re-read its config file.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RELOAD_EPILOG)
    parser.add_argument("--pid-file", metavar="FILE",
                        help="send SIGHUP to the process whose id is in FILE (the service's --pid-file)")
    parser.add_argument("--url", default="http://localhost:5000/",
                        help="the service's address, without --pid-file (default: http://localhost:5000/)")
    parser.add_argument("--key", help="the service's secret_key (default: read from -c CONFIG)")
    parser.add_argument("-c", "--config", metavar="CONFIG", default="caduceus.toml",
                        help="the config file to take the key from when --key is not given "
                             "(default: caduceus.toml)")
    parser.add_argument("--timeout", type=_timeout_arg, default=RUN_TIMEOUT_S, metavar="SECONDS",
                        help="for the request (default: 10)")
    args = parser.parse_args(argv)
    if args.pid_file:
        return _send_hangup(args.pid_file)
    key = args.key
    if key is None:
        config = _load_config_or_say(args.config)
        if config is None:
            return 2
        key = config.secret_key
    problem = _url_problem(args.url)
    if problem:
        print(f"caduceus: --url: {problem}", file=sys.stderr)
        return 2
    url = urllib.parse.urljoin(args.url if args.url.endswith("/") else args.url + "/", "api/v1/reload")
    request = urllib.request.Request(url, data=b"", method="POST", headers={
        "User-Agent": f"caduceus-reload/{__version__}", "X-Caduceus-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(_answer_text(response.read(HTTP_MAX_ANSWER_BYTES), "message"))
            return 0
    except urllib.error.HTTPError as exc:
        with exc:
            print(f"caduceus: {exc.code}: {_answer_text(exc.read(HTTP_MAX_ANSWER_BYTES), 'error')}",
                  file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as exc:
        print(f"caduceus: cannot reach {mask_keys(args.url)}: {getattr(exc, 'reason', None) or exc}",
              file=sys.stderr)
        return 1


def _send_hangup(pid_file: str) -> int:
    try:
        with open(pid_file, encoding="ascii") as file:
            text = file.read().strip()
    except (OSError, UnicodeError) as exc:
        print(f"caduceus: {pid_file}: cannot read the pid file: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    if not text.isdigit() or int(text) < 2:
        print(f"caduceus: {pid_file}: expected a process id, got {json.dumps(text[:40])}", file=sys.stderr)
        return 2
    try:
        os.kill(int(text), signal.SIGHUP)
    except ProcessLookupError:
        print(f"caduceus: {pid_file}: no process {text} (Caduceus is not running?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"caduceus: not allowed to signal process {text} (run as its user or root)", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to process {text}; its log says what changed")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM or Ctrl-C (or the ``run``/``check``
    command); return the exit status.

    2 for a configuration or start-up problem (one line on stderr), 0 after a
    clean shutdown.  ``run`` returns its command's exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    commands = {"run": _run_main, "check": _check_main, "reload": _reload_main, "status": _status_main,
                "test-notify": _test_notify_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = _parse_args(argv)
    if not _usable_db_name(args.db):
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    config = _load_config_or_say(args.config)
    if config is None:
        return 2
    if not config.checks:
        log.warning("no alerts configured in %s; nothing is watched", args.config)
    try:
        lock = _InstanceLock(args.db)
    except CaduceusError as exc:
        print(f"caduceus: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"caduceus: {args.db}: cannot open the database: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with lock:
        # Listen before touching the database: a start that cannot serve changes nothing.
        activated = os.environ.get("LISTEN_PID") == str(os.getpid())
        try:
            server = Server((args.host, args.port), listen_socket=systemd_socket(),
                            max_connections=raise_open_files_limit(config.max_connections))
        except (OSError, UnicodeError) as exc:
            where = "the socket passed by systemd (LISTEN_FDS)" if activated else f"{args.host}:{args.port}"
            print(f"caduceus: cannot listen on {where}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return 2
        with server:
            try:
                store = Store(args.db, history=config.history)
            except (sqlite3.Error, CaduceusError) as exc:
                print(f"caduceus: {args.db}: cannot open the database: {exc}", file=sys.stderr)
                return 2
            with contextlib.closing(store):
                try:
                    pid_file = _PidFile(args.pid_file)
                except OSError as exc:
                    print(f"caduceus: {args.pid_file}: cannot write the pid file: {exc.strerror or exc}",
                          file=sys.stderr)
                    return 2
                lock.keep()
                with pid_file:
                    return _run_service(server, store, config, args.config)


def _run_service(server: Server, store: Store, config: Config, config_path: str) -> int:
    """Watch ``config``'s alerts in ``store`` and serve until stopped."""
    senders = {kind: channel.send for kind, channel in CHANNELS.items()}
    server.monitor = monitor = Monitor(store, config, senders)
    monitor.start()
    return _serve(server, monitor, config_path)


def _warn_if_open(config: Config, host: str) -> None:
    """Say so at start-up when a server without a secret_key listens beyond loopback."""
    if config.secret_key:
        return
    with contextlib.suppress(ValueError):  # a name, not an address: say it too
        if ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return
    log.warning("no secret_key: anyone who can reach %s can read the dashboard, API and metrics, check in, "
                "and pause alerts; set [config] secret_key", host)


class _Reloader:
    """Re-reads the config file, for SIGHUP and POST /api/v1/reload, one reload at a time.

    An invalid file is refused with the one-line error of a start, logged,
    and the running config kept.  A valid one goes to ``Monitor.reload``; a
    changed ``max_connections`` applies to the next connection, and the
    heartbeat is told (``on_reload(now)``), in case it was just set.  The
    config holds neither the listen address nor the database (they are
    command-line flags), so a reload cannot change them: that takes a restart.
    Returns ``(done, message)``; the log says what changed.
    """

    def __init__(self, path: str, server: Server, monitor: Monitor,
                 on_reload: Callable[[float], None] = lambda now: None) -> None:
        self.path = path
        self.server = server
        self.monitor = monitor
        self.on_reload = on_reload
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            try:
                config = load_config(self.path)
            except ConfigError as exc:
                log.error("reload refused, the running config is kept: %s", exc)
                return False, f"Reload refused, the running config is kept: {exc}"
            old = self.monitor.config
            changes = config_changes(old, config)
            try:
                self.monitor.reload(config)
            except sqlite3.Error as exc:
                log.error("reload failed, the running config is kept: the database: %s", exc)
                return False, f"Reload failed, the running config is kept: the database: {exc}"
            self.monitor.store.history = config.history
            if config.max_connections != old.max_connections:
                self.server.connections.max_connections = raise_open_files_limit(config.max_connections)
            self.on_reload(self.monitor.clock())
            what = "; ".join(changes) or "nothing changed"
            log.info("reloaded %s: %s", self.path, what)
            return True, f"Reloaded {self.path}: {what}."


def _serve(server: Server, monitor: Monitor, config_path: str = "") -> int:
    """Serve until SIGTERM or SIGINT (SIGHUP reloads ``config_path``); return 0."""
    workers = _start_workers(server, monitor, config_path)
    thread = threading.Thread(target=server.serve_forever, name="http", kwargs={"poll_interval": 0.2})
    # A signal handler must not take locks (Event.set() can deadlock against the
    # main thread's own wait), so the C handler writes the signal number to a
    # socket and the main thread sleeps on reading it.
    wake_r, wake_w = socket.socketpair()
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    with wake_r, wake_w:
        wake_w.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {signum: signal.signal(signum, lambda signum, frame: None)
                    for signum in (signal.SIGTERM, signal.SIGINT, hangup) if signum is not None}
        try:
            thread.start()
            host, port = server.server_address[:2]
            log.info("caduceus %s listening on http://%s:%d/ watching %d alerts", __version__,
                     f"[{host}]" if ":" in host else host, port, len(monitor.config.checks))
            _warn_if_open(monitor.config, host)
            for worker in workers:
                worker.start()
            while True:
                signum = wake_r.recv(1)[0]
                if signum == hangup:
                    server.reloader()
                elif signum in previous:
                    break
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    log.info("shutting down")
    server.shutdown()
    server.socket.close()  # refuse new connections now; requests in progress still finish
    thread.join()
    for worker in workers:
        worker.stop(timeout_s=0)
    give_up_at = time.monotonic() + SHUTDOWN_WAIT_S
    if not server.drain(SHUTDOWN_WAIT_S):
        log.warning("gave up waiting for requests in progress")
    for worker in workers:  # a send in progress finishes, so it is not sent twice
        worker.stop(timeout_s=max(give_up_at - time.monotonic(), 0.0))
    server.watchdog.record_alive()  # the downtime a restart reports starts now
    return 0


def _start_workers(server: Server, monitor: Monitor, config_path: str) -> list[Sweeper]:
    """The sweeper, the couriers, the liveness recorder and the heartbeat, wired
    to ``monitor`` and ``server`` (health and reload), not yet started."""
    sweeper = Sweeper(GuardedSweep(monitor))
    monitor.on_deadline(sweeper.poke)
    couriers = Couriers(monitor)
    server.watchdog = watchdog = Watchdog(monitor, sweeper)
    watchdog.record_alive()  # healthy from the first request on, if the database is writable
    alive = Sweeper(watchdog.record_alive, name="liveness recorder")
    heartbeat = Sweeper(watchdog.heartbeat, name="heartbeat")

    def reloaded(now: float) -> None:
        couriers.sync()
        heartbeat.poke(now)  # in case heartbeat_url was just set

    server.reloader = _Reloader(config_path, server, monitor, reloaded)
    return [sweeper, couriers, alive, heartbeat]


if __name__ == "__main__":
    sys.exit(main())
