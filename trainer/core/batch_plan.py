"""The batches of every epoch: which samples each micro-batch holds (seeded per epoch, split across ranks,
skipping exactly what a resumed run has done) and how they are laid out (the collate).

    collate = supervised_collate(args)          # PackRows or PadRows: the stage script passes its choice
    plan = BatchPlan(dataset, args, run, collate)
    plan.num_batches(epoch)                     # this rank's micro-batches in that epoch
    loader = plan.loader(epoch, skip=12)        # a DataLoader over the rest of the epoch

--batch_size counts samples, as in the original (--batch_unit samples, the default): a micro-batch holds
--batch_size samples of one shuffled order, so an epoch has the original's number of optimizer steps.
Packing is only their layout: PackRows places a micro-batch's samples into rows of max_seq_len - 1
positions (the width of the original's padded rows) by best fit, each sample attending only to itself, so
at most --batch_size rows and the original's memory envelope (batch_size x (max_seq_len - 1) positions)
hold them, with almost no padding (on CPU, where attention runs sample by sample, one row of exactly their
tokens); PadRows gives the original's one sample per row, padded to the batch's
longest. With fixed shapes (--use_compile 1, --pad_to_max 1) rows are max_seq_len - 1 wide and their count
is rounded up to a multiple of a quarter of --batch_size (at most 4 shapes).
--batch_unit rows (the previous meaning): the whole epoch is packed at once (best fit inside shuffled windows
of PACK_WINDOW samples) and a micro-batch is --batch_size packed rows, 2-3x more samples each: an epoch then
has that many times fewer optimizer steps, so scale --learning_rate (or lower --batch_size) to match.
Every collate also gives what the step needs without asking the device: "loss_at" (flat indices of the
supervised positions), "loss_tokens" (their count), "packed" (0 when every row holds one sample, else the
number of samples, padding tails and row starts counted: the length of the model's cu_seqlens on CUDA) and
"samples". Under --use_compile 1 "packed" is rounded up to a power of two, "loss_at" is every position and
"labels" is -100 where no loss is taken (F.cross_entropy's ignore_index), so the loss, inside the compiled
forward, has a fixed shape too.
"""
import math
from bisect import bisect_left, insort

import torch
from torch.utils.data import DataLoader, Dataset

from dataset.lm_dataset import pack_collate, pad_collate
from trainer.core.progress import Logger

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


def _finish(batch: dict, samples: int, rows_to: int = 0, compiled: bool = False) -> dict:
    """Add the host-side facts of a supervised batch (module docstring); pad with empty rows up to `rows_to`;
    `compiled` (fixed shapes for torch.compile): loss_at over every position, labels -100 where loss_mask is 0,
    and the sample count rounded up to a power of two."""
    extra = rows_to - batch["input_ids"].shape[0]
    if extra > 0:
        width = batch["input_ids"].shape[1]
        for key in ("input_ids", "labels", "loss_mask"):
            batch[key] = torch.cat([batch[key], batch[key].new_zeros(extra, width)])
        if "position_ids" in batch:
            batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(width).expand(extra, width)])
    pos = batch.get("position_ids")
    restarts = 0 if pos is None else int((pos[:, 1:] == 0).sum())
    count = restarts + pos.shape[0] if restarts else 0
    batch["packed"] = 1 << (count - 1).bit_length() if compiled and count else count
    mask = batch["loss_mask"].reshape(-1)
    if compiled:
        batch["labels"] = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
        batch["loss_at"] = torch.arange(mask.numel())
        batch["loss_tokens"] = int(mask.count_nonzero())
    else:
        batch["loss_at"] = mask.nonzero().squeeze(1)
        batch["loss_tokens"] = int(batch["loss_at"].numel())
    batch["samples"] = samples
    return batch


def _bucket(rows: int, batch_size: int) -> int:
    """Row counts for fixed shapes: multiples of a quarter of the batch size (at most 4 shapes)."""
    step = max(1, math.ceil(batch_size / 4))
    return math.ceil(rows / step) * step


