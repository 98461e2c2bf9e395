"""Dataset preparation on a Ray cluster: prepare.py's parts run as Ray tasks spread over the nodes.

Each task tokenizes one part into shards - written into the staging directory of a local output (which every
node must see: one machine, or a shared filesystem), or uploaded to a gs:// output - and returns what the
index needs; the driver writes the index once every part succeeded, so the dataset is byte for byte the one
a single process prepares. A task whose worker process or node dies is retried by Ray (on another node when
its node is gone); a problem with the input stops everything with its one-line error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from typing import Any

from mesh_transformer import prepare
from mesh_transformer.errors import UserError
from mesh_transformer.sources import DataError

# Test hook: "die:PART" kills (SIGKILL) the worker process preparing part PART, the first time only.
FAULT_ENV = "MESH_TRANSFORMER_PREPARE_FAULT"
TASK_RETRIES = 3  # attempts after the first when a worker or node dies
_MARKER = ".visible-to-every-node"


class PreparationFailed(RuntimeError):
    """A part could not be prepared for reasons outside the input (workers or nodes kept dying)."""


def prepare_parts(
    parts: list[prepare.Part],
    settings: prepare.Settings,
    staging: Any,
    ray_address: str,
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Prepare every part as a Ray task; returns their results (in completion order)."""
    from tqdm import tqdm

    from mesh_transformer.cluster import connect

    fault = _fault_part(os.environ.get(FAULT_ENV))
    # "local": a private instance on this machine (127.0.0.1 only) with at least `workers` CPUs. Ray is
    # imported only after `connect`, which must set up the environment before Ray's first import.
    connect(None if ray_address == "local" else ray_address, workers)
    import ray

    if not staging.remote:
        open(os.path.join(staging.root, _MARKER), "w").close()
    task = ray.remote(_prepare_task).options(
        num_cpus=1,
        max_retries=TASK_RETRIES,
        retry_exceptions=False,  # a DataError is the input's fault: another attempt gives the same
        scheduling_strategy="SPREAD",  # parts over the nodes, not packed onto the first ones
    )
    settings_ref = ray.put(settings)
    output = staging.output_dir if staging.remote else None
    refs = {
        task.remote(part, settings_ref, staging.root, output, part.number == fault): part for part in parts
    }
    results = []
    total = sum(part.input_bytes for part in parts)
    pending = list(refs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="preparing", disable=not progress) as bar:
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                results.append(_result(ray, done[0], refs[done[0]]))
                bar.update(refs[done[0]].input_bytes)
        finally:
            for ref in pending:  # after a failure: stop the other parts before the staging is removed
                ray.cancel(ref, force=True)
            for name in os.listdir(staging.root) if not staging.remote else ():
                if name == _MARKER or name.startswith(".fault-"):
                    os.remove(os.path.join(staging.root, name))
    return results


def _result(ray: Any, ref: Any, part: prepare.Part) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):  # the input (or its storage path) is wrong: say so, as here
            raise e.cause from None
        raise PreparationFailed(
            f"part {part.number} ({_files(part)}) failed: {_first_line(e.cause or e)}"
        ) from None
    except ray.exceptions.RayError as e:
        raise PreparationFailed(
            f"part {part.number} ({_files(part)}) failed on {TASK_RETRIES + 1} attempts: {_first_line(e)}"
        ) from None


def _prepare_task(
    part: prepare.Part, settings: prepare.Settings, staging_root: str, output_dir: str | None, die: bool
) -> dict[str, Any]:
    """One part on whichever node Ray chose: into the shared staging directory of a local output, or into a
    temporary directory of this node and from there to the gs:// output."""
    if die and _first_attempt(staging_root, part.number):
        os.kill(os.getpid(), signal.SIGKILL)
    if output_dir is None and not os.path.exists(os.path.join(staging_root, _MARKER)):
        import socket

        raise DataError(
            f"the output's staging directory {staging_root} is not visible on Ray node "
            f"{socket.gethostname()}; on a cluster of several machines prepare into gs:// or onto a "
            "filesystem every node mounts"
        )
    root = staging_root if output_dir is None else tempfile.mkdtemp(prefix=f"prepare-part-{part.number}-")
    try:
        with prepare.Encoder(settings, 1) as encoder:
            result = prepare.prepare_part(part, settings, root, encoder)
        if output_dir is not None:
            prepare.upload_part(result, root, output_dir)
        return result
    finally:
        if output_dir is not None:
            shutil.rmtree(root, ignore_errors=True)


def _fault_part(spec: str | None) -> int | None:
    if not spec:
        return None
    match = re.fullmatch(r"die:(\d+)", spec.strip())
    if not match:
        raise DataError(f"{FAULT_ENV}={spec!r}: expected die:PART")
    return int(match.group(1))


def _first_attempt(staging_root: str, number: int) -> bool:
    """True once per part (the test hook kills only the first worker that prepares it)."""
    try:
        os.close(os.open(os.path.join(staging_root, f".fault-{number}"), os.O_CREAT | os.O_EXCL))
        return True
    except OSError:  # made by an earlier attempt (or not on this node: then never)
        return False


def _files(part: prepare.Part) -> str:
    names = [path for path, _ in part.files]
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more files"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
