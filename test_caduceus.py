"""Tests for caduceus.py: run with ``python3 -X dev -W error -m unittest -v``.

Real SQLite files, real sockets on loopback (the HTTP server, an SMTP sink, a
Telegram stand-in), a fake clock for every timing rule, and no sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email
import email.policy
import http.client
import http.server
import io
import json
import logging
import os
import queue
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import unittest.mock
import urllib.request

import caduceus
from caduceus import DOWN, NEW, UP

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


class Recorder:
    """A channel that keeps what it is given, or fails with ``self.error`` when set."""

    def __init__(self) -> None:
        self.notices: list[caduceus.Notice] = []
        self.error: Exception | None = None
        self.attempts = 0

    def __call__(self, config: caduceus.Config, notice: caduceus.Notice) -> None:
        self.attempts += 1
        if self.error is not None:
            raise self.error
        self.notices.append(notice)

    @property
    def subjects(self) -> list[str]:
        return [notice.subject for notice in self.notices]

    def about(self, name: str) -> list[caduceus.Notice]:
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
    def test_accepts_what_caduceus_0_0_11_accepted(self):
        table = {
            "1s": 1, "90s": 90, "1m": 60, "1h": 3600, "1d": 86400, "1w": 604800,
            "1h30m": 5400, "1.5h": 5400, "2 days": 172800, "90 minutes": 5400,
            "1:30:00": 5400, "4:13": 253, "2:04:13:02": 2 * 86400 + 4 * 3600 + 13 * 60 + 2,
            "2 days, 4:13:02": 2 * 86400 + 4 * 3600 + 13 * 60 + 2,
            "5hr34m56s": 5 * 3600 + 34 * 60 + 56,
            "5 hours, 34 minutes, 56 seconds": 5 * 3600 + 34 * 60 + 56,
            "1w 3d 2h 32m": 7 * 86400 + 3 * 86400 + 2 * 3600 + 32 * 60,
            "1.2 mins": 72, "172 hrs": 172 * 3600, "5.5 weeks": 5.5 * 604800,
            " 10m ": 600, "1H": 3600, "90": 90, "0.5s": 0.5,
        }
        for text, seconds in table.items():
            with self.subTest(text=text):
                self.assertAlmostEqual(caduceus.parse_duration(text), seconds)

    def test_rejects_nonsense_and_non_positive_durations(self):
        for text in ["", "soon", "1 fortnight", "h", "1h1h", "1h 2x", "-5m", "0s", "0", "1::2", "1.2.3h"]:
            with self.subTest(text=text), self.assertRaises(ValueError) as caught:
                caduceus.parse_duration(text)
            self.assertIn(json.dumps(text), str(caught.exception))

    def test_formats_durations_for_people(self):
        table = [(5400, 4, "1h 30m"), (93784, 4, "1d 2h 3m 4s"), (93784, 2, "1d 2h"),
                 (0.5, 4, "0.5s"), (0.0004, 4, "0s"), (60, 4, "1m"), (604800, 4, "7d")]
        for seconds, parts, text in table:
            with self.subTest(seconds=seconds):
                self.assertEqual(caduceus.format_duration(seconds, parts), text)

    def test_formats_times_as_utc_iso_8601(self):
        self.assertEqual(caduceus.format_time(1_700_000_000), "2023-11-14T22:13:20Z")


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

    def test_reads_the_original_format_unchanged(self):
        config = config_from(self, ORIGINAL_README_CONFIG)
        self.assertEqual(config.secret_key, "somelongkey")
        self.assertEqual(config.email.recipient_emails, ("notifyme@example.com", "otherdev@example.com"))
        self.assertEqual((config.email.hostname, config.email.port, config.email.encryption),
                         ("example.com", 25, "starttls"))
        self.assertEqual(config.telegram.chat_id, "99999999")
        self.assertEqual(config.telegram.api_url, "https://api.telegram.org")
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
        self.assertEqual((config.email.hostname, config.email.port, config.email.username,
                          config.email.encryption), ("localhost", 25, "", "none"))
        self.assertEqual(config.checks["job"].channels, ("email",))
        self.assertIsNone(config.telegram)

    def test_default_channels_is_a_setting_not_an_alert(self):
        config = config_from(self, CONSOLE_CONFIG)
        self.assertNotIn("default_channels", config.checks)

    def test_secrets_do_not_show_in_the_config_repr(self):
        config = config_from(self, ORIGINAL_README_CONFIG)
        for secret in ("somelongkey", "mypassword", "123456:ABCDEF"):
            self.assertNotIn(secret, repr(config))

    def test_unknown_key_is_named_with_a_suggestion(self):
        self.assertConfigError("""
            [alerts.backups]
            evry = "1h"
        """, "alerts.backups.every: missing")
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

    def test_alerts_section_is_required(self):
        self.assertConfigError("""
            [config]
            secret_key = "x"
        """, "alerts: missing")

    def test_malformed_toml_gives_the_line(self):
        self.assertConfigError("""
            [alerts.job]
            every = "1h
        """, "invalid TOML", "line 3")

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

    def test_example_config_loads_and_uses_the_console(self):
        config = caduceus.load_config(os.path.join(HERE, "caduceus.toml.example"))
        self.assertTrue(config.checks)
        for spec in config.checks.values():
            self.assertEqual(spec.channels, ("console",), spec.name)


###############################################################################
# Storage #####################################################################
###############################################################################


class StoreTest(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(temp_dir(self), "db.sqlite3")
        self.store = open_store(self, self.path)

    def test_a_failed_transaction_leaves_nothing_behind(self):
        self.store.sync_checks(["job"], 100.0)
        with self.assertRaises(RuntimeError):
            with self.store.transaction():
                self.store.record_ping("job", 200.0, "success", "127.0.0.1", "curl")
                raise RuntimeError("boom")
        self.assertIsNone(self.store.check("job")["last_ping_at"])
        self.assertEqual(self.store.pings("job"), [])

    def test_check_in_history_is_bounded(self):
        self.store.sync_checks(["job"], 0.0)
        for i in range(caduceus.PING_HISTORY * 2 + 7):
            self.store.record_ping("job", float(i), "success", "127.0.0.1", "curl")
        pings = self.store.pings("job")
        self.assertEqual(len(pings), caduceus.PING_HISTORY)
        self.assertEqual(pings[-1]["at"], caduceus.PING_HISTORY * 2 + 6)
        self.assertEqual(self.store.check("job")["n_pings"], caduceus.PING_HISTORY * 2 + 7)

    def test_status_change_is_compare_and_swap(self):
        self.store.sync_checks(["job"], 0.0)
        self.assertTrue(self.store.set_status("job", NEW, UP))
        self.assertFalse(self.store.set_status("job", NEW, DOWN))
        self.assertEqual(self.store.check("job")["status"], UP)

    def test_removed_alerts_are_forgotten_with_their_history(self):
        self.store.sync_checks(["job", "old"], 0.0)
        self.store.record_ping("old", 1.0, "success", "", "")
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
        self.assertIn("Last check-in: never", self.console.notices[0].body)

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
        self.assertIn(f"Last check-in: {checked_in} (1d 2h ago)", body)
        self.assertIn("Overdue by:    2h", body)
        self.clock.advance(3600)
        self.monitor.ping("backups")
        self.monitor.deliver("console")
        self.assertIn("Down for:    3h", self.console.about("backups")[-1].body)

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
            channels = ["console", "console"]
        """)
        self.monitor.store.close()
        monitor = self.start_monitor(config)
        self.clock.advance(60)
        monitor.sweep()
        channels = sorted((row["check_name"], row["channel"]) for row in monitor.store.pending_notices())
        self.assertEqual(channels, [("a", "console"), ("b", "console"), ("b", "console")])


