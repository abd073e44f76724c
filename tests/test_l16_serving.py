"""Lesson 16: an embedding model behind the OpenAI-compatible server (``POST /v1/embeddings``).

One real ``nanoengine serve all-minilm-l6-v2`` process (the bundled MiniLM, a BERT) serves
the module; the tests talk to it with the official ``openai`` client (which asks for base64
and decodes it) and with raw ``httpx`` (the float form, error bodies). The oracles are
sentence-transformers' own ``encode`` of the same texts and the model's tokenizer (loaded
by transformers) for token counts. Which routes a generative server refuses is checked
in-process, over a stub engine; the refusals of the command line in a real ``serve``.
"""

from __future__ import annotations

import base64
import socket
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from nanoengine.cli import build_parser, main
from nanoengine.engine.async_engine import EngineInfo, EngineMetrics
from nanoengine.model import resolve_model_path
from nanoengine.server.app import build_app
from nanoengine.server.launcher import engine_kwargs
from tests.engines import run_async
from tests.serving import AUTH, Server, assert_error, serving

pytestmark = pytest.mark.l16

MODEL = "all-minilm-l6-v2"
MAX_SEQ_LENGTH = 256  # MiniLM's sentence-transformers limit, below BERT's 512 positions
TEXTS = ["A man is eating food.", "The new movie is awesome!", "Paged attention splits the KV cache into blocks.",
         "Ünïcödé and emoji 🚀 survive tokenization."]


@pytest.fixture(scope="module")
def path():
    return resolve_model_path(MODEL)


@pytest.fixture(scope="module")
def server(path, tmp_path_factory):
    with serving([MODEL, "--dtype", "float32"], tmp_path_factory.mktemp("embed-server") / "server.log") as base:
        running = Server(base, path)
        yield running
        running.http.close()
        running.client.close()


@pytest.fixture(scope="module")
def expected(path) -> np.ndarray:
    """sentence-transformers' vectors of ``TEXTS`` (mean pooling, normalised)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(TEXTS)


def assert_close(ours, theirs) -> None:
    """Each row of ``ours`` points where the row of ``theirs`` does, and is as long."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape
    cosine = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    assert cosine.min() > 1 - 1e-4, cosine
    assert np.abs(ours - theirs).max() < 1e-4


def _embed(server: Server, **body) -> httpx.Response:
    return server.http.post("/v1/embeddings", json=body, headers=AUTH)


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    return np.array([item["embedding"] for item in data], dtype=np.float32)


# --- the happy paths -------------------------------------------------------------------------------------------


def test_the_openai_client_gets_sentence_transformers_vectors(server, expected):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    out = server.client.embeddings.create(model=MODEL, input=TEXTS)  # base64 on the wire, decoded by the client
    assert out.object == "list" and out.model == MODEL
    assert [item.index for item in out.data] == list(range(len(TEXTS)))
    assert all(item.object == "embedding" and len(item.embedding) == 384 for item in out.data)
    assert_close([item.embedding for item in out.data], expected)
    num_tokens = sum(server.prompt_len(text) for text in TEXTS)
    assert out.usage.prompt_tokens == out.usage.total_tokens == num_tokens


def test_float_and_base64_answers_are_the_same_vectors(server, expected):
    floats = _embed(server, input=TEXTS)  # "float" is the server's default
    assert isinstance(floats.json()["data"][0]["embedding"][0], float)
    packed = _embed(server, input=TEXTS, encoding_format="base64", user="someone")  # user: accepted, ignored
    assert packed.status_code == 200, packed.text
    decoded = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in packed.json()["data"]]
    assert np.array_equal(np.stack(decoded), _vectors(floats))
    assert_close(_vectors(floats), expected)
    assert floats.json()["usage"] == packed.json()["usage"]


def test_token_ids_embed_as_their_text_does(server, expected):
    ids = [server.tokenizer(text)["input_ids"] for text in TEXTS]
    as_ids = _vectors(_embed(server, model=MODEL, input=ids))
    assert_close(as_ids, expected)
    assert_close(as_ids, _vectors(_embed(server, model=MODEL, input=TEXTS)))
    one = _embed(server, input=ids[1])  # one list of ids is one input, as one string is
    assert_close(_vectors(one), expected[1:2])
    assert_close(_vectors(_embed(server, input=TEXTS[1])), expected[1:2])
    assert one.json()["usage"]["prompt_tokens"] == len(ids[1])


def test_the_longest_input_the_model_takes_is_embedded(server):
    text = " ".join(["word"] * (MAX_SEQ_LENGTH - 2))  # with [CLS] and [SEP]: exactly the limit
    assert server.prompt_len(text) == MAX_SEQ_LENGTH
    out = server.client.embeddings.create(model=MODEL, input=text)
    assert out.usage.prompt_tokens == MAX_SEQ_LENGTH and np.linalg.norm(out.data[0].embedding) == pytest.approx(1)


