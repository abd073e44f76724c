"""Lesson 14: LoRA adapters behind the OpenAI-compatible server, as vLLM serves them.

One real ``nanoengine serve --enable-lora --lora-modules ...`` process (a tiny zoo model)
serves the module; a client picks an adapter by naming it as the request's ``model``.
The oracle of an adapter's answer is PEFT's merged model (``merge_and_unload``) run by
transformers, decoded by the model's tokenizer; every adapter is checked to change the
base model's answer, so a server that ignored adapters would fail. How the front end
routes add/remove calls to every data-parallel replica is tested against scripted
replicas; the command line in-process, and a start-up failure in a real process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from nanoengine import LoRARequest
from nanoengine.cli import build_parser, main
from nanoengine.engine.async_engine import AsyncEngine, EngineInfo, EngineMetrics
from nanoengine.server.app import build_app
from nanoengine.server.launcher import engine_kwargs
from tests.engines import run_async
from tests.lora_adapters import ADAPTERS, broken_copy, make_peft_adapter, merged_model, set_config
from tests.oracles import hf_greedy
from tests.serving import AUTH, KEY, Server, assert_error, serving

pytestmark = pytest.mark.l14

MODEL = "llama-gqa"
PROMPT = [5, 6, 7, 8, 9, 10]
NUM_TOKENS = 8
GREEDY = dict(max_tokens=NUM_TOKENS, temperature=0, extra_body={"min_tokens": NUM_TOKENS})  # EOS masked, as hf_greedy
CHAT = [{"role": "user", "content": "The quick brown fox"}]
TIMEOUT = 10  # seconds: a utility call that never returns fails the test instead of hanging it


@pytest.fixture(scope="module")
def adapter_paths(zoo_paths, tmp_path_factory) -> dict[int, Path]:
    """PEFT adapters of the zoo model by ``tests.lora_adapters.ADAPTERS`` id: 1 adapts q and v
    (rank 4), 2 every projection (rank 8)."""
    root = tmp_path_factory.mktemp("served-loras")
    return {lora_id: make_peft_adapter(zoo_paths[MODEL], root / f"a{lora_id}", *ADAPTERS[lora_id], seed=lora_id)
            for lora_id in (1, 2)}


@pytest.fixture(scope="module")
def server(zoo_paths, adapter_paths, tmp_path_factory):
    """Serves adapter 2 as ``sql`` (given as NAME=PATH) and adapter 1 as ``qv`` (vLLM's JSON form)."""
    path = zoo_paths[MODEL]
    arguments = [str(path), "--dtype", "float32", "--kv-cache-memory", "4MiB", "--max-model-len", "256",
                 "--no-fast-path", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                 "--lora-modules", f"sql={adapter_paths[2]}", json.dumps({"name": "qv", "path": str(adapter_paths[1])})]
    with serving(arguments, tmp_path_factory.mktemp("lora-server") / "server.log") as base:
        running = Server(base, path)
        yield running
        running.http.close()
        running.client.close()


def _peft_text(server: Server, zoo_paths, adapter: Path | None, prompt: list[int] = PROMPT) -> str:
    """The greedy text of PEFT's merged model for ``adapter`` (None: the base model)."""
    tokens = hf_greedy(merged_model(zoo_paths[MODEL], adapter), prompt, NUM_TOKENS)
    return server.tokenizer.decode(tokens, skip_special_tokens=True)


def _load(server: Server, name: str, path: Path | str) -> httpx.Response:
    return server.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=AUTH)


def _unload(server: Server, name: str) -> httpx.Response:
    return server.http.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH)


def _model_ids(server: Server) -> list[str]:
    return [card["id"] for card in server.http.get("/v1/models", headers=AUTH).json()["data"]]


# --- serving adapters ----------------------------------------------------------------------------------------


def test_models_lists_the_base_model_then_each_adapter(server, adapter_paths):
    cards = server.http.get("/v1/models", headers=AUTH).json()["data"]
    assert [card["id"] for card in cards[:3]] == [MODEL, "sql", "qv"]
    base, sql, qv = cards[:3]
    assert (base["root"], base["parent"], base["max_model_len"]) == (MODEL, None, 256)
    assert sql == {"id": "sql", "object": "model", "created": base["created"], "owned_by": "nanoengine",
                   "root": str(adapter_paths[2]), "parent": MODEL, "max_model_len": 256}
    assert qv["root"] == str(adapter_paths[1]) and qv["parent"] == MODEL
    assert server.http.get("/v1/models/qv", headers=AUTH).json() == qv
    assert [m.id for m in server.client.models.list().data][:3] == [MODEL, "sql", "qv"]


