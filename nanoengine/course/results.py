"""Run the course's tests in a fresh interpreter and keep each test's outcome and lessons.

A fresh ``python -m pytest`` (not ``pytest.main`` in the caller's process) so the code under
test is what is on disk now: a notebook that imported the package before the learner edited
a module would otherwise test the old code. Loaded into that pytest as a plugin (``-p
nanoengine.course.results``), this module writes one JSON line per test to the file named by
``$NANOENGINE_RESULTS``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_ENV = "NANOENGINE_RESULTS"
_MARKER = re.compile(r"^l\d\d(_t\d)?$")
_STUB = re.compile(r"(L\d\d\.T\d): see lessons/")


@dataclasses.dataclass(frozen=True)
class TestResult:
    """One test: ``outcome`` is passed, failed, skipped or error; ``markers`` its lesson and
    task markers (``l03``, ``l03_t2``); ``stubs`` the tasks whose stubs its failure names;
    ``message`` the failure's last line."""

    __test__ = False  # not a pytest test class, despite its name

    nodeid: str
    outcome: str
    markers: tuple[str, ...]
    stubs: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ("passed", "skipped")


def run_tests(root: Path, marker_expression: str, workers: int = 1) -> list[TestResult]:
    """The outcome of every test of ``root/tests`` that ``-m marker_expression`` selects."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        command = [sys.executable, "-m", "pytest", "tests", "-m", marker_expression, "-p", "nanoengine.course.results",
                   "-p", "no:nbmake", "-p", "no:cacheprovider", "-o", "addopts=--strict-markers",
                   "--hypothesis-profile=grade", "-q",
                   "--no-header", "--tb=line", "-o", "console_output_style=classic"]
        if workers > 1:
            command += ["-n", str(workers)]
        env = {**os.environ, _ENV: str(out), "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(command, cwd=root, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not out.exists():
            return []
        results: dict[str, TestResult] = {}
        for line in out.read_text().splitlines():
            record = json.loads(line)
            result = TestResult(**{**record, "markers": tuple(record["markers"]), "stubs": tuple(record["stubs"])})
            if result.nodeid not in results or not result.ok:  # a failing teardown fails a passed test
                results[result.nodeid] = result
        return list(results.values())


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001 (a pytest hook)
    """Record the call phase of each test, and any phase that did not pass."""
    if report.when != "call" and report.outcome == "passed":
        return
    outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
    text = str(report.longrepr) if report.failed else ""
    record = {
        "nodeid": report.nodeid,
        "outcome": outcome,
        "markers": sorted(k for k in report.keywords if _MARKER.match(k)),
        "stubs": sorted(set(_STUB.findall(text))),
        "message": text.strip().splitlines()[-1][:300] if text.strip() else "",
    }
    with open(os.environ[_ENV], "a") as f:
        f.write(json.dumps(record) + "\n")
