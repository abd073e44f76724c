"""Load a model from a local path: a Hugging Face directory, a ``.gguf`` file, or a bundled name.

Nothing is downloaded: a name that is neither bundled nor an existing path is an error. The
loader reads the HF config (or maps GGUF metadata to one), builds the registered class in
the requested dtype on the requested device, streams checkpoint tensors into it, and loads
the tokenizer (with its chat template) through transformers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from nanoengine.config import ModelConfig
from nanoengine.model import gguf_file
from nanoengine.model.bundled import DEFAULT_MODEL, bundled_model_path, bundled_names
from nanoengine.model.chat_formats import fill_in_chat_format, turn_end_token_ids
from nanoengine.model.layers.onednn import onednn_packing_available, pack_linear_weights
from nanoengine.model.registry import model_class_for
from nanoengine.model.tokenizer_cache import gguf_tokenizer
from nanoengine.parallel.state import SINGLE, RankLayout, building_for
from nanoengine.pooling.config import sentence_transformers_max_length
from nanoengine.quant.registry import resolve_quantization
from nanoengine.platform import dtype_name, keep_freed_memory_for_reuse, resolve_device, resolve_dtype

logger = logging.getLogger("nanoengine")


@dataclasses.dataclass(slots=True)
class LoadedModel:
    """A model ready to run, with what the engine needs to know about it.

    ``max_model_len`` is the longest sequence (prompt + output) the engine will accept;
    ``eos_token_ids`` are every token that ends generation unless ``ignore_eos``;
    ``fast_path``: the model was prepared for lesson 15's fast path, and the engine should
    pick its fast kernels too (``enforce_eager``: without the fused decode step);
    ``quantization``: the lesson-11 method its linear layers run (None: plain weights in
    ``dtype``); ``layout``: the rank it was built for (lesson 12):
    ``model`` then holds that rank's share of the weights only. ``hf_config`` is the language
    model's config (a multimodal model's ``text_config``: what the KV cache and the vocabulary
    checks need); ``processor``: a multimodal model's input processor (lesson 16), else None.
    ``batch_invariant``: every matmul was put on the per-row kernel (batch-invariant mode), and
    the engine should attend every row with the decode kernel.
    """

    model: torch.nn.Module
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    path: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: frozenset[int]
    fast_path: bool = False
    enforce_eager: bool = False
    batch_invariant: bool = False
    quantization: str | None = None
    layout: RankLayout = SINGLE
    processor: object | None = None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor the model holds (parameters and buffers, shared ones once):
        the weights' resident memory, quantized or not, packed copies included."""
        return tensor_bytes(self.model)


def resolve_model_path(model: str | Path | None) -> Path:
    """Where the weights are: the bundled default, a bundled name, or a local path."""
    if model is None:
        return bundled_model_path(DEFAULT_MODEL)
    if str(model) in bundled_names():
        return bundled_model_path(str(model))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"model {str(model)!r} is neither a bundled name ({', '.join(bundled_names())}) nor a local "
        "Hugging Face directory (with config.json) or .gguf file; nanoengine never downloads models"
    )


# Formats whose checkpoint tensors are packed in ways the sharding of lesson 12 does not cut.
_UNSHARDABLE_QUANTIZATION = ("gptq", "awq", "gguf")


