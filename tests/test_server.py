"""The HTTP server over real sockets: a uvicorn server on 127.0.0.1 serving a tiny random model, driven by the
official `openai` client and by httpx - completions, streaming, stop sequences, seeds, logprobs and echo
against a full forward pass, chat completions against transformers' chat template, 32 concurrent clients
batched continuously, malformed requests (never a 5xx), the body limit, a bounded queue, dropped clients, a
failing generation, a dead engine, the API key - and device_sample.py end to end."""

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sampling import SEQ, SHAPE, full_logits, tiny_params, tiny_tokenizer

from mesh_transformer.engine import Generator
from mesh_transformer.sampling import Row, SamplingParams
from mesh_transformer.serving import ServerOptions, build_app
from mesh_transformer.serving.chat import load_chat_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny-gptj"
# Prompts and max_tokens stay small (<= 16 tokens each) and arrivals are prefilled in batches of 1 or 16,
# so the whole file compiles a few shapes (shared with test_sampling.py).
BATCH_SIZES = (1, 16)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# The config of test_sampling's tiny model (SHAPE, SEQ), for the scripts.
TINY_CONFIG = {
    "layers": SHAPE.layers,
    "d_model": SHAPE.d_model,
    "n_heads": SHAPE.n_heads,
    "n_vocab": SHAPE.n_vocab,
    "pe_rotary_dims": SHAPE.rotary_dims,
    "seq": SEQ,
    "compute_dtype": "float32",
    "remat": "none",
    "name": "tiny",
}


class RunningServer:
    """A uvicorn server on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, generator: Generator, **options):
        self.generator = generator
        self.app = build_app(generator, ServerOptions(model_name=MODEL, complete_max_tokens=16, **options))
        self.worker = self.app.state.worker
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    """The tokenizer as a transformers folder: tokenizer.json and a tokenizer_config.json with a template."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def make_generator(params, tokenizer, **options) -> Generator:
    return Generator(
        SHAPE, params, seq=SEQ, tokenizer=tokenizer, chunk_tokens=8, batch_sizes=BATCH_SIZES, **options
    )


@pytest.fixture(scope="module")
def server(params, tokenizer, tokenizer_dir):
    template = load_chat_template(tokenizer, tokenizer_path=str(tokenizer_dir / "tokenizer.json"))
    running = RunningServer(make_generator(params, tokenizer), chat_template=template)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(server: RunningServer, prompt: str | list[int], **settings) -> str:
    """The completion the generator gives this request on its own (offline, batch of one)."""
    ids = prompt if isinstance(prompt, list) else server.generator.tokenizer.encode(prompt).ids
    return server.generator.generate([Row(ids, SamplingParams(**settings))])[0].text


def post(server: RunningServer, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120, **kwargs)


def test_openai_client_completion_with_usage(server, client, tokenizer):
    response = client.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=8, temperature=0, seed=1
    )
    assert response.object == "text_completion" and response.model == MODEL
    (choice,) = response.choices
    assert choice.text == alone(server, "Hello world", max_tokens=8, temperature=0)
    assert choice.finish_reason in ("length", "stop") and choice.index == 0
    prompt_tokens = len(tokenizer.encode("Hello world").ids)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    assert 1 <= response.usage.completion_tokens <= 8