def test_adapter_requests_match_pefts_merged_models_beside_a_base_request(server, zoo_paths, adapter_paths):
    """Three requests at once, so they share engine steps: two adapters and the base model."""
    async def together() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(client.completions.create(model=model, prompt=PROMPT, **GREEDY)
                                          for model in ("sql", MODEL, "qv")))

    sql, base, qv = run_async(together())
    assert (sql.model, base.model, qv.model) == ("sql", MODEL, "qv")
    texts = [out.choices[0].text for out in (sql, base, qv)]
    expected = [_peft_text(server, zoo_paths, adapter) for adapter in (adapter_paths[2], None, adapter_paths[1])]
    assert len(set(expected)) == 3, "an adapter leaves the base model's answer unchanged: the test would be blind"
    assert texts == expected
    assert all(out.usage.completion_tokens == NUM_TOKENS for out in (sql, base, qv))


def test_answers_name_the_adapter_the_client_asked_for(server):
    out = server.client.chat.completions.create(model="sql", messages=CHAT, max_tokens=3)
    assert out.model == "sql"
    chunks = list(server.client.chat.completions.create(model="qv", messages=CHAT, max_tokens=3, stream=True))
    assert chunks and {chunk.model for chunk in chunks} == {"qv"}
    no_model = server.http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2}, headers=AUTH)
    assert no_model.json()["model"] == MODEL
    assert server.http.post("/tokenize", json={"model": "sql", "prompt": "ab"}, headers=AUTH).status_code == 200


def test_an_unknown_model_is_404(server):
    for path, body in [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": CHAT}),
                       ("/tokenize", {"prompt": "x"})]:
        error = assert_error(server.http.post(path, json={**body, "model": "nope"}, headers=AUTH), 404)
        assert error["message"] == "The model `nope` does not exist."
    assert_error(server.http.get("/v1/models/nope", headers=AUTH), 404)
    assert "cannot be found" in assert_error(_unload(server, "nope"), 404)["message"]


