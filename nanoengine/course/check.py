"""``check("l02")``: run one lesson's (or task's) tests in-process and print a result table.

The tests live in the course repository's ``tests/`` beside the package, so this works in
the clone a learner installed with ``pip install -e``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nanoengine.course.syllabus import repo_root


# Set (to "1") by the repository's conftest for the pytest session, and so for the notebooks it
# executes: that session runs every lesson's tests itself, so a notebook's check() there only
# collects its lesson's tests (proving they exist and import) instead of running them twice.
COLLECT_ONLY_VARIABLE = "NANOENGINE_CHECK_COLLECT_ONLY"


class _Collector:
    """A pytest plugin that keeps each test's outcome (and how many tests were selected)."""

    def __init__(self) -> None:
        self.results: dict[str, str] = {}
        self.selected = 0

    def pytest_collection_finish(self, session) -> None:
        self.selected = len(session.items)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            if report.nodeid not in self.results or report.outcome != "passed":
                self.results[report.nodeid] = report.outcome


def tests_dir() -> Path:
    path = repo_root() / "tests"
    if not path.is_dir():
        raise RuntimeError(
            "check() runs the course's tests, which live in the repository beside the package; "
            "clone the course and install it with `pip install -e .`"
        )
    return path


def check(marker: str, verbose: bool = False) -> bool:
    """Run the tests marked ``marker`` (``"l02"``, ``"l01_t2"``); True when all pass.

    Inside the repository's own pytest session (:data:`COLLECT_ONLY_VARIABLE`), only collect
    them: that session runs them.
    """
    import pytest

    collector = _Collector()
    # The repository's addopts also run notebooks (nbmake); a check runs only the tests.
    args = [str(tests_dir()), "-m", marker, "-o", "addopts=--strict-markers", "-p", "no:nbmake",
            "-p", "no:cacheprovider", "-q", "--no-header"]
    if not verbose:
        args += ["--tb=line", "-o", "console_output_style=classic"]
    collect_only = os.environ.get(COLLECT_ONLY_VARIABLE) == "1"
    if collect_only:
        args.append("--collect-only")
    engine_log = logging.getLogger("nanoengine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)  # the engines the tests build would each log their KV size
    try:
        code = pytest.main(args, plugins=[collector])
    finally:
        engine_log.setLevel(level)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print(f"no tests are marked {marker!r}")
        return False
    if collect_only:
        print(f"{marker}: {collector.selected} tests collected; the pytest session running this notebook "
              "runs them itself, so they are not run twice")
        return code == pytest.ExitCode.OK
    width = max((len(n) for n in collector.results), default=10)
    print(f"\n{'test'.ljust(width)}  result")
    for nodeid, outcome in collector.results.items():
        print(f"{nodeid.ljust(width)}  {'PASS' if outcome == 'passed' else outcome.upper()}")
    passed = sum(o == "passed" for o in collector.results.values())
    print(f"{marker}: {passed}/{len(collector.results)} passed")
    return code == pytest.ExitCode.OK
