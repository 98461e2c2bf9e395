"""Where files live. Every read and write of the project (configs, data, checkpoints, metrics, tokenizers,
exports) goes through this module, for local paths and `gs://bucket/key` URLs alike: whole files, ranged
reads, listings, streams (`open_file`), and `Store`, a directory of named files (what checkpoints use).

Errors say whose they are. A gs:// path whose bucket does not exist, a denied permission or a missing
credential is a `StorageError`, a `UserError` naming the path; a missing object is FileNotFoundError for the
caller to explain. Google Cloud Storage failing (429, 5xx, dropped connections) is retried with exponential
backoff for up to RETRY_DEADLINE_S; after that it is `StorageUnavailable`, an `InfrastructureError` that the
Ray driver recovers from by restarting the hosts from the last committed checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from mesh_transformer.errors import InfrastructureError, UserError

# Backoff on GCS's transient errors, per request: 0.5 s doubling to at most 30 s, for up to this long.
RETRY_DEADLINE_S = 600.0
# Resumable uploads send this much per request; it bounds a writer's buffer.
UPLOAD_CHUNK_BYTES = 64 * 1024 * 1024
# Objects up to this size are uploaded in one request from memory.
SINGLE_REQUEST_BYTES = 8 * 1024 * 1024


class StorageError(UserError):
    """A path cannot be used as given: no bucket named or no such bucket, no credentials, access denied."""


class StorageUnavailable(InfrastructureError):
    """Storage failed (GCS errors after the retries, a dropped connection, a failing disk)."""


# ----- paths -----


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def split_gcs(url: str) -> tuple[str, str]:
    """gs://bucket/some/key -> ("bucket", "some/key")."""
    bucket, _, key = url[len("gs://") :].partition("/")
    if not bucket:
        raise StorageError(f"{url!r} names no bucket; expected gs://bucket/path")
    return bucket, key


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_gcs(base) else os.path.join(base, *parts)


def parent(path: str) -> str:
    """The directory holding `path` ("" for a bare local file name)."""
    if is_gcs(path):
        head = path.rstrip("/").rsplit("/", 1)[0]
        return head if head != "gs:/" else path
    return os.path.dirname(path)


def makedirs(path: str) -> None:
    """Create a local directory and its parents; nothing to do in a bucket, where directories are prefixes."""
    if not is_gcs(path):
        with _local_errors(path):
            os.makedirs(path, exist_ok=True)


# ----- clients and errors -----


def new_gcs_client() -> Any:
    """A fresh storage client (one per thread where requests run in parallel: sessions are not shared)."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise StorageError(
            "gs:// paths need Google Cloud credentials; run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


@functools.cache
def gcs_client() -> Any:
    """The process's shared storage client."""
    return new_gcs_client()


_thread = threading.local()


def _thread_client() -> Any:
    """This thread's client, made anew when the emulator address changes (tests point it at proxies)."""
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    if getattr(_thread, "key", None) != key or getattr(_thread, "client", None) is None:
        _thread.client, _thread.key = new_gcs_client(), key
    return _thread.client


def gcs_blob(path: str) -> Any:
    bucket, key = split_gcs(path)
    return gcs_client().bucket(bucket).blob(key)


def retry() -> Any:
    """Exponential backoff on GCS's transient errors (429, 5xx, connection resets) for every request."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=0.5, multiplier=2.0, maximum=30.0).with_timeout(RETRY_DEADLINE_S)


def _short(error: BaseException) -> str:
    text = str(getattr(error, "message", "") or error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


@contextlib.contextmanager
def gcs_errors(path: str) -> Iterator[None]:
    """Google's exceptions for `path` as this module's: FileNotFoundError for a missing object, StorageError
    for a missing bucket or denied access, StorageUnavailable when GCS kept failing."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    transient = (api.RetryError, api.ServerError, api.TooManyRequests, auth.TransportError, auth.RefreshError)
    try:
        yield
    except api.NotFound:
        bucket, _ = split_gcs(path)
        if not _bucket_exists(bucket):
            raise StorageError(f"{path}: bucket {bucket!r} does not exist; check the gs:// path") from None
        raise FileNotFoundError(path) from None
    except (api.Forbidden, api.Unauthorized) as e:
        raise StorageError(
            f"{path}: access denied ({_short(e)}); the account needs read and write access to the bucket"
        ) from None
    except transient as e:  # RefreshError: the credentials' server (a TPU VM's metadata) failed
        raise StorageUnavailable(f"{path}: Google Cloud Storage failed after retrying: {_short(e)}") from e
    except api.GoogleAPICallError as e:  # other 4xx: a request the path made invalid (e.g. a bad bucket name)
        raise StorageError(f"{path}: refused by Google Cloud Storage: {_short(e)}") from None
    except (requests.RequestException, ConnectionError, TimeoutError) as e:
        raise StorageUnavailable(f"{path}: connection to Google Cloud Storage failed: {_short(e)}") from e


