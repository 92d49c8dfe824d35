"""dataset/lm_dataset.py: the original's samples (goldens), loss masks, dynamic padding, the offset
index, and clear errors for bad input. Everything is written to tmp_path.

The golden tests use tests/goldens (the original tokenizer and its outputs, copied into the repository).
"""
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader

from dataset.lm_dataset import (DPODataset, JsonlIndex, PretrainDataset, RLAIFDataset, SFTDataset,
                                assistant_loss_mask, dpo_collate, pack_collate, pad_collate, read_jsonl)

GOLDENS = Path(__file__).resolve().parent / "goldens"
UPSTREAM_TOKENIZER = GOLDENS / "upstream_tokenizer"

# ChatML without the tools preamble details: enough for the fallback tokenizer
FALLBACK_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- '# Tools\\n' }}{%- for t in tools %}"
    "{{- t | tojson + '\\n' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

USER_ASSISTANT = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}


@pytest.fixture(scope="session")
def upstream_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(UPSTREAM_TOKENIZER)


@pytest.fixture(scope="session")
def tokenizer():
    """The original tokenizer if present, else a 300-token byte-level BPE with the same specials."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if UPSTREAM_TOKENIZER.exists():
        return AutoTokenizer.from_pretrained(UPSTREAM_TOKENIZER)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["You are a helpful assistant. user system 你好！MiniMind is a tiny model."] * 20,
                           trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                               special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = FALLBACK_TEMPLATE
    return tok


def write_jsonl(path: Path, rows, newline: str = "\n", trailing: bool = True) -> Path:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r, ensure_ascii=False) for r in rows]
    data = newline.encode().join(l if isinstance(l, bytes) else l.encode() for l in lines)
    path.write_bytes(data + (newline.encode() if trailing else b""))
    return path


def as_dict(sample) -> dict:
    return dict(zip(("X", "Y", "loss_mask"), sample)) if isinstance(sample, tuple) else sample


def original_loss_mask(ids, bos, eos, max_length):
    """The original's _generate_loss_mask (spec 4.2), as a plain Python scan."""
    mask, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(bos)] == bos:
            start = end = i + len(bos)
            while end < len(ids) and ids[end:end + len(eos)] != eos:
                end += 1
            for j in range(start + 1, min(end + len(eos) + 1, max_length)):
                mask[j] = 1
            i = end + len(eos) if end < len(ids) else len(ids)
        else:
            i += 1
    return mask


# ---- goldens: the original's tensors ----
GOLDEN_CASES = [("pretrain", PretrainDataset), ("sft", SFTDataset), ("dpo", DPODataset)]


@pytest.mark.parametrize("kind,cls", GOLDEN_CASES)
def test_pad_to_max_reproduces_the_original(tmp_path, upstream_tokenizer, kind, cls):
    gold = json.loads((GOLDENS / f"data_{kind}.json").read_text())
    path = write_jsonl(tmp_path / f"{kind}.jsonl", gold["samples"])
    ds = cls(path, upstream_tokenizer, max_length=gold["max_length"], pad_to_max=True)
    assert len(ds) == len(gold["outputs"])
    for i, expected in enumerate(gold["outputs"]):
        got = as_dict(ds[i])
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key].dtype == torch.long and got[key].tolist() == value, (kind, i, key)


@pytest.mark.parametrize("kind,cls", GOLDEN_CASES)
def test_dynamic_padding_feeds_and_supervises_the_same_tokens(tmp_path, upstream_tokenizer, kind, cls):
    gold = json.loads((GOLDENS / f"data_{kind}.json").read_text())
    path = write_jsonl(tmp_path / f"{kind}.jsonl", gold["samples"])
    ds = cls(path, upstream_tokenizer, max_length=gold["max_length"])
    for i, expected in enumerate(gold["outputs"]):
        got = as_dict(ds[i])
        for key, value in expected.items():
            n = len(got[key])
            assert got[key].tolist() == value[:n], (kind, i, key)  # a prefix of the padded sample
        for mask_key in (k for k in expected if "mask" in k):
            assert int(got[mask_key].sum()) == sum(expected[mask_key])  # nothing supervised was cut off
        if kind == "pretrain":  # only pads are dropped: the row's own tokens are all there
            n_real = sum(t != 0 for t in expected["X"] + expected["Y"][-1:])
            assert len(got["X"]) == max(n_real, 2) - 1


