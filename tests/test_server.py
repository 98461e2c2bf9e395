"""The HTTP server over real sockets: a uvicorn server on 127.0.0.1 serving a tiny random model, driven by the
official `openai` client and by httpx - completions, streaming, stop sequences, seeds, 16 concurrent clients
batched together, malformed requests (never a 5xx), a bounded queue, dropped clients, the API key - and
device_sample.py end to end."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sampling import SEQ, SHAPE, tiny_params, tiny_tokenizer

from mesh_transformer.engine import Generator
from mesh_transformer.sampling import Row, SamplingParams
from mesh_transformer.serving import ServerOptions, build_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny-gptj"
# Prompts and max_tokens stay small (<= 16 tokens each) and batches run at sizes 1 or 16, so the whole file
# compiles a few shapes (shared with test_sampling.py).
BATCH_SIZES = (1, 16)


class RunningServer:
    """A uvicorn server on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, generator: Generator, **options):
        self.generator = generator
        self.app = build_app(generator, ServerOptions(model_name=MODEL, complete_max_tokens=16, **options))
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


def make_generator(params, tokenizer) -> Generator:
    return Generator(SHAPE, params, seq=SEQ, tokenizer=tokenizer, chunk_tokens=8, batch_sizes=BATCH_SIZES)


@pytest.fixture(scope="module")
def server(params, tokenizer):
    running = RunningServer(make_generator(params, tokenizer))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(server: RunningServer, prompt: str, **settings) -> str:
    """The completion the generator gives this request on its own (offline, batch of one)."""
    ids = server.generator.tokenizer.encode(prompt).ids
    return server.generator.generate([Row(ids, SamplingParams(**settings))])[0].text


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


def test_seed_repeats_and_n_choices_differ(client):
    request = dict(model=MODEL, prompt=["fox", "dog"], max_tokens=12, temperature=1.0, seed=7, n=2)
    first, second = client.completions.create(**request), client.completions.create(**request)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts[0] != texts[1] and texts[2] != texts[3]
    other_seed = client.completions.create(**{**request, "seed": 8})
    assert [c.text for c in other_seed.choices] != texts


def test_sixteen_concurrent_clients_are_batched_and_each_gets_its_own_answer(server):
    requests = [
        {
            "prompt": f"{word} {i}",
            "max_tokens": 4 + i % 13,
            "temperature": [0.0, 0.7, 1.0, 1.3][i % 4],
            "top_p": [1.0, 0.9][i % 2],
            "top_k": [0, 0, 5][i % 3],
            "seed": 1000 + i,
        }
        for i, word in enumerate(["Hello", "fox", "def", "world"] * 4)
    ]
    expected = [alone(server, r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    batches_before = server.app.state.batcher.batches

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=r) for r in requests))

    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    assert server.app.state.batcher.batches - batches_before < 16  # some requests shared a generation call


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
    "max_tokens": st.integers(-3, 16) | st.integers(10**3, 10**20) | JSON_VALUES,
    "temperature": st.floats(-2, 3) | JSON_VALUES,
    "top_p": st.floats(-1, 2) | JSON_VALUES,
    "top_k": st.integers(-5, 10**12) | JSON_VALUES,
    "n": st.integers(-1, 3) | st.integers(65, 10**6) | JSON_VALUES,
    "seed": st.integers(-(10**30), 10**30) | JSON_VALUES,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES,
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
@given(path=st.sampled_from(["/v1/completions", "/complete"]), body=BODIES)
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
    "body,status,words",
    [
        ("{not json", 400, "JSON"),
        ('{"prompt": "a", "max_tokens": "ten"}', 400, "max_tokens"),
        ('{"prompt": ""}', 400, "prompt is empty"),
        ('{"prompt": []}', 400, "prompt is empty"),
        ('{"prompt": "%s"}' % ("word " * 200), 400, "context of 128"),
        ('{"prompt": "a", "max_tokens": 500}', 400, "context of 128"),
        ('{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
        ('{"prompt": "a", "model": "gpt-4"}', 400, "tiny-gptj"),
        ('{"prompt": [7, 300]}', 400, "prompt ids"),
    ],
)
def test_bad_requests_name_the_problem_and_the_server_keeps_serving(server, client, body, status, words):
    response = httpx.post(
        f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text is not None


def test_extreme_but_valid_values_are_served(server):
    for extra in (
        {"top_k": 10**12},
        {"seed": -(10**30)},
        {"temperature": 1e308},
        {"top_p": 1e-300},
        {"n": 3},
    ):
        response = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2, **extra}, timeout=60
        )
        assert response.status_code == 200, (extra, response.text)
        assert all(c["text"] is not None for c in response.json()["choices"])


