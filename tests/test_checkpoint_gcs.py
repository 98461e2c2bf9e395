"""Checkpoints on gs://: round trip, retention, slim and damage against a local GCS emulator, and retries
through a proxy that answers some requests with 503."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Container, Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from helpers import gcs_emulator
from test_checkpoint import assert_trees_equal, host_state, make_mesh, place, target_for

from mesh_transformer.checkpoint import CheckpointError, CheckpointManager, load_params, slim_checkpoint

pytestmark = pytest.mark.slow
BUCKET = "ckpt-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A GCS emulator holding an empty bucket; yields its http://host:port."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as url:
        yield url


def _blob(name: str) -> storage.Blob:
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    return client.bucket(BUCKET).blob(name)


def test_gcs_round_trip_with_retention_and_resharding(emulator: str) -> None:
    model_dir = f"gs://{BUCKET}/runs/a"
    manager = CheckpointManager(model_dir, keep_n=1)
    mesh = make_mesh(2, 4)
    for step in (1, 2):
        manager.save(step, place(host_state(step), mesh), {"loader": {"index": step}})
    manager.wait()
    assert manager.committed_steps() == [2]  # step 1 deleted from the bucket by retention
    assert not _blob("runs/a/step_1/checkpoint.json").exists()
    fresh = CheckpointManager(model_dir)
    assert fresh.latest_step() == 2
    state, extra = fresh.restore(target_for(make_mesh(4, 2)))
    assert extra == {"loader": {"index": 2}}
    assert_trees_equal(state, host_state(2))
    slim_dir = f"gs://{BUCKET}/slim/a"
    slim_checkpoint(model_dir, slim_dir, "float16")
    params = load_params(slim_dir, target_for(make_mesh(1, 1)).params)
    assert_trees_equal(
        params, jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), host_state(2).params)
    )


def test_gcs_damaged_piece_is_named_by_its_url(emulator: str) -> None:
    model_dir = f"gs://{BUCKET}/runs/damaged"
    manager = CheckpointManager(model_dir)
    manager.save(3, place(host_state(3), make_mesh(2, 4)), {})
    manager.wait()
    piece = _blob("runs/damaged/step_3/00001.00000.safetensors")
    raw = bytearray(piece.download_as_bytes())
    raw[-1] ^= 0x80
    piece.upload_from_string(bytes(raw))
    with pytest.raises(
        CheckpointError, match=rf"gs://{BUCKET}/runs/damaged/step_3/00001\.00000\.safetensors: checksum"
    ):
        manager.restore(target_for(make_mesh(2, 4)))


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards HTTP to the emulator but answers `status` (503) to requests numbered in `fail`."""

    def __init__(self, upstream: str, fail: Container[int], status: int = 503) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fail, self.status, self.count, self.failed, self.lock = fail, status, 0, 0, threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyProxy

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.count += 1
            fail = self.server.count in self.server.fail
            self.server.failed += fail
        if fail:
            self.send_response(self.server.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward


def test_gcs_transient_errors_are_retried(emulator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _FlakyProxy(emulator, fail={2, 5, 9, 14, 30})
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_address[1]}")
        manager = CheckpointManager(f"gs://{BUCKET}/runs/flaky")
        manager.save(4, place(host_state(4), make_mesh(2, 4)), {"ok": True})
        manager.wait()
        state, extra = CheckpointManager(f"gs://{BUCKET}/runs/flaky").restore(target_for(make_mesh(8, 1)))
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.failed == 5 and proxy.count > 30
    assert extra == {"ok": True}
    assert_trees_equal(state, host_state(4))


def test_gcs_path_without_bucket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="names no bucket"):
        CheckpointManager("gs://")
