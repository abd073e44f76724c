"""A real ``nanoengine serve`` process for the server tests (lessons 13 and 14), and how to
talk to it: raw httpx, the official ``openai`` client, its tokenizer and its ``/metrics``."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server and ways to talk to it: raw httpx, the openai client, its tokenizer."""

    def __init__(self, base: str, path: Path) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, timeout=30)
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (e.g. over finish reasons); a labelled
        counter has no sample before its first increment, which counts as 0."""
        text = self.http.get("/metrics").text
        assert name.split("_total")[0] in text, f"{name} is not on /metrics"
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def wait_idle(self, timeout: float) -> tuple[float, float]:
        """Poll until nothing runs and no KV block is held; the last (running, usage) seen."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.metric("nanoengine:num_requests_running"), self.metric("nanoengine:kv_cache_usage_perc")
            if seen == (0, 0) or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)

    def prompt_len(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    def chat_prompt_len(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def serving(arguments: list[str], log: Path):
    """Run ``nanoengine serve`` with ``arguments`` on a free port until the block ends; yields
    its base URL. Fails the test if it does not become healthy or logs an unexpected error."""
    port = _free_port()
    command = [sys.executable, "-m", "nanoengine", "serve", *arguments, "--port", str(port), "--api-key", KEY,
               "--uvicorn-log-level", "warning"]
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text(errors="replace")  # nothing a client did may have hit an unexpected error
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


def assert_error(response: httpx.Response, status: int) -> dict:
    """``response`` is an error in OpenAI's shape with ``status``; its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]
