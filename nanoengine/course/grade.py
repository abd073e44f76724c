"""``grade``: run every graded task's tests and score them from ``lessons/grading.toml``.

A task scores its points when every test with its marker passes (a skipped test, such as a
GPU test on a CPU machine, does not count against it); a lesson scores its own points when
every test of the lesson's marker passes. A failing task shows the first failure's message:
in a student tree, the ``NotImplementedError`` naming the task and where it is specified.
The table goes to the terminal and, with each test's outcome, to ``grade.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nanoengine.course.results import TestResult, run_tests
from nanoengine.course.syllabus import Lesson, lesson_number, load_syllabus, repo_root


@dataclasses.dataclass(frozen=True)
class Score:
    """One row of the table: a task (``L03.T1``) or a whole lesson (``L03``)."""

    item: str
    title: str
    marker: str
    points: int
    earned: int
    passed: int
    tests: int
    message: str

    @property
    def status(self) -> str:
        if not self.tests:
            return "NO TESTS"
        return "PASS" if self.earned == self.points and self.passed == self.tests else "FAIL"


def score(item: str, title: str, marker: str, points: int, results: list[TestResult]) -> Score:
    """Score ``item`` from the results of the tests that carry ``marker``."""
    mine = [r for r in results if marker in r.markers]
    failed = [r for r in mine if not r.ok]
    ok = bool(mine) and not failed
    message = ""
    if failed:
        stubs = [s for r in failed for s in r.stubs]
        message = f"NotImplementedError: {stubs[0]} (stub)" if stubs else failed[0].message
    return Score(item, title, marker, points, points if ok else 0, len(mine) - len(failed), len(mine), message)


def lessons_to_grade(lessons: list[Lesson], lesson: str | None) -> list[Lesson]:
    ready = [entry for entry in lessons if entry.ready]
    if lesson is None:
        return ready
    number = lesson_number(lesson)
    chosen = [entry for entry in ready if entry.number == number]
    if not chosen:
        raise ValueError(f"no ready lesson {number} in lessons/grading.toml (ready: {', '.join(e.number for e in ready)})")
    return chosen


def grade(lesson: str | None = None, root: Path | None = None, out: Path | None = Path("grade.json"),
          workers: int = 1) -> list[Score]:
    """Grade every ready lesson (or one), print the table, write ``out``; return the rows."""
    root = root or repo_root()
    chosen = lessons_to_grade(load_syllabus(root), lesson)
    results = run_tests(root, " or ".join(entry.marker for entry in chosen), workers)
    rows = []
    for entry in chosen:
        rows.append(score(f"L{entry.number}", f"lesson {entry.number}: all its tests", entry.marker, entry.points, results))
        rows += [score(t.id, t.title, t.marker, t.points, results) for t in entry.tasks]
    print(format_table(rows))
    if out is not None:
        report = {
            "earned": sum(r.earned for r in rows),
            "points": sum(r.points for r in rows),
            "rows": [dataclasses.asdict(r) | {"status": r.status} for r in rows],
            "tests": [dataclasses.asdict(r) for r in results],
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
    return rows


def format_table(rows: list[Score]) -> str:
    width = max(len(r.title) for r in rows)
    lines = [f"{'item':<7} {'':<{width}}  {'tests':>7}  {'points':>7}  status", "-" * (width + 36)]
    for r in rows:
        line = f"{r.item:<7} {r.title:<{width}}  {f'{r.passed}/{r.tests}':>7}  {f'{r.earned}/{r.points}':>7}  {r.status}"
        lines.append(line + (f"  {r.message}" if r.message else ""))
    earned, points = sum(r.earned for r in rows), sum(r.points for r in rows)
    lines += ["-" * (width + 36), f"total   {earned}/{points} points"]
    return "\n".join(lines)
