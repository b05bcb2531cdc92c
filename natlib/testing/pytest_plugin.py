"""pytest plugin shipped with natlib: the ``--fail-on-skip`` flag (and, later, the lab fixtures).

Tests that need root, a network namespace or an external tool skip with a reason when run by a
developer without them. CI passes ``--fail-on-skip`` so that such a skip becomes a failure: a green
CI run then proves that every one of those tests really ran.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["natlib.testing.pytest_plugin"]``.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

__all__ = ["pytest_addoption", "pytest_runtest_makereport"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("natlib")
    group.addoption(
        "--fail-on-skip",
        action="store_true",
        default=False,
        help="turn every skipped test into a failure (CI uses this to prove that root/tool tests ran)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or not item.config.getoption("fail_on_skip"):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under --fail-on-skip: {reason}"
