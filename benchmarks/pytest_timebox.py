"""A time limit per test, for benchmarks/gpu_check.sh's test stage (``-p benchmarks.pytest_timebox``).

The GPU image has no pytest-timeout and nothing can be installed there, so this plugin does the
part of it the check needs: ``SGG_TEST_TIMEOUT`` seconds per test (default 60; per file
``SGG_TEST_TIMEOUTS="tests/test_distributed.py=70,..."``). When a test runs over, SIGALRM raises
``TimeoutError`` in it (the test fails, with its name, and the run goes on with the next one). A
test that does not come back to Python (a hung kernel or collective) cannot be interrupted that
way: ``SGG_TEST_TIMEOUT_GRACE`` seconds later (default 20) faulthandler prints every thread's
stack and ends the process, so the log still names the test (``-v`` prints it before it runs).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import pytest


def _limit(item) -> int:
    limit = int(float(os.environ.get("SGG_TEST_TIMEOUT", "60")))
    for entry in os.environ.get("SGG_TEST_TIMEOUTS", "").split(","):
        path, _, seconds = entry.partition("=")
        if path.strip() and seconds.strip() and item.nodeid.split("::")[0] == path.strip():
            limit = int(float(seconds))
    return limit


def _grace() -> int:
    return int(float(os.environ.get("SGG_TEST_TIMEOUT_GRACE", "20")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The hard limit (faulthandler) around the whole test: setup, call and teardown."""
    faulthandler.dump_traceback_later(_limit(item) + _grace(), exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """The soft limit (SIGALRM) around the test body: the test fails and the run goes on."""
    limit = _limit(item)

    def over(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran over its {limit} s limit (benchmarks/pytest_timebox.py)")

    old = signal.signal(signal.SIGALRM, over)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pytest_report_header(config):
    return f"pytest_timebox: {os.environ.get('SGG_TEST_TIMEOUT', '60')} s per test " \
           f"({os.environ.get('SGG_TEST_TIMEOUTS') or 'no per-file limits'}), +{_grace()} s hard"
