"""Lesson 16, multimodal input: a tiny LLaVA (CLIP tower, projector, Llama) with images.

The oracle is transformers' LLaVA on the same weights and the same processor output:
greedy tokens for prompts with images, alone and batched beside text-only prompts, with
the image's tokens split across prefill chunks; the prefix cache must not share blocks
between different images behind the same text.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from nanoengine import LLM
from nanoengine.sampling_params import SamplingParams
from tests.oracles import assert_same_greedy
from tests.zoo import save_llava

pytestmark = pytest.mark.l16

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
PROMPT = "<|im_start|>user\n<image>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"


def picture(seed: int, size: tuple[int, int] = (40, 50)) -> Image.Image:
    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")
    return Image.fromarray(pixels)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    return save_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def hf_llava(llava_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(llava_path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(llava_path)


def hf_tokens(hf_llava, text: str, images: list[Image.Image], num_tokens: int) -> tuple[list[int], list[int]]:
    model, processor = hf_llava
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                             pad_token_id=0)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def assert_greedy_matches(hf_llava, text, images, output):
    model, processor = hf_llava
    prompt, want = hf_tokens(hf_llava, text, images, len(output.outputs[0].token_ids))
    assert output.prompt_token_ids == prompt
    if output.outputs[0].token_ids != want:  # the near-tie rule needs the text-only oracle's logits
        raise AssertionError(f"ours {output.outputs[0].token_ids}, transformers {want}")


@pytest.mark.parametrize("chunk", [None, 10], ids=["whole-prefill", "image-split-across-chunks"])
def test_a_prompt_with_an_image_generates_what_transformers_does(chunk, llava_path, hf_llava):
    llm = LLM(str(llava_path), dtype="float32", fast_path=False, max_num_batched_tokens=chunk, max_num_seqs=4)
    image = picture(0)
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids.count(llm.loaded.model.image_token_id) == 16
    assert_greedy_matches(hf_llava, PROMPT, [image], out)


def test_images_and_text_in_one_batch_each_equal_their_own_run(llava_path, hf_llava):
    llm = LLM(str(llava_path), dtype="float32", fast_path=False)
    two = PROMPT.replace("<image>", "<image> and <image>")
    prompts = [
        {"prompt": PROMPT, "multi_modal_data": {"image": picture(1)}},
        "The quick brown fox",
        {"prompt": two, "multi_modal_data": {"image": [picture(2), picture(3, (64, 20))]}},
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_greedy_matches(hf_llava, PROMPT, [picture(1)], outs[0])
    assert_greedy_matches(hf_llava, two, [picture(2), picture(3, (64, 20))], outs[2])
    model, processor = hf_llava
    ids = processor.tokenizer("The quick brown fox")["input_ids"]
    assert_same_greedy(model, ids, outs[1].outputs[0].token_ids, hf_tokens(hf_llava, "The quick brown fox", [], 12)[1])


def test_the_prefix_cache_keeps_different_images_apart(llava_path, hf_llava):
    """The same text with two images, one after the other: with prefix caching on, the second
    must not reuse the first's image blocks."""
    llm = LLM(str(llava_path), dtype="float32", fast_path=False, block_size=4)
    for seed in (4, 5, 4):
        out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": picture(seed)}}, GREEDY, use_tqdm=False)[0]
        assert_greedy_matches(hf_llava, PROMPT, [picture(seed)], out)


def test_chat_takes_images_as_data_urls(llava_path, hf_llava):
    llm = LLM(str(llava_path), dtype="float32", fast_path=False)
    image = picture(6)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert_greedy_matches(hf_llava, PROMPT, [image], out)


def test_bad_images_are_refused_by_name(llava_path, zoo_paths):
    llm = LLM(str(llava_path), dtype="float32", fast_path=False)
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) for 2 image\(s\)"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": [picture(0), picture(1)]}})
    with pytest.raises(ValueError, match="never downloads"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    with pytest.raises(ValueError, match="does not hold a readable image"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(ValueError, match="this model takes no images"):
        LLM(str(zoo_paths["llama-gqa"]), dtype="float32").generate({"prompt": "x <image>", "multi_modal_data": {"image": picture(0)}})


def test_the_server_takes_images_in_chat_messages(llava_path, tmp_path):
    """OpenAI's image_url parts (base64 data URLs) through ``nanoengine serve``: the answer is
    the offline chat's; an unreadable image is a 400 naming it, and the server goes on."""
    import httpx

    from tests.serving import AUTH, serving

    image = picture(7)
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}},
               {"type": "text", "text": "What is in the picture?"}]
    body = {"model": llava_path.name, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 12, "min_tokens": 12}
    want = LLM(str(llava_path), dtype="float32", fast_path=False).chat(body["messages"], GREEDY, use_tqdm=False)[0]
    arguments = [str(llava_path), "--dtype", "float32", "--no-fast-path", "--kv-cache-memory", "4MiB"]
    with serving(arguments, tmp_path / "server.log") as base, httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == want.outputs[0].text
        assert answer.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
        broken = {**body, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
        refused = http.post("/v1/chat/completions", json=broken)
        assert refused.status_code == 400 and "does not hold a readable image" in refused.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == want.outputs[0].text
