"""The order of the batches: seeded per epoch, split across ranks, packed (or length-grouped), and with
the batches a resumed run has already done skipped exactly.

    plan = BatchPlan(dataset, args, run)        # --packing 1: measures every sample's length once (cached)
    plan.num_batches(epoch)                     # this rank's micro-batches in that epoch
    loader = plan.loader(epoch, skip=12)        # a DataLoader over the rest of the epoch

Packing (--packing 1, the default for the stages that train on single sequences): whole samples are
placed into rows of max_seq_len - 1 positions (the width of the original's padded rows) by best fit,
decreasing, inside windows of the epoch's shuffled order; the rows are shuffled, split across ranks and
grouped --batch_size rows to a batch. The plan depends only on the sample lengths and (seed, epoch), so a
resumed run and every rank see the same plan. Without packing, batches hold --batch_size samples in
shuffled order (or grouped by length with --group_by_length 1), padded to their longest.
"""
import hashlib
import json
import math
import os
import time
from bisect import bisect_left, insort
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from trainer.core.progress import Logger, is_main_process

PACK_WINDOW = 8192   # samples packed together: large enough for ~99% full rows, small enough to stay shuffled


def shuffled_batches(num_samples: int, batch_size: int, epoch: int, seed: int = 42, rank: int = 0, world_size: int = 1,
                     lengths=None) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch, in an order that depends only on (seed, epoch).

    Ranks get every world_size-th sample of one shuffled order (padded by repeating its head so every
    rank gets as many). With `lengths`, samples are grouped into batches of similar length (sorted
    inside shuffled windows of 64 batches, then the batches are shuffled)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    per_rank = math.ceil(num_samples / world_size)
    order += order[: per_rank * world_size - num_samples]
    order = order[rank::world_size]
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window, grouped = batch_size * 64, []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j], reverse=True)
        grouped += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [grouped[i] for i in torch.randperm(len(grouped), generator=g).tolist()]


