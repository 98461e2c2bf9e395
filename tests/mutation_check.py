"""Does the suite catch what it names? Break one behaviour at a time in a temporary copy of the checkout, run
the tests that should notice, and print which of them failed.

    python tests/mutation_check.py                 # every break (about 15 minutes on 2 cores)
    python tests/mutation_check.py --only remat_noop --only top_p_off
    python tests/mutation_check.py --list

Each break is a small patch of one function's text; when the code has moved on so that a patch no longer
applies, the run says so and names the break to update here. The working tree is never modified: each break
runs in its own copy (git's tracked and untracked, not ignored, files). Exit status 0 when every break made
at least one test fail and the unbroken copy passed them all. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PatchError(Exception):
    """A break that no longer applies to the code as it is now."""


@dataclass(frozen=True)
class Break:
    name: str
    path: str  # file the patch applies to, relative to the repository root
    what: str
    patch: Callable[[str], str]
    tests: tuple[str, ...]  # test files (or node ids) expected to notice


def replace_once(pattern: str, replacement: str, flags: int = 0) -> Callable[[str], str]:
    """A patch: the regex must match exactly once."""

    def patch(text: str) -> str:
        hits = len(re.findall(pattern, text, flags))
        if hits != 1:
            raise PatchError(f"pattern {pattern!r} matches {hits} times (expected once)")
        return re.sub(pattern, replacement, text, count=1, flags=flags)

    return patch


def swap_once(a: str, b: str) -> Callable[[str], str]:
    """A patch: the literal strings a and b (each found exactly once) trade places."""

    def patch(text: str) -> str:
        for s in (a, b):
            if text.count(s) != 1:
                raise PatchError(f"{s!r} occurs {text.count(s)} times (expected once)")
        return text.replace(a, "\0").replace(b, a).replace("\0", b)

    return patch


def at_function_start(function: str, statement: str, needs: tuple[str, ...]) -> Callable[[str], str]:
    """A patch: `statement` becomes the first statement of `function` (after its docstring). The function
    must exist and take the parameters `needs` - so the break survives rewrites of the function's body."""

    def patch(text: str) -> str:
        tree = ast.parse(text)
        found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
        if len(found) != 1:
            raise PatchError(f"found {len(found)} functions named {function} (expected one)")
        node = found[0]
        params = {a.arg for a in node.args.args + node.args.kwonlyargs}
        missing = [p for p in needs if p not in params]
        if missing:
            raise PatchError(f"{function} has no parameter(s) {', '.join(missing)} any more")
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
        if has_doc and len(body) == 1:
            raise PatchError(f"{function} has nothing but a docstring")
        first = body[1] if has_doc else body[0]
        lines = text.splitlines(keepends=True)
        indent = " " * first.col_offset
        lines.insert(first.lineno - 1, f"{indent}{statement}  # mutation_check\n")
        return "".join(lines)

    return patch


TRAIN = ("tests/test_train.py",)
SAMPLING = ("tests/test_sampling.py", "tests/test_sampling_oracles.py")
HF = ("tests/test_model.py", "tests/test_hf.py")