def test_streaming_gives_the_same_text_and_ends_with_done(server, client):
    request = dict(model=MODEL, prompt="The quick", max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
    whole = client.completions.create(**request).choices[0]
    chunks = list(client.completions.create(**request, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**request, "stream": True}, timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stream_usage_when_asked(server):
    body = {"prompt": "Hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_stop_sequences(server, client):
    full = (
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    )
    stop = full[5:8]
    response = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stop=[stop]
    )
    assert response.choices[0].text == full[: full.find(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]


def test_seeds_repeat_and_every_prompt_and_choice_draws_its_own_noise(client):
    request = dict(model=MODEL, prompt=["fox", "fox", "dog"], max_tokens=12, temperature=1.0, seed=7, n=2)
    first, second = client.completions.create(**request), client.completions.create(**request)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == list(range(6))
    assert len(set(texts)) == 6  # the same prompt twice, and two choices of each: six draws
    other_seed = client.completions.create(**{**request, "seed": 8})
    assert [c.text for c in other_seed.choices] != texts


def test_thirty_two_concurrent_clients_are_batched_continuously_and_each_gets_its_own_answer(server):
    words = ["Hello", "fox", "def add(a, b):", "The quick brown fox jumps", "Ünïcödé"]
    requests = [
        {
            "prompt": f"{words[i % 5]} {i}",
            "max_tokens": [2, 16, 5, 11, 1, 8][i % 6],
            "temperature": [0.0, 0.7, 1.0, 1.3][i % 4],
            "top_p": [1.0, 0.9][i % 2],
            "top_k": [0, 0, 5][i % 3],
            "seed": 1000 + i,
        }
        for i in range(32)
    ]
    expected = [alone(server, r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    calls_before = server.worker.engine.device_calls

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=r) for r in requests))

    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 32
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    # One request alone needs a prefill and a decode call per 8 tokens; 32 of them batched far fewer in all.
    alone_calls = sum(1 + -(-(r["max_tokens"] - 1) // 8) for r in requests)
    assert server.worker.engine.device_calls - calls_before < alone_calls / 2


def test_logprobs_and_echo_are_the_full_forward_pass(server, params, tokenizer):
    prompt = tokenizer.encode("The quick brown fox").ids
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    generated = server.generator.generate([Row(prompt, SamplingParams(max_tokens=6, temperature=0))])[0]
    ids = prompt + generated.token_ids + [0] * (generated.finish_reason == "stop")  # EOS is id 0
    assert len(logprobs["tokens"]) == len(ids) == len(prompt) + generated.generated_tokens
    expected = np.asarray(jax.nn.log_softmax(full_logits(params, ids), axis=-1))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    np.testing.assert_allclose(
        logprobs["token_logprobs"][1:], [expected[t - 1, ids[t]] for t in range(1, len(ids))], atol=1e-4
    )
    # Token texts (partial UTF-8 characters as "bytes:\\xNN") add up to the text, as OpenAI's do.
    as_bytes = lambda t: bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()  # noqa: E731
    assert b"".join(map(as_bytes, logprobs["tokens"])).decode(errors="replace") == choice["text"]
    for t in range(1, len(ids)):
        best = np.argsort(-expected[t - 1, :300])[:3]
        top = logprobs["top_logprobs"][t]
        assert len(top) >= 3  # three alternatives (and the chosen token), each its own text
        np.testing.assert_allclose(sorted(top.values(), reverse=True)[:3], expected[t - 1, best], atol=1e-4)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(choice["text"])
    assert choice["text"][offsets[1] :].startswith(tokenizer.decode(ids[1:]))

    scored = post(server, "/v1/completions", {**body, "max_tokens": 0, "logprobs": 1}).json()
    choice = scored["choices"][0]
    assert choice["text"] == tokenizer.decode(prompt) and scored["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][: len(prompt)]
    plain = post(server, "/v1/completions", {**body, "echo": False}).json()["choices"][0]
    assert plain["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][len(prompt) :]
    assert plain["logprobs"]["text_offset"][0] == 0


def test_chat_completions_render_the_tokenizer_template_as_transformers_does(server, client, tokenizer_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    rendered = AutoTokenizer.from_pretrained(str(tokenizer_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = alone(server, list(rendered), max_tokens=10, temperature=0)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(rendered)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError, match="unknown role tool"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}], max_tokens=2
        )


def test_chat_without_a_template_is_one_clear_400(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        response = post(running, "/v1/chat/completions", body)
        assert response.status_code == 400 and "--chat-template" in response.json()["error"]["message"]
    finally:
        running.close()


# Integers that could be valid stay <= 16 and texts short, so that requests which do pass validation
# generate within the shapes the other tests compiled.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 16)
    | st.integers(min_value=10**3)
    | st.floats(allow_nan=False)
    | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
FIELDS = {
    "prompt": st.text(max_size=4)
    | st.lists(st.text(max_size=3), max_size=3)
    | st.lists(st.integers(-5, 400), max_size=4)
    | JSON_VALUES,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "bot", "tool"]), "content": st.text(max_size=3)}
        )
    )
    | JSON_VALUES,
    "max_tokens": st.integers(-3, 16) | st.integers(10**3, 10**20) | JSON_VALUES,
    "temperature": st.floats(-2, 3) | JSON_VALUES,
    "top_p": st.floats(-1, 2) | JSON_VALUES,
    "top_k": st.integers(-5, 10**12) | JSON_VALUES,
    "n": st.integers(-1, 3) | st.integers(65, 10**6) | JSON_VALUES,
    "seed": st.integers(-(10**30), 10**30) | JSON_VALUES,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES,
    "logprobs": st.integers(-1, 6) | st.booleans() | JSON_VALUES,
    "echo": st.booleans() | JSON_VALUES,
    "model": st.sampled_from([MODEL, "other"]) | JSON_VALUES,
    "context": st.text(max_size=4) | JSON_VALUES,
    "temp": st.floats(-1, 2) | JSON_VALUES,
}
BODIES = (
    st.fixed_dictionaries({}, optional=FIELDS).map(json.dumps)
    | JSON_VALUES.map(json.dumps)
    | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
    | st.sampled_from(
        ['{"prompt": "a", "temperature": NaN}', '{"prompt": "\\ud800"}', '{"prompt": "x" ', "", "[]"]
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/complete"]), body=BODIES)
def test_malformed_requests_get_a_4xx_never_a_5xx(server, path, body):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        response = http.post(
            path, content=body.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}
        )
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert 400 <= response.status_code < 500 and response.json()["error"]["message"]
        else:
            for event in response.text.split("\n\n"):  # a stream ends with [DONE]; a JSON body parses
                assert not event.startswith('data: {"error"')
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "path,body,words",
    [
        ("/v1/completions", "{not json", "JSON"),
        ("/v1/completions", '{"prompt": "a", "max_tokens": "ten"}', "max_tokens"),
        ("/v1/completions", '{"prompt": ""}', "prompt"),
        ("/v1/completions", '{"prompt": []}', "prompt"),
        ("/v1/completions", '{"prompt": "%s"}' % ("word " * 200), "context of 128"),
        ("/v1/completions", '{"prompt": "a", "max_tokens": 500}', "max_tokens"),
        ("/v1/completions", '{"prompt": "%s", "max_tokens": 100}' % ("a " * 30), "context of 128"),
        ("/v1/completions", '{"prompt": "a", "temperature": -0.5}', "temperature"),
        ("/v1/completions", '{"prompt": "a", "model": "gpt-4"}', "tiny-gptj"),
        ("/v1/completions", '{"prompt": [7, 300]}', "prompt"),
        ("/v1/completions", '{"prompt": "a", "logprobs": 6}', "logprobs"),
        ("/v1/completions", '{"prompt": "a", "suffix": "b"}', "suffix"),
        ("/v1/completions", '{"prompt": ["a", "b"], "n": 40}', "prompts x n is 80"),
        ("/v1/chat/completions", '{"messages": []}', "messages"),
        ("/v1/chat/completions", '{"messages": [{"role": "bot", "content": "a"}]}', "role"),
        ("/complete", '{"context": "a", "temp": -1}', "temp"),
        ("/complete", '{"context": "a", "top_p": 0}', "top_p"),
        ("/complete", '{"context": ""}', "context"),
        ("/complete", '{"context": "%s"}' % ("word " * 200), "context of 128"),
    ],
)
def test_bad_requests_name_the_problem_and_the_server_keeps_serving(server, client, path, body, words):
    response = post(server, path, body)
    assert response.status_code == 400
    assert words in response.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text is not None


def test_extreme_but_valid_values_equal_their_limits(server):
    def texts(**extra) -> list[str]:
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "seed": 3, **extra}
        response = post(server, "/v1/completions", body)
        assert response.status_code == 200, (extra, response.text)
        return [c["text"] for c in response.json()["choices"]]

    greedy = texts(temperature=0)
    assert texts(top_p=1e-300) == greedy  # the nucleus holds the likeliest token alone
    assert texts(top_k=1) == greedy
    assert texts(top_k=10**12) == texts(top_k=0) != greedy  # a top-k past the vocabulary is no top-k
    assert texts(top_k=300) == texts(top_k=0)
    assert texts(temperature=1e308) == texts(temperature=1e6)  # both a uniform draw
    three = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 4, "seed": 1, "n": 3}).json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in three["choices"]}) == 3
    assert texts(seed=-(10**30)) == texts(seed=-(10**30))


