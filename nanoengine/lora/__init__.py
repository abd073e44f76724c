"""Lesson 14: multi-LoRA, many adapters served in one batch.

``LoRARequest`` (plain Python) is importable without torch; the layers and the manager
load with the model code.
"""

from nanoengine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
