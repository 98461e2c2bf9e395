"""Where files live: local paths and `gs://` URLs through one small set of helpers (open, exists, join) and
one way to build a Google Cloud Storage client (anonymous against an emulator set by STORAGE_EMULATOR_HOST).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from mesh_transformer.errors import UserError


class StorageError(UserError):
    """A gs:// path cannot be reached (no credentials, no bucket named)."""


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def split_gcs(url: str) -> tuple[str, str]:
    """gs://bucket/some/key -> ("bucket", "some/key")."""
    bucket, _, key = url[len("gs://") :].partition("/")
    if not bucket:
        raise StorageError(f"{url!r} names no bucket; expected gs://bucket/path")
    return bucket, key


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


def gcs_blob(path: str) -> Any:
    bucket, key = split_gcs(path)
    return gcs_client().bucket(bucket).blob(key)


def open_file(path: str, mode: str = "rb") -> Any:
    """Open a local or gs:// file without any transparent decompression (callers decompress themselves)."""
    if is_gcs(path):
        import smart_open

        return smart_open.open(path, mode, compression="disable", transport_params={"client": gcs_client()})
    return open(path, mode)


def path_exists(path: str) -> bool:
    if is_gcs(path):
        return gcs_blob(path).exists()
    return os.path.exists(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_gcs(base) else os.path.join(base, *parts)
