"""Images in prompts: decoding them, and the processor's work of turning text + images into
token ids (each image a run of ``<image>`` tokens) and pixel values.

A prompt with images is ``{"prompt": "... <image> ...", "multi_modal_data": {"image": img}}``
(vLLM's shape; ``img`` a PIL image, a list of them, or a ``data:image/...;base64,...`` URL),
or a chat message whose content has ``{"type": "image_url", "image_url": {"url": ...}}``
parts (OpenAI's shape). nanoengine never downloads: an http(s) URL is refused by name.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass(frozen=True)
class MultiModalInputs:
    """A prompt's images as the model takes them. ``pixel_values``: ``[images, 3, H, W]``;
    ``placeholders[i]``: ``(first position, number of tokens)`` of image ``i`` in the prompt;
    ``hashes[i]``: a digest of image ``i``'s pixels, which keys the prefix cache (two prompts
    with the same text and different images must not share their image blocks)."""

    pixel_values: torch.Tensor
    placeholders: tuple[tuple[int, int], ...]
    hashes: tuple[str, ...]


def load_image(item: object) -> Image.Image:
    """A PIL image from a PIL image or a base64 data URL, as RGB."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if not isinstance(item, str):
        raise ValueError(f"an image must be a PIL image or a data URL; got {type(item).__name__}")
    if item.startswith(("http://", "https://")):
        raise ValueError("image URLs are not fetched (nanoengine never downloads): send the image as a "
                         "data:image/...;base64,... URL")
    header, _, data = item.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise ValueError(f"an image URL must be a data:image/...;base64,... URL; got {item[:40]!r}")
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"the image data URL does not hold a readable image ({exc})") from None


def images_of(multi_modal_data: object) -> list[Image.Image]:
    """``{"image": one or a list}`` as a list of images."""
    if not isinstance(multi_modal_data, dict) or set(multi_modal_data) != {"image"}:
        raise ValueError("multi_modal_data must be {'image': an image or a list of images}")
    items = multi_modal_data["image"]
    return [load_image(item) for item in (items if isinstance(items, (list, tuple)) else [items])]


def process_prompt(processor: object, text: str, images: list[Image.Image], image_token_id: int) -> tuple[list[int], MultiModalInputs]:
    """Token ids of ``text`` with each ``<image>`` expanded to its image's tokens, and the
    images' inputs. The text must hold one placeholder per image."""
    count = text.count(IMAGE_PLACEHOLDER)
    if count != len(images):
        raise ValueError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    out = processor(text=text, images=images or None, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    runs = _runs_of(ids, image_token_id)
    if len(runs) != len(images):
        raise ValueError(f"the processor placed {len(runs)} image token runs for {len(images)} image(s)")
    pixels = out["pixel_values"] if images else torch.empty(0)
    hashes = tuple(hashlib.sha256(p.float().numpy().tobytes()).hexdigest()[:32] for p in pixels)
    return ids, MultiModalInputs(pixels, tuple(runs), hashes)


def _runs_of(ids: list[int], token: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each maximal run of ``token`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    for position, token_id in enumerate(ids):
        if token_id != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


def split_chat_images(conversation: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """A conversation whose contents may be lists of OpenAI parts (``text``, ``image_url``),
    as the chat template takes it (an image part becomes ``{"type": "image"}``), and its
    images in order."""
    messages, images = [], []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                url = part.get("image_url")
                images.append(load_image(url.get("url") if isinstance(url, dict) else url))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"a message part must be of type 'text' or 'image_url'; got {kind!r}")
        messages.append({**message, "content": parts})
    return messages, images
