"""``python -m nanoengine.course``: make student trees, grade, and regenerate the course's tables.

    make-student --solved-through L05 --out DIR   the repository with lessons after 05 to write
    grade [--lesson 03]                             score the graded tasks; writes grade.json
    classroom [--write]                             the GitHub Classroom workflow from the table
    course-map                                      README's course map from the table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoengine.course.classroom import WORKFLOW, workflow
from nanoengine.course.grade import grade
from nanoengine.course.student import make_student
from nanoengine.course.syllabus import course_map, load_syllabus, repo_root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanoengine.course", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("make-student", help="write a student copy of the repository")
    student.add_argument("--solved-through", metavar="LNN", default=None,
                         help="the last lesson left solved, e.g. L05 (default: every task to write)")
    student.add_argument("--out", type=Path, required=True, help="an absent or empty directory outside the repository")
    grading = commands.add_parser("grade", help="run the graded tests and print a score table")
    grading.add_argument("--lesson", metavar="NN", default=None, help="grade one lesson only")
    grading.add_argument("--out", type=Path, default=Path("grade.json"), help="where to write the report")
    grading.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (default: 1, no xdist)")
    classroom = commands.add_parser("classroom", help="print (or --write) the GitHub Classroom workflow")
    classroom.add_argument("--write", action="store_true", help=f"write {WORKFLOW} instead of printing it")
    commands.add_parser("course-map", help="print README's course map")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = repo_root()
    try:
        if args.command == "make-student":
            note = make_student(root, args.solved_through, args.out)
            solved = ", ".join(note["lessons_solved"]) or "none"
            print(f"wrote {args.out}: lessons solved: {solved}; tasks to write: {len(note['tasks_to_write'])} "
                  f"(from commit {note['source_commit'] or 'unknown'})")
        elif args.command == "grade":
            rows = grade(args.lesson, root, args.out, args.workers)
            print(f"wrote {args.out}")
            return 0 if all(r.status == "PASS" for r in rows) else 1
        elif args.command == "classroom":
            text = workflow(load_syllabus(root))
            if args.write:
                (root / WORKFLOW).parent.mkdir(parents=True, exist_ok=True)
                (root / WORKFLOW).write_text(text)
                print(f"wrote {WORKFLOW}")
            else:
                print(text, end="")
        else:
            print(course_map(load_syllabus(root)))
    except (ValueError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
