"""A GGUF file's tokenizer, converted once and then read back.

transformers builds a GGUF's tokenizer by converting the vocabulary stored in the file into a
fast tokenizer: about 5 s for SmolLM2's 49k tokens, 20 s for Gemma 3's 262k, on every load.
The result depends only on the file (and the transformers that converted it), so the first
load saves it under the cache folder, keyed by the file's path, size, modification time and
the transformers version, and later loads read the saved files back in well under a second.
A cache that cannot be written (a read-only home) only costs the conversion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Where nanoengine keeps what it derives from files (default: ~/.cache/nanoengine).
CACHE_DIR_VARIABLE = "NANOENGINE_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "nanoengine")


def _cache_folder(path: Path) -> Path:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
    return cache_root() / "tokenizers" / hashlib.sha256(identity.encode()).hexdigest()[:20]


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) stored inside the GGUF file ``path``."""
    folder = _cache_folder(path)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent))
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)  # atomic: a reader never sees half the files
        except OSError:  # another process saved it first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass
    return tokenizer
