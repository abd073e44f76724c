"""The models a server answers to: its base model and the LoRA adapters it serves (lesson 14).

As in vLLM, a client picks an adapter by naming it as the request's ``model``; ``/v1/models``
lists the base model, then each adapter with the base model as its ``parent``. Adapters
come from ``--lora-modules`` at start-up or ``POST /v1/load_lora_adapter`` at run time, and
leave with ``POST /v1/unload_lora_adapter``.
"""

from __future__ import annotations

import logging

from nanoengine.engine.async_engine import AsyncEngine
from nanoengine.lora.request import LoRARequest
from nanoengine.server.errors import APIError

logger = logging.getLogger("nanoengine")


class ServedModels:
    """The served names: ``base_name`` and every adapter loaded, by name.

    Invariants: each adapter in ``loras`` was added to the engine successfully; ids are
    given 1, 2, … in the order loads begin and never reused, so an id the engine may still
    hold (a request running with an unloaded adapter) always means one adapter. A name
    being loaded is in ``_loading`` until its load ends, so two loads cannot both take it.
    """

    def __init__(self, engine: AsyncEngine, base_name: str, created: int) -> None:
        self.engine = engine
        self.base_name = base_name
        self.created = created
        self.loras: dict[str, LoRARequest] = {}
        self._loading: set[str] = set()
        self._last_id = 0

    def resolve(self, requested: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names: None for the base model (or no name);
        any other unknown name is a 404, as OpenAI answers it."""
        if requested is None or requested == self.base_name:
            return None
        lora = self.loras.get(requested)
        if lora is None:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")
        return lora

    def card(self, name: str) -> dict:
        """OpenAI's model object for a served name (404 if it is not one)."""
        lora = self.resolve(name)
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "nanoengine",
                "root": self.engine.info.model_name, "parent": None, "max_model_len": self.engine.info.max_model_len}
        if lora is not None:
            card |= {"root": lora.lora_path, "parent": self.base_name}
        return card

    def cards(self) -> list[dict]:
        """The base model's card, then each adapter's, in load order."""
        return [self.card(name) for name in (self.base_name, *self.loras)]

    async def load(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Add an adapter to the engine under a new id, then serve it as ``lora_name``.

        A ValueError (a 400) says why not: a name in use, a server without ``--enable-lora``,
        or the engine's own reason for refusing the adapter, which names the problem.
        """
        if not self.engine.info.enable_lora:
            raise ValueError("this server runs without LoRA adapters: start it with --enable-lora")
        if not lora_name or not lora_path:
            raise ValueError("Both 'lora_name' and 'lora_path' must be provided.")
        if lora_name == self.base_name:
            raise ValueError(f"'{lora_name}' is the name of the served base model")
        if lora_name in self.loras or lora_name in self._loading:
            raise ValueError(f"The lora adapter '{lora_name}' has already been loaded.")
        self._last_id += 1
        lora = LoRARequest(lora_name, self._last_id, lora_path)
        self._loading.add(lora_name)
        try:
            await self.engine.add_lora(lora)
        finally:
            self._loading.discard(lora_name)
        self.loras[lora_name] = lora
        logger.info("loaded LoRA adapter %r from %s (id %d)", lora_name, lora_path, lora.lora_int_id)
        return lora

    async def unload(self, lora_name: str) -> None:
        """Stop serving ``lora_name`` at once (404 if it is not served) and let the engine
        forget it; requests already running with it finish with it."""
        lora = self.loras.pop(lora_name, None)
        if lora is None:
            raise APIError(404, f"The lora adapter '{lora_name}' cannot be found.", "lora_name")
        await self.engine.remove_lora(lora.lora_int_id)
        logger.info("unloaded LoRA adapter %r (id %d)", lora_name, lora.lora_int_id)
