"""Data pipeline throughput: preparation MB/s (in this process, with worker processes, and as Ray tasks)
against plain `tokenizers` encode_batch, and loader tokens/s for one dataset and a mixture.

Every path tokenizes the same text (Python standard library sources as JSON lines, in 8 files and 8 parts)
with the same byte-level BPE. Runs are interleaved, repeated, and reported as the median with the spread
(min - max) and the median's ratio to the peer's.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray listens on 127.0.0.1 only

from mesh_transformer import prepare  # noqa: E402
from mesh_transformer.data import Loader, MixtureLoader  # noqa: E402

FILES = 8


def corpus(max_bytes: int) -> list[str]:
    """Standard-library sources (sorted, so every run measures the same text), up to max_bytes."""
    stdlib = sysconfig.get_paths()["stdlib"]
    texts, size = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        with open(path, "rb") as f:
            raw = f.read()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        size += len(raw)
        if size >= max_bytes:
            break
    return texts


def spread(seconds: list[float], megabytes: float, peer: float) -> str:
    rates = sorted(megabytes / s for s in seconds)
    median = statistics.median(seconds)
    ratio = peer / median
    return f"{megabytes / median:6.2f} MB/s (spread {rates[0]:.2f}-{rates[-1]:.2f}) = {ratio:.2f}x the peer"


def same_files(a: str, b: str) -> bool:
    names = sorted(os.path.relpath(os.path.join(r, n), a) for r, _, ns in os.walk(a) for n in ns)
    other = sorted(os.path.relpath(os.path.join(r, n), b) for r, _, ns in os.walk(b) for n in ns)
    read = lambda root, name: open(os.path.join(root, name), "rb").read()  # noqa: E731
    return names == other and all(read(a, n) == read(b, n) for n in names)


def loader_rates(make: functools.partial, seconds: float = 1.0) -> list[float]:
    """M tokens/s of three loaders made by `make`, each read for `seconds`."""
    rates = []
    for _ in range(3):
        loader = make()
        next(loader)
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(loader)
            batches += 1
        window = make.keywords["seq"] + 1
        rates.append(batches * make.keywords["global_batch"] * window / (time.perf_counter() - start) / 1e6)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=6, help="text to prepare")
    parser.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary trained for the benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each path")
    parser.add_argument("--ray-workers", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="data-throughput-")
    try:
        documents = corpus(int(args.megabytes * 1e6))
        megabytes = sum(len(d.encode()) for d in documents) / 1e6
        sources = []
        for i in range(FILES):
            sources.append(os.path.join(work, f"corpus{i}.jsonl"))
            with open(sources[-1], "w") as f:
                f.writelines(json.dumps({"text": d, "meta": {}}) + "\n" for d in documents[i::FILES])
        part_bytes = max(1, sum(os.path.getsize(s) for s in sources) // FILES)
        tokenizer = prepare.train_tokenizer(iter(documents[: len(documents) // 4]), args.vocab)
        tokenizer_path = os.path.join(work, "tokenizer.json")
        tokenizer.save(tokenizer_path)
        print(f"corpus: {len(documents)} documents, {megabytes:.1f} MB of text in {FILES} files and parts")
        print(f"BPE vocabulary {args.vocab}; cores: {os.cpu_count()}; local Ray CPUs: {args.ray_workers}")

        from mesh_transformer.cluster import connect

        start = time.perf_counter()
        connect(None, args.ray_workers)  # started once, outside the timings (it takes seconds)
        print(f"local Ray started in {time.perf_counter() - start:.1f} s")

        def prepare_with(name: str, **options) -> None:
            out = os.path.join(work, name)
            shutil.rmtree(out, ignore_errors=True)
            prepare.prepare_dataset(
                sources, out, tokenizer_path=tokenizer_path, part_bytes=part_bytes, **options
            )

        runs = {
            "tokenizers encode_batch (the peer)": lambda: tokenizer.encode_batch(
                documents, add_special_tokens=False
            ),
            "tokenizers encode_batch_fast (no offsets)": lambda: tokenizer.encode_batch_fast(
                documents, add_special_tokens=False
            ),
            "prepare_dataset, 1 process": lambda: prepare_with("out1"),
            "prepare_dataset, 2 worker processes": lambda: prepare_with("out2", workers=2),
            f"prepare_dataset, Ray tasks ({args.ray_workers} CPUs)": lambda: prepare_with(
                "ray", ray_address="local"
            ),
        }
        prepare_with("ray", ray_address="local")  # warm-up: Ray starts its worker processes once
        # Interleaved repeats, so load from other work on the machine falls on peer and pipeline alike.
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        peer = statistics.median(seconds["tokenizers encode_batch (the peer)"])
        for name, timings in seconds.items():
            print(f"{name:44s} {spread(timings, megabytes, peer)}")
        identical = same_files(os.path.join(work, "out1"), os.path.join(work, "ray"))
        print(f"Ray's dataset identical to the single process's, file for file: {identical}")

        dataset = os.path.join(work, "out1")
        mixture = {dataset: 0.7, os.path.join(work, "ray"): 0.3}
        for seq, batch in ((2048, 16), (128, 16)):
            shape = dict(seq=seq, global_batch=batch, process_index=0, process_count=1)
            for label, make in (
                ("one dataset", functools.partial(Loader, dataset, **shape)),
                ("mixture of 2", functools.partial(MixtureLoader, mixture, **shape)),
            ):
                rates = loader_rates(make)
                median = statistics.median(rates)
                print(
                    f"loader {label:12s} seq {seq:4d} x batch {batch}: {median:7.2f} M tokens/s per host "
                    f"(spread {min(rates):.2f}-{max(rates):.2f}) = {median:.1f}x the 1M tokens/s target"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