def test_spec_worked_example_supervises_reply_im_end_and_newline(tmp_path, upstream_tokenizer):
    ds = SFTDataset(write_jsonl(tmp_path / "a.jsonl", [USER_ASSISTANT]), upstream_tokenizer, max_length=32,
                    pad_to_max=True)
    X, Y, mask = ds[0]
    assert len(X) == 31 and Y[mask == 1].tolist() == [5134, 2207, 2, 201]
    assert ds.start_ids == [1, 1078, 538, 501] and ds.end_ids == [2]


# ---- loss mask ----
@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.sampled_from([1, 5, 6, 2, 201, 9]), max_size=60),
       end=st.sampled_from([[2], [2, 201]]))
def test_vectorised_mask_equals_the_original_scan(ids, end):
    bos = [1, 5, 6]
    got = assistant_loss_mask(np.asarray(ids, dtype=np.int64), bos, end)
    assert got.tolist() == original_loss_mask(ids, bos, end, len(ids))


def test_reasoning_rows_supervise_think_and_answer(tmp_path, tokenizer):
    reply = "<think>\n想一想\n</think>\n<answer>\n42\n</answer>"
    row = {"conversations": [{"role": "user", "content": "问题"}, {"role": "assistant", "content": reply}]}
    X, Y, mask = SFTDataset(write_jsonl(tmp_path / "r1.jsonl", [row]), tokenizer)[0]
    trained = tokenizer.decode(Y[mask == 1].tolist())
    assert trained == reply + "<|im_end|>\n"


def test_multi_turn_supervises_every_assistant_turn_only(tmp_path, tokenizer):
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"}]
    X, Y, mask = SFTDataset(write_jsonl(tmp_path / "m.jsonl", [{"conversations": conv}]), tokenizer)[0]
    assert tokenizer.decode(Y[mask == 1].tolist()) == "A1<|im_end|>\nA2<|im_end|>\n"


def test_tools_from_the_system_turn_reach_the_template(tmp_path, tokenizer):
    tool = {"name": "get_weather", "description": "d"}
    conv = [{"role": "system", "content": "S", "functions": [tool]}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    ds = SFTDataset(write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv}]), tokenizer)
    text = tokenizer.decode(ds.encode(0))
    assert "get_weather" in text and "# Tools" in text


# ---- dynamic padding ----
def test_pad_collate_gives_the_same_loss_as_padding_to_max(tmp_path, upstream_tokenizer):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    gold = json.loads((GOLDENS / "data_sft.json").read_text())
    path = write_jsonl(tmp_path / "sft.jsonl", gold["samples"])
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2)).eval()
    losses = []
    for pad_to_max in (False, True):
        ds = SFTDataset(path, upstream_tokenizer, max_length=gold["max_length"], pad_to_max=pad_to_max)
        batch = pad_collate([ds[i] for i in range(len(ds))])
        X, Y, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
        assert X.dtype == Y.dtype == mask.dtype == torch.long
        with torch.no_grad():
            ce = F.cross_entropy(model(X).logits.transpose(1, 2), Y, reduction="none")
        losses.append(ce[mask == 1])
    assert losses[0].shape == losses[1].shape and torch.allclose(losses[0], losses[1], atol=1e-6, rtol=0)


def test_pad_collate_pads_to_the_longest_sample():
    a = (torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4]), torch.tensor([1, 1, 1]))
    b = (torch.tensor([7]), torch.tensor([8]), torch.tensor([1]))
    batch = pad_collate([a, b])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 0, 0]] and batch["labels"].tolist() == [[2, 3, 4], [8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["tokens"] == 4


def test_pack_collate_lays_samples_end_to_end_with_restarting_positions():
    a = (torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4]), torch.tensor([0, 1, 1]))
    b = (torch.tensor([7]), torch.tensor([8]), torch.tensor([1]))
    batch = pack_collate([[a, b], [b]], length=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 0, 0], [7, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 4, 8, 0, 0], [8, 0, 0, 0, 0, 0]]     # each sample keeps its targets
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1], [0, 0, 1, 2, 3, 4]]
    assert batch["tokens"] == 5
    assert pack_collate([[a, b], [b]])["input_ids"].shape == (2, 4)                  # default: the longest row


