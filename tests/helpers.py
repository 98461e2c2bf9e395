"""Small pieces several test files share: a tiny model's config keys, a free loopback port, a local GCS
emulator, and one greedy request to `device_sample.py --serve`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# The model most config-driven tests train: small enough for seconds per step on 8 fake CPU devices.
TINY_MODEL = dict(layers=2, d_model=64, n_heads=4, n_vocab=384, seq=16, pe_rotary_dims=8)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator(log_dir: Path, *buckets: str) -> Iterator[str]:
    """A gcp-storage-emulator on 127.0.0.1 (in memory) holding the empty `buckets`, with
    STORAGE_EMULATOR_HOST pointing at it while the context lasts; yields its http://host:port."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from mesh_transformer import storage

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_dir / "emulator.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
            + ["--port", str(port), "--in-memory", "--quiet"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        old = os.environ.get("STORAGE_EMULATOR_HOST")
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"GCS emulator did not start; see {log.name}") from None
                    time.sleep(0.1)
            os.environ["STORAGE_EMULATOR_HOST"] = url
            storage.gcs_client.cache_clear()
            client = gcs.Client(project="test", credentials=AnonymousCredentials())
            for bucket in buckets:
                client.create_bucket(bucket)
            yield url
        finally:
            storage.gcs_client.cache_clear()
            if old is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old
            proc.terminate()
            proc.wait(timeout=10)


def serve_one_greedy_request(command: list[str], model: str, prompt_ids: list[int], max_tokens: int) -> str:
    """Start `command --serve` (a device_sample.py command line) on a free port, wait for /health, send one
    greedy /v1/completions request of `prompt_ids` with the openai client, stop the server; its text."""
    import httpx
    import openai

    port = free_port()
    serving = subprocess.Popen(
        [*command, "--serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while True:  # loading and compiling take a while in a fresh process
            assert serving.poll() is None, serving.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        answer = client.completions.create(
            model=model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0
        )
        assert answer.usage.completion_tokens == max_tokens
        return answer.choices[0].text
    finally:
        serving.terminate()
        serving.wait(timeout=60)
