"""``python -m nanoengine.viz.make_figures``: regenerate every figure in ``figures/``.

Inputs are fixed (the bundled model's config, recorded benchmark JSON in ``docs/bench/``),
so a rerun gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from nanoengine.model import gguf_file, resolve_model_path  # noqa: E402
from nanoengine.viz import kv_cache_speed, model_anatomy, save_figure, token_timeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str) -> dict | None:
    path = ROOT / "docs" / "bench" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "figures")
    args = parser.parse_args(argv)
    config = gguf_file.gguf_to_hf_config(gguf_file.open_gguf(resolve_model_path(None)))
    written = [
        save_figure(model_anatomy(config, "SmolLM2-135M-Instruct"), args.out / "model_anatomy.png"),
        save_figure(token_timeline(), args.out / "token_timeline.png"),
    ]
    results = [r for r in (_bench("l02_recompute"), _bench("l02_contiguous")) if r]
    if results:
        written.append(save_figure(kv_cache_speed(results), args.out / "kv_cache_speed.png"))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