class PadRows:
    """Collate: one sample per row, right-padded to the batch's longest (to max_seq_len - 1 with `width`), as
    the original. Picklable, for DataLoader workers."""

    def __init__(self, width: int | None = None, pad_id: int = 0, compiled: bool = False):
        self.width, self.pad_id, self.compiled = width, pad_id, compiled

    def __call__(self, samples):
        return _finish(pad_collate(samples, self.pad_id, self.width), len(samples), compiled=self.compiled)

    def describe(self, args) -> str:
        return f"one sample per row, padded to {'max_seq_len - 1' if self.width else 'the longest in the batch'}"


class PackRows:
    """Collate: the micro-batch's samples packed into rows of `capacity` positions by best fit (longest first),
    each sample with positions from 0 and its own targets. `static`: rows `capacity` wide and their count a
    bucket of `batch_size` (fixed shapes for torch.compile). Also takes already planned rows (--batch_unit rows).
    `compiled`: fixed shapes for torch.compile (see _finish)."""

    def __init__(self, capacity: int, batch_size: int, static: bool = False, pad_id: int = 0, one_row: bool = False,
                 compiled: bool = False):
        self.capacity, self.batch_size, self.static, self.pad_id = capacity, batch_size, static, pad_id
        self.one_row, self.compiled = one_row and not static, compiled

    def __call__(self, batch):
        planned = bool(batch) and isinstance(batch[0], list)     # rows planned over the whole epoch
        if planned:
            rows = batch
        elif self.one_row:      # every sample end to end in one row exactly as long as their tokens: no padding
            rows = [batch]
        else:
            lengths = [len(x) for x, _, _ in batch]
            rows = [[batch[i] for i in row] for row in best_fit(list(range(len(batch))), lengths, self.capacity)]
        out = pack_collate(rows, self.pad_id, self.capacity if self.static else None)
        rows_to = (self.batch_size if planned else _bucket(len(rows), self.batch_size)) if self.static else 0
        return _finish(out, sum(len(row) for row in rows), rows_to, self.compiled)

    def describe(self, args) -> str:
        if args.batch_unit == "rows":
            return f"packed rows of {self.capacity} positions (--batch_unit rows)"
        if self.one_row:
            return (f"packed end to end into one row of their tokens (at most {self.batch_size} x {self.capacity} = "
                    f"{self.batch_size * self.capacity:,}; CPU: attention runs sample by sample, so no padding)")
        return (f"packed into at most {self.batch_size} rows of {self.capacity} positions "
                f"(budget {self.batch_size} x {self.capacity} = {self.batch_size * self.capacity:,} tokens)")


def supervised_collate(args, pad_id: int = 0):
    """The collate of the supervised stages: PackRows with --packing 1 (their default), else PadRows; fixed
    shapes with --use_compile 1 or --pad_to_max 1, and with --use_compile 1 a loss over every position (-100
    where none is taken), so that no step of the compiled model sees a new shape after the first few."""
    compiled = bool(getattr(args, "use_compile", 0))
    static = bool(getattr(args, "pad_to_max", 0)) or compiled
    if getattr(args, "packing", 0):
        # on CPU the model attends sample by sample (model_minimind.packed_kernel), so a row's width costs
        # nothing and the micro-batch is one row without padding; elsewhere rows are max_seq_len - 1 wide
        # (not for MoE: its per-sequence load-balancing loss would then see one sequence per micro-batch)
        one_row = "cpu" in str(getattr(args, "device", "")) and getattr(args, "batch_unit", "samples") == "samples" \
            and not getattr(args, "use_moe", 0)
        return PackRows(args.max_seq_len - 1, args.batch_size, static, pad_id, one_row, compiled=compiled)
    return PadRows(args.max_seq_len - 1 if static else None, pad_id, compiled=compiled)