def test_the_other_routes_serve_an_embedding_model(server):
    tokenized = server.http.post("/tokenize", json={"prompt": TEXTS[0]}, headers=AUTH).json()
    assert tokenized["tokens"] == server.tokenizer(TEXTS[0])["input_ids"]
    detokenized = server.http.post("/detokenize", json={"tokens": tokenized["tokens"]}, headers=AUTH).json()
    assert "man is eating food" in detokenized["prompt"]
    before = server.metric("nanoengine:prompt_tokens_total")
    _vectors(_embed(server, input=TEXTS[0]))
    assert server.metric("nanoengine:prompt_tokens_total") == before + tokenized["count"]
    assert server.metric("nanoengine:kv_cache_usage_perc") == 0  # no KV cache at all
    assert server.http.get("/health").status_code == 200
    assert server.http.get(f"/v1/models/{MODEL}", headers=AUTH).json()["id"] == MODEL


# --- refusals ---------------------------------------------------------------------------------------------------


def _too_long() -> str:
    return " ".join(["word"] * (MAX_SEQ_LENGTH - 1))


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"input": []}, 400, "input", ["empty"]),
    ({"input": ""}, 400, "input", ["empty"]),
    ({"input": ["fine", ""]}, 400, "input", ["prompt 1", "empty"]),
    ({"input": [[101, 102], []]}, 400, "input", ["prompt 1", "empty"]),
    ({"input": [101, 30522, 102]}, 400, "input", ["vocabulary", "30522"]),
    ({"input": [[101, 102], [-1]]}, 400, "input", ["prompt 1", "vocabulary"]),
    ({"input": ["fine", "__LONG__"]}, 400, "input", ["prompt 1", "257", str(MAX_SEQ_LENGTH)]),
    ({"input": [101] * (MAX_SEQ_LENGTH + 1)}, 400, "input", [str(MAX_SEQ_LENGTH)]),
    ({"input": "fine", "dimensions": 8}, 400, "dimensions", ["dimensions", MODEL]),
    ({"input": "fine", "encoding_format": "int8"}, 400, "encoding_format", ["encoding_format"]),
    ({"input": "fine", "model": "nope"}, 404, "model", ["nope"]),
    ({"input": 5}, 400, "input", ["input"]),
    ({"input": ["fine", 5]}, 400, "input", ["input"]),
    ({}, 400, "input", ["input"]),
])
def test_bad_requests_get_the_right_status_and_name_the_problem(server, body, status, param, words):
    if body.get("input") == ["fine", "__LONG__"]:
        body = {**body, "input": ["fine", _too_long()]}
    error = assert_error(_embed(server, **body), status)
    assert error["param"] == param, error
    assert all(word in error["message"] for word in words), error["message"]


def test_an_embedding_model_does_not_generate(server):
    for route, body in [("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})]:
        error = assert_error(server.http.post(route, json={"model": MODEL, **body}, headers=AUTH), 400)
        assert "embedding model" in error["message"] and "/v1/embeddings" in error["message"], error
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)


def test_bad_requests_do_not_disturb_good_ones(server, expected):
    """Good and bad requests at once: every good one gets its vectors, every bad one its 400,
    and the engine process lives on."""
    bodies = [{"input": TEXTS} if i % 2 == 0 else {"input": [[101, 10**6]]} for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda body: httpx.post(f"{server.base}/v1/embeddings", json=body, headers=AUTH,
                                                          timeout=60), bodies))
    for body, response in zip(bodies, responses):
        if body["input"] == TEXTS:
            assert_close(_vectors(response), expected)
        else:
            assert "vocabulary" in assert_error(response, 400)["message"]
    assert server.http.get("/health").status_code == 200
    assert_close(server.client.embeddings.create(model=MODEL, input=TEXTS[:1]).data[0].embedding, expected[0])


# --- a generative server, and the command line --------------------------------------------------------------------


def test_a_generative_server_refuses_embeddings(path):
    """Over a stub engine with no ``embed``: the route must refuse before it asks the engine."""
    info = EngineInfo("generator", AutoTokenizer.from_pretrained(path), 64, 30522, 8, 16)
    app = build_app(SimpleNamespace(info=info, metrics=EngineMetrics))

    async def post(body: dict) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.post("/v1/embeddings", json=body)

    error = assert_error(run_async(post({"input": "Hello"})), 400)
    assert "generator generates text" in error["message"] and "--task embed" in error["message"]
    assert error["param"] == "model"
    assert_error(run_async(post({"input": "Hello", "model": "nope"})), 404)


def test_serve_takes_a_task():
    assert engine_kwargs(build_parser().parse_args(["serve", MODEL]))["task"] == "auto"
    assert engine_kwargs(build_parser().parse_args(["serve", MODEL, "--task", "embed"]))["task"] == "embed"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", MODEL, "--task", "classify"])


@pytest.mark.parametrize(("flags", "words"), [
    (["--data-parallel-size", "2"], ["embedding model", "data_parallel_size must be 1"]),
    (["--enable-lora"], ["LoRA"]),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], ["speculative"]),
])
def test_an_embedding_model_refuses_what_it_cannot_run_before_any_port_opens(flags, words, capsys):
    with socket.socket() as taken:  # a server that got as far as its port would fail to bind it, not hang
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", MODEL, "--dtype", "float32", "--port", port, *flags]) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words) and "Traceback" not in err, err