def test_dpo_collate_gives_chosen_and_rejected_one_length(tmp_path, tokenizer):
    def pair(good, bad):
        user = {"role": "user", "content": "推荐一本书"}
        return {"chosen": [user, {"role": "assistant", "content": good}],
                "rejected": [user, {"role": "assistant", "content": bad}]}
    ds = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [pair("《三体》值得一读。" * 3, "不知道。"),
                                                         pair("好", "不知道不知道不知道。")]), tokenizer)
    samples = [ds[0], ds[1]]
    batch = dpo_collate(samples)
    assert set(batch) == {"x_chosen", "y_chosen", "mask_chosen", "x_rejected", "y_rejected", "mask_rejected", "tokens"}
    longest = max(len(s[k]) for s in samples for k in ("x_chosen", "x_rejected"))
    assert {tuple(v.shape) for v in batch.values() if torch.is_tensor(v)} == {(2, longest)}
    assert batch["tokens"] == sum(len(s["x_chosen"]) + len(s["x_rejected"]) for s in samples)
    for i, s in enumerate(samples):
        for key, value in s.items():
            assert batch[key][i, :len(value)].tolist() == value.tolist()
            assert not batch[key][i, len(value):].any()


def test_lengths_follow_line_bytes(tmp_path, tokenizer):
    rows = [{"text": "短"}, {"text": "MiniMind is a tiny language model. " * 20}]
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    lengths = ds.lengths()
    assert len(lengths) == len(ds) and lengths[1] > 10 * lengths[0]


# ---- the offset index ----
@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.sampled_from([b"", b" ", b"\r", b"\t \r", b'{"a":1}', b'{"a":1}\r', b"x" * 40,
                                       b'  {"b": "y"}']), max_size=12),
       trailing=st.booleans(), chunk=st.integers(1, 64))
def test_scan_finds_every_non_blank_line(tmp_path_factory, lines, trailing, chunk):
    path = tmp_path_factory.mktemp("scan") / "f.jsonl"
    data = b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    path.write_bytes(data)
    index = JsonlIndex(str(path), chunk)                  # 8 bytes a line: offset, length; line numbers derived
    starts, ends, linenos = index.starts.astype(int), index.starts.astype(int) + index.lengths, index.linenos
    assert [index.lineno(i) for i in range(len(index))] == linenos.tolist()
    expected, pos = [], 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            expected.append((pos, pos + len(line), lineno))
        pos += len(line) + 1
    assert list(zip(starts.tolist(), ends.tolist(), linenos.tolist())) == expected


def test_blank_lines_crlf_no_trailing_newline_and_bom(tmp_path, tokenizer):
    rows = [{"text": "first"}, "", "   ", {"text": "second"}, "\t", {"text": "third"}]
    for newline in ("\n", "\r\n"):
        for trailing in (True, False):
            path = write_jsonl(tmp_path / "p.jsonl", rows, newline=newline, trailing=trailing)
            assert [r["text"] for r in read_jsonl(path)] == ["first", "second", "third"]
            assert JsonlIndex(path).linenos.tolist() == [1, 4, 6]
            ds = PretrainDataset(path, tokenizer)
            assert tokenizer.decode(ds[2][0].tolist() + ds[2][1][-1:].tolist()) == "third"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r["text"] for r in read_jsonl(path)] == ["first", "second", "third"]


