"""Repository-wide pytest set-up: markers, the deterministic hypothesis profile, notebook marks.

Markers are registered here (and ``--strict-markers`` is on) so a typo in a marker fails
instead of silently selecting nothing. Notebooks collected by nbmake get ``nb`` and their
lesson's marker (``02_kv_cache.ipynb`` -> ``l02``), so ``pytest -m l02`` runs it too.
"""

from __future__ import annotations

import os
import re

import pytest

# CI runs the suite on two pytest-xdist workers (README's test command) on a 2-core machine:
# each worker keeps to one thread, since torch's, numba's and OpenMP's pools spinning on a
# shared core slow one another many times over (a numba decode step went from 25 ms to over
# 1 s that way). Read by numba and OpenMP when first imported, so set before torch is.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _pool in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_pool, "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from nanoengine.course.check import COLLECT_ONLY_VARIABLE  # noqa: E402

# numba reads this once, when first imported: without a GPU, numba.cuda kernels (lesson 05)
# run on the CUDA simulator. setdefault leaves an explicit choice alone.
if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

NUM_LESSONS = 18  # l00 .. l17
TASKS_PER_LESSON = 9

# Derandomized and bounded: the same examples on every machine, every run.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=20,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", parent=settings.get_profile("ci"), derandomize=False, max_examples=200)
# Grading (python -m nanoengine.course grade) wants pass/fail fast: in a student copy most
# tests fail at once on a stub, and shrinking or explaining each failure would take minutes.
settings.register_profile("grade", parent=settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    # The notebooks this session executes inherit it: their check() cells only collect, as
    # this session runs the tests (a learner's Jupyter has no such variable and runs them).
    os.environ[COLLECT_ONLY_VARIABLE] = "1"
    for lesson in range(NUM_LESSONS):
        config.addinivalue_line("markers", f"l{lesson:02d}: lesson {lesson:02d}")
        for task in range(1, TASKS_PER_LESSON + 1):
            config.addinivalue_line("markers", f"l{lesson:02d}_t{task}: task L{lesson:02d}.T{task}")
    for name, text in {
        "kernel": "numba.cuda kernels (CUDA simulator on CPU, or a real GPU)",
        "gpu": "needs a real GPU",
        "slow": "takes more than a few seconds",
        "nb": "a notebook executed by nbmake",
        "course": "the course machinery (student copies, grading): in no lesson",
    }.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.nb)
            match = re.match(r"(\d\d)_", item.path.name)
            if match:
                item.add_marker(getattr(pytest.mark, f"l{match.group(1)}"))
