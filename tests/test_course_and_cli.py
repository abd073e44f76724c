"""The course helpers (``show``, ``check``) and the ``nanoengine`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanoengine.cli import main
from nanoengine.course.show import source_of
from nanoengine.engine.naive import recompute_decode

pytestmark = pytest.mark.l00


def test_show_gives_the_installed_source_with_its_location():
    source = source_of(recompute_decode)
    assert source.startswith("# nanoengine/engine/naive.py:")
    assert "def recompute_decode" in source


@pytest.mark.slow
def test_check_runs_a_task_and_prints_a_table():
    code = "import sys; from nanoengine.course import check; sys.exit(0 if check('l02_t1') else 1)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    assert "l02_t1:" in run.stdout and "PASS" in run.stdout


def test_generate_command_prints_completions(zoo_paths, capsys):
    code = main(["generate", str(zoo_paths["llama-gqa"]), "--prompt", "ab cd", "--prompt", "東京",
                 "--max-tokens", "5", "--temperature", "0", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- 'ab cd'" in out and "--- '東京'" in out


def test_bad_arguments_give_a_message_not_a_traceback(zoo_paths, capsys):
    code = main(["generate", str(zoo_paths["llama-gqa"]), "--prompt", "x", "--top-p", "2"])
    assert code == 2
    assert "top_p must be in" in capsys.readouterr().err
    assert main(["generate", "no/such/model", "--prompt", "x"]) == 2