def test_dataloader_workers_read_through_their_own_file_handle(tmp_path, tokenizer):
    rows = [{"text": f"MiniMind is a tiny model. {'你好' * (i % 7)} {i}"} for i in range(40)]
    ds = PretrainDataset(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer)
    expected = [ds[i] for i in range(len(ds))]  # the parent opens its handle before the fork
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=pad_collate)
    got = [sample for b in loader for sample in zip(b["input_ids"], b["labels"], b["loss_mask"])]
    assert len(got) == len(expected)
    for (x, y, m), (ex, ey, em) in zip(got, expected):
        n = len(ex)
        assert x[:n].tolist() == ex.tolist() and y[:n].tolist() == ey.tolist() and m[:n].tolist() == em.tolist()
        assert not m[n:].any()
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    assert clone[3][0].tolist() == expected[3][0].tolist()


# ---- errors ----
def conv(*pairs):
    return {"conversations": [{"role": r, "content": c} for r, c in pairs]}


GOOD_SFT = conv(("user", "Q"), ("assistant", "A"))
BAD_SFT = [
    ('{"conversations": [', "bad JSON"),
    (b'{"text": "\xff\xfe"}', "invalid UTF-8"),
    ("[1, 2]", "expected a JSON object"),
    ({"messages": []}, "missing field 'conversations'"),
    ({"conversations": []}, "non-empty list"),
    (conv(("assistant", "A"), ("user", "Q")), "role 'assistant' cannot come first"),
    (conv(("user", "Q"), ("user", "Q2"), ("assistant", "A")), "role 'user' cannot come after 'user'"),
    (conv(("user", "Q"), ("assistant", "A"), ("assistant", "B")), "cannot come after 'assistant'"),
    (conv(("user", "Q"), ("system", "S"), ("assistant", "A")), "role 'system' cannot come after 'user'"),
    (conv(("user", "Q"), ("bot", "A")), "unknown role 'bot'"),
    (conv(("user", "Q"), ("assistant", "  ")), "empty content"),
    ({"conversations": [{"role": "user", "content": ["Q"]}, {"role": "assistant", "content": "A"}]},
     "content must be a string"),
    (conv(("user", "Q"), ("assistant", "A<|im_end|>B")), "ChatML control token"),
    (conv(("system", "S"), ("user", "Q")), "no assistant token to supervise"),
]


@pytest.mark.parametrize("bad,reason", BAD_SFT, ids=[r for _, r in BAD_SFT])
def test_bad_sft_line_names_file_and_line(tmp_path, tokenizer, bad, reason):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, "", bad, GOOD_SFT])
    ds = SFTDataset(path, tokenizer)
    ds[0], ds[2]  # good lines around the bad one are fine
    with pytest.raises(ValueError, match=f"^{path}:3: ") as err:
        ds[1]
    assert reason in str(err.value)


def test_sample_truncated_before_any_reply_is_an_error_or_skipped(tmp_path, tokenizer):
    row = conv(("user", "很长的问题。" * 50), ("assistant", "A"))
    path = write_jsonl(tmp_path / "sft.jsonl", [row, GOOD_SFT])
    with pytest.raises(ValueError, match=f"{path}:1: .*max_length=32.*--skip_bad_lines 1"):
        SFTDataset(path, tokenizer, max_length=32)[0]
    with pytest.warns(UserWarning):
        skipping = SFTDataset(path, tokenizer, max_length=32, skip_bad_lines=True)
    assert len(skipping) == 1 and skipping.num_skipped == 1 and skipping[0][2].sum() > 0
    assert SFTDataset(path, tokenizer, max_length=4096)[0][2].sum() > 0


@pytest.mark.parametrize("bad,reason", [
    ({"text": 3}, "'text' must be a non-empty string"), ({"text": "  "}, "non-empty string"),
    ({"txt": "a"}, "missing field 'text'")])
def test_bad_pretrain_line(tmp_path, tokenizer, bad, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, bad])
    with pytest.raises(ValueError, match=f"^{path}:2: .*{reason}"):
        PretrainDataset(path, tokenizer)[1]


@pytest.mark.parametrize("bad,reason", [
    ({"chosen": GOOD_SFT["conversations"]}, "missing field 'rejected'"),
    ({"rejected": GOOD_SFT["conversations"]}, "missing field 'chosen'"),
    ({"chosen": GOOD_SFT["conversations"], "rejected": [{"role": "assistant", "content": "A"}]},
     "rejected: message 0: role 'assistant' cannot come first"),
    ({"chosen": [{"role": "user", "content": "Q"}], "rejected": GOOD_SFT["conversations"]},
     "chosen has no assistant token")])
