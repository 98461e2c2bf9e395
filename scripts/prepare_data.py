"""Prepare a dataset: text, JSON-lines, Parquet and Arrow corpora (local or gs://) to packed token shards.

Successor of the original create_finetune_tfrecords.py; the library does the work (mesh_transformer.prepare).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh_transformer.errors import UserError  # noqa: E402
from mesh_transformer.prepare import PART_BYTES, prepare_dataset  # noqa: E402
from mesh_transformer.prepare_cluster import PreparationFailed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH_OR_GLOB",
        help="files (.txt, .jsonl, .jsonl.zst, .jsonl.gz, .json.zst, .parquet, .arrow; other = text), dirs, "
        "globs, `datasets` save_to_disk folders",
    )
    parser.add_argument("--output", required=True, help="new dataset directory (local or gs://)")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", help="a Hugging Face tokenizer.json")
    tokenizer.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this many tokens on the inputs",
    )
    parser.add_argument(
        "--text-column",
        default="text",
        help="text field of JSON lines, column of Parquet and Arrow files (default: text); records with "
        "'prompt' and 'completion' instead are fine-tuning examples",
    )
    parser.add_argument("--seq", type=int, default=2048, help="sequence length the dataset is meant for")
    parser.add_argument(
        "--val-fraction", type=float, default=0.01, help="fraction of documents for validation"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes (1 = in this process, which already uses every core); with "
        "--ray-address local, the least number of CPUs of the local Ray",
    )
    parser.add_argument(
        "--ray-address",
        metavar="auto|HOST:PORT|local",
        help="prepare the input's parts as tasks of this Ray cluster (local: a private one on this machine)",
    )
    parser.add_argument(
        "--part-mb",
        type=float,
        default=PART_BYTES / 1e6,
        help="input megabytes per part, the unit a Ray task prepares (whole files; the dataset does not "
        "depend on how many workers prepare it, but does on this)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument(
        "--max-vocab", type=int, help="refuse a tokenizer larger than this (the model's n_vocab)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad line or document instead of skipping and counting it",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        index = prepare_dataset(
            args.input,
            args.output,
            tokenizer_path=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer,
            seq=args.seq,
            val_fraction=args.val_fraction,
            workers=args.workers,
            seed=args.seed,
            strict=args.strict,
            max_vocab=args.max_vocab,
            progress=True,
            text_column=args.text_column,
            ray_address=args.ray_address,
            part_bytes=max(1, round(args.part_mb * 1e6)),
        )
    except (UserError, PreparationFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no dataset was written", file=sys.stderr)
        return 130
    print(
        f"wrote {args.output}: {index['files']} files, {index['documents']} documents, "
        f"{index['tokens']} tokens "
        f"({index['dtype']}, vocabulary {index['vocab_size']}, EOS id {index['eos_id']})"
    )
    if index["examples"]:
        print(f"  {index['examples']} fine-tuning examples: the loss counts their completions only")
    for name, split in index["splits"].items():
        print(
            f"  {name}: {split['documents']} documents, {split['tokens']} tokens, "
            f"{len(split['shards'])} shards"
        )
    for reason, count in index["skipped"].items():
        if count:
            print(f"  skipped {count} ({reason}), first at {index['skipped_examples'][reason]}")
    for warning in index["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
