"""How a model's per-token hidden states become one vector per text.

``pooling_type``: ``"MEAN"`` averages every token's vector (sentence-transformers' MiniLM),
``"CLS"`` keeps the first token's (BERT's classification token), ``"LAST"`` the last
token's (a decoder, whose last token is the only one that has seen the whole text).
``normalize``: scale each vector to unit length, so a dot product is a cosine similarity.

A sentence-transformers folder says what it was trained with (``modules.json``, its
``Pooling`` module's config, whether a ``Normalize`` module follows); otherwise encoders
default to CLS and decoders to LAST, both normalised (vLLM's defaults).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

POOLING_TYPES = ("MEAN", "CLS", "LAST")

# sentence-transformers' pooling flags -> our pooling type
_ST_MODES = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS", "pooling_mode_lasttoken": "LAST"}


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}; got {self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool; got {self.normalize!r}")

    @classmethod
    def from_value(cls, value: PoolerConfig | dict | None) -> PoolerConfig | None:
        """``LLM(pooler_config=...)`` as a config, a dict of its fields, or None."""
        if value is None or isinstance(value, PoolerConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"pooler_config must be a PoolerConfig or a dict; got {type(value).__name__}")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"pooler_config has unknown keys {sorted(unknown)}; known: pooling_type, normalize")
        return cls(**value)


def default_pooler_config(path: Path, is_encoder: bool) -> PoolerConfig:
    """What the model folder's sentence-transformers files say, else the default by kind."""
    modules_file = path / "modules.json" if path.is_dir() else None
    if modules_file is not None and modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        if "Pooling" in kinds:
            flags = json.loads((path / kinds["Pooling"]["path"] / "config.json").read_text())
            chosen = [kind for flag, kind in _ST_MODES.items() if flags.get(flag)]
            if len(chosen) != 1:
                raise ValueError(f"{path}: sentence-transformers pooling {flags} is not one of MEAN, CLS or last token")
            return PoolerConfig(chosen[0], "Normalize" in kinds)
    return PoolerConfig("CLS" if is_encoder else "LAST", True)


def sentence_transformers_max_length(path: Path) -> int | None:
    """``max_seq_length`` of a sentence-transformers folder: the longest text it was trained on."""
    config_file = path / "sentence_bert_config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("max_seq_length")