class LegacyImportTest(unittest.TestCase):
    """Switching over from a Caduceus 0.0.11 database.sqlite3 in place."""

    def make_legacy_db(self, path: str, checkins: dict, notifications: dict) -> None:
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

    def test_imports_last_check_in_and_notified_state_and_leaves_old_tables(self):
        clock = FakeClock()
        now = clock.now
        db = os.path.join(temp_dir(self), "database.sqlite3")
        self.make_legacy_db(db, {"hourly": [now - 7000, now - 600], "backups": [now - 86400 - 7200]},
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
        self.make_legacy_db(db, {"hourly": [clock.now - 100]}, {})
        config = config_from(self, CONSOLE_CONFIG)
        with contextlib.closing(caduceus.Store(db)) as store:
            monitor = caduceus.Monitor(store, config, {}, clock)
            monitor.start()
            clock.advance(50)
            monitor.ping("hourly")
        store = open_store(self, db)
        caduceus.Monitor(store, config, {}, clock).start()
        self.assertEqual(store.check("hourly")["last_ping_at"], clock.now)


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
                                   {"console": self.console, "telegram": self.telegram}, self.clock)
        monitor.start()
        return monitor

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

    def test_rate_limit_wait_is_honoured(self):
        self.telegram.error = caduceus.NotifyError("429", retry_after_s=42)
        self.go_down()
        self.assertEqual(self.monitor.deliver("telegram"), self.clock.now + 42)

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


###############################################################################
# Notifiers ###################################################################
###############################################################################


