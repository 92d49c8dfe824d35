"""trainer/core/batch_plan.py on its own: the order of the batches (seeded per epoch, split across ranks, packed by
best fit or length-grouped), BatchPlan's loaders (exactly the batches after a resume's skip; --batch_size
samples per micro-batch whatever the layout; --batch_unit rows), the collates (PackRows, PadRows: layouts,
host-side counts, fixed-shape buckets) and the rows plan's sample lengths (from the token cache)."""
import math
from types import SimpleNamespace

import pytest
import torch

from dataset.lm_dataset import PretrainDataset, SFTDataset, pack_collate
from model.loading import load_tokenizer
from tests.conftest import tokenizer_dir, write_tiny_corpus
from trainer.core import batch_plan
from trainer.core.batch_plan import (BatchPlan, PackRows, PadRows, best_fit, packed_batches, shuffled_batches,
                                     supervised_collate)


def test_shuffled_batches_order_and_ranks():
    full = shuffled_batches(50, 4, epoch=0)
    assert len(full) == 13 and sorted(sum(full, [])) == list(range(50))
    assert shuffled_batches(50, 4, epoch=0) == full                                 # depends only on (seed, epoch)
    assert shuffled_batches(50, 4, epoch=1) != full                                 # a new order every epoch
    r0 = sum(shuffled_batches(50, 4, epoch=0, rank=0, world_size=2), [])
    r1 = sum(shuffled_batches(50, 4, epoch=0, rank=1, world_size=2), [])
    assert len(r0) == len(r1) == 25 and set(r0) | set(r1) == set(range(50)) and not set(r0) & set(r1)
    lengths = [i % 7 for i in range(64)]
    grouped = shuffled_batches(64, 8, epoch=0, lengths=lengths)
    assert sorted(sum(grouped, [])) == list(range(64))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in full[:8] if b)


def test_best_fit_rows_hold_every_sample_once_within_capacity():
    import random
    rng = random.Random(0)
    lengths = [rng.randint(1, 63) for _ in range(500)]
    rows = best_fit(list(range(500)), lengths, capacity=63, window=128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 63 for row in rows)
    # best fit fills rows: at most one row per window is less than half full
    assert sum(sum(lengths[i] for i in row) < 32 for row in rows) <= 4
    assert len(rows) <= sum(lengths) / 63 * 1.1 + 4
    # a sample longer than the row is truncated there (the dataset truncates it the same way)
    assert best_fit([0, 1], [100, 5], capacity=63) == [[0], [1]]


