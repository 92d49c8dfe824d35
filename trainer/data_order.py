"""The order of the batches: seeded per epoch, split across ranks, optionally grouped by length, and
with the batches a resumed run has already done skipped exactly."""
import math

import torch
from torch.utils.data import DataLoader, Sampler

from trainer.progress import Logger


class SkipBatchSampler(Sampler):
    """This rank's batches of one epoch, in a seeded order, minus the first `skip_batches`.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted run would have seen. With `lengths`, samples are grouped into batches of similar
    length (sorted inside shuffled windows of 64 batches, then the batches are shuffled)."""

    def __init__(self, num_samples: int, batch_size: int, epoch: int, seed: int = 42, rank: int = 0,
                 world_size: int = 1, skip_batches: int = 0, lengths=None, shuffle: bool = True):
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=g).tolist() if shuffle else list(range(num_samples))
        per_rank = math.ceil(num_samples / world_size)
        order += order[: per_rank * world_size - num_samples]        # pad so every rank gets as many samples
        order = order[rank::world_size]
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if lengths is not None:
            window = batch_size * 64
            grouped = []
            for i in range(0, len(order), window):
                chunk = sorted(order[i:i + window], key=lambda j: lengths[j], reverse=True)
                grouped += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
            perm = torch.randperm(len(grouped), generator=g).tolist()
            batches = [grouped[i] for i in perm]
        self.total = len(batches)
        self.batches = batches[skip_batches:]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def epoch_loader(dataset, args, epoch: int, start=None, run=None, collate_fn=None):
    """(DataLoader over this rank's remaining batches of the epoch, total batches in the epoch)."""
    from dataset.lm_dataset import pad_collate
    skip = start.step if start is not None and epoch == start.epoch else 0
    lengths = dataset.lengths() if args.group_by_length and hasattr(dataset, "lengths") else None
    sampler = SkipBatchSampler(len(dataset), args.batch_size, epoch, args.seed, run.rank if run else 0,
                               run.world_size if run else 1, skip, lengths)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        collate_fn=collate_fn or pad_collate,
                        pin_memory=bool(run and run.device_type == "cuda"),
                        persistent_workers=False)
    if skip:
        Logger(f"Epoch [{epoch + 1}/{args.epochs}]: skipping the first {skip} steps, starting at step {skip + 1}")
    return loader, sampler.total