def test_models_health_and_the_original_complete_route(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    response = httpx.post(
        f"{server.url}/complete", json={"context": "Hello", "top_p": 0.9, "temp": 0.0}, timeout=60
    )
    assert response.status_code == 200
    assert response.json()["completion"] == alone(server, "Hello", max_tokens=16, temperature=0.0, top_p=0.9)


class GatedGenerator:
    """Wraps a generator: each generate call first waits for `gate`; the results are kept in `results`, and
    `pause_s` is slept after every streamed piece of text (so that a client can leave mid-generation)."""

    def __init__(self, generator: Generator, pause_s: float = 0.0):
        self.inner, self.pause_s = generator, pause_s
        self.gate, self.started = threading.Event(), threading.Event()
        self.results: list = []
        self.tokenizer, self.seq = generator.tokenizer, generator.seq

    def check(self, row: Row) -> None:
        self.inner.check(row)

    def generate(self, rows, on_text=None, cancelled=None):
        self.started.set()
        self.gate.wait(timeout=60)

        def slow_on_text(i, delta):
            on_text(i, delta)
            time.sleep(self.pause_s)

        results = self.inner.generate(rows, on_text=slow_on_text, cancelled=cancelled)
        self.results.extend(results)
        return results


def test_full_queue_answers_503_with_retry_after(params, tokenizer):
    gated = GatedGenerator(make_generator(params, tokenizer))
    running = RunningServer(gated, max_queue=2, max_batch_wait_s=0.0)
    try:
        body = {"prompt": "Hello", "max_tokens": 2}
        with httpx.Client(base_url=running.url, timeout=120) as http:
            first = threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": body})
            first.start()
            assert gated.started.wait(60)  # the first request is being generated (held at the gate)
            queued = [
                threading.Thread(target=http.post, args=("/v1/completions",), kwargs={"json": body})
                for _ in range(2)
            ]
            for t in queued:
                t.start()
            deadline = time.monotonic() + 60
            while running.app.state.batcher.queued < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "busy" in refused.json()["error"]["message"]
            gated.gate.set()
            for t in [first, *queued]:
                t.join(timeout=120)
            assert http.post("/v1/completions", json=body).status_code == 200
        assert len(gated.results) == 4
    finally:
        gated.gate.set()
        running.close()


def test_clients_that_leave_are_dropped_from_their_batch(params, tokenizer):
    gated = GatedGenerator(make_generator(params, tokenizer), pause_s=1.0)
    running = RunningServer(gated)
    try:
        gated.gate.set()
        body = {"prompt": "Hello", "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))  # first text, then hang up
        deadline = time.monotonic() + 60
        while not gated.results:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert gated.results[0].finish_reason == "cancelled" and gated.results[0].generated_tokens < 16

        gated.gate.clear()
        gated.started.clear()
        with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up while waiting
            httpx.post(f"{running.url}/v1/completions", json={**body, "stream": False}, timeout=2.0)
        assert gated.started.is_set()
        time.sleep(0.5)  # the server notices the closed connection (it polls every 50 ms)
        gated.gate.set()
        while len(gated.results) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert gated.results[1].finish_reason == "cancelled"
    finally:
        gated.gate.set()
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


def test_device_sample_script_completes_a_prompt_from_a_checkpoint(tmp_path, params, tokenizer, server):
    from mesh_transformer.checkpoint import save_params

    config = {
        "layers": SHAPE.layers,
        "d_model": SHAPE.d_model,
        "n_heads": SHAPE.n_heads,
        "n_vocab": SHAPE.n_vocab,
        "pe_rotary_dims": SHAPE.rotary_dims,
        "seq": SEQ,
        "compute_dtype": "float32",
        "remat": "none",
        "name": "tiny",
        "model_dir": str(tmp_path / "run"),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_params(str(tmp_path / "run" / "step_5"), params)  # the newest checkpoint of the config's model_dir
    (tmp_path / "run" / "dataset").mkdir()
    tokenizer.save(str(tmp_path / "run" / "dataset" / "tokenizer.json"))  # where training leaves it
    script = [
        sys.executable,
        os.path.join(REPO, "device_sample.py"),
        "--config",
        str(tmp_path / "config.json"),
    ]
    done = subprocess.run(
        [*script, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello" + alone(server, "Hello", max_tokens=8, temperature=0) + "\n"

    port = free_port()
    serving = subprocess.Popen(
        [*script, "--serve", "--port", str(port)],
        env={**os.environ, "MESH_TRANSFORMER_API_KEY": "k3y"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while True:  # loading and compiling take a while in a fresh process
            assert serving.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        auth = {"Authorization": "Bearer k3y"}
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 401
        answer = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120).json()
        assert answer["model"] == "tiny" and answer["choices"][0]["text"] == done.stdout[len("Hello") : -1]
    finally:
        serving.terminate()
        serving.wait(timeout=60)

    missing = subprocess.run(
        [*script, "--ckpt", str(tmp_path / "nowhere"), "--prompt", "a"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.count("\n") == 1
        and missing.stderr.startswith("error:")
        and "nowhere" in missing.stderr
    )
