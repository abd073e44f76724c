"""``show(obj)``: the installed source of an engine function or class, highlighted.

Notebooks never copy engine code: they show the real thing, so what a learner reads is what
runs (and, in a student tree, what they wrote).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from pygments import highlight
from pygments.formatters import TerminalFormatter
from pygments.lexers import PythonLexer


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def source_of(obj: object) -> str:
    """``obj``'s source, headed by a comment naming its file and first line."""
    obj = inspect.unwrap(obj)  # decorators (e.g. torch.inference_mode) keep the original in __wrapped__
    lines, first = inspect.getsourcelines(obj)
    path = Path(inspect.getsourcefile(obj) or "?")
    parts = path.parts
    shown = "/".join(parts[parts.index("nanoengine"):]) if "nanoengine" in parts else path.name
    return f"# {shown}:{first}\n" + "".join(lines)


def show(obj: object):
    """Display ``obj``'s source: highlighted HTML in a notebook, coloured text in a terminal."""
    source = source_of(obj)
    if _in_notebook():
        from IPython.display import Code

        return Code(source, language="python")
    print(highlight(source, PythonLexer(), TerminalFormatter()))
    return None