def test_models_health_openapi_and_the_original_complete_route(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    response = post(server, "/complete", {"context": "Hello", "top_p": 0.9, "temp": 0.0})
    assert response.status_code == 200
    assert response.json()["completion"] == alone(server, "Hello", max_tokens=16, temperature=0.0, top_p=0.9)

    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = schema["components"]["schemas"][body["$ref"].split("/")[-1]]["properties"]
    integer = lambda field: next(s for s in request[field]["anyOf"] if s.get("type") == "integer")  # noqa: E731
    assert integer("max_tokens") == {"type": "integer", "minimum": 0, "maximum": SEQ - 1}
    assert integer("n")["maximum"] == 64 and integer("logprobs")["maximum"] == 5
    assert {"const": MODEL, "type": "string"} in request["model"]["anyOf"]
    answers = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "413", "500", "503"} <= set(answers) and "422" not in answers


def cheap(case):
    """A generated case with at most 4 new tokens and 4 choices (the schema allows 127 and 64): as valid, and
    many more of them fit the test's time."""
    if isinstance(case.body, dict):
        for field, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 4)):
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                case.body[field] = most
    return case


def test_schema_driven_fuzzing_finds_no_server_error(server):
    """schemathesis reads /openapi.json and sends what it allows, and what it forbids, to every route."""
    import schemathesis
    from hypothesis import Phase
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    answered = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        has_body = operation.method.upper() == "POST"
        for mode in GenerationMode if has_body else [GenerationMode.POSITIVE]:  # a GET here has no input

            @given(case=operation.as_strategy(generation_mode=mode).map(cheap))
            @settings(max_examples=40 if has_body else 3, deadline=None, phases=[Phase.generate])
            def fuzz(case):
                response = case.call(timeout=120)
                answered[(case.path, response.status_code)] += 1
                case.validate_response(response, checks=[not_a_server_error])

            fuzz()
    for path in ("/v1/completions", "/v1/chat/completions", "/complete"):  # it generated and ran requests
        assert answered[(path, 200)] > 0 and answered[(path, 400)] > 0, answered
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_request_bodies_over_the_limit_get_413(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer), max_body_bytes=1000)
    try:
        big = {"prompt": "a", "user": "x" * 2000}
        response = post(running, "/v1/completions", big)
        assert response.status_code == 413 and response.json()["error"]["message"]
        chunked = httpx.post(  # no Content-Length: counted as it arrives
            f"{running.url}/v1/completions",
            content=iter([json.dumps(big).encode()]),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert chunked.status_code == 413
        assert post(running, "/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200
    finally:
        running.close()


class SlowTokenizer:
    """A tokenizer whose encode takes `delay_s` (and releases the GIL meanwhile, as the real one does)."""

    def __init__(self, tokenizer, delay_s: float):
        self.inner, self.delay_s = tokenizer, delay_s

    def encode(self, text, **kwargs):
        time.sleep(self.delay_s)
        return self.inner.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenizing_runs_off_the_event_loop(params, tokenizer):
    generator = make_generator(params, tokenizer)
    generator.tokenizer = SlowTokenizer(tokenizer, delay_s=2.0)
    running = RunningServer(generator)
    try:
        slow = threading.Thread(
            target=post, args=(running, "/v1/completions", {"prompt": "a", "max_tokens": 1})
        )
        slow.start()
        time.sleep(0.3)  # the request is being tokenized
        t0 = time.monotonic()
        assert httpx.get(f"{running.url}/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.0  # not stuck behind the 2 s encode
        slow.join(timeout=60)
    finally:
        running.close()


def gate(worker, before_step=None):
    """Make the worker's engine wait for the returned event before each step (then call `before_step`)."""
    opened, step = threading.Event(), worker.engine.step

    def gated_step():
        opened.wait(timeout=60)
        if before_step is not None:
            before_step()
        step()

    worker.engine.step = gated_step
    return opened


def test_full_queue_answers_503_with_retry_after(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer), max_queue=2)
    opened = gate(running.worker)
    try:
        body = {"prompt": "Hello", "max_tokens": 2}
        with httpx.Client(base_url=running.url, timeout=120) as http:
            waiting = [
                threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": body})
                for _ in range(2)
            ]
            for t in waiting:
                t.start()
            deadline = time.monotonic() + 60
            while running.worker.queued < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "busy" in refused.json()["error"]["message"]
            opened.set()
            for t in waiting:
                t.join(timeout=120)
            assert http.post("/v1/completions", json=body).status_code == 200
    finally:
        opened.set()
        running.close()


class Recorder:
    """Wraps the engine's listeners to keep every completion it reports."""

    def __init__(self, engine):
        self.completions: list = []
        add = engine.add

        def recording_add(row, listener):
            on_done = listener.on_done
            listener.on_done = lambda completion: (self.completions.append(completion), on_done(completion))
            add(row, listener)

        engine.add = recording_add


def test_clients_that_leave_are_dropped_from_their_batch(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer))
    recorder = Recorder(running.worker.engine)
    opened = gate(running.worker, before_step=lambda: time.sleep(0.3))  # about 8 tokens per 0.3 s
    opened.set()
    try:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))  # first text, then hang up
        deadline = time.monotonic() + 60
        while not recorder.completions:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert recorder.completions[0].finish_reason == "cancelled"
        assert recorder.completions[0].generated_tokens < 100

        opened.clear()
        with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up while waiting
            httpx.post(f"{running.url}/v1/completions", json={**body, "stream": False}, timeout=2.0)
        opened.set()
        while len(recorder.completions) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert recorder.completions[1].finish_reason == "cancelled"
    finally:
        opened.set()
        running.close()


