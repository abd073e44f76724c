"""nanoengine: vLLM rebuilt from scratch, one layer at a time.

``from nanoengine import LLM, SamplingParams`` gives the offline API. Importing the package
stays cheap: the model code (torch, transformers) loads on first use of ``LLM``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanoengine.logger import init_logger
from nanoengine.lora.request import LoRARequest
from nanoengine.outputs import CompletionOutput, RequestOutput
from nanoengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanoengine.llm import LLM
    from nanoengine.sampling.beam_search import BeamSearchParams

__all__ = ["LLM", "BeamSearchParams", "CompletionOutput", "LoRARequest", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

init_logger()


def __getattr__(name: str):
    if name == "LLM":
        from nanoengine.llm import LLM

        return LLM
    if name == "BeamSearchParams":
        from nanoengine.sampling.beam_search import BeamSearchParams

        return BeamSearchParams
    raise AttributeError(f"module 'nanoengine' has no attribute {name!r}")
