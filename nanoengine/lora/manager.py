"""Lesson 14: the adapters a model runner can apply, and which of them sit in device slots.

Two tiers, as in vLLM: every adapter *added* is kept on the CPU (read from disk once), and
at most ``max_loras`` of them are *active*, copied into the slots of every
:class:`LoRALinear`. Before each step :meth:`LoRAManager.prepare` makes sure every adapter
the step uses has a slot, evicting the least recently used adapter the step does not use,
and tells the layers which rows of the flat batch run which slot. The scheduler never puts
more than ``max_loras`` adapters in one step, so a slot can always be found.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from nanoengine.config import LoRAConfig
from nanoengine.lora.adapter import LoRAAdapter, load_adapter
from nanoengine.lora.layers import LoRABatch, LoRALinear, Rows
from nanoengine.lora.request import LoRARequest
from nanoengine.scheduler.output import ScheduledRequest

# A step whose rows × slots in use is at most this runs the masked path (add_lora_masked). On a
# CPU a thin matmul costs mostly its call: for 32 rows, the matmul pair over eight slots at once
# takes under three times as long as the pair for one slot. So a decode step runs one wide pair
# rather than a pair per adapter; in a long prefill chunk the extra arithmetic of every row
# through every slot would dominate, and the gather-and-matmul loop runs.
MASKED_MAX_ROW_SLOTS = 2048

# Our (fused) projection -> the checkpoint projections it holds, in its output order.
FUSED_MODULES = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


class LoRAManager:
    """Adapters on the CPU by id, up to ``max_loras`` of them in device slots.

    Invariants: ``slot_of`` maps each active adapter id to its own slot, least recently
    used first; every slot of every :class:`LoRALinear` holds the adapter ``slot_of`` puts
    there (or zeros); an adapter in the running step's ``batch`` keeps its slot until the
    next :meth:`prepare`.
    """

    def __init__(self, model: nn.Module, hf_config: PretrainedConfig, config: LoRAConfig,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.hf_config, self.config, self.device, self.dtype = hf_config, config, device, dtype
        self.batch = LoRABatch()
        self.adapters: dict[int, LoRAAdapter] = {}
        self.slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.layers = _wrap_projections(model, config, self.batch, dtype, device)
        self.masked_max_row_slots = MASKED_MAX_ROW_SLOTS

    # -- the CPU tier: adapters added, by id ------------------------------------------------
    def add(self, lora_request: LoRARequest) -> bool:
        """Read and check the adapter (ValueError names what is wrong); False: already added."""
        known = self.adapters.get(lora_request.lora_int_id)
        if known is not None:
            if known.lora_request.lora_path != lora_request.lora_path:
                raise ValueError(f"lora_int_id {lora_request.lora_int_id} is already adapter "
                                 f"{known.lora_request.lora_name!r} from {known.lora_request.lora_path!r}")
            return False
        self.adapters[lora_request.lora_int_id] = load_adapter(lora_request, self.hf_config,
                                                               self.config.max_lora_rank)
        return True

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter (False: it was not added) and free its slot. The engine removes
        an adapter only once no live request uses it."""
        if self.adapters.pop(lora_id, None) is None:
            return False
        self.slot_of.pop(lora_id, None)
        return True

    # -- the device tier: slots --------------------------------------------------------------
    def prepare(self, scheduled: Sequence[ScheduledRequest]) -> None:
        """Give every adapter of the step a slot and tell the layers whose rows are whose.

        ``scheduled``'s chunks lie one after another in the flat batch, in order; each
        adapter they name has been added (the engine adds it with its request).
        """
        in_use = {s.lora_request.lora_int_id for s in scheduled if s.lora_request is not None}
        if len(in_use) > self.config.max_loras:
            raise RuntimeError(f"a step uses {len(in_use)} adapters, more than max_loras ({self.config.max_loras})")
        slots = {lora_id: self.slot_for(lora_id, in_use) for lora_id in in_use}
        ranges: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for s in scheduled:
            end = start + len(s.token_ids)
            if s.lora_request is not None:
                ranges.setdefault(slots[s.lora_request.lora_int_id], []).append((start, end))
            start = end
        self.batch.segments = [(slot, self._rows(spans)) for slot, spans in ranges.items()]
        self.batch.one_hot = self._one_hot(ranges, start)

    def _one_hot(self, ranges: dict[int, list[tuple[int, int]]], num_rows: int) -> torch.Tensor | None:
        """The step's mapping as a ``[rows, k]`` mask over slots ``0 .. k-1`` when the masked
        path pays (rows × k small), else None."""
        k = max(ranges, default=-1) + 1
        if not ranges or num_rows * k > self.masked_max_row_slots:
            return None
        one_hot = torch.zeros(num_rows, k, dtype=self.dtype)
        for slot, spans in ranges.items():
            for a, b in spans:
                one_hot[a:b, slot] = 1
        return one_hot.to(self.device)

    def slot_for(self, lora_id: int, in_use: set[int]) -> int:
        """The slot of adapter ``lora_id``, loading it if it has none: into a free slot, else
        into the slot of the least recently used adapter not in ``in_use`` (the step's
        adapters). It becomes the most recently used."""
        # BEGIN SOLUTION L14.T2
        if lora_id in self.slot_of:
            self.slot_of.move_to_end(lora_id)
            return self.slot_of[lora_id]
        taken = set(self.slot_of.values())
        free = [slot for slot in range(self.config.max_loras) if slot not in taken]
        if free:
            slot = free[0]
        else:
            victim = next(other for other in self.slot_of if other not in in_use)
            slot = self.slot_of.pop(victim)
        self._load_slot(slot, self.adapters[lora_id])
        self.slot_of[lora_id] = slot
        return slot
        # END SOLUTION

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy ``adapter``'s weights into ``slot`` of every layer (zeros where it adapts nothing)."""
        for (layer_idx, name), layer in self.layers.items():
            pairs = [adapter.weights.get((layer_idx, module)) for module in layer.modules_held]
            layer.set_slot(slot, [None if p is None else (p[0].to(self.device), p[1].to(self.device)) for p in pairs])

    def _rows(self, spans: list[tuple[int, int]]) -> Rows:
        if len(spans) == 1:
            return slice(*spans[0])
        return torch.cat([torch.arange(a, b) for a, b in spans]).to(self.device)


def _wrap_projections(model: nn.Module, config: LoRAConfig, batch: LoRABatch, dtype: torch.dtype,
                      device: torch.device) -> dict[tuple[int, str], LoRALinear]:
    """Put a :class:`LoRALinear` around every projection of every decoder layer, in place."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"enable_lora supports models of the Llama family; {type(model).__name__} is not one")
    wrapped = {}
    for layer_idx, decoder_layer in enumerate(layers):
        for name, modules in FUSED_MODULES.items():
            parent_name, child = name.split(".")
            base = getattr(getattr(decoder_layer, parent_name), child, None)
            if base is None:
                raise ValueError(f"enable_lora: layer {layer_idx} of {type(model).__name__} has no dense {name} "
                                 "(its MLP is a mixture of experts); LoRA on experts is not supported")
            parent = getattr(decoder_layer, parent_name)
            offsets = getattr(base, "shard_offsets", None)
            slices = [offsets[key] for key in offsets] if offsets else [(0, base.output_size)]
            lora = LoRALinear(base, modules, slices, config.max_loras, config.max_lora_rank, batch, dtype, device)
            setattr(parent, child, lora)
            wrapped[(layer_idx, name)] = lora
    return wrapped