def test_bad_dpo_line(tmp_path, tokenizer, bad, reason):
    path = write_jsonl(tmp_path / "dpo.jsonl", [bad])
    with pytest.raises(ValueError, match=f"^{path}:1: ") as err:
        DPODataset(path, tokenizer)[0]
    assert reason in str(err.value)


def test_skip_bad_lines_drops_and_counts(tmp_path, tokenizer):
    rows = [GOOD_SFT, "{oops", conv(("assistant", "A")), "", conv(("user", "Q2"), ("assistant", "A2"))]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert len(SFTDataset(path, tokenizer)) == 4  # without the flag: nothing checked until read
    with pytest.warns(UserWarning, match=rf"skipped 2 of 4 lines; first: {path}:2: bad JSON"):
        ds = SFTDataset(path, tokenizer, skip_bad_lines=True)
    assert ds.num_skipped == 2 and len(ds) == 2 and ds.rows.linenos.tolist() == [1, 5]
    assert tokenizer.decode(ds[1][1][ds[1][2] == 1].tolist()) == "A2<|im_end|>\n"
    assert len(ds.lengths()) == 2


def test_read_jsonl_checks_required_fields(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": 2}])
    assert list(read_jsonl(path)) == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match=f"^{path}:2: missing field 'a'"):
        list(read_jsonl(path, required=("a",)))


# ---- RLAIF ----
def test_rlaif_prompt_answer_and_reference(tmp_path, tokenizer):
    rows = [{"conversations": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "无"}],
             "answer": "2"},
            {"conversations": [{"content": "Q1"}, {"content": "A1"}, {"content": "Q2"}, {"content": "无"}]}]
    ds = RLAIFDataset(write_jsonl(tmp_path / "rl.jsonl", rows), tokenizer)
    first, second = ds[0], ds[1]
    assert first == {"prompt": first["prompt"], "answer": "无", "reference": "2",
                     "messages": [{"role": "user", "content": "1+1=?"}]}
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert first["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")
    assert first["prompt"].endswith("<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n")
    assert second["reference"] == "" and "<|im_start|>assistant\nA1<|im_end|>" in second["prompt"]
    assert second["prompt"].endswith("Q2<|im_end|>\n<|im_start|>assistant\n")
    from trainer.core.rl import rl_collate
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=rl_collate)))
    assert batch["reference"] == ["2", ""] and len(batch["messages"][1]) == 3


@pytest.mark.parametrize("bad,reason", [
    ({"conversations": [{"role": "user", "content": "Q"}]}, "at least a prompt and an answer"),
    ({"conversations": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
     "role 'system', but position 0 is 'user'"),
    ({"conversations": [{"role": "user", "content": ""}, {"role": "assistant", "content": "无"}]}, "empty content")])
def test_bad_rlaif_line(tmp_path, tokenizer, bad, reason):
    path = write_jsonl(tmp_path / "rl.jsonl", [bad])
    with pytest.raises(ValueError, match=f"^{path}:1: ") as err:
        RLAIFDataset(path, tokenizer)[0]
    assert reason in str(err.value)


def test_tokenizers_parallelism_is_only_defaulted(monkeypatch):
    import dataset.lm_dataset as module

    def import_fresh_copy() -> str:  # under another name, so the real module's classes stay as they are
        spec = importlib.util.spec_from_file_location("lm_dataset_copy", module.__file__)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        return os.environ["TOKENIZERS_PARALLELISM"]
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert import_fresh_copy() == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    assert import_fresh_copy() == "true"


def test_empty_file_and_bad_tools_are_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=f"^{path}: no usable lines"):
        PretrainDataset(path, tokenizer)
    row = {"conversations": [{"role": "system", "content": "S", "functions": ["get_weather"]},
                             {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = write_jsonl(tmp_path / "tools.jsonl", [row])
    with pytest.raises(ValueError, match=f"^{path}:1: 'functions' must be a list of tool definitions"):
        SFTDataset(path, tokenizer)[0]