def best_fit(order: list[int], lengths, capacity: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Pack samples into rows of `capacity` positions: within each window of `order`, longest first, each
    sample goes to the fullest row it still fits in (a new row if none). Deterministic."""
    rows = []
    for w in range(0, len(order), window):
        free, bins = [], []                      # free: sorted (space left, row index)
        for i in sorted(order[w:w + window], key=lambda j: -lengths[j]):   # stable: ties keep the shuffled order
            n = min(int(lengths[i]), capacity)
            k = bisect_left(free, (n, -1))
            if k == len(free):
                bins.append([i])
                space, row = capacity - n, len(bins) - 1
            else:
                space, row = free.pop(k)
                bins[row].append(i)
                space -= n
            if space:
                insort(free, (space, row))
        rows += bins
    return rows


def packed_batches(lengths, capacity: int, batch_size: int, epoch: int, seed: int = 42, rank: int = 0,
                   world_size: int = 1) -> list[list[list[int]]]:
    """This rank's batches of packed rows (lists of sample indices) for one epoch."""
    g = torch.Generator().manual_seed(seed + epoch)
    rows = best_fit(torch.randperm(len(lengths), generator=g).tolist(), lengths, capacity)
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    per_rank = math.ceil(len(rows) / world_size)
    rows += rows[: per_rank * world_size - len(rows)]
    rows = rows[rank::world_size]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


class _Rows(Dataset):
    """dataset[row] for a packed row: the list of its samples (the DataLoader fetches one row per index)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, row):
        return [self.ds[i] for i in row]


class BatchPlan:
    """The batches of every epoch for one run (see the module docstring)."""

    def __init__(self, dataset, args, run, collate_fn=None):
        from dataset.lm_dataset import pack_collate, pad_collate
        self.dataset, self.args, self.run = dataset, args, run
        self.packing = bool(getattr(args, "packing", 0))
        self.capacity = args.max_seq_len - 1
        static = bool(getattr(args, "pad_to_max", 0) or getattr(args, "use_compile", 0))   # fixed shapes
        if self.packing:
            self.lengths = sample_lengths(dataset, args)
            self.collate = partial(pack_collate, length=self.capacity if static else None)
        else:
            grouped = getattr(args, "group_by_length", 0) and hasattr(dataset, "lengths")
            self.lengths = dataset.lengths() if grouped else None
            self.collate = collate_fn or pad_collate
        self._epochs = {}

    def batches(self, epoch: int) -> list:
        if epoch not in self._epochs:
            a, rank, world = self.args, self.run.rank, self.run.world_size
            if self.packing:
                plan = packed_batches(self.lengths, self.capacity, a.batch_size, epoch, a.seed, rank, world)
            else:
                plan = shuffled_batches(len(self.dataset), a.batch_size, epoch, a.seed, rank, world, self.lengths)
            self._epochs[epoch] = plan
        return self._epochs[epoch]

    def num_batches(self, epoch: int) -> int:
        return len(self.batches(epoch))

    def loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """A DataLoader over this rank's batches of `epoch` after the first `skip`."""
        batches = self.batches(epoch)[skip:]
        if skip:
            Logger(f"Epoch [{epoch + 1}/{self.args.epochs}]: skipping the first {skip} steps, starting at step {skip + 1}")
        return DataLoader(_Rows(self.dataset) if self.packing else self.dataset, batch_sampler=batches,
                          num_workers=self.args.num_workers, collate_fn=self.collate,
                          pin_memory=self.run.device_type == "cuda", persistent_workers=False)


# ---- sample lengths for packing ----
def sample_lengths(dataset, args) -> np.ndarray:
    """Length of every sample's input (after truncation), measured by building each sample once, in
    --num_workers processes. Cached under --checkpoint_dir/lengths/, keyed by the data file, the
    tokenizer and max_seq_len; rank 0 measures, the other ranks wait and read the cache."""
    cache = _lengths_cache_path(dataset, args)
    if is_main_process() and not cache.exists():
        lengths = _measure_lengths(dataset, args.num_workers)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, lengths)
        os.replace(tmp, cache)
    if dist.is_initialized():
        dist.barrier()
    lengths = np.load(cache)
    if len(lengths) != len(dataset):      # the data changed without changing size and mtime
        cache.unlink(missing_ok=True)
        return sample_lengths(dataset, args)
    return lengths


def _lengths_cache_path(dataset, args) -> Path:
    rows = dataset.rows
    stat = os.stat(rows.path)
    tok = dataset.tokenizer
    key = json.dumps([os.path.abspath(rows.path), stat.st_size, stat.st_mtime_ns, type(dataset).__name__,
                      dataset.max_length, len(dataset), int(rows.linenos[-1]) if len(rows) else 0,
                      hashlib.sha1(tok.backend_tokenizer.to_str().encode()).hexdigest(),
                      getattr(tok, "chat_template", None) or ""])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(args.checkpoint_dir) / "lengths" / f"{Path(rows.path).stem}-{digest}.npy"


def _lengths_of(samples) -> list[int]:
    return [len(sample[0]) for sample in samples]


def _measure_lengths(dataset, num_workers: int) -> np.ndarray:
    n, out, t0, shown = len(dataset), [], time.time(), time.time()
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers, collate_fn=_lengths_of)
    for chunk in loader:
        out += chunk
        if time.time() - shown > 10:
            shown = time.time()
            eta = (shown - t0) / len(out) * (n - len(out)) / 60
            Logger(f"measuring sample lengths for packing: {len(out):,}/{n:,} ({100 * len(out) / n:.0f}%), "
                   f"eta {eta:.1f}min")
    if time.time() - t0 > 10:
        Logger(f"measured {n:,} sample lengths in {time.time() - t0:.0f}s (cached for the next run)")
    return np.asarray(out, dtype=np.int32)
