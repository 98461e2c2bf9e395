"""The storage layer on local disk and on gs:// (a GCS emulator, and a proxy that answers with errors): the
same calls behave the same on both; a missing bucket, a denied access and GCS failing past its retries are
told apart (the user's input, or an infrastructure failure to recover from) and name the path; a save whose
storage fails stays uncommitted and is reported as an infrastructure failure, not the user's mistake."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
from helpers import gcs_emulator
from test_checkpoint import assert_trees_equal, host_state, make_mesh, place, target_for
from test_checkpoint_gcs import _FlakyProxy

from mesh_transformer import errors, storage
from mesh_transformer.checkpoint import COMMIT_MARKER, CheckpointManager, CheckpointSaveError
from mesh_transformer.errors import InfrastructureError, UserError

pytestmark = pytest.mark.slow
BUCKET = "storage-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Iterator[str]:
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), BUCKET) as url:
        yield url


@contextlib.contextmanager
def failing_proxy(emulator: str, monkeypatch, status: int) -> Iterator[_FlakyProxy]:
    """Every request to GCS answered with `status` while the context lasts."""
    proxy = _FlakyProxy(emulator, range(1, 10**9), status)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.server_address[1]}")
    storage.gcs_client.cache_clear()
    try:
        yield proxy
    finally:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
        storage.gcs_client.cache_clear()
        proxy.shutdown()
        proxy.server_close()


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("emulator")
    return f"gs://{BUCKET}/{tmp_path.name}"


def test_files_read_write_list_and_delete_alike_on_disk_and_in_a_bucket(root):
    path = storage.join(root, "a", "data.bin")
    storage.write_bytes(path, bytes(range(256)))
    storage.write_text(storage.join(root, "note.txt"), "hello\n")
    assert storage.read_bytes(path) == bytes(range(256))
    assert storage.read_range(path, 10, 20) == bytes(range(10, 20))
    assert storage.read_range(path, 250, 300) == bytes(range(250, 256))
    assert storage.read_text(storage.join(root, "note.txt")) == "hello\n"
    assert storage.list_dir(root) == (["note.txt"], ["a"])
    assert storage.is_dir(storage.join(root, "a")) and not storage.is_dir(storage.join(root, "b"))
    assert storage.is_file(path) and not storage.is_file(storage.join(root, "a"))
    assert storage.list_dir(storage.join(root, "nothing")) == ([], [])
    with storage.open_file(path) as f:
        assert f.read(3) == bytes([0, 1, 2])
    storage.delete(path)
    storage.delete(path)  # already gone: nothing to do
    assert not storage.path_exists(path)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(path)


def test_a_missing_bucket_is_one_clear_user_error_naming_the_path(emulator):
    missing = "bucket 'no-such-bucket' does not exist; check the gs:// path"
    with pytest.raises(storage.StorageError, match=f"^gs://no-such-bucket/run/x: {missing}$"):
        storage.read_bytes("gs://no-such-bucket/run/x")
    with pytest.raises(storage.StorageError, match=f"^gs://no-such-bucket/run: {missing}$"):
        CheckpointManager("gs://no-such-bucket/run").latest_step()


def test_denied_access_is_a_user_error_naming_the_path(emulator, monkeypatch):
    with failing_proxy(emulator, monkeypatch, 403), pytest.raises(storage.StorageError) as caught:
        storage.list_dir(f"gs://{BUCKET}/run")
    assert str(caught.value).startswith(f"gs://{BUCKET}/run: access denied")
    assert "\n" not in str(caught.value)


def test_gcs_failing_past_its_retries_is_an_infrastructure_error(emulator, monkeypatch, capsys):
    monkeypatch.setattr(storage, "RETRY_DEADLINE_S", 2.0)
    with failing_proxy(emulator, monkeypatch, 503) as proxy:
        with pytest.raises(storage.StorageUnavailable) as caught:
            storage.read_bytes(f"gs://{BUCKET}/run/x")
        assert proxy.failed > 1  # retried before giving up
        with pytest.raises(SystemExit) as exit_info:
            errors.run_cli(lambda: storage.write_text(f"gs://{BUCKET}/run/y", "y"))
    assert isinstance(caught.value, InfrastructureError) and not isinstance(caught.value, UserError)
    assert f"gs://{BUCKET}/run/x: Google Cloud Storage failed after retrying" in str(caught.value)
    assert exit_info.value.code == errors.EXIT_INFRASTRUCTURE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: gs://{BUCKET}/run/y: Google Cloud Storage failed after retrying")


def test_a_save_whose_storage_fails_stays_uncommitted_and_is_infrastructure(root):
    manager = CheckpointManager(root)
    state = place(host_state(1), make_mesh(2, 4))
    storage.inject_write_failure("/step_2/")
    try:
        manager.save(2, state, {})
        with pytest.raises(CheckpointSaveError, match=r"step_2/\d+\.\d+\.safetensors: .*injected fault"):
            manager.wait()
    finally:
        storage.inject_write_failure(None)
    assert manager.latest_step() is None
    manager.save(3, state, {})  # storage is back: the next save commits
    manager.wait()
    assert manager.committed_steps() == [3]


def test_commit_hooks_run_before_and_after_the_marker(root):
    manager = CheckpointManager(root)
    seen = []

    def marker() -> bool:
        return storage.path_exists(storage.join(root, "step_4", COMMIT_MARKER))

    manager.save(4, place(host_state(4), make_mesh(4, 2)), {}, before_commit=lambda: seen.append(marker()))
    manager.wait()
    manager.save(
        5, place(host_state(5), make_mesh(4, 2)), {}, on_commit=lambda step, s: seen.append((step, s > 0))
    )
    manager.wait()
    assert seen == [False, (5, True)] and manager.committed_steps() == [4, 5]
    assert_trees_equal(manager.restore(target_for(make_mesh(2, 4)))[0], host_state(5))

    def flush_fails() -> None:
        raise storage.StorageUnavailable("log upload failed")

    manager.save(6, place(host_state(6), make_mesh(4, 2)), {}, before_commit=flush_fails)
    with pytest.raises(CheckpointSaveError, match="log upload failed"):
        manager.wait()
    assert manager.committed_steps() == [4, 5]
