"""The lesson table (``lessons/grading.toml``): lessons, their modules and graded tasks.

Everything the course machinery does reads this one table: the README's course map,
``make-student`` (which regions belong to which lesson), ``grade`` (task -> marker ->
points) and the GitHub Classroom workflow.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import nanoengine

TABLE = Path("lessons") / "grading.toml"


@dataclasses.dataclass(frozen=True)
class Task:
    """A graded task: its id (``L03.T1``), handout title, pytest marker and points."""

    id: str
    title: str
    marker: str
    points: int
    lesson: Lesson

    @property
    def handout_link(self) -> str:
        """Where the task is specified, relative to the repository root."""
        return f"{self.lesson.handout}#{self.id.lower().replace('.', '')}"


@dataclasses.dataclass(frozen=True)
class Lesson:
    """One lesson's row of the course map."""

    number: str
    slug: str
    builds: str
    modules: tuple[str, ...]
    prerequisites: tuple[str, ...]
    hours: float
    status: str
    points: int
    tasks: tuple[Task, ...] = ()

    @property
    def marker(self) -> str:
        return f"l{self.number}"

    @property
    def handout(self) -> str:
        return f"lessons/{self.number}-{self.slug}/README.md"

    @property
    def notebook(self) -> str:
        return f"notebooks/{self.number}_{self.slug.replace('-', '_')}.ipynb"

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def owns(self, path: str) -> bool:
        """Whether ``path`` (relative to ``nanoengine/``) is one of this lesson's modules."""
        return any(path == m or (m.endswith("/") and path.startswith(m)) for m in self.modules)


def repo_root() -> Path:
    """The course repository the installed package lives in (``pip install -e``)."""
    return Path(nanoengine.__file__).resolve().parents[1]


def load_syllabus(root: Path | None = None) -> list[Lesson]:
    """The lessons of ``root``'s table, in order; raises ValueError on a malformed table."""
    path = (root or repo_root()) / TABLE
    if not path.is_file():
        raise RuntimeError(f"{path} not found: the course machinery runs in a clone of the course repository")
    lessons = []
    for row in tomllib.loads(path.read_text())["lesson"]:
        task_rows = row.pop("task", [])
        lesson = Lesson(**{**row, "modules": tuple(row["modules"]), "prerequisites": tuple(row["prerequisites"])})
        tasks = tuple(Task(lesson=lesson, **t) for t in task_rows)
        for task in tasks:
            if not re.fullmatch(rf"L{lesson.number}\.T\d", task.id) or task.marker != task.id.lower().replace(".", "_"):
                raise ValueError(f"{path}: task {task.id!r} (marker {task.marker!r}) does not belong to lesson {lesson.number}")
        lessons.append(dataclasses.replace(lesson, tasks=tasks))
    return lessons


def all_tasks(lessons: list[Lesson]) -> dict[str, Task]:
    return {t.id: t for lesson in lessons for t in lesson.tasks}


def lesson_number(text: str) -> str:
    """``"L05"``, ``"l5"``, ``"05"`` or ``"5"`` -> ``"05"``."""
    match = re.fullmatch(r"[lL]?(\d{1,2})", text.strip())
    if not match:
        raise ValueError(f"not a lesson: {text!r} (expected e.g. L05 or 05)")
    return f"{int(match[1]):02d}"


def course_map(lessons: list[Lesson]) -> str:
    """README's course map as a markdown table."""
    rows = ["| lesson | you build | module(s) | prerequisites | time | graded tasks | notebook | status |",
            "|---|---|---|---|---|---|---|---|"]
    for lesson in lessons:
        modules = ", ".join(f"`{m}`" for m in lesson.modules)
        prerequisites = ", ".join(lesson.prerequisites) or "—"
        tasks = ", ".join(t.id for t in lesson.tasks) or "—"
        name, notebook = lesson.number, f"`{Path(lesson.notebook).stem}`"
        if lesson.ready:
            name, notebook = f"[{lesson.number}]({lesson.handout})", f"[{notebook}]({lesson.notebook})"
        rows.append(f"| {name} | {lesson.builds} | {modules} | {prerequisites} | {lesson.hours:g} h | {tasks} "
                    f"| {notebook} | {lesson.status} |")
    return "\n".join(rows)
