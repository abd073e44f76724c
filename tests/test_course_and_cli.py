"""The course helpers (``show``, ``check``) and the ``nanoengine`` command line's argument
checks. ``nanoengine generate`` runs the whole engine: it is tested with lesson 15's fast
path it runs by default (test_l15_bench.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nanoengine.cli import main
from nanoengine.course.check import COLLECT_ONLY_VARIABLE
from nanoengine.course.show import source_of
from nanoengine.engine.naive import recompute_decode


@pytest.mark.l00
def test_show_gives_the_installed_source_with_its_location():
    source = source_of(recompute_decode)
    assert source.startswith("# nanoengine/engine/naive.py:")
    assert "def recompute_decode" in source


@pytest.mark.course  # it runs lesson 02's tests: in no lesson itself
@pytest.mark.slow
def test_check_runs_a_task_and_prints_a_table():
    code = "import sys; from nanoengine.course import check; sys.exit(0 if check('l02_t1') else 1)"
    env = {k: v for k, v in os.environ.items() if k != COLLECT_ONLY_VARIABLE}  # as in a learner's Jupyter
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "l02_t1:" in run.stdout and "PASS" in run.stdout


@pytest.mark.course
def test_inside_the_suite_check_only_collects_what_the_suite_runs(monkeypatch, capsys):
    from nanoengine.course import check

    monkeypatch.setenv(COLLECT_ONLY_VARIABLE, "1")
    assert check("l02_t1")
    out = capsys.readouterr().out
    assert "tests collected" in out and "PASS" not in out
    assert not check("l99")


@pytest.mark.l00
def test_bad_arguments_give_a_message_not_a_traceback(zoo_paths, capsys):
    code = main(["generate", str(zoo_paths["llama-gqa"]), "--prompt", "x", "--top-p", "2"])
    assert code == 2
    assert "top_p must be in" in capsys.readouterr().err
    assert main(["generate", "no/such/model", "--prompt", "x"]) == 2