def load_model(config: ModelConfig, layout: RankLayout = SINGLE) -> LoadedModel:
    """Build and fill the model that ``config`` names; for a parallel ``layout``, only this
    rank's share (each checkpoint tensor is read, narrowed to the rank's slice and dropped,
    so no rank ever holds the whole model)."""
    started = time.perf_counter()
    path = resolve_model_path(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    reader = gguf_file.open_gguf(path) if path.suffix == ".gguf" else None
    hf_config = gguf_file.gguf_to_hf_config(reader) if reader else AutoConfig.from_pretrained(path)
    quant_config = resolve_quantization(config.quantization, hf_config, is_gguf=reader is not None)
    max_model_len = max_model_len_for(hf_config, config.max_model_len)
    trained_len = sentence_transformers_max_length(path)  # an embedding model's own limit (lesson 16)
    if config.max_model_len is None and trained_len is not None:
        max_model_len = min(max_model_len, trained_len)
    if layout.tp.size > 1 and quant_config is not None and quant_config.name in _UNSHARDABLE_QUANTIZATION:
        raise ValueError(f"{quant_config.name} weights cannot be split across tensor-parallel ranks yet; "
                         "use tensor_parallel_size=1, or a method that quantizes as it loads (int8, int4, fp8)")
    model_class = model_class_for(hf_config)
    with torch.device(device), building_for(layout):
        model = model_class(hf_config, dtype, max_model_len, quant_config)
    weights, count = (
        (gguf_file.iter_gguf_weights(reader, hf_config, native=quant_config is not None and quant_config.name == "gguf"),
         len(reader.tensors))
        if reader
        else _iter_safetensors(path)
    )
    with torch.no_grad():
        model.load_weights(tqdm(weights, total=count, desc="Loading weights", leave=False, disable=count < 50))
        process_weights_after_loading(model)
    model.eval()
    packed = 0
    if config.fast_path and not config.batch_invariant and onednn_packing_available(dtype, device):
        try:
            packed = pack_linear_weights(model)
        except NotImplementedError as todo:  # a student copy before lesson 15: plain F.linear
            logger.warning("prepacking the weights is not written yet (%s); the layers run unpacked", todo)
    gemv, fused = 0, False
    if config.batch_invariant:  # every matmul on the per-row kernel; nothing packed or fused
        from nanoengine.model.batch_invariant import use_batch_invariant_kernels

        gemv = use_batch_invariant_kernels(model, dtype, device)
    elif config.fast_path and device.type == "cpu":
        keep_freed_memory_for_reuse()
        # numba: imported only when used
        from nanoengine.model.fused_decode import use_fused_decode
        from nanoengine.model.layers.cpu_gemv import use_gemv
        from nanoengine.model.layers.fused_norm import use_fused_norms

        gemv = use_gemv(model)
        if quant_config is not None and quant_config.name == "gguf":
            from nanoengine.quant.gguf import use_int8_activations

            use_int8_activations(model)
        use_fused_norms(model)
        fused = not config.enforce_eager and use_fused_decode(model)
    processor = AutoProcessor.from_pretrained(path) if getattr(model, "image_token_id", None) is not None else None
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(path)
    fill_in_chat_format(tokenizer, hf_config)
    loaded = LoadedModel(
        model=model,
        hf_config=hf_config.get_text_config(),
        tokenizer=tokenizer,
        path=path,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        eos_token_ids=_eos_token_ids(path, hf_config.get_text_config(), tokenizer),
        fast_path=config.fast_path,
        enforce_eager=config.enforce_eager,
        batch_invariant=config.batch_invariant,
        quantization=quant_config.name if quant_config is not None else None,
        layout=layout,
        processor=processor,
    )
    logger.info(
        "loaded %s (%s) as %s%s on %s in %.1f s: %.1f MB of weights; max_model_len=%d%s",
        path.name, hf_config.architectures[0], dtype_name(dtype),
        f" with {loaded.quantization} weights" if loaded.quantization else "",
        device, time.perf_counter() - started, loaded.weight_bytes / 1e6, max_model_len,
        f"; batch-invariant: {gemv} matmuls on the per-row kernel" if config.batch_invariant
        else f"; fast path: {packed} weights prepacked for oneDNN, {gemv} decode matmuls on the GEMV kernel"
        f"{', decode steps fused' if fused else ''}"
        if config.fast_path else "",
    )
    return loaded


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Let every layer's method turn its loaded tensors into what it runs on (lesson 11)."""
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once and whole (the
    fused decode path's layers hold views of one stacked tensor per kind of weight)."""
    seen: set[int] = set()
    total = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_mkldnn:
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        else:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def load_hf_config(model: str | Path | None) -> PretrainedConfig:
    """A model's HF config without reading its weights (for sizing and figures)."""
    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        return gguf_file.gguf_to_hf_config(gguf_file.open_gguf(path))
    return AutoConfig.from_pretrained(path)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer (and chat template), from its directory or from inside the GGUF."""
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def max_model_len_for(hf_config: PretrainedConfig, requested: int | None) -> int:
    """The longest sequence the engine will run: ``requested``, or what the model supports.
    A model class that does not apply its config's sliding window (all but Gemma 3's) stops
    at the window, since a longer sequence would be wrong."""
    windowed = getattr(model_class_for(hf_config), "sliding_window_attention", False)
    hf_config = hf_config.get_text_config()
    limit = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and not windowed:
        limit = min(limit, window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds what the model supports ({limit})")
    return requested


def _iter_safetensors(path: Path) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors files")
    handles = [safe_open(f, framework="pt") for f in files]
    count = sum(len(h.keys()) for h in handles)
    return ((name, h.get_tensor(name)) for h in handles for name in h.keys()), count


def _eos_token_ids(path: Path, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = turn_end_token_ids(tokenizer, hf_config)
    sources = [hf_config.eos_token_id, tokenizer.eos_token_id]
    if path.is_dir() and (path / "generation_config.json").is_file():
        sources.append(GenerationConfig.from_pretrained(path).eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