class SMTPSink(socketserver.ThreadingTCPServer):
    """A real SMTP server on loopback that keeps what it receives.

    ``refuse_rcpt`` makes it answer RCPT TO with that reply line instead of 250.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refuse_rcpt: bytes = b"") -> None:
        super().__init__(("127.0.0.1", 0), SMTPSinkHandler)
        self.refuse_rcpt = refuse_rcpt
        self.messages: list[tuple[str, list[str], email.message.Message]] = []
        self.received = threading.Event()


class SMTPSinkHandler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 sink ESMTP\r\n")
        sender, recipients = "", []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
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
                self.server.messages.append((sender, recipients, message))
                self.server.received.set()
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            self.wfile.write(b"250 ok\r\n")


class TelegramStandIn(http.server.ThreadingHTTPServer):
    """A real HTTP server playing the Bot API: answers from ``self.answers`` in turn."""

    daemon_threads = True

    def __init__(self, answers: list[tuple[int, dict]]) -> None:
        super().__init__(("127.0.0.1", 0), TelegramHandler)
        self.answers = answers
        self.requests: list[tuple[str, dict]] = []


class TelegramHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, json.loads(body)))
        code, answer = self.server.answers.pop(0)
        payload = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def email_config(test: unittest.TestCase, port: int, **changes) -> caduceus.Config:
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
    conf = dataclasses.replace(config.email, hostname="127.0.0.1", port=port, **changes)
    return dataclasses.replace(config, email=conf)


NOTICE = caduceus.Notice("mail", caduceus.NOTICE_DOWN, 'Caduceus: Alert "mail" is failing.',
                         "Hello,\n\nYour alert \"mail\" is failing.\n", 1_700_000_000.0)


class EmailTest(unittest.TestCase):
    def test_sends_a_complete_message(self):
        sink = serve(self, SMTPSink())
        caduceus.send_email(email_config(self, sink.server_address[1]), NOTICE)
        self.assertTrue(sink.received.wait(WAIT_S))
        sender, recipients, message = sink.messages[0]
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
        notice = dataclasses.replace(NOTICE, check="mail2")
        caduceus.send_email(email_config(self, sink.server_address[1]), notice)
        self.assertTrue(sink.received.wait(WAIT_S))
        _, recipients, message = sink.messages[0]
        self.assertEqual(recipients, ["third@example.com"])
        self.assertEqual(message["To"], "third@example.com")

    def test_non_ascii_alert_names_survive(self):
        sink = serve(self, SMTPSink())
        notice = dataclasses.replace(NOTICE, subject='Caduceus: Alert "sauvegarde-été" is failing.',
                                     body="Ça ne marche pas.\n")
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


class TelegramTest(unittest.TestCase):
    TOKEN = "123456:SECRET-TOKEN"

    def config_for(self, server: TelegramStandIn) -> caduceus.Config:
        config = config_from(self, f"""
            [alerting.telegram]
            apikey = "{self.TOKEN}"
            chat_id = 99999999
            api_url = "http://127.0.0.1:{server.server_address[1]}/"
            [alerts.mail]
            every = "5s"
            channels = ["telegram"]
        """)
        return config

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
            caduceus.send_telegram(config, NOTICE)
        self.assertNotIn(self.TOKEN, str(caught.exception))
        self.assertFalse(caught.exception.permanent)


class ConsoleTest(unittest.TestCase):
    def test_prints_subject_and_body(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            caduceus.send_console(None, NOTICE)
        self.assertTrue(out.getvalue().startswith('Caduceus: Alert "mail" is failing.\nHello,'))


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
                     "/reset/default_channels/?key=s3cret", "/reset/hourly/extra?key=s3cret",
                     "/reset/", "/nosuch"]:
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
        status, body, _ = self.request("GET", "/")
        self.assertEqual(status, 200)
        self.assertIn("watching 2 alerts, 0 failing", body)

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

    def test_the_key_never_reaches_the_log(self):
        with self.assertLogs("caduceus", "DEBUG") as logs:
            self.request("GET", "/reset/hourly/?key=s3cret")
            self.request("GET", "/reset/hourly/?key=s3cret-wrong")
            with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
                sock.sendall(b"GET /reset/hourly/?key=s3cret HTTP/1.1 extra\r\n\r\n")
                sock.recv(1024)
        text = "\n".join(logs.output)
        self.assertIn("key=***", text)
        self.assertNotIn("s3cret", text)

    def test_an_internal_error_is_a_500_and_the_server_survives(self):
        self.monitor.store.close()
        with self.assertLogs("caduceus", "ERROR"):
            self.assertEqual(self.request("GET", "/reset/hourly/?key=s3cret")[0], 500)
        self.assertEqual(self.request("GET", "/nosuch")[0], 404)


###############################################################################
# Sweeper #####################################################################
###############################################################################


class SweeperTest(unittest.TestCase):
    def test_runs_at_once_and_again_when_poked(self):
        runs = queue.Queue()
        sweeper = caduceus.Sweeper(lambda: runs.put(time.time()))
        self.addCleanup(sweeper.stop)
        sweeper.start()
        runs.get(timeout=WAIT_S)
        sweeper.poke(time.time())
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
            every = "0.2s"
        """)
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


###############################################################################
# Command line ################################################################
###############################################################################


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

    def test_version(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            caduceus.main(["--version"])
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(out.getvalue().strip(), f"caduceus {caduceus.__version__}")


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


if __name__ == "__main__":
    unittest.main()
