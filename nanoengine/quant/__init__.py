"""Lesson 11: quantized weights behind the linear layers' ``LinearMethod`` seam.

``registry.py`` turns ``quantization=`` (or a checkpoint's own ``quantization_config``, or
``"gguf"`` for a GGUF file run in its own types) into a :class:`~nanoengine.quant.base.QuantizationConfig`;
each method lives in one module: ``int8``, ``int4`` and ``fp8`` quantize float weights as
they load, ``gptq`` and ``awq`` read those checkpoints' packed tensors (``int32_packing``
holds what they share), ``gguf`` runs llama.cpp's block types. ``int4_kernel`` is the
group-wise 4-bit matmul that int4, GPTQ, AWQ and GGUF's 4-bit types share; ``fp8_cpu`` the
numba table lookup that widens FP8 weights on a CPU.
"""