def test_packed_batches_depend_on_seed_epoch_and_split_ranks():
    lengths = [(i * 7) % 30 + 1 for i in range(200)]
    a = packed_batches(lengths, 31, batch_size=4, epoch=0)
    assert a == packed_batches(lengths, 31, batch_size=4, epoch=0) and a != packed_batches(lengths, 31, 4, epoch=1)
    assert sorted(i for batch in a for row in batch for i in row) == list(range(200))
    ranks = [packed_batches(lengths, 31, 4, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    rows = [[tuple(row) for batch in plan for row in batch] for plan in ranks]
    assert len(rows[0]) == len(rows[1]) and not set(rows[0]) & set(rows[1]) - set(rows[0][:1])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_dir())


def plan_args(tmp_path, **flags):
    args = dict(packing=0, max_seq_len=64, batch_size=4, seed=42, epochs=2, num_workers=0, pad_to_max=0,
                use_compile=0, group_by_length=0, batch_unit="samples", accumulation_steps=2,
                checkpoint_dir=str(tmp_path / "ckpt"))
    return SimpleNamespace(**(args | flags))


def one_rank(rank=0, world_size=1):
    return SimpleNamespace(rank=rank, world_size=world_size, device_type="cpu")


def same_batch(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("packing", [0, 1])
def test_a_loader_after_a_skip_yields_exactly_the_remaining_batches(tmp_path, tokenizer, packing):
    """What a resumed run sees: the same plan as the uninterrupted run (a new BatchPlan, same seed and epoch),
    minus exactly the first `skip` batches; each loaded batch is the collate of the planned samples. Packing or
    not, a micro-batch holds --batch_size samples of the same order: an epoch has the original's step count."""
    data = write_tiny_corpus(tmp_path / "data", n=40)
    ds = SFTDataset(data["sft"], tokenizer, max_length=64)
    args = plan_args(tmp_path, packing=packing)
    plan = BatchPlan(ds, args, one_rank(), supervised_collate(args))
    batches = plan.batches(0)
    assert plan.num_batches(0) == len(batches) and batches == BatchPlan(ds, args, one_rank()).batches(0)
    assert batches == shuffled_batches(len(ds), args.batch_size, 0, args.seed)    # the layout never changes them
    assert plan.batches(1) != batches                                   # a new order every epoch
    assert len(batches) == math.ceil(len(ds) / args.batch_size)
    assert sorted(i for batch in batches for i in batch) == list(range(len(ds)))   # every sample once per epoch
    loaded = list(plan.loader(0, skip=3))
    assert len(loaded) == len(batches) - 3
    for got, planned in zip(loaded, batches[3:]):
        assert same_batch(got, plan.collate([ds[i] for i in planned]))
        assert got["samples"] == len(planned) and got["tokens"] == sum(len(ds[i][0]) for i in planned)
        assert got["loss_tokens"] == sum(int(ds[i][2].sum()) for i in planned)
        if packing:
            assert got["input_ids"].shape[1] <= args.max_seq_len - 1 and got["input_ids"].shape[0] <= args.batch_size
    text = plan.describe()
    assert f"{args.batch_size * args.accumulation_steps} samples per optimizer step" in text
    assert f"{len(batches)} micro-batches = {math.ceil(len(batches) / 2)} optimizer steps per epoch" in text


def test_pack_rows_lays_out_a_micro_batch_and_counts_on_the_host(tmp_path, tokenizer):
    """PackRows: every sample of the micro-batch once, whole, in rows within capacity, positions restarting at
    each sample; loss_at are exactly the supervised flat positions; fixed shapes pad rows to a bucket."""
    data = write_tiny_corpus(tmp_path / "data", n=16)
    ds = SFTDataset(data["sft"], tokenizer, max_length=128)
    samples = [ds[i] for i in range(10)]
    lengths = [len(x) for x, _, _ in samples]
    batch = PackRows(127, batch_size=10)(samples)
    rows = batch["input_ids"].shape[0]
    assert rows < 10 and batch["input_ids"].shape[1] <= 127 and batch["packed"] and batch["samples"] == 10
    layout = best_fit(list(range(10)), lengths, 127)                     # each sample once, rows within capacity
    assert sorted(i for row in layout for i in row) == list(range(10)) and len(layout) == rows
    assert same_batch(batch, batch_plan._finish(pack_collate([[samples[i] for i in row] for row in layout]), 10))
    assert torch.equal(batch["loss_at"], batch["loss_mask"].view(-1).nonzero().squeeze(1))
    static = PackRows(127, batch_size=10, static=True)(samples)
    assert static["input_ids"].shape == (3 * ((rows + 2) // 3), 127)   # a multiple of ceil(10 / 4) = 3 rows
    assert static["loss_tokens"] == batch["loss_tokens"] and static["tokens"] == batch["tokens"]
    assert torch.equal(static["loss_mask"][rows:], torch.zeros_like(static["loss_mask"][rows:]))
    padded = PadRows(width=127)(samples)
    assert padded["input_ids"].shape == (10, 127) and not padded["packed"] and "position_ids" not in padded


def test_batch_unit_rows_packs_the_epoch_and_splits_ranks(tmp_path, tokenizer):
    """--batch_unit rows: a micro-batch is --batch_size packed rows (more samples per step, fewer steps); ranks
    get disjoint rows (but for the head row, repeated to even them out); fixed shapes keep one width."""
    data = write_tiny_corpus(tmp_path / "data", n=60)
    ds = PretrainDataset(data["pretrain"], tokenizer, max_length=32)
    args = plan_args(tmp_path, packing=1, max_seq_len=32, batch_size=2, batch_unit="rows")
    ranks = [BatchPlan(ds, args, one_rank(r, 2), supervised_collate(args)).batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])                               # every rank takes as many steps
    rows = [{tuple(row) for batch in plan for row in batch} for plan in ranks]
    assert rows[0] & rows[1] <= {tuple(ranks[0][0][0])}                 # disjoint, but for the head row repeated
    assert sorted(i for r in rows[0] | rows[1] for i in r) == list(range(len(ds)))      # to even the ranks out
    plan = BatchPlan(ds, args, one_rank(), supervised_collate(args))
    assert plan.num_batches(0) < math.ceil(len(ds) / args.batch_size) and "packed rows of" in plan.describe()
    static = plan_args(tmp_path, packing=1, max_seq_len=32, batch_size=2, use_compile=1, batch_unit="rows")
    static = BatchPlan(ds, static, one_rank(), supervised_collate(static))
    assert {b["input_ids"].shape for b in static.loader(0)} == {(2, 31)}   # compile: one shape
    with pytest.raises(ValueError, match="needs --packing 1"):
        BatchPlan(ds, plan_args(tmp_path, batch_unit="rows"), one_rank(), supervised_collate(plan_args(tmp_path)))


def test_rows_plans_take_sample_lengths_from_the_token_cache(tmp_path, tokenizer, monkeypatch):
    """--batch_unit rows packs by each sample's input length: the dataset's token_lengths(), read from the token
    cache without tokenizing (its rebuild rules: tests/test_token_cache.py); max_seq_len bounds them."""
    data = write_tiny_corpus(tmp_path / "data", n=30)
    args = plan_args(tmp_path, packing=1, batch_unit="rows")
    cache = tmp_path / "ckpt" / "tokens"
    first = BatchPlan(SFTDataset(data["sft"], tokenizer, max_length=64, cache_dir=cache), args, one_rank(),
                      supervised_collate(args)).lengths
    assert list(first) == [len(s[0]) for s in SFTDataset(data["sft"], tokenizer, max_length=64)]
    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("tokenized")))
        again = BatchPlan(SFTDataset(data["sft"], tokenizer, max_length=64, cache_dir=cache), args, one_rank(),
                          supervised_collate(args)).lengths
    assert list(again) == list(first)
    long, short = (BatchPlan(PretrainDataset(data["pretrain"], tokenizer, max_length=n, cache_dir=cache),
                             plan_args(tmp_path, packing=1, max_seq_len=n, batch_unit="rows"), one_rank(),
                             PackRows(n - 1, 4)).lengths for n in (64, 16))
    assert max(short) <= 15 < max(long)


def test_one_loader_with_persistent_workers_serves_every_epoch(tmp_path, tokenizer):
    """With --num_workers 1 the same DataLoader (and worker process) gives each epoch's batches, after a skip too."""
    data = write_tiny_corpus(tmp_path / "data", n=20)
    ds = PretrainDataset(data["pretrain"], tokenizer, max_length=64)
    args = plan_args(tmp_path, packing=1, num_workers=1)
    plan = BatchPlan(ds, args, one_rank(), supervised_collate(args))
    first = plan.loader(0)
    assert first.persistent_workers and len(list(first)) == plan.num_batches(0)
    again = plan.loader(1, skip=2)
    assert again is first
    for got, planned in zip(again, plan.batches(1)[2:], strict=True):
        assert same_batch(got, plan.collate([ds[i] for i in planned]))
    workers = first._iterator._workers
    plan.close()
    assert workers and not any(w.is_alive() for w in workers)


def test_on_cpu_a_packed_micro_batch_is_one_row_without_padding(tmp_path, tokenizer):
    """On CPU attention runs sample by sample, so the collate puts the whole micro-batch end to end in one row
    (no padding, same samples and supervised positions); on CUDA, with fixed shapes, --batch_unit rows or MoE
    (its per-sequence aux loss), rows stay max_seq_len - 1 wide."""
    data = write_tiny_corpus(tmp_path / "data", n=16)
    ds = SFTDataset(data["sft"], tokenizer, max_length=64)
    samples = [ds[i] for i in range(8)]
    cpu = supervised_collate(plan_args(tmp_path, packing=1, device="cpu"))
    assert cpu.one_row and "one row" in cpu.describe(plan_args(tmp_path))
    batch = cpu(samples)
    assert batch["input_ids"].shape == (1, sum(len(s[0]) for s in samples)) and batch["samples"] == 8
    assert batch["loss_tokens"] == sum(int(s[2].sum()) for s in samples) and batch["packed"]
    rows = PackRows(63, 8)(samples)
    assert batch["loss_tokens"] == rows["loss_tokens"] and batch["tokens"] == rows["tokens"]
    for flags in (dict(device="cuda:0"), dict(device="cpu", use_compile=1), dict(device="cpu", pad_to_max=1),
                  dict(device="cpu", batch_unit="rows"), dict(device="cpu", use_moe=1)):
        assert not supervised_collate(plan_args(tmp_path, packing=1, **flags)).one_row, flags


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_a_run_stops_its_loader_workers_when_it_ends(tmp_path, fails):
    """A training run with --num_workers 1 leaves no DataLoader worker behind when main() returns or raises
    (the plan's loader sits in a reference cycle: left to the garbage collector, torch's shutdown of its
    persistent workers waited out a 5 s timeout, at a random later point of the process)."""
    import multiprocessing
    from tests.conftest import tiny_train_args
    from trainer import train_pretrain
    data = write_tiny_corpus(tmp_path / "data", n=24)
    args = tiny_train_args(tmp_path, data["pretrain"], num_workers=1, packing=0, max_steps=2)
    before = set(multiprocessing.active_children())
    if fails:
        real = train_pretrain.PretrainDataset.__getitem__

        def broken(self, i):
            if i % 2:
                raise ValueError("a sample that fails in the worker")
            return real(self, i)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_pretrain.PretrainDataset, "__getitem__", broken)
            with pytest.raises(ValueError, match="fails in the worker"):
                train_pretrain.main(args)
    else:
        train_pretrain.main(args)
    assert set(multiprocessing.active_children()) - before == set()