class BatchPlan:
    """The batches of every epoch for one run (see the module docstring). `collate`: PackRows, PadRows, or any
    function of a list of samples (DPO, the RL stages)."""

    def __init__(self, dataset, args, run, collate=None):
        self.dataset, self.args, self.run = dataset, args, run
        self.collate = collate or PadRows()
        self.by_rows = getattr(args, "batch_unit", "samples") == "rows"
        if self.by_rows and not isinstance(self.collate, PackRows):
            raise ValueError("--batch_unit rows counts packed rows: it needs --packing 1")
        if self.by_rows:
            self.lengths = dataset.token_lengths()          # from the token cache: no tokenizing
        else:
            grouped = getattr(args, "group_by_length", 0) and hasattr(dataset, "lengths")
            self.lengths = dataset.lengths() if grouped else None
        self._epochs, self._loader, self._sampler = {}, None, None

    def batches(self, epoch: int) -> list:
        if epoch not in self._epochs:
            a, rank, world = self.args, self.run.rank, self.run.world_size
            if self.by_rows:
                plan = packed_batches(self.lengths, self.collate.capacity, a.batch_size, epoch, a.seed, rank, world)
            else:
                plan = shuffled_batches(len(self.dataset), a.batch_size, epoch, a.seed, rank, world, self.lengths)
            self._epochs[epoch] = plan
        return self._epochs[epoch]

    def num_batches(self, epoch: int) -> int:
        return len(self.batches(epoch))

    def describe(self) -> str:
        """The first log line about batches: samples per optimizer step, the layout, steps per epoch."""
        a, world = self.args, self.run.world_size
        steps = math.ceil(self.num_batches(0) / a.accumulation_steps)
        layout = self.collate.describe(a) if hasattr(self.collate, "describe") else "collated by the stage"
        if self.by_rows:
            per = sum(len(row) for batch in self.batches(0) for row in batch) / max(1, self.num_batches(0))
            head = (f"~{per * a.accumulation_steps * world:.0f} samples per optimizer step ({a.batch_size} packed rows "
                    f"of ~{per / a.batch_size:.1f} samples per micro-batch")
        else:
            head = (f"{a.batch_size * a.accumulation_steps * world:,} samples per optimizer step ({a.batch_size} per "
                    "micro-batch")
        return (f"batches: {head} x {a.accumulation_steps} accumulation x {world} process"
                f"{'es' if world > 1 else ''}); {layout}; {self.num_batches(0):,} micro-batches = {steps:,} "
                "optimizer steps per epoch")

    def loader(self, epoch: int, skip: int = 0) -> DataLoader:
        """A DataLoader over this rank's batches of `epoch` after the first `skip`. One DataLoader serves every
        epoch, so its --num_workers processes persist; on CUDA batches come in pinned memory (copied with
        non_blocking)."""
        if skip:
            Logger(f"Epoch [{epoch + 1}/{self.args.epochs}]: skipping the first {skip} steps, starting at step {skip + 1}")
        if self._loader is None:
            workers = self.args.num_workers
            self._sampler = _EpochBatches(self)
            self._loader = DataLoader(_Rows(self.dataset) if self.by_rows else self.dataset,
                                      batch_sampler=self._sampler, num_workers=workers, collate_fn=self.collate,
                                      pin_memory=self.run.device_type == "cuda", persistent_workers=workers > 0)
        self._sampler.epoch, self._sampler.skip = epoch, skip
        return self._loader

    def close(self):
        """Stop the DataLoader's worker processes now. The plan, its DataLoader and the batch sampler form a
        reference cycle, so without this the persistent workers would end only when the garbage collector
        reaches them, and by then the index queues' finalizers have run: torch's shutdown then waits out its
        5 s join timeout, at some later point of the process (tests, notebooks, scripts calling main())."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        if loader is not None:
            loader._iterator = None


class _EpochBatches:
    """The batch sampler of the one DataLoader: the batches of the epoch (and skip) the plan last set. The
    DataLoader reads it in the main process when an iterator starts, so workers never need to know."""

    def __init__(self, plan):
        self.plan, self.epoch, self.skip = plan, 0, 0

    def __iter__(self):
        return iter(self.plan.batches(self.epoch)[self.skip:])

    def __len__(self):
        return max(0, self.plan.num_batches(self.epoch) - self.skip)
