"""The model runner's side of images: features computed once, put at their rows each step.

A request's images go through the vision tower the first time a step reaches one of their
tokens, and the features are kept until the request ends (a preempted request recomputes
its K/V, not its images: vLLM calls this the encoder cache). Each step, :meth:`prepare`
finds which rows of the flat batch are image tokens (a prefill chunk may hold part of an
image) and hands the model those rows and their features.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoengine.multimodal.inputs import MultiModalInputs
from nanoengine.scheduler.output import ScheduledRequest


class ImageInputs:
    """Invariants: ``inputs`` has every live request with images; ``features[r][i]`` is
    ``[tokens of image i, hidden]``, present once computed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inputs: dict[str, MultiModalInputs] = {}
        self.features: dict[str, torch.Tensor] = {}

    def add(self, request_id: str, inputs: MultiModalInputs) -> None:
        self.inputs[request_id] = inputs

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.inputs.pop(request_id, None)
            self.features.pop(request_id, None)

    def _features_of(self, request_id: str) -> torch.Tensor:
        if request_id not in self.features:
            self.features[request_id] = self.model.image_features(self.inputs[request_id].pixel_values)
        return self.features[request_id]

    def prepare(self, scheduled: list[ScheduledRequest]) -> None:
        """Give the model this step's image rows (none when no chunk reaches an image)."""
        rows, features = [], []
        offset = 0  # the first row of the current request's chunk in the flat batch
        for s in scheduled:
            start, end = s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids)
            inputs = self.inputs.get(s.request_id)
            for image, (first, length) in enumerate(inputs.placeholders if inputs else ()):
                lo, hi = max(first, start), min(first + length, end)
                if lo < hi:
                    features.append(self._features_of(s.request_id)[image, lo - first : hi - first])
                    rows.append(torch.arange(offset + lo - start, offset + hi - start))
            offset += len(s.token_ids)
        if rows:
            self.model.set_image_rows(torch.cat(rows), torch.cat(features))
        else:
            self.model.set_image_rows(None, None)