def _bucket_exists(bucket: str) -> bool:
    from google.api_core import exceptions as api

    try:
        return _thread_client().bucket(bucket).exists(retry=retry())
    except (api.Forbidden, api.Unauthorized):  # may not see the bucket's metadata, yet may use its objects
        return True


@contextlib.contextmanager
def _local_errors(path: str) -> Iterator[None]:
    """Local OSErrors: a path the user gave that cannot be used is a StorageError; a missing file stays
    FileNotFoundError; a failing disk (full, I/O error) is StorageUnavailable."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        raise StorageError(f"{e.filename or path}: {e.strerror or e}") from None
    except OSError as e:
        raise StorageUnavailable(f"{e.filename or path}: {e.strerror or e}") from e


# ----- test hook -----

_failing_writes: str | None = None


def inject_write_failure(marker: str | None) -> None:
    """Make every later write in this process to a path containing `marker` fail as GCS does once its
    retries run out (None: stop). Only for the fault-injection switch of the Ray tests (cluster.FAULT_ENV)."""
    global _failing_writes
    _failing_writes = marker


def _check_injected(path: str) -> None:
    if _failing_writes is not None and _failing_writes in path:
        raise StorageUnavailable(f"{path}: Google Cloud Storage failed after retrying: 503 (injected fault)")


# ----- a directory of named files -----


class Store:
    """A directory on local disk or in a bucket, addressed by URL; names below it are '/'-separated relative
    paths ("" is the directory itself). Writes are atomic: a reader never sees half a file."""

    url: str

    @staticmethod
    def open(url: str) -> Store:
        if not url:
            raise StorageError("the path is empty; expected a local directory or gs://bucket/path")
        return GcsStore(url) if is_gcs(url) else LocalStore(url)

    def describe(self, name: str = "") -> str:
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        """The whole file; FileNotFoundError when it does not exist."""
        raise NotImplementedError

    def read_into(self, name: str, allocate: Callable[[int], np.ndarray]) -> np.ndarray:
        """The whole file in the uint8 array `allocate(size)` returns; FileNotFoundError when absent."""
        raw = self.read(name)
        out = allocate(len(raw))
        out[:] = np.frombuffer(raw, np.uint8)
        return out

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file (fewer at its end)."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        """Whether file `name` exists."""
        raise NotImplementedError

    def is_dir(self, name: str = "") -> bool:
        raise NotImplementedError

    def list(self, name: str = "") -> tuple[list[str], list[str]]:
        """(file names, subdirectory names) directly inside directory `name`, each sorted."""
        raise NotImplementedError

    def subdirs(self) -> list[str]:
        return self.list()[1]

    def size(self, name: str) -> int:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove file `name` if it exists."""
        raise NotImplementedError

    def delete_dir(self, name: str) -> None:
        raise NotImplementedError

    def sync_dir(self, name: str) -> None:
        """Make the directory entries written so far durable (a no-op where writes are atomic objects)."""

    def remove_partial(self, name: str) -> None:
        """Delete what interrupted writes left in directory `name` (nothing where uploads are atomic)."""


class LocalStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        self.root = os.path.abspath(url)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/")) if name else self.root

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        path = self._path(name)
        _check_injected(path)
        # Write under a temporary name and rename, so a reader never sees half a file under the real name.
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with _local_errors(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def read(self, name: str) -> bytes:
        with _local_errors(self._path(name)), open(self._path(name), "rb") as f:
            return f.read()

    def read_into(self, name: str, allocate: Callable[[int], np.ndarray]) -> np.ndarray:
        with _local_errors(self._path(name)), open(self._path(name), "rb") as f:
            out = allocate(os.fstat(f.fileno()).st_size)
            f.readinto(memoryview(out))
            return out

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        with _local_errors(self._path(name)), open(self._path(name), "rb") as f:
            f.seek(start)
            return f.read(max(0, stop - start))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def is_dir(self, name: str = "") -> bool:
        return os.path.isdir(self._path(name))

    def list(self, name: str = "") -> tuple[list[str], list[str]]:
        directory = self._path(name)
        if not os.path.isdir(directory):
            return [], []
        with _local_errors(directory):
            entries = sorted(os.listdir(directory))
        dirs = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
        return [e for e in entries if e not in dirs], dirs

    def size(self, name: str) -> int:
        with _local_errors(self._path(name)):
            return os.path.getsize(self._path(name))

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError), _local_errors(self._path(name)):
            os.remove(self._path(name))

    def delete_dir(self, name: str) -> None:
        shutil.rmtree(self._path(name), ignore_errors=True)

    def remove_partial(self, name: str) -> None:
        for entry in os.listdir(self._path(name)):
            if ".tmp-" in entry:  # a write that a killed process left half done
                os.remove(os.path.join(self._path(name), entry))

    def sync_dir(self, name: str) -> None:
        fd = os.open(self._path(name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GcsStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket_name, prefix = split_gcs(url)
        self.prefix = prefix.strip("/")
        self._retry = retry()

    def _bucket(self) -> Any:
        return _thread_client().bucket(self.bucket_name)

    def _key(self, name: str) -> str:
        return "/".join(p for p in (self.prefix, name) if p)

    def _blob(self, name: str, **options: Any) -> Any:
        return self._bucket().blob(self._key(name), **options)

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        where = self.describe(name)
        _check_injected(where)
        # An object becomes visible only when its upload completes, so a failed write leaves nothing behind.
        small = (
            isinstance(chunks, (list, tuple))
            and sum(memoryview(c).nbytes for c in chunks) <= SINGLE_REQUEST_BYTES
        )
        if small:  # one request (a resumable upload takes three or more)
            with gcs_errors(where):
                self._blob(name).upload_from_string(b"".join(chunks), retry=self._retry)
            return
        blob = self._blob(name, chunk_size=UPLOAD_CHUNK_BYTES)
        with gcs_errors(where), blob.open("wb", retry=self._retry, ignore_flush=True) as f:
            for chunk in chunks:
                f.write(chunk)

    def read(self, name: str) -> bytes:
        with gcs_errors(self.describe(name)):
            return self._blob(name).download_as_bytes(retry=self._retry)

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        with gcs_errors(self.describe(name)):
            return self._blob(name).download_as_bytes(start=start, end=stop - 1, retry=self._retry)

    def exists(self, name: str) -> bool:
        with gcs_errors(self.describe(name)):
            return self._blob(name).exists(retry=self._retry)

    def _listing(self, name: str, delimiter: str | None) -> Any:
        base = self._key(name)
        base = f"{base}/" if base else ""
        bucket = self._bucket()
        return base, bucket.client.list_blobs(bucket, prefix=base, delimiter=delimiter, retry=self._retry)

    def is_dir(self, name: str = "") -> bool:
        with gcs_errors(self.describe(name)):
            base, blobs = self._listing(name, None)
            return next(iter(blobs), None) is not None

    def list(self, name: str = "") -> tuple[list[str], list[str]]:
        with gcs_errors(self.describe(name)):
            base, blobs = self._listing(name, "/")
            # reading every page fills in the prefixes (the subdirectories)
            files = [b.name[len(base) :] for b in blobs if b.name != base]
            return sorted(files), sorted(p[len(base) :].rstrip("/") for p in blobs.prefixes)

    def size(self, name: str) -> int:
        with gcs_errors(self.describe(name)):
            blob = self._bucket().get_blob(self._key(name), retry=self._retry)
        if blob is None:
            raise FileNotFoundError(self.describe(name))
        return blob.size or 0

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError), gcs_errors(self.describe(name)):
            self._blob(name).delete(retry=self._retry)

    def delete_dir(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        with gcs_errors(self.describe(name)):
            for blob in self._listing(name, None)[1]:
                with contextlib.suppress(NotFound):
                    blob.delete(retry=self._retry)


# ----- single paths -----


def _store_and_name(path: str) -> tuple[Store, str]:
    if is_gcs(path):
        bucket, key = split_gcs(path)
        head, _, name = key.rstrip("/").rpartition("/")
        return GcsStore(f"gs://{bucket}/{head}"), name
    return LocalStore(os.path.dirname(os.path.abspath(path))), os.path.basename(path)


def read_bytes(path: str) -> bytes:
    """A whole file; FileNotFoundError when it does not exist."""
    store, name = _store_and_name(path)
    return store.read(name)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_range(path: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file (fewer at its end)."""
    store, name = _store_and_name(path)
    return store.read_range(name, start, stop)


def write_bytes(path: str, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write a whole file atomically (parents created): it appears complete or not at all."""
    store, name = _store_and_name(path)
    store.write(name, [data] if isinstance(data, bytes) else data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def path_exists(path: str) -> bool:
    """Whether a file (or, locally, a directory) exists at `path`."""
    if is_gcs(path):
        store, name = _store_and_name(path)
        return store.exists(name)
    return os.path.exists(path)


def is_dir(path: str) -> bool:
    """A local directory, or a gs:// prefix holding at least one object."""
    return Store.open(path).is_dir()


def is_file(path: str) -> bool:
    store, name = _store_and_name(path)
    return store.exists(name)


def list_dir(path: str) -> tuple[list[str], list[str]]:
    """(file names, subdirectory names) directly inside directory `path`; empty when it does not exist."""
    return Store.open(path).list()


def list_objects(prefix: str) -> list[tuple[str, int]]:
    """(URL, size) of every object whose gs:// URL starts with `prefix` (a partial name matches), by URL."""
    bucket, key = split_gcs(prefix)
    with gcs_errors(prefix):
        blobs = _thread_client().list_blobs(bucket, prefix=key, retry=retry())
        return sorted((f"gs://{bucket}/{b.name}", b.size or 0) for b in blobs if not b.name.endswith("/"))


def delete(path: str) -> None:
    store, name = _store_and_name(path)
    store.delete(name)


def upload_file(local_path: str, url: str) -> None:
    """Copy a local file to `url` (local or gs://) in bounded chunks, atomically."""

    def chunks() -> Iterator[bytes]:
        with _local_errors(local_path), open(local_path, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK_BYTES):
                yield chunk

    with _local_errors(local_path):
        small = os.path.getsize(local_path) <= SINGLE_REQUEST_BYTES
    write_bytes(url, list(chunks()) if small else chunks())


def open_file(path: str, mode: str = "rb") -> Any:
    """Open a local or gs:// file as a stream without any transparent decompression (callers decompress
    themselves). On gs://, errors while reading or writing are translated like every other call here."""
    if is_gcs(path):
        import smart_open

        with gcs_errors(path):
            f = smart_open.open(path, mode, compression="disable", transport_params={"client": gcs_client()})
        return _Translated(f, path)
    return open(path, mode)


class _Translated:
    """A gs:// stream whose calls raise this module's errors rather than Google's."""

    def __init__(self, f: Any, path: str) -> None:
        self._f, self._path = f, path

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._f, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with gcs_errors(self._path):
                return attr(*args, **kwargs)

        return call

    def __iter__(self) -> Iterator[Any]:
        with gcs_errors(self._path):
            yield from self._f

    def __enter__(self) -> _Translated:
        return self

    def __exit__(self, *exc: object) -> None:
        with gcs_errors(self._path):  # an upload left by an exception is discarded, not completed
            self._f.__exit__(*exc)
