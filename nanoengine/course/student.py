"""``make-student``: the repository as a learner receives it, solved through one lesson.

The copy is the whole repository (tests, notebooks, handouts, figures), with every solution
region of a later lesson replaced by its stub (``regions.student_source``), and a note,
``student.json``, of the source commit and which lessons are solved. Before writing
anything it checks every region of the package: markers well formed, the task in the
lesson table, and the file one of that lesson's modules; it refuses the source otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from nanoengine.course.regions import Region, RegionError, find_regions, student_source
from nanoengine.course.syllabus import Lesson, all_tasks, lesson_number, load_syllabus

NOTE = "student.json"
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".hypothesis", "build", "dist"}


def stub_message(task_id: str, lessons: list[Lesson]) -> str:
    """The NotImplementedError text of a stubbed task: its id and where it is specified."""
    return f"{task_id}: see {all_tasks(lessons)[task_id].handout_link}"


def package_regions(root: Path, lessons: list[Lesson]) -> dict[Path, list[Region]]:
    """Every file of ``root/nanoengine`` with solution regions, checked against the table."""
    tasks = all_tasks(lessons)
    found: dict[Path, list[Region]] = {}
    for path in sorted((root / "nanoengine").rglob("*.py")):
        relative = path.relative_to(root / "nanoengine").as_posix()
        regions = find_regions(path.read_text(), f"nanoengine/{relative}")
        for region in regions:
            task = tasks.get(region.task)
            if task is None:
                raise RegionError(f"nanoengine/{relative}:{region.begin + 1}: task {region.task} is not in lessons/grading.toml")
            if not task.lesson.owns(relative):
                raise RegionError(f"nanoengine/{relative}:{region.begin + 1}: {region.task}'s region is in a file lesson "
                                  f"{task.lesson.number} does not list (its modules: {', '.join(task.lesson.modules)})")
        if regions:
            found[path] = regions
    return found


def repository_files(root: Path) -> list[Path]:
    """The files a clone has: git's tracked and untracked-but-not-ignored files, or, outside
    git, every file but caches and build output."""
    if (root / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True).stdout.decode()
        return [Path(p) for p in listed.split("\0") if p and (root / p).is_file()]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(dirpath, f).relative_to(root) for f in filenames]
    return sorted(files)


def source_commit(root: Path) -> tuple[str | None, bool]:
    """The commit ``root`` is at (None outside git) and whether its files differ from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        return None, False
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    return head.stdout.strip(), bool(status.stdout.strip())


def make_student(root: Path, solved_through: str | None, out: Path) -> dict:
    """Write the student tree of ``root`` into ``out`` (absent or empty) and return its note.

    ``solved_through``: the last lesson whose tasks stay solved (``"L05"``), or None for a
    fully stubbed tree.
    """
    lessons = load_syllabus(root)
    last = lesson_number(solved_through) if solved_through is not None else None
    if last is not None and last not in {lesson.number for lesson in lessons}:
        raise ValueError(f"no lesson {last} in lessons/grading.toml")
    regions = package_regions(root, lessons)
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    if out.is_relative_to(root.resolve()):
        raise ValueError(f"{out} is inside the repository it copies")

    def keep(task_id: str) -> bool:
        return last is not None and task_id[1:3] <= last

    for relative in repository_files(root):
        source, target = root / relative, out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source in regions:
            text = student_source(source.read_text(), keep, lambda t: stub_message(t, lessons), relative.as_posix())
            target.write_text(text)
            shutil.copymode(source, target)
        else:
            shutil.copy2(source, target)
    stubbed = sorted({r.task for rs in regions.values() for r in rs if not keep(r.task)})
    commit, changed = source_commit(root)
    note = {
        "source_commit": commit,
        "source_had_uncommitted_changes": changed,
        "solved_through": f"L{last}" if last is not None else None,
        "lessons_solved": [lesson.number for lesson in lessons if last is not None and lesson.number <= last],
        "tasks_to_write": stubbed,
    }
    (out / NOTE).write_text(json.dumps(note, indent=2) + "\n")
    return note
