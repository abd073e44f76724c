"""The course machinery: solution regions, student trees, grading, and the tables it reads.

The guards at the end build real student copies of this repository and run their tests in
fresh interpreters: a fully stubbed copy must import and fail each task's tests with that
task's own NotImplementedError; a copy solved through a lesson must pass it and every
earlier lesson. They check the reference repository, so they skip inside a student copy.
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanoengine.course.classroom import WORKFLOW, workflow
from nanoengine.course.grade import format_table, score
from nanoengine.course.regions import RegionError, find_regions, student_source
from nanoengine.course.results import TestResult, run_tests
from nanoengine.course.student import NOTE, make_student, package_regions, stub_message
from nanoengine.course.syllabus import all_tasks, course_map, load_syllabus

ROOT = Path(__file__).resolve().parents[1]
LESSONS = load_syllabus(ROOT)
TASKS = all_tasks(LESSONS)
IN_STUDENT_TREE = (ROOT / NOTE).exists()
reference_only = pytest.mark.skipif(IN_STUDENT_TREE, reason="guards the reference repository, not a student copy")

pytestmark = pytest.mark.course

SOURCE = textwrap.dedent('''\
    def f(x):
        y = 1
        # BEGIN SOLUTION L03.T1
        y = x + 1
        # END SOLUTION
        # BEGIN STUB
        # y = 0  # start here
        # END STUB
        return y


    def g():
        # BEGIN SOLUTION L04.T2
        return 2
        # END SOLUTION
''')


def _stub_all(text: str) -> str:
    return student_source(text, keep=lambda task: False, message=lambda task: f"{task}: see handout")


# --- regions ---------------------------------------------------------------------------------


def test_regions_are_found_with_their_stub_fences():
    first, second = find_regions(SOURCE)
    assert (first.task, first.indent, first.begin, first.end, first.stub) == ("L03.T1", "    ", 2, 4, (5, 7))
    assert (second.task, second.stub) == ("L04.T2", None)


def test_a_stubbed_region_keeps_its_markers_runs_its_stub_and_raises_naming_the_task():
    student = _stub_all(SOURCE)
    assert "y = x + 1" not in student and "return 2" not in student
    assert "    y = 0  # start here\n    raise NotImplementedError('L03.T1: see handout')\n    # END SOLUTION\n" in student
    assert student.count("# BEGIN SOLUTION") == 2 and "STUB" not in student
    namespace: dict = {}
    exec(compile(student, "student.py", "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"^L03\.T1: see handout$"):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match=r"^L04\.T2"):
        namespace["g"]()


def test_a_kept_region_keeps_its_code_and_drops_its_stub_fence():
    student = student_source(SOURCE, keep=lambda task: task == "L03.T1", message=lambda task: task)
    assert "y = x + 1" in student and "STUB" not in student and "start here" not in student
    assert "raise NotImplementedError('L04.T2')" in student
    namespace: dict = {}
    exec(compile(student, "student.py", "exec"), namespace)
    assert namespace["f"](1) == 2


@pytest.mark.parametrize(("text", "complaint"), [
    ("# BEGIN SOLUTION L01.T1\n# BEGIN SOLUTION L01.T2\n# END SOLUTION\n# END SOLUTION\n", "nested"),
    ("x = 1\n# END SOLUTION\n", "without a BEGIN"),
    ("# BEGIN SOLUTION L01.T1\nx = 1\n", "never ends"),
    ("# BEGIN SOLUTION L1.T1\n# END SOLUTION\n", "malformed marker"),
    ("# begin solution L01.T1\n", "malformed marker"),
    ("# BEGIN STUB\n# x = 1\n# END STUB\n", "must directly follow"),
    ("# BEGIN SOLUTION L01.T1\n# END SOLUTION\n# BEGIN STUB\nx = 1\n# END STUB\n", "comment lines only"),
    ("# BEGIN SOLUTION L01.T1\n# END SOLUTION\n# BEGIN STUB\n# x = 1\n", "stub fence never ends"),
])
def test_bad_markers_are_refused_naming_the_line(text, complaint):
    with pytest.raises(RegionError, match=complaint) as error:
        find_regions(text, "demo.py")
    assert re.match(r"demo\.py:\d+: ", str(error.value))


# --- the lesson table and what is generated from it ------------------------------------------


def test_every_task_has_a_region_a_marker_and_a_handout_section():
    regions = package_regions(ROOT, LESSONS)
    with_regions = {r.task for rs in regions.values() for r in rs}
    assert with_regions == set(TASKS)
    for task in TASKS.values():
        handout = (ROOT / task.lesson.handout).read_text()
        anchor = task.handout_link.split("#")[1]
        assert f'<a id="{anchor}"></a>\n### {task.id} — {task.title}\n' in handout, task.id


def test_a_region_outside_its_lessons_modules_or_of_an_unknown_task_is_refused(tmp_path):
    (tmp_path / "lessons").mkdir()
    (tmp_path / "lessons" / "grading.toml").write_text(textwrap.dedent('''\
        [[lesson]]
        number = "03"
        slug = "paging"
        builds = "paging"
        modules = ["cache/"]
        prerequisites = []
        hours = 1
        status = "ready"
        points = 1
        [[lesson.task]]
        id = "L03.T1"
        title = "the block pool"
        marker = "l03_t1"
        points = 1
    '''))
    package = tmp_path / "nanoengine"
    (package / "cache").mkdir(parents=True)
    (package / "cache" / "pool.py").write_text("# BEGIN SOLUTION L03.T1\n# END SOLUTION\n")
    lessons = load_syllabus(tmp_path)
    assert list(package_regions(tmp_path, lessons)) == [package / "cache" / "pool.py"]
    (package / "model.py").write_text("# BEGIN SOLUTION L03.T1\n# END SOLUTION\n")
    with pytest.raises(RegionError, match=r"nanoengine/model\.py:1: L03\.T1's region is in a file lesson 03 does not list"):
        package_regions(tmp_path, lessons)
    (package / "model.py").write_text("# BEGIN SOLUTION L03.T2\n# END SOLUTION\n")
    with pytest.raises(RegionError, match=r"task L03\.T2 is not in lessons/grading\.toml"):
        package_regions(tmp_path, lessons)
    with pytest.raises(RegionError):
        make_student(tmp_path, None, tmp_path.parent / "student-out")
    assert not (tmp_path.parent / "student-out").exists()


def test_readme_course_map_is_the_tables():
    assert course_map(LESSONS) in (ROOT / "README.md").read_text()


def test_the_classroom_workflow_is_the_tables():
    assert (ROOT / WORKFLOW).read_text() == workflow(LESSONS)


def test_the_figure_gallery_shows_every_figure():
    from nanoengine.viz.make_figures import GALLERY, gallery_markdown

    assert {name for name, _, _ in GALLERY} == {p.name for p in (ROOT / "figures").glob("*.png")}
    assert (ROOT / "figures" / "README.md").read_text() == gallery_markdown()


def test_ready_lessons_have_their_notebook_and_a_handout_in_the_course_format():
    headings = ["## Goal", "## Concept", "## Tasks", "## How to check", "## Payoff, measured", "## How vLLM"]
    for lesson in LESSONS:
        if lesson.ready:
            assert (ROOT / lesson.notebook).is_file(), lesson.notebook
            found = [line for line in (ROOT / lesson.handout).read_text().splitlines() if line.startswith("## ")]
            assert len(found) == len(headings) and all(map(str.startswith, found, headings)), (lesson.handout, found)


# --- grading ---------------------------------------------------------------------------------


def test_a_task_scores_only_when_all_its_tests_pass_and_shows_its_stub():
    results = [
        TestResult("t::a", "passed", ("l03", "l03_t1")),
        TestResult("t::b", "skipped", ("l03", "l03_t1")),
        TestResult("t::c", "failed", ("l03", "l03_t2"), ("L03.T2",), "NotImplementedError: L03.T2: see ..."),
        TestResult("t::d", "passed", ("l03", "l03_t2")),
    ]
    t1, t2 = score("L03.T1", "pool", "l03_t1", 10, results), score("L03.T2", "tables", "l03_t2", 7, results)
    lesson, t3 = score("L03", "lesson", "l03", 5, results), score("L03.T3", "slots", "l03_t3", 5, results)
    assert (t1.earned, t1.status, t1.passed, t1.tests) == (10, "PASS", 2, 2)
    assert (t2.earned, t2.status, t2.message) == (0, "FAIL", "NotImplementedError: L03.T2 (stub)")
    assert (lesson.earned, lesson.passed, lesson.tests) == (0, 3, 4)
    assert t3.status == "NO TESTS" and t3.earned == 0
    assert format_table([t1, t2]).endswith("total   10/17 points")


def test_llm_runs_the_reference_path_in_a_copy_where_lesson_15_is_not_written(monkeypatch, caplog, zoo_paths):
    """LLM's default fast path must not break lessons 00–14 in a student copy: its unwritten
    parts (L15.T1's kernel, L15.T2's packing) fall back to the reference path, with a warning."""
    from nanoengine import LLM, SamplingParams
    from nanoengine.attention import numba_cpu, torch_batched
    from nanoengine.model import loader

    def unwritten(task: str):
        def stub(*args):
            raise NotImplementedError(f"{task}: see the handout")
        return stub

    monkeypatch.setattr(loader, "onednn_packing_available", lambda dtype, device: True)  # on any CPU
    monkeypatch.setattr(loader, "pack_linear_weights", unwritten("L15.T2"))
    monkeypatch.setattr(numba_cpu, "warm_up", unwritten("L15.T1"))
    engine_log = logging.getLogger("nanoengine")  # it does not propagate to caplog's root handler
    engine_log.addHandler(caplog.handler)
    try:
        llm = LLM(str(zoo_paths["llama-gqa"]), dtype="bfloat16", fast_path=True)
    finally:
        engine_log.removeHandler(caplog.handler)
    assert "L15.T1" in caplog.text and "L15.T2" in caplog.text
    assert llm.llm_engine.runner.attention_fn is torch_batched.paged_attention
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# --- guards over real student copies ---------------------------------------------------------


@pytest.fixture(scope="module")
def stubbed_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "stubbed"
    note = make_student(ROOT, None, out)
    assert note["tasks_to_write"] == sorted(TASKS) and note["lessons_solved"] == []
    return out


def _public_signatures(root: Path) -> list[tuple[str, str, str]]:
    """(module, name, arguments or bases) of every public function, method and class."""
    signatures = []
    for path in sorted((root / "nanoengine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                signatures.append((path.relative_to(root).as_posix(), node.name, ", ".join(map(ast.unparse, node.bases))))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                signatures.append((path.relative_to(root).as_posix(), node.name, ast.unparse(node.args)))
    return sorted(signatures)


@reference_only
def test_a_stubbed_tree_imports_and_keeps_every_public_signature(stubbed_tree):
    modules = sorted(".".join(p.relative_to(stubbed_tree).with_suffix("").parts)
                     for p in (stubbed_tree / "nanoengine").rglob("*.py") if p.name != "__main__.py")
    code = f"import importlib; [importlib.import_module(m) for m in {modules!r}]"
    env = {**os.environ, "PYTHONPATH": str(stubbed_tree), "NUMBA_ENABLE_CUDASIM": "1"}
    imported = subprocess.run([sys.executable, "-c", code], cwd=stubbed_tree, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert _public_signatures(stubbed_tree) == _public_signatures(ROOT)


@reference_only
def test_each_tasks_tests_fail_in_a_stubbed_tree_naming_that_task_alone(stubbed_tree):
    results = run_tests(stubbed_tree, " or ".join(t.marker for t in TASKS.values()))
    wrong = []
    for task in TASKS.values():
        mine = [r for r in results if task.marker in r.markers and r.outcome != "skipped"]
        assert mine, f"{task.id}: no test ran"
        wrong += [f"{task.id} {r.nodeid}: {r.outcome}, names {r.stubs or r.message}"
                  for r in mine if r.ok or r.stubs != (task.id,)]
    assert not wrong, "\n".join(wrong)


@reference_only
def test_pasting_the_reference_region_back_passes_that_tasks_tests(stubbed_tree, tmp_path):
    """What a learner does: write the region (here: paste the reference's) and rerun the task."""
    task = "L03.T3"
    target = stubbed_tree / "nanoengine" / "cache" / "kv_cache_manager.py"
    original = target.read_text()
    stub_line = f"    raise NotImplementedError({stub_message(task, LESSONS)!r})\n"
    reference = (ROOT / target.relative_to(stubbed_tree)).read_text()
    region = reference.split(f"# BEGIN SOLUTION {task}\n")[1].split("    # END SOLUTION")[0]
    assert stub_line in original
    target.write_text(original.replace(stub_line, region))
    try:
        results = run_tests(stubbed_tree, TASKS[task].marker)
    finally:
        target.write_text(original)
    assert results and all(r.ok for r in results), [r.message for r in results if not r.ok]


def _solved_through() -> str:
    """The lesson this run's solved-through guard uses: $NANOENGINE_SOLVED_THROUGH, else one
    ready lesson chosen by the day, so that successive CI runs cover every lesson in turn."""
    chosen = os.environ.get("NANOENGINE_SOLVED_THROUGH")
    if chosen:
        return chosen
    ready = [lesson.number for lesson in LESSONS if lesson.ready]
    return "L" + ready[datetime.date.today().toordinal() % len(ready)]


@reference_only
@pytest.mark.parametrize("solved_through", [_solved_through()])
def test_a_tree_solved_through_a_lesson_passes_that_lessons_tests_and_notebook(solved_through, tmp_path):
    """A copy solved through lesson N passes lesson N's tests and runs its notebook: nothing of
    lesson N reaches a later lesson's stub.

    Checking lesson N alone, one N per run, covers "a copy solved through N passes every lesson
    up to N" over the rotation: a lesson-M test that passes solved through M never reached a
    region past M, so it runs the same code, and passes, in a copy solved through any later N.
    """
    out = tmp_path / "student"
    note = make_student(ROOT, solved_through, out)
    assert json.loads((out / NOTE).read_text())["solved_through"] == solved_through
    lesson = next(lesson for lesson in LESSONS if f"L{lesson.number}" == solved_through)
    results = run_tests(out, lesson.marker)
    failed = [f"{r.nodeid}: {r.message}" for r in results if not r.ok]
    assert results and not failed, "\n".join(failed)
    env = {**os.environ, "PYTHONPATH": str(out)}
    # A lenient cell timeout: this checks that the notebook runs, not how fast.
    run = subprocess.run([sys.executable, "-m", "pytest", lesson.notebook, "-p", "no:cacheprovider", "-q",
                          "--nbmake-timeout=600"], cwd=out, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
