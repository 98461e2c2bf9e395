"""Small pieces several test files share: a tiny model's config keys, a free loopback port, and a local GCS
emulator."""

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