def test_a_failure_inside_generation_answers_that_request_500_and_the_others_go_on(
    server, tokenizer, monkeypatch
):
    poison = tokenizer.encode("fox").ids[0]
    engine = server.worker.engine
    insert = engine._run_insert

    def failing_insert(size, state, count, tokens_AP, *args):
        if poison in np.asarray(tokens_AP):
            raise RuntimeError("injected prefill failure")
        return insert(size, state, count, tokens_AP, *args)

    monkeypatch.setattr(engine, "_run_insert", failing_insert)
    long_body = {"prompt": "Hello", "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))  # generating now
        failed = post(server, "/v1/completions", {"prompt": "fox", "max_tokens": 4})
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert failed.status_code == 500
    assert "injected prefill failure" in failed.json()["error"]["message"]
    streamed = json.loads(first[6:])["choices"][0]["text"] + "".join(e["choices"][0]["text"] for e in rest)
    assert streamed == alone(server, "Hello", max_tokens=16, temperature=0)

    decode, calls = engine._run_decode, []

    def failing_decode(*args):  # the state is donated, then the call fails: all of it is lost
        calls.append(1)
        result = decode(*args)
        if len(calls) == 1:
            jax.block_until_ready(result)
            raise RuntimeError("injected decode failure")
        return result

    monkeypatch.setattr(engine, "_run_decode", failing_decode)
    failed = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 16})
    assert failed.status_code == 500 and "injected decode failure" in failed.json()["error"]["message"]
    ok = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 16, "temperature": 0})
    assert ok.json()["choices"][0]["text"] == alone(server, "Hello", max_tokens=16, temperature=0)


