"""Does the packed-row attention mask cost more than packing saves? Forward + backward time of one
batch of packed rows against the same samples one per row, padded per batch.

    python bench/bench_packing.py                                  # 512x8 model, 8 rows of 512 tokens, fp32
    python bench/bench_packing.py --hidden_size 64 --num_hidden_layers 2 --rows 2 --max_seq_len 128   # quick
    python bench/bench_packing.py --hidden_size 256 --num_hidden_layers 4 --rows 1 --median_len 50   # demo SFT
Samples get lengths from a log-normal draw (median --median_len tokens, 120 by default, like short documents;
capped at max_seq_len) until they fill `rows` packed rows. Rows of the table:
  unpacked, padded     the same samples one per row, `rows` per batch, padded to each batch's longest
  packed, sample by sample  position_ids restart per sample; attention runs per sample (causal SDPA on each
                       span): what training uses on CPU
  packed, block mask   the same rows with one block-diagonal causal mask over the whole row (SDPA, boolean
                       mask): what training uses on accelerators and under torch.compile
  packed, plain causal the packed rows with no position_ids (samples see each other: only to show what the
                       mask itself costs; not a valid training setup)
The layouts take turns, best of --repeats. Prints a markdown table (time, useful tokens/s, padding share,
speed-up). Writes nothing.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

import model.model_minimind as model_minimind
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.core.progress import cpu_description


def random_lengths(rows: int, width: int, seed: int, median: int = 120) -> list:
    """Lengths that fill `rows` rows of `width` tokens with first-fit packing (returns rows of lengths)."""
    rng = random.Random(seed)
    mu = math.log(median)
    packed = [[] for _ in range(rows)]
    free = [width] * rows
    misses = 0
    while misses < 50:
        n = min(width, max(8, int(rng.lognormvariate(mu, 0.7))))
        fit = next((r for r in range(rows) if free[r] >= n), None)
        if fit is None:
            misses += 1
            continue
        packed[fit].append(n)
        free[fit] -= n
    return packed


def packed_batch(rows: list, width: int, vocab: int):
    ids = torch.randint(3, vocab, (len(rows), width))
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    samples = []
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            pos[r, start:start + n] = torch.arange(n)
            labels[r, start:start + n] = ids[r, start:start + n]
            samples.append(ids[r, start:start + n])
            start += n
        pos[r, start:] = torch.arange(width - start)
    return ids, pos, labels, samples


def unpacked_batches(samples: list, per_batch: int, seed: int):
    """The same samples in a shuffled order, one per row, each batch padded to its longest (pad = 0, label -100)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    batches = []
    for i in range(0, len(order), per_batch):
        group = [samples[j] for j in order[i:i + per_batch]]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for r, s in enumerate(group):
            ids[r, :len(s)], labels[r, :len(s)] = s, s
        batches.append((ids, None, labels))
    return batches


def fwd_bwd(model, batches) -> float:
    """Seconds for forward + backward over all `batches` (token-level mean CE over real tokens)."""
    t0 = time.perf_counter()
    for ids, pos, labels in batches:
        logits = model(ids, position_ids=pos).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                        ignore_index=-100).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def best_times(model, runs: list, repeats: int) -> dict:
    """Best-of-N seconds per layout; the layouts take turns (after one warm-up round), so that a change in the
    machine's load hits all of them alike."""
    best = {name: float("inf") for name, _, _ in runs}
    for round_ in range(repeats + 1):
        for name, batches, spans in runs:
            model_minimind.PACKED_ATTENTION = None if spans else "mask"
            try:
                seconds = fwd_bwd(model, batches)
            finally:
                model_minimind.PACKED_ATTENTION = None
            if round_:
                best[name] = min(best[name], seconds)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--rows", type=int, default=8, help="packed rows per batch, and samples per unpacked batch")
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--median_len", type=int, default=120, help="median sample length (log-normal draw)")
    p.add_argument("--repeats", type=int, default=2, help="best of N timed passes (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                         use_moe=bool(args.use_moe))
    model = MiniMindForCausalLM(cfg).train()
    rows = random_lengths(args.rows, args.max_seq_len, seed=0, median=args.median_len)
    ids, pos, labels, samples = packed_batch(rows, args.max_seq_len, cfg.vocab_size)
    useful = sum(len(s) for s in samples)
    unpacked = unpacked_batches(samples, args.rows, seed=0)
    runs = [("unpacked, padded", unpacked, True),
            ("packed, sample by sample", [(ids, pos, labels)], True),
            ("packed, block mask", [(ids, pos, labels)], False),
            ("packed, plain causal", [(ids, None, labels)], True)]
    print(f"# forward+backward: {args.hidden_size}x{args.num_hidden_layers}{' MoE' if args.use_moe else ''}, fp32, "
          f"{len(samples)} samples ({useful} tokens) in {args.rows} rows of {args.max_seq_len}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {cpu_description()}")
    print("| layout | batches | padded tokens | padding share | time (s) | useful tokens/s | vs unpacked |")
    print("|---|---|---|---|---|---|---|")
    best = best_times(model, runs, args.repeats)
    base = None
    for name, batches, _ in runs:
        seconds = best[name]
        total = sum(b[0].numel() for b in batches)
        base = base or seconds
        print(f"| {name} | {len(batches)} | {total} | {1 - useful / total:.0%} | {seconds:.2f} | "
              f"{useful / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
