"""Solution regions: find them in a source file, and write the student's version of it.

A solution region is the code a learner writes for one task: the lines between a marker
line ``# BEGIN SOLUTION L03.T1`` and a marker line ``# END SOLUTION``. It may be followed at
once by a stub fence, the lines between ``# BEGIN STUB`` and ``# END STUB``: comments in the
reference (so they never run there) that become code in a student copy where the task is
left to write, e.g. scaffolding the learner starts from.

In a student copy a task left to write keeps its two markers; the reference code between
them becomes the stub's lines (uncommented) and a ``raise NotImplementedError`` naming the
task and its handout section, so every test that reaches it fails saying what to write.
A task kept solved keeps its code and loses its stub fence.

Invariants the parser enforces (it refuses the file otherwise, naming the line): markers
are whole lines; regions do not nest and every BEGIN has its END; a stub fence directly
follows an END SOLUTION, holds only comment or blank lines, and ends.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

_BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION (?P<task>L\d\d\.T\d)$")
_END = "# END SOLUTION"
_STUB_BEGIN = "# BEGIN STUB"
_STUB_END = "# END STUB"
# A comment line that mentions a marker word but is not exactly a marker: a typo to refuse.
_MARKER_LIKE = re.compile(r"^\s*#\s*(BEGIN|END)\s+(SOLUTION|STUB)\b", re.IGNORECASE)


class RegionError(ValueError):
    """A source file's markers are malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One solution region. Line numbers are 0-based indices into the file's lines:
    ``begin`` and ``end`` are the marker lines; ``stub`` is the (begin, end) of the stub
    fence's marker lines, if it has one."""

    task: str
    indent: str
    begin: int
    end: int
    stub: tuple[int, int] | None = None


def find_regions(text: str, name: str = "<source>") -> list[Region]:
    """Every solution region of ``text``, in order; raises ``RegionError`` on bad markers."""
    lines = text.splitlines()
    regions: list[Region] = []
    open_region: tuple[str, str, int] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        where = f"{name}:{index + 1}"
        begin = _BEGIN.match(line)
        if begin:
            if open_region is not None:
                raise RegionError(f"{where}: region {begin['task']} opens inside region {open_region[0]} (nested)")
            open_region = (begin["task"], begin["indent"], index)
        elif stripped == _END:
            if open_region is None:
                raise RegionError(f"{where}: END SOLUTION without a BEGIN")
            task, indent, start = open_region
            open_region = None
            stub = None
            if index + 1 < len(lines) and lines[index + 1].strip() == _STUB_BEGIN:
                stub = (index + 1, _stub_end(lines, index + 1, name))
            regions.append(Region(task, indent, start, index, stub))
            if stub:
                index = stub[1]
        elif stripped in (_STUB_BEGIN, _STUB_END):
            raise RegionError(f"{where}: a stub fence must directly follow an END SOLUTION line")
        elif _MARKER_LIKE.match(line):
            raise RegionError(f"{where}: malformed marker {stripped!r} (expected '# BEGIN SOLUTION L03.T1', "
                              "'# END SOLUTION', '# BEGIN STUB' or '# END STUB')")
        index += 1
    if open_region is not None:
        raise RegionError(f"{name}:{open_region[2] + 1}: region {open_region[0]} never ends")
    return regions


def _stub_end(lines: list[str], start: int, name: str) -> int:
    for index in range(start + 1, len(lines)):
        stripped = lines[index].strip()
        if stripped == _STUB_END:
            return index
        if _BEGIN.match(lines[index]) or stripped in (_END, _STUB_BEGIN):
            raise RegionError(f"{name}:{index + 1}: marker inside the stub fence opened on line {start + 1}")
        if stripped and not stripped.startswith("#"):
            raise RegionError(f"{name}:{index + 1}: a stub fence holds comment lines only (they run in "
                              "the student copy, not in the reference)")
    raise RegionError(f"{name}:{start + 1}: stub fence never ends")


def _uncomment(line: str) -> str:
    """``    # x = 1`` -> ``    x = 1``: the stub line as it runs in the student copy."""
    match = re.match(r"^(\s*)# ?(.*)$", line)
    return f"{match[1]}{match[2]}" if match and match[2] else ""


def student_source(text: str, keep: Callable[[str], bool], message: Callable[[str], str],
                   name: str = "<source>") -> str:
    """``text`` with every region whose task ``keep`` rejects replaced by its stub.

    ``message(task)`` is the NotImplementedError's text. Kept regions keep their code; every
    stub fence is removed (its lines are used, uncommented, only where the task is stubbed).
    """
    lines = text.splitlines(keepends=True)
    newline = "\n"
    out: list[str] = []
    cursor = 0
    for region in find_regions(text, name):
        after = region.stub[1] if region.stub else region.end
        if keep(region.task):
            out += lines[cursor:region.end + 1]
        else:
            out += lines[cursor:region.begin + 1]
            if region.stub:
                out += [_uncomment(line.rstrip("\r\n")) + newline for line in lines[region.stub[0] + 1:region.stub[1]]]
            out.append(f"{region.indent}raise NotImplementedError({message(region.task)!r}){newline}")
            out.append(lines[region.end])
        cursor = after + 1
    out += lines[cursor:]
    return "".join(out)