BREAKS = [
    Break(
        "no_clip",
        "mesh_transformer/optimizer.py",
        "no gradient clipping",
        replace_once(r"\n\s*optax\.clip_by_global_norm\(1\.0\),", ""),
        TRAIN,
    ),
    Break(
        "adam_b2_0.99",
        "mesh_transformer/optimizer.py",
        "Adam's b2 = 0.99 instead of 0.999",
        replace_once(r"b2=0\.999", "b2=0.99"),
        TRAIN,
    ),
    Break(
        "decay_everything",
        "mesh_transformer/optimizer.py",
        "weight decay on every parameter (biases and norms too)",
        replace_once(r"mask=decay_mask", "mask=None"),
        TRAIN,
    ),
    Break(
        "l2_before_adam",
        "mesh_transformer/optimizer.py",
        "weight decay added to the gradient before Adam (L2) instead of after it",
        replace_once(
            r"(\n\s*optax\.scale_by_adam\([^\n]*\),)(\n\s*optax\.add_decayed_weights\([^\n]*\),)", r"\2\1"
        ),
        TRAIN,
    ),
    Break(
        "remat_noop",
        "mesh_transformer/models/layers.py",
        "remat = 'layer' recomputes nothing (hk.remat skipped)",
        replace_once(r"step = hk\.remat\(step\)", "step = step"),
        TRAIN,
    ),
    Break(
        "top_p_off",
        "mesh_transformer/sampling.py",
        "sample_next ignores top_p (treated as 1)",
        at_function_start("sample_next", "top_p_B = jnp.ones_like(top_p_B)", needs=("top_p_B",)),
        SAMPLING,
    ),
    Break(
        "temperature_ignored",
        "mesh_transformer/sampling.py",
        "sample_next ignores the temperature (1 unless greedy)",
        at_function_start(
            "sample_next",
            "temperature_B = jnp.where(temperature_B > 0, 1.0, 0.0).astype(temperature_B.dtype)",
            needs=("temperature_B",),
        ),
        SAMPLING,
    ),
    Break(
        "hf_swap_q_k",
        "mesh_transformer/models/gptj.py",
        "the HF name map swaps q_proj and k_proj",
        swap_once("attn.q_proj.weight", "attn.k_proj.weight"),
        HF,
    ),
    Break(
        "original_swap_q_k",
        "mesh_transformer/original.py",
        "the original-checkpoint reader takes linear_2 (k) as q and linear (q) as k",
        swap_once('("q_proj", "w", CONCAT_OUT)', '("k_proj", "w", CONCAT_OUT)'),
        ("tests/test_hf.py",),
    ),
]


def copy_checkout(dest: Path) -> None:
    """Git's tracked and untracked (not ignored) files of the checkout, as they are now, into dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(checkout: Path, tests: tuple[str, ...], timeout_s: int) -> tuple[set[str], set[str], float]:
    """(failed test ids, passed test ids, seconds) of pytest over `tests` in `checkout`."""
    report = checkout / "mutation-report.xml"
    env = dict(os.environ, PYTHONPATH=str(checkout))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junit-xml={report}"]
    started = time.monotonic()
    subprocess.run(
        [*command, *tests], cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    seconds = time.monotonic() - started
    failed, passed = set(), set()
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(test_id)
            elif case.find("skipped") is None:
                passed.add(test_id)
    report.unlink(missing_ok=True)
    return failed, passed, seconds


def check(break_: Break | None, tests: tuple[str, ...], timeout_s: int) -> tuple[set[str], set[str], float]:
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        checkout = Path(tmp)
        copy_checkout(checkout)
        if break_ is not None:
            path = checkout / break_.path
            path.write_text(break_.patch(path.read_text()))
        return run_tests(checkout, tests, timeout_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run this break (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unbroken copy")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    args = parser.parse_args()
    if args.list:
        for b in BREAKS:
            print(f"{b.name:20} {b.what}  [{b.path}; {' '.join(b.tests)}]")
        return 0
    names = {b.name for b in BREAKS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        print(
            f"error: unknown break(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}",
            file=sys.stderr,
        )
        return 1
    chosen = [b for b in BREAKS if not args.only or b.name in args.only]

    for b in chosen:  # every patch must apply before anything slow runs
        try:
            b.patch((ROOT / b.path).read_text())
        except PatchError as e:
            print(f"error: break {b.name} no longer applies to {b.path}: {e}; update it in {__file__}")
            return 1

    baseline_failed: set[str] = set()
    if not args.no_baseline:
        files = tuple(dict.fromkeys(t for b in chosen for t in b.tests))
        baseline_failed, passed, seconds = check(None, files, args.timeout)
        print(f"unbroken: {len(passed)} passed, {len(baseline_failed)} failed in {seconds:.0f} s")
        for test in sorted(baseline_failed):
            print(f"  fails without any break (ignored below): {test}")

    rows, ok = [], not baseline_failed
    for b in chosen:
        failed, passed, seconds = check(b, b.tests, args.timeout)
        caught = sorted(failed - baseline_failed)
        ok &= bool(caught)
        rows.append((b, caught, len(passed), seconds))
        print(f"{b.name}: {len(caught)} failed, {len(passed)} passed ({seconds:.0f} s)", flush=True)

    print("\n| break | what | tests that failed |\n| --- | --- | --- |")
    for b, caught, _, _ in rows:
        listed = "<br>".join(caught) if caught else "**NONE - not caught**"
        print(f"| {b.name} | {b.what} | {listed} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
