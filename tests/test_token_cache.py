"""dataset/token_cache.py through the datasets' cache_dir: cached samples equal freshly tokenized ones bit
for bit (and the original's padded tensors, tests/goldens), the build is the same in one process or
several, a second construction never tokenizes, every input of the key rebuilds, a damaged cache is
rebuilt, a failed or killed build leaves nothing, skipped samples are counted, and under torch.distributed
only rank 0 builds. Tiny files in tmp_path with the shipped tokenizer; chunks of a few lines so that
several worker processes really share the build."""
import copy
import json
import os
import pickle
import time

import numpy as np
import pytest
import torch

import dataset.token_cache as token_cache
from dataset.lm_dataset import DPODataset, NothingToSupervise, PretrainDataset, SFTDataset
from tests.conftest import GOLDENS, UPSTREAM_TOKENIZER, tokenizer_dir

TOOL = {"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}


def chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def pretrain_rows():
    words = ["MiniMind", "is", "a", "tiny", "model.", "猫", "天空是蓝色的。", "1+1=2", "<|endoftext|>"]
    rng = np.random.default_rng(0)
    rows = [{"text": "<|im_start|>" + " ".join(rng.choice(words, rng.integers(1, 40))) + "<|im_end|>"}
            for _ in range(40)]
    return rows + [{"text": "x"}, {"text": "<|endoftext|>"}]   # one token (X padded to 1); a pad-only mask


def sft_rows():
    rows = [{"conversations": chat(("user", f"{a}+{a}等于几？"),
                                   ("assistant", f"{a}+{a}={2 * a}。" * (a % 5 + 1)))} for a in range(30)]
    rows.append({"conversations": chat(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                                       ("assistant", "A2 " * 120))})
    rows.append({"conversations": [{"role": "system", "content": "S", "functions": [TOOL]},
                                   {"role": "user", "content": "北京天气？"},
                                   {"role": "assistant", "content": "",
                                    "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
                                   {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "晴天。"}]})
    return rows


def dpo_rows():
    user = {"role": "user", "content": "推荐一本书"}
    return [{"chosen": [user, {"role": "assistant", "content": "《三体》值得一读。" * (k % 6 + 1)}],
             "rejected": [user, {"role": "assistant", "content": "不知道。" * (k % 3 + 1)}]} for k in range(24)]


CASES = {"pretrain": (PretrainDataset, pretrain_rows, 24), "sft": (SFTDataset, sft_rows, 256),
         "dpo": (DPODataset, dpo_rows, 40)}


@pytest.fixture(scope="module")
def tokenizer():
    from model.loading import load_tokenizer
    return load_tokenizer(tokenizer_dir())


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK_LINES", 8)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def assert_same_samples(a, b):
    assert len(a) == len(b)
    for i in range(len(b)):
        x, y = a[i], b[i]
        pairs = zip(x.values(), y.values()) if isinstance(x, dict) else zip(x, y)
        if isinstance(x, dict):
            assert list(x) == list(y)
        for u, v in pairs:
            assert u.dtype == v.dtype == torch.long and torch.equal(u, v), i
        for (ids_a, mask_a), (ids_b, mask_b) in zip(a.tokens(i), b.tokens(i)):
            assert np.array_equal(ids_a, ids_b) and np.array_equal(mask_a, mask_b) and mask_a.dtype == np.uint8


def cache_dirs(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def cache_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---- the same samples ----
@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("pad_to_max", [False, True])
def test_cached_samples_equal_tokenized_ones(tmp_path, tokenizer, kind, pad_to_max):
    cls, rows, max_length = CASES[kind]
    path = write(tmp_path / f"{kind}.jsonl", rows())
    fresh = cls(path, tokenizer, max_length=max_length, pad_to_max=pad_to_max)
    cached = cls(path, tokenizer, max_length=max_length, pad_to_max=pad_to_max, cache_dir=tmp_path / "c", workers=2)
    assert cached.cache is not None and fresh.cache is None
    assert_same_samples(cached, fresh)
    assert any(len(ids) == max_length for part in (fresh.tokens(i) for i in range(len(fresh))) for ids, _ in part)
    lengths = cached.token_lengths()
    assert lengths.dtype == np.int32 and np.array_equal(lengths, fresh.token_lengths())
    if not pad_to_max:
        xs = [[len(s[k]) for k in s if k.startswith("x_")] if kind == "dpo" else [len(s[0])] for s in fresh]
        assert lengths.tolist() == [max(x) for x in xs]
    for i in range(len(fresh)):  # tokens(i): the unshifted, unpadded ids and mask of what ds[i] trains
        ids, mask = fresh.tokens(i)[0]
        X, Y, m = (fresh[i]["x_chosen"], fresh[i]["y_chosen"], fresh[i]["mask_chosen"]) if kind == "dpo" else fresh[i]
        n = len(ids) - 1
        assert X[:n].tolist() == ids[:-1].tolist() and Y[:n].tolist() == ids[1:].tolist()
        assert m[:n].tolist() == mask[1:].tolist() and not m[n:].any()


@pytest.mark.parametrize("kind,cls", [("pretrain", PretrainDataset), ("sft", SFTDataset), ("dpo", DPODataset)])
def test_cached_pad_to_max_reproduces_the_original(tmp_path, kind, cls):
    from transformers import AutoTokenizer
    gold = json.loads((GOLDENS / f"data_{kind}.json").read_text())
    path = write(tmp_path / f"{kind}.jsonl", gold["samples"])
    ds = cls(path, AutoTokenizer.from_pretrained(UPSTREAM_TOKENIZER), max_length=gold["max_length"], pad_to_max=True,
             cache_dir=tmp_path / "c")
    assert len(ds) == len(gold["outputs"])
    for i, expected in enumerate(gold["outputs"]):
        got = ds[i] if isinstance(ds[i], dict) else dict(zip(("X", "Y", "loss_mask"), ds[i]))
        assert {key: got[key].tolist() for key in expected} == expected, (kind, i)


def test_multi_process_build_equals_single_process(tmp_path, tokenizer):
    path = write(tmp_path / "sft.jsonl", sft_rows() * 3)
    one = SFTDataset(path, tokenizer, max_length=48, cache_dir=tmp_path / "one", workers=1)
    two = SFTDataset(path, tokenizer, max_length=48, cache_dir=tmp_path / "two", workers=2)
    files = [cache_files(ds.cache.directory) for ds in (one, two)]
    assert files[0] == files[1] and len(files[0]) == 6
    meta = json.loads(files[0]["meta.json"])   # the tools row has no answer within 48 tokens
    assert (meta["samples"], meta["unsupervised"], meta["skipped"]) == (93, 3, 0) and len(one) == 93


def test_second_construction_reads_the_cache_without_the_tokenizer(tmp_path, tokenizer, monkeypatch, capsys):
    path = write(tmp_path / "dpo.jsonl", dpo_rows())
    first = DPODataset(path, tokenizer, max_length=40, cache_dir=tmp_path / "c")
    assert "token cache: tokenizing 24 lines" in capsys.readouterr().out
    expected = [first[i] for i in range(len(first))]

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was called")
    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    monkeypatch.setattr(type(tokenizer), "apply_chat_template", refuse)
    t0 = time.perf_counter()
    again = DPODataset(path, tokenizer, max_length=40, cache_dir=tmp_path / "c")
    assert time.perf_counter() - t0 < 5 and capsys.readouterr().out == ""   # milliseconds, when nothing else runs
    assert again.cache.directory == first.cache.directory
    for got, want in zip((again[i] for i in range(len(again))), expected):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert again.token_lengths().tolist() == first.token_lengths().tolist()
    clone = pickle.loads(pickle.dumps(again))  # what a spawned DataLoader worker gets: the maps reopen there
    assert len(pickle.dumps(again.cache)) < 10_000 and torch.equal(clone[5]["x_chosen"], expected[5]["x_chosen"])


# ---- when it is rebuilt ----
def test_every_input_of_the_key_builds_a_new_cache(tmp_path, tokenizer, capsys):
    root, rows = tmp_path / "c", sft_rows()
    path = write(tmp_path / "sft.jsonl", rows)

    def build(tok=tokenizer, max_length=256):
        ds = SFTDataset(path, tok, max_length=max_length, cache_dir=root)
        assert "token cache: tokenizing" in capsys.readouterr().out, "expected a build"
        return ds
    build()
    SFTDataset(path, tokenizer, max_length=256, cache_dir=root)
    assert "tokenizing" not in capsys.readouterr().out
    build(max_length=255)
    edited = rows[1:] + rows[:1]      # the same bytes in another order: same size, new first-MiB hash
    write(path, edited)
    assert build()[0][0].tolist() == SFTDataset(path, tokenizer, max_length=256)[0][0].tolist()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))   # touched: same bytes, new mtime
    build()
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template + "{#- edited -#}"
    build(other)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<|new_token|>"])
    build(other)
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"   # same vocab and template, another EOS id (minimind-3 pretrain samples hold it)
    build(other)
    assert len(cache_dirs(root)) == 7 and all(name.startswith("sft-") for name in cache_dirs(root))


@pytest.mark.parametrize("damage", ["truncated ids", "flipped byte", "missing meta", "flipped offsets"])
def test_a_damaged_cache_is_rebuilt_and_equals_a_fresh_one(tmp_path, tokenizer, capsys, damage):
    path = write(tmp_path / "p.jsonl", pretrain_rows())
    directory = PretrainDataset(path, tokenizer, max_length=24, cache_dir=tmp_path / "c").cache.directory
    good = cache_files(directory)
    if damage == "truncated ids":
        (directory / "ids.bin").write_bytes(good["ids.bin"][:-2])
    elif damage == "missing meta":
        (directory / "meta.json").unlink()
    else:
        name = "ids.bin" if damage == "flipped byte" else "offsets.bin"
        data = bytearray(good[name])
        data[len(data) // 2] ^= 0x01
        (directory / name).write_bytes(bytes(data))
    capsys.readouterr()
    ds = PretrainDataset(path, tokenizer, max_length=24, cache_dir=tmp_path / "c")
    out = capsys.readouterr().out
    assert f"token cache {directory} is corrupt (" in out and "): rebuilding" in out
    assert ds.cache.directory == directory and cache_files(directory) == good
    assert_same_samples(ds, PretrainDataset(path, tokenizer, max_length=24))
    assert cache_dirs(tmp_path / "c") == [directory.name]   # nothing left beside it


def test_a_killed_build_leaves_a_directory_the_next_build_removes(tmp_path, tokenizer):
    import socket
    import subprocess
    path = write(tmp_path / "p.jsonl", pretrain_rows())
    directory = PretrainDataset(path, tokenizer, max_length=24, cache_dir=tmp_path / "c").cache.directory
    dead = subprocess.Popen(["true"])
    dead.wait()                                              # its pid now names no process
    killed = directory.with_name(f".{directory.name}.tmp-{dead.pid}@{socket.gethostname()}-x1")
    running = directory.with_name(f".{directory.name}.tmp-{os.getpid()}@{socket.gethostname()}-x2")
    for d in (killed, running):
        d.mkdir()
        (d / "ids.bin").write_bytes(b"partial")
    (directory / "meta.json").unlink()
    PretrainDataset(path, tokenizer, max_length=24, cache_dir=tmp_path / "c")
    assert cache_dirs(tmp_path / "c") == sorted([directory.name, running.name])


# ---- bad and unsupervised samples ----
def test_a_bad_line_fails_the_build_naming_file_and_line_and_leaves_nothing(tmp_path, tokenizer):
    rows = sft_rows()
    rows[13] = {"conversations": chat(("assistant", "A"))}
    rows[26] = "{oops"                                       # a later chunk: the first in file order wins
    path = write(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=f"^{path}:14: message 0: role 'assistant' cannot come first"):
        SFTDataset(path, tokenizer, max_length=256, cache_dir=tmp_path / "c", workers=2)
    assert cache_dirs(tmp_path / "c") == []
    rows[13] = {"conversations": chat(("system", "S"), ("user", "Q"))}   # no answer at all: a bad line too
    write(path, rows)
    with pytest.raises(ValueError, match=f"^{path}:14: sample has no assistant token to supervise$") as err:
        SFTDataset(path, tokenizer, max_length=256, cache_dir=tmp_path / "c")
    assert not isinstance(err.value, NothingToSupervise) and cache_dirs(tmp_path / "c") == []


def test_skip_bad_lines_drops_and_counts_in_the_build(tmp_path, tokenizer):
    rows = sft_rows()
    rows[3], rows[20] = "[1, 2]", {"conversations": chat(("user", "Q"), ("assistant", " "))}
    path = write(tmp_path / "sft.jsonl", rows)
    with pytest.warns(UserWarning, match=rf"skipped 2 of {len(rows)} lines; first: {path}:4: expected a JSON object"):
        ds = SFTDataset(path, tokenizer, max_length=256, skip_bad_lines=True, cache_dir=tmp_path / "c", workers=2)
    assert ds.num_skipped == 2 and ds.num_unsupervised == 0 and len(ds) == len(rows) - 2
    assert ds.rows.linenos.tolist() == [n for n in range(1, len(rows) + 1) if n not in (4, 21)]
    with pytest.warns(UserWarning, match="skipped 2 of"):
        assert_same_samples(ds, SFTDataset(path, tokenizer, max_length=256, skip_bad_lines=True))
    with pytest.warns(UserWarning, match="skipped 2 of"):  # loaded: the same counts and warning
        again = SFTDataset(path, tokenizer, max_length=256, skip_bad_lines=True, cache_dir=tmp_path / "c")
    assert again.num_skipped == 2 and again.rows.linenos.tolist() == ds.rows.linenos.tolist()


def test_samples_with_no_answer_within_max_length_are_dropped_and_counted(tmp_path, tokenizer, capsys):
    good = sft_rows()[:12]
    long = {"conversations": chat(("user", "很长的问题。" * 20), ("assistant", "A"))}
    rows = good[:5] + [long] + good[5:] + [long]
    path = write(tmp_path / "sft.jsonl", rows)
    fresh = SFTDataset(path, tokenizer, max_length=32)
    with pytest.raises(NothingToSupervise, match=f"^{path}:6: sample has no assistant token to supervise after "
                                                 "truncation to max_length=32"):
        fresh[5]
    ds = SFTDataset(path, tokenizer, max_length=32, cache_dir=tmp_path / "c", workers=2)
    assert f"{path}: skipped 2 of 14 samples: no answer within max_seq_len 32" in capsys.readouterr().out
    assert ds.num_unsupervised == 2 and ds.num_skipped == 0 and len(ds) == 12
    assert ds.rows.linenos.tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    kept = [fresh[i] for i in range(len(rows)) if rows[i] is not long]
    for got, want in zip((ds[i] for i in range(len(ds))), kept):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    pair = {"chosen": long["conversations"], "rejected": good[0]["conversations"]}
    dpo = DPODataset(write(tmp_path / "dpo.jsonl", [pair] + dpo_rows()[:3]), tokenizer, max_length=32,
                     cache_dir=tmp_path / "c")
    assert dpo.num_unsupervised == 1 and len(dpo) == 3


# ---- torch.distributed: rank 0 builds, the others wait and load ----
def _rank(rank: int, world: int, tmp, path) -> None:
    import torch.distributed as dist
    from model.loading import load_tokenizer
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        if rank:
            def refuse(*args, **kwargs):
                raise AssertionError(f"rank {rank} built the cache")
            token_cache.TokenCache.build = refuse
        else:
            time.sleep(1)  # a rank that did not wait would find no cache and try to build
        ds = SFTDataset(path, load_tokenizer(tokenizer_dir()), max_length=256, cache_dir=tmp / "c", workers=1)
        np.save(tmp / f"rank{rank}.npy", ds.token_lengths())
    finally:
        dist.destroy_process_group()


def test_under_torch_distributed_rank_0_builds_and_the_others_load(tmp_path):
    import torch.multiprocessing as torch_mp
    path = write(tmp_path / "sft.jsonl", sft_rows())
    torch_mp.start_processes(_rank, args=(2, tmp_path, path), nprocs=2, start_method="fork")   # fork: no re-import
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))
    assert len(cache_dirs(tmp_path / "c")) == 1