def test_an_adapter_loaded_at_run_time_is_listed_and_serves_requests(server, zoo_paths, adapter_paths):
    response = _load(server, "late", adapter_paths[1])
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'late' added successfully."
    assert "late" in _model_ids(server)
    assert server.http.get("/v1/models/late", headers=AUTH).json()["parent"] == MODEL
    out = server.client.completions.create(model="late", prompt=PROMPT, **GREEDY)
    assert out.model == "late" and out.choices[0].text == _peft_text(server, zoo_paths, adapter_paths[1])
    assert "already been loaded" in assert_error(_load(server, "late", adapter_paths[2]), 400)["message"]
    assert "base model" in assert_error(_load(server, MODEL, adapter_paths[2]), 400)["message"]
    assert_error(server.http.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=AUTH), 400)
    assert_error(server.http.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": "p"}, headers=AUTH), 400)
    unauthorized = httpx.post(f"{server.base}/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "p"})
    assert_error(unauthorized, 401)


@pytest.mark.parametrize("edit, complaint", [
    (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
    (set_config(r=64), r"rank 64, above max_lora_rank \(8\)"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"not a safetensors file"), "(?i)safetensor"),
])
def test_a_bad_adapter_is_refused_with_400_naming_the_problem_and_the_server_goes_on(
    server, adapter_paths, tmp_path, edit, complaint
):
    before = _model_ids(server)
    error = assert_error(_load(server, "bad", broken_copy(adapter_paths[2], tmp_path, edit)), 400)
    assert re.search(complaint, error["message"]), error["message"]
    assert _model_ids(server) == before
    assert_error(server.http.post("/v1/completions", json={"model": "bad", "prompt": "x"}, headers=AUTH), 404)
    assert server.client.completions.create(model="sql", prompt=PROMPT, **GREEDY).usage.completion_tokens == NUM_TOKENS
    assert server.http.get("/health").status_code == 200


def test_a_missing_adapter_directory_is_refused_by_name(server, tmp_path):
    message = assert_error(_load(server, "gone", tmp_path / "nothing-here"), 400)["message"]
    assert "'gone'" in message and "is not a directory" in message


def test_unloading_refuses_new_requests_while_a_running_stream_completes(server, adapter_paths):
    assert _load(server, "doomed", adapter_paths[2]).status_code == 200
    body = {"model": "doomed", "prompt": PROMPT, "max_tokens": 240, "min_tokens": 240, "temperature": 0}
    whole = server.http.post("/v1/completions", json=body, headers=AUTH).json()["choices"][0]["text"]
    base = server.http.post("/v1/completions", json={**body, "model": MODEL}, headers=AUTH).json()["choices"][0]["text"]
    assert whole != base, "the adapter leaves the base model's answer unchanged: the test would be blind"
    events = []
    with server.http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as response:
        lines = (line[len("data: "):] for line in response.iter_lines() if line.startswith("data: "))
        events.append(next(lines))
        response = _unload(server, "doomed")
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'doomed' removed successfully."
        assert server.metric("nanoengine:num_requests_running") == 1, "the stream ended before the unload"
        assert_error(server.http.post("/v1/completions", json=body, headers=AUTH), 404)
        assert_error(_unload(server, "doomed"), 404)
        events += list(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole and chunks[-1]["finish_reason"] == "length"
    assert "doomed" not in _model_ids(server)


# --- the front end's utility calls, against scripted replicas -------------------------------------------------

DIE = object()


class UtilityCore(threading.Thread):
    """A replica's end of the pipe that answers utility calls only: ``answers[method]`` is the
    ``(result, failure)`` it sends back, or ``DIE`` to close the pipe unanswered, as a crashed
    engine process would. ``calls`` records the ``(method, args)`` that came in."""

    def __init__(self, conn, answers: dict) -> None:
        super().__init__(daemon=True)
        self.conn, self.answers = conn, answers
        self.calls: list[tuple] = []

    def run(self) -> None:
        try:
            while True:
                kind, *rest = self.conn.recv()
                if kind == "shutdown":
                    return
                call_id, method, args = rest
                self.calls.append((method, args))
                if self.answers[method] is DIE:
                    return
                self.conn.send(("utility", call_id, *self.answers[method]))
        finally:
            self.conn.close()


def test_a_utility_call_reaches_every_replica_and_any_failure_is_raised(zoo_paths):
    cores, ends = [], []
    for answers in ({"add_lora": (True, None), "remove_lora": (True, None)},
                    {"add_lora": (None, "LoRA adapter 'x' has rank 64, above max_lora_rank (8)"), "remove_lora": DIE}):
        ours, theirs = multiprocessing.Pipe()
        cores.append(UtilityCore(theirs, answers))
        ends.append(ours)
        cores[-1].start()
    healthy, picky = cores
    info = EngineInfo("scripted", AutoTokenizer.from_pretrained(zoo_paths[MODEL]), 256, 320, 64, 4, enable_lora=True)
    engine = AsyncEngine(list(zip(cores, ends)), info)
    lora = LoRARequest("x", 1, "/x")

    def call(coroutine):
        return run_async(asyncio.wait_for(coroutine, TIMEOUT))

    try:
        with pytest.raises(ValueError, match="rank 64"):  # one replica refuses: the caller hears it
            call(engine.add_lora(lora))
        assert healthy.calls == picky.calls == [("add_lora", (lora,))]
        with pytest.raises(RuntimeError, match="engine process stopped"):  # a replica dies mid-call: no hang
            call(engine.remove_lora(1))
        assert call(engine.remove_lora(1)) is True  # only the live replica is asked now
        assert len(healthy.calls) == 3 and len(picky.calls) == 2
        assert engine._calls == {}
    finally:
        engine.shutdown()


def test_a_server_without_enable_lora_refuses_to_load_adapters(zoo_paths):
    info = EngineInfo("base", AutoTokenizer.from_pretrained(zoo_paths[MODEL]), 64, 320, 8, 16)
    app = build_app(SimpleNamespace(info=info, metrics=EngineMetrics))

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            load = await client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"})
            return load, await client.get("/v1/models")

    load, models = run_async(main())
    assert "--enable-lora" in assert_error(load, 400)["message"]
    assert [card["id"] for card in models.json()["data"]] == ["base"]


# --- the command line ------------------------------------------------------------------------------------------


def test_lora_modules_take_name_path_items_and_vllms_json():
    args = build_parser().parse_args(["serve", "m", "--enable-lora", "--max-loras", "3", "--lora-modules", "a=/x",
                                      '{"name": "b", "path": "/y=z"}', "c=/p=q"])
    assert args.lora_modules == [("a", "/x"), ("b", "/y=z"), ("c", "/p=q")]
    kwargs = engine_kwargs(args)
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"]) == (True, 3, 16)
    assert engine_kwargs(build_parser().parse_args(["serve", "m"]))["enable_lora"] is False


@pytest.mark.parametrize("item", ["a", "=/x", "a=", "{not json", '{"name": "a"}', '{"name": "a", "path": "/x", "x": 1}',
                                  '{"name": 1, "path": "/x"}'])
def test_a_malformed_lora_module_is_an_argparse_error(item, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--enable-lora", "--lora-modules", item])
    assert exit_.value.code == 2 and "--lora-modules" in capsys.readouterr().err


def test_lora_modules_without_enable_lora_stop_the_server_before_it_starts(capsys):
    assert main(["serve", "unused-model", "--lora-modules", "a=/x"]) == 2
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err


def test_an_adapter_that_fails_at_start_up_stops_the_server_before_any_port_opens(zoo_paths, adapter_paths):
    """Adapter 1 (rank 4) loads, adapter 2 (rank 8) does not fit ``--max-lora-rank 4``."""
    done = subprocess.run(
        [sys.executable, "-m", "nanoengine", "serve", str(zoo_paths[MODEL]), "--dtype", "float32", "--no-fast-path",
         "--kv-cache-memory", "4MiB", "--enable-lora", "--max-lora-rank", "4",
         "--lora-modules", f"small={adapter_paths[1]}", f"big={adapter_paths[2]}"],
        capture_output=True, text=True, timeout=180,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert f"--lora-modules big={adapter_paths[2]}: LoRA adapter 'big' has rank 8, above max_lora_rank (4)" in output
    assert "Traceback" not in output and "OpenAI API under /v1" not in output  # no port was opened
