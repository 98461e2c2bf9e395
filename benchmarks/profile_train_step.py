"""Where one training step spends its time: a `jax.profiler` trace of the jitted step at the shape of
`train_throughput.py`, each XLA op's time put in one category (matmul, cross-entropy over the (B, T, V)
logits, attention softmax and mask, layernorm, rotary, activation, casts, copies, optimizer, other).

An op's category comes from the compiled HLO: an op holding a dot is a matmul (forward, or backward when it
is under JAX's `transpose`); otherwise the Python function that emitted it (the HLO's stack frames:
`cross_entropy`, `attention`, haiku's LayerNorm, optax, ...) names it. Times are summed over the op's runs
(each layer's, in the scan over layers) and divided by the steps traced.

    python benchmarks/profile_train_step.py [--dtype bfloat16] [--steps 3] [--shape small|large] [--top 15]
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import SHAPES, make_trainer  # noqa: E402

# (category, prefixes of the qualified Python function names on an op's stack), first match wins; matmuls are
# found by their dots. A gradient op carries the frames of the forward op it differentiates.
CATEGORIES = [
    ("cross-entropy (B,T,V)", ("cross_entropy",)),
    ("attention softmax+mask", ("attention", "sequence_positions", "document_positions_and_mask")),
    ("rotary", ("Rotary.", "rotate_")),
    ("layernorm", ("LayerNorm.",)),
    ("activation", ("<lambda>",)),  # the module-level lambdas of layers.ACTIVATIONS
    ("optimizer", ("chain.", "scale_by_", "clip_by_global_norm.", "add_decayed_weights.", "masked.",
                   "apply_updates", "tree_norm", "tree_update_moment", "Trainer._step.<locals>.<lambda>")),
]  # fmt: skip
OP_NAMES: dict[
    str, str
] = {}  # HLO op -> its JAX op name ("jit(_step)/.../transpose(jvp(gptj))/.../dot_general")
NESTED = {"while", "conditional", "call"}  # their bodies' ops are timed on their own


def parse_hlo(text: str) -> dict[str, tuple[str, set[str], bool]]:
    """HLO op name -> (opcode, Python functions on the stacks of it and the ops it fuses, holds a dot)."""
    files = dict(
        re.findall(r"^(\d+) \"(.*)\"$", text.split("FileLocations")[0].split("FunctionNames")[1], re.M)
    )
    locations = {
        i: files.get(f, "?")
        for i, f in re.findall(r"^(\d+) \{file_name_id=\d+ function_name_id=(\d+)", text, re.M)
    }
    frames = {i: (loc, parent) for i, loc, parent in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", text, re.M
    )}  # fmt: skip

    def functions(frame: str) -> set[str]:
        names = set()
        while frame in frames and frame not in names:
            loc, parent = frames[frame]
            names.add(locations.get(loc, "?"))
            if parent == frame:
                break
            frame = parent
        return names

    computations: dict[str, tuple[set[str], bool]] = {}
    ops: dict[str, tuple[str, set[str], bool]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if head:
            current = head.group(1)
            computations[current] = (set(), False)
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = .*? (\w[\w-]*)\(", line)
        if not m or current is None:
            continue
        name, opcode = m.groups()
        frame = re.search(r"stack_frame_id=(\d+)", line)
        funcs = functions(frame.group(1)) if frame else set()
        called = re.findall(r"calls=%([\w.\-]+)", line)
        has_dot = opcode in ("dot", "convolution") or "ynn" in name or "onednn" in line
        for c in called:
            c_funcs, c_dot = computations.get(c, (set(), False))
            funcs |= c_funcs
            has_dot |= c_dot
        ops[name] = (opcode, funcs, has_dot)
        where = re.search(r'op_name="([^"]*)"', line)
        OP_NAMES[name] = where.group(1) if where else ""
        c_funcs, c_dot = computations[current]
        computations[current] = (c_funcs | funcs, c_dot or has_dot)
    return ops


def category(name: str, opcode: str, funcs: set[str], has_dot: bool) -> str:
    if has_dot:
        return "matmul backward" if "transpose(" in OP_NAMES.get(name, "") else "matmul forward"
    for label, prefixes in CATEGORIES:
        if any(f.startswith(prefixes) for f in funcs):
            return label
    if opcode == "convert" or name.startswith("wrapped_convert"):
        return "casts"
    if name.startswith("wrapped_broadcast"):  # mostly the zeros the layer scan's stacked buffers start from
        return "broadcasts"
    if "dynamic-slice" in name or "dynamic-update-slice" in name:  # a layer's slice of the stacked arrays
        return "layer-stack slices"
    if opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copies/transposes"
    return "other"


def profile(dtype: str, shape: str, n_steps: int, top: int) -> None:
    trainer, state, batch = make_trainer(SHAPES[shape], dtype)
    compiled = trainer.step.lower(state, batch).compile()
    ops = parse_hlo(compiled.as_text())
    for _ in range(2):  # compile and warm up
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
    logdir = tempfile.mkdtemp(prefix="profile_train_step_")
    walls = []
    jax.profiler.start_trace(logdir)
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t0)
    jax.profiler.stop_trace()

    data = jax.profiler.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    by_category: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                name = stats.get("hlo_op")
                if name is None or not str(stats.get("hlo_module", "")).startswith("jit__step"):
                    continue
                opcode, funcs, has_dot = ops.get(name, ("?", set(), False))
                if opcode in NESTED:
                    continue
                seconds = event.duration_ns / 1e9 / n_steps
                by_category[category(name, opcode, funcs, has_dot)] += seconds
                by_op[name] += seconds
    wall = float(np.median(walls))
    total = sum(by_category.values())
    print(f"{shape} shape {SHAPES[shape]}, {dtype}: step {wall * 1e3:.0f} ms wall (median of {n_steps}), "
          f"ops {total * 1e3:.0f} ms summed over threads")  # fmt: skip
    for name, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {name:26s} {seconds * 1e3:8.1f} ms {seconds / total:6.1%}")
    print(f"  top {top} ops, and the top {top} of those that are not matmuls:")
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])
    not_matmul = [(n, s) for n, s in ranked if not ops.get(n, ("", set(), False))[2]]
    for name, seconds in ranked[:top] + not_matmul[:top]:
        opcode, funcs, has_dot = ops.get(name, ("?", set(), False))
        where = "/".join(OP_NAMES.get(name, "").split("/")[-3:])[-60:]
        print(f"    {name:28s} {seconds * 1e3:7.1f} ms  {category(name, opcode, funcs, has_dot):22s} {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    profile(args.dtype, args.shape, args.steps, args.top)


if __name__ == "__main__":
    main()
