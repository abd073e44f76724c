"""The repository's own rules: clean notebooks, pinned torch, registered markers, import hygiene."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nanoengine.course.student import package_regions
from nanoengine.course.syllabus import load_syllabus

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.l00


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:6] == [
        "00_setup_and_models.ipynb", "01_decode_loop.ipynb", "02_kv_cache.ipynb",
        "03_paging.ipynb", "04_paged_attention.ipynb", "05_numba_cuda_kernel.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    notebook = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(notebook["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_engine_code(path):
    """Notebooks show and use the package; engine code lives only in nanoengine/."""
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            assert not re.search(r"^\s*class\s", source, re.M), f"{path.name} defines a class"


def test_torch_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]


def test_every_lesson_has_its_handout():
    for path in NOTEBOOKS:
        number = path.name[:2]
        assert list((ROOT / "lessons").glob(f"{number}-*/README.md")), f"lesson {number} has no handout"


def test_plain_python_layers_do_not_import_torch():
    """scheduler/, cache/, trace.py and request.py decide what runs and who gets memory; they
    stay tensor-free (DESIGN.md), so they can be tested and taught without torch."""
    code = ("import sys, nanoengine.request, nanoengine.trace, nanoengine.cache.contiguous, "
            "nanoengine.cache.kv_cache_manager, nanoengine.scheduler, nanoengine.scheduler.simulate; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_importing_the_package_is_cheap():
    code = "import sys, nanoengine; sys.exit(1 if {'torch', 'numba', 'transformers'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_solution_regions_are_well_formed_and_in_their_lessons_modules():
    """Markers balanced and not nested, each task in lessons/grading.toml, each region in a
    module its lesson lists: what make-student needs (it refuses the tree otherwise)."""
    regions = package_regions(ROOT, load_syllabus(ROOT))
    assert regions


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "&& python -m pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
