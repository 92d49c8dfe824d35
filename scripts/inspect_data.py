"""Check a training jsonl before training on it: bad lines, token lengths, and what one sample trains.

    python scripts/inspect_data.py --data_path dataset/demo/sft.jsonl --kind sft
    python scripts/inspect_data.py --data_path dataset/dpo.jsonl --kind dpo --max_seq_len 1024 --show 3
    python scripts/inspect_data.py --data_path dataset/pretrain_hq.jsonl --kind pretrain --max_lines 10000

Builds every sample exactly as training would (dataset/lm_dataset.py), lists each bad line as
file:line: reason, prints token-length percentiles (before truncation) and how many samples
max_seq_len cuts, then prints sample --show token by token with its loss-mask value (1 = trained).
Reads only; writes nothing. Exits with status 1 if any line is bad.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse

import numpy as np

from dataset.lm_dataset import DPODataset, PretrainDataset, RLAIFDataset, SFTDataset
from model.cli import cli
from model.loading import TOKENIZER_DIR

DATASETS = {"pretrain": PretrainDataset, "sft": SFTDataset, "dpo": DPODataset, "rlaif": RLAIFDataset}
# the --max_seq_len each stage trains with by default (rlaif: the prompt budget of train_ppo)
DEFAULT_LEN = {"pretrain": 512, "sft": 512, "dpo": 1024, "rlaif": 66}


def token_length(ds, kind: str, i: int) -> int:
    """Untruncated token count of sample i (DPO: the longer of chosen and rejected; RLAIF: the prompt)."""
    if kind == "rlaif":
        return len(ds.tokenizer(ds[i]["prompt"]).input_ids)
    if kind == "dpo":
        return max(len(ids) for ids in ds.encode(i))
    return len(ds.encode(i))


def show_tokens(tokenizer, X, Y, mask) -> None:
    """One line per position: the token fed at position 0, then each target with its mask value."""
    print(f"{'pos':>5} {'mask':>4} {'id':>6}  token")
    print(f"{0:5d} {'-':>4} {int(X[0]):6d}  {tokenizer.decode([int(X[0])])!r}")
    for t, (tok, m) in enumerate(zip(Y.tolist(), mask.tolist()), start=1):
        print(f"{t:5d} {m:4d} {tok:6d}  {tokenizer.decode([tok])!r}")
    print(f"{int(mask.sum())} of {len(mask)} targets trained")


def main(argv=None):
    p = argparse.ArgumentParser(description="Validate a MiniMind jsonl and show what a sample trains", allow_abbrev=False)
    p.add_argument("--data_path", type=str, required=True, help="jsonl file (resolved against the cwd)")
    p.add_argument("--kind", choices=sorted(DATASETS), required=True, help="which dataset reads it")
    p.add_argument("--tokenizer_path", type=str, default=str(TOKENIZER_DIR), help="tokenizer directory")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="truncation length in tokens (default: the stage's, pretrain/sft 512, dpo 1024, rlaif 66)")
    p.add_argument("--show", type=int, default=0, help="index of the sample to print token by token; -1 = none")
    p.add_argument("--max_lines", type=int, default=0, help="check only the first N samples; 0 = all")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer
    if not (Path(args.tokenizer_path) / "tokenizer.json").exists():
        raise ValueError(f"no tokenizer.json in {args.tokenizer_path}; pass --tokenizer_path")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path, local_files_only=True)
    max_len = args.max_seq_len or DEFAULT_LEN[args.kind]
    ds = DATASETS[args.kind](args.data_path, tokenizer, max_len)

    n = len(ds) if args.max_lines <= 0 else min(args.max_lines, len(ds))
    lengths, bad = [], []
    for i in range(n):
        try:
            ds[i]  # every check training would make, truncation included
            lengths.append(token_length(ds, args.kind, i))
        except ValueError as e:
            bad.append(str(e))
    print(f"{args.data_path}: {len(ds)} non-blank lines, checked {n}, {len(bad)} bad")
    for msg in bad[:50]:
        print(f"  {msg}")
    if len(bad) > 50:
        print(f"  ... and {len(bad) - 50} more")
    if lengths:
        lens = np.asarray(lengths)
        p50, p90, p99 = np.percentile(lens, [50, 90, 99]).round().astype(int)
        cut = int((lens > max_len).sum())
        what = "prompt tokens" if args.kind == "rlaif" else "tokens"
        print(f"{what}: p50 {p50}  p90 {p90}  p99 {p99}  max {lens.max()}; "
              f"{cut} of {len(lens)} ({100 * cut / len(lens):.1f}%) longer than max_seq_len={max_len}"
              + ("" if args.kind == "rlaif" else " and truncated"))

    if 0 <= args.show < len(ds):
        print(f"\nsample {args.show} ({ds.rows.where(args.show)}):")
        try:
            sample = ds[args.show]
        except ValueError as e:
            print(f"  {e}")
        else:
            if args.kind == "rlaif":
                for key, value in sample.items():
                    print(f"--- {key}:\n{value}")
            elif args.kind == "dpo":
                for side in ("chosen", "rejected"):
                    print(f"--- {side}")
                    show_tokens(tokenizer, sample[f"x_{side}"], sample[f"y_{side}"], sample[f"mask_{side}"])
            else:
                show_tokens(tokenizer, *sample)
    return 1 if bad else 0


if __name__ == "__main__":
    cli(lambda: sys.exit(main()))