def test_a_dead_engine_makes_health_503_and_requests_fail_at_once(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer))
    try:

        def broken_step():
            raise RuntimeError("injected scheduler bug")

        opened = gate(running.worker)
        running.worker.engine.step = broken_step
        opened.set()
        waiting = post(running, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        assert waiting.status_code == 500 and "injected scheduler bug" in waiting.json()["error"]["message"]
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and "injected scheduler bug" in health.json()["error"]
        t0 = time.monotonic()
        refused = post(running, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        assert refused.status_code == 503 and "engine stopped" in refused.json()["error"]["message"]
        assert time.monotonic() - t0 < 5
    finally:
        running.close()


def test_api_key_is_enforced_when_set(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer), api_key="s3cret")
    try:
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        assert (
            httpx.get(f"{running.url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        assert httpx.post(f"{running.url}/complete", json={"context": "a"}).status_code == 401
        good = httpx.get(f"{running.url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="wrong", max_retries=0).completions.create(
                model=MODEL, prompt="a", max_tokens=2
            )
        authorised = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert (
            authorised.completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens >= 1
        )
    finally:
        running.close()


def write_run(tmp_path, params, tokenizer) -> list[str]:
    """A config, a checkpoint in its model_dir and the run's tokenizer; the device_sample.py command."""
    from mesh_transformer.checkpoint import save_params

    config = {**TINY_CONFIG, "model_dir": str(tmp_path / "run")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_params(str(tmp_path / "run" / "step_5"), params)  # the newest checkpoint of the config's model_dir
    (tmp_path / "run" / "dataset").mkdir()
    tokenizer.save(str(tmp_path / "run" / "dataset" / "tokenizer.json"))  # where training leaves it
    return [sys.executable, os.path.join(REPO, "device_sample.py"), "--config", str(tmp_path / "config.json")]


@pytest.mark.slow
def test_device_sample_script_completes_and_serves_completions_and_chat(tmp_path, params, tokenizer, server):
    script = write_run(tmp_path, params, tokenizer)
    done = subprocess.run(
        [*script, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello" + alone(server, "Hello", max_tokens=8, temperature=0) + "\n"

    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    port = free_port()
    serving = subprocess.Popen(
        # One slot: the fewest programs for the server to compile before it serves.
        [
            *script,
            "--serve",
            "--port",
            str(port),
            "--max-batch",
            "1",
            "--chat-template",
            str(tmp_path / "chat.jinja"),
        ],
        env={**os.environ, "MESH_TRANSFORMER_API_KEY": "k3y"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while True:  # loading and compiling every program take a while in a fresh process
            assert serving.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=120)
        answer = client.completions.create(model="tiny", **body)
        assert answer.model == "tiny" and answer.choices[0].text == done.stdout[len("Hello") : -1]
        messages = [{"role": "user", "content": "Hello world"}]
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        same_template = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)  # in process
        expected = same_template.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0
        )
        assert chat.choices[0].message.content == expected.choices[0].message.content
    finally:
        serving.terminate()
        serving.wait(timeout=60)

    for bad, words in (
        (["--ckpt", str(tmp_path / "nowhere"), "--prompt", "a"], "nowhere"),
        (["--serve", "--chat-template", str(tmp_path / "none.jinja")], "none.jinja"),
    ):
        missing = subprocess.run([*script, *bad], capture_output=True, text=True, timeout=300)
        assert missing.returncode == 1
        assert (
            missing.stderr.count("\n") == 1
            and missing.stderr.startswith("error:")
            and words in missing.stderr
        )
