"""The minimind-3 tokenizer (model/minimind3/) and the samples our datasets build with it, against goldens made
by running upstream's own code (jingyaogong/minimind d65ef2c; tests/goldens/mm3_*.json, see its README):
the template renders every golden conversation exactly, SFTDataset feeds and supervises exactly the tokens
upstream's SFTDataset does, and PretrainDataset adds BOS/EOS as upstream does, for this tokenizer only."""
import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from dataset.lm_dataset import PretrainDataset, SFTDataset, assistant_loss_mask, is_minimind3_tokenizer
from tests.conftest import GOLDENS, ROOT, UPSTREAM_TOKENIZER

MM3 = ROOT / "model" / "minimind3"
CHAT = json.loads((GOLDENS / "mm3_chat_templates.json").read_text(encoding="utf-8"))
SFT = json.loads((GOLDENS / "mm3_sft_loss_masks.json").read_text(encoding="utf-8"))
PRETRAIN = json.loads((GOLDENS / "mm3_data_pretrain.json").read_text(encoding="utf-8"))
KEPT = sorted(k for k in SFT["samples"] if k.endswith("empty_think_removed=False"))  # the variant we build


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MM3, local_files_only=True, trust_remote_code=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def upstream_labels(ids, bos, eos, max_length):
    """Upstream d65ef2c's SFTDataset.generate_labels, written out: the target tokens it supervises."""
    labels, i = [-100] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(bos)] == bos:
            start = end = i + len(bos)
            while end < len(ids) and ids[end:end + len(eos)] != eos:
                end += 1
            for j in range(start, min(end + len(eos), max_length)):
                labels[j] = ids[j]
            i = end + len(eos) if end < len(ids) else len(ids)
        else:
            i += 1
    return labels


# ---- the shipped files ----
def test_files_are_upstreams_unchanged_and_load_as_is(tok):
    digests = {"tokenizer.json": "71f32c68cf63a15355a8fc171b7594b3d41870fe0ddb54fc6aefa55f73a4a668",
               "tokenizer_config.json": "d7cd6a60c9f191c4f9ffec69b2eb289ad2f960366724f328b681ae1e46e4c110"}
    for name, digest in digests.items():
        assert hashlib.sha256((MM3 / name).read_bytes()).hexdigest() == digest, name
    assert len(tok) == 6400 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids(["<tool_call>", "<think>", "</think>", "<|buffer9|>"]) == [21, 25, 26, 35]
    # ids 21-35 are not special: they survive skip_special_tokens
    assert tok.decode([1, 21, 25, 26, 2], skip_special_tokens=True) == "<tool_call><think></think>"
    assert tok("hi<|im_end|>").input_ids == tok("hi<|im_end|>", add_special_tokens=False).input_ids  # no BOS/EOS added


def test_family_is_told_by_the_template(tok):
    from transformers import AutoTokenizer
    assert is_minimind3_tokenizer(tok)
    for path in (ROOT / "model", UPSTREAM_TOKENIZER):  # MiniMind2: ours and the original
        assert not is_minimind3_tokenizer(AutoTokenizer.from_pretrained(path))


# ---- chat template ----
@pytest.mark.parametrize("name", sorted(CHAT))
def test_template_renders_upstreams_text_and_ids(tok, name):
    case = CHAT[name]
    text = tok.apply_chat_template(case["messages"], tokenize=False, tools=case["tools"], **case["kwargs"])
    assert text == case["text"]
    assert tok(text, add_special_tokens=False).input_ids == case["ids"]


# ---- SFT ----
@pytest.mark.parametrize("name", KEPT)
def test_sft_feeds_and_supervises_upstreams_tokens(tmp_path, tok, name):
    gold = SFT["samples"][name]
    ids, labels, n = gold["input_ids"], gold["labels"], SFT["max_length"]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": gold["conversations"]}])
    # padded to max_length: upstream's tensors, shifted as the model shifts them
    X, Y, mask = SFTDataset(path, tok, max_length=n, pad_to_max=True)[0]
    assert X.tolist() == ids[:-1] and Y.tolist() == ids[1:]
    assert mask.tolist() == [int(label != -100) for label in labels[1:]]
    # dynamic padding: a prefix of those, supervising the same target positions
    X, Y, mask = SFTDataset(path, tok, max_length=n)[0]
    assert X.tolist() + Y[-1:].tolist() == ids[:len(X) + 1]
    assert {k + 1 for k in np.flatnonzero(mask.numpy())} == {j for j, label in enumerate(labels) if label != -100}
    assert tok.decode(Y[mask == 1].tolist()) == gold["supervised_text"]


def test_sft_supervises_the_empty_think_block_as_upstream(tmp_path, tok):
    gold = SFT["samples"]["plain|empty_think_removed=False"]
    X, Y, mask = SFTDataset(write_jsonl(tmp_path / "a.jsonl", [{"conversations": gold["conversations"]}]), tok)[0]
    assert tok.decode(Y[mask == 1].tolist()) == "<think>\n\n</think>\n\n你好！<|im_end|>\n"
    again = SFTDataset(tmp_path / "a.jsonl", tok)   # deterministic: no random system prompt, nothing stripped
    assert all(torch.equal(a, b) for _ in range(3) for a, b in zip(again[0], (X, Y, mask)))


def test_sft_token_cache_gives_the_same_samples(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": SFT["samples"][k]["conversations"]} for k in KEPT])
    fresh, cached = (SFTDataset(path, tok, max_length=SFT["max_length"], cache_dir=c) for c in (None, tmp_path / "c"))
    assert all(torch.equal(a, b) for i in range(len(KEPT)) for a, b in zip(fresh[i], cached[i]))


@pytest.mark.parametrize("name", sorted(SFT["samples"]))
def test_loss_mask_rule_equals_upstreams_on_every_layout_and_cut(tok, name):
    """Our mask (start '<|im_start|>assistant', end '<|im_end|>', spec 4.2) against upstream's rule
    (start '<|im_start|>assistant\\n', end '<|im_end|>\\n') on both golden variants (empty think kept or
    stripped), and on the same ids cut at every length, as SFTDataset lays a truncated sample out."""
    gold = SFT["samples"][name]
    ds = SFTDataset.__new__(SFTDataset)
    ds.tokenizer = tok
    assert upstream_labels(gold["input_ids"], SFT["bos_id"], SFT["eos_id"], SFT["max_length"]) == gold["labels"]
    real = [t for t in gold["input_ids"] if t != tok.pad_token_id]
    for cut in range(2, len(real) + 3):
        arr = (real + [tok.pad_token_id] * 3)[:cut]
        ours = assistant_loss_mask(np.asarray(arr), ds.start_ids, ds.end_ids)
        theirs = upstream_labels(arr, SFT["bos_id"], SFT["eos_id"], cut)
        assert ours[1:].tolist() == [int(label != -100) for label in theirs[1:]], cut


def test_tool_rows_with_json_strings(tmp_path, tok):
    conv = SFT["samples"]["tool|empty_think_removed=False"]["conversations"]
    assert isinstance(conv[0]["tools"], str) and isinstance(conv[2]["tool_calls"], str)  # upstream's stored form
    as_lists = copy.deepcopy(conv)
    as_lists[0]["tools"], as_lists[2]["tool_calls"] = json.loads(conv[0]["tools"]), json.loads(conv[2]["tool_calls"])
    ds = SFTDataset(write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv}, {"conversations": as_lists}]), tok)
    assert torch.equal(ds[0][0], ds[1][0]) and torch.equal(ds[0][2], ds[1][2])


@pytest.mark.parametrize("field,value,reason", [
    ("tools", "[{\"name\": ", r"t.jsonl:1: message 0: 'tools' is not valid JSON"),
    ("tools", "{\"name\": \"f\"}", r"t.jsonl:1: message 0: 'tools' must be a list of objects"),
    ("tool_calls", "not json", r"t.jsonl:1: message 2: 'tool_calls' is not valid JSON"),
    ("reasoning_content", 7, r"t.jsonl:1: message 2: reasoning_content must be a string"),
    ("reasoning_content", "a<|im_end|>b", r"t.jsonl:1: message 2: reasoning_content contains a ChatML"),
])
def test_bad_minimind3_fields_name_file_and_line(tmp_path, tok, field, value, reason):
    conv = copy.deepcopy(SFT["samples"]["tool|empty_think_removed=False"]["conversations"])
    conv[0 if field == "tools" else 2][field] = value
    with pytest.raises(ValueError, match=reason):
        SFTDataset(write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv}]), tok)[0]


# ---- pretrain ----
@pytest.mark.parametrize("cached", [False, True])
def test_pretrain_adds_bos_and_eos_as_upstream(tmp_path, tok, cached):
    path = write_jsonl(tmp_path / "p.jsonl", PRETRAIN["samples"])
    n, cache = PRETRAIN["max_length"], (tmp_path / "cache" if cached else None)
    padded = PretrainDataset(path, tok, max_length=n, pad_to_max=True, cache_dir=cache)
    dynamic = PretrainDataset(path, tok, max_length=n, cache_dir=cache)
    for i, gold in enumerate(PRETRAIN["outputs"]):
        ids, labels = gold["input_ids"], gold["labels"]
        X, Y, mask = padded[i]
        assert X.tolist() == ids[:-1] and Y.tolist() == ids[1:]
        assert mask.tolist() == [int(label != -100) for label in labels[1:]]
        X, Y, mask = dynamic[i]
        real = [t for t, label in zip(ids, labels) if label != -100]
        assert X.tolist() + Y[-1:].tolist() == real and mask.all()
        assert real[0] == tok.bos_token_id and real[-1] == tok.eos_token_id  # also when the text was cut
    assert len(PRETRAIN["outputs"][-1]["input_ids"]) == n and all(t != -100 for t in PRETRAIN["outputs"][-1]["labels"])


def test_pretrain_with_minimind2_adds_nothing(tmp_path):
    from transformers import AutoTokenizer
    mm2 = AutoTokenizer.from_pretrained(ROOT / "model")
    path = write_jsonl(tmp_path / "p.jsonl", PRETRAIN["samples"][:1])
    X, Y, _ = PretrainDataset(path, mm2, max_length=64)[0]
    assert X.tolist() + Y[-1:].tolist() == mm2(PRETRAIN["samples"][0]["text"]).input_ids


def test_token_cache_keeps_the_families_apart(tmp_path, tok):
    from transformers import AutoTokenizer
    path, cache = write_jsonl(tmp_path / "p.jsonl", PRETRAIN["samples"]), tmp_path / "cache"
    mm2 = PretrainDataset(path, AutoTokenizer.from_pretrained(ROOT / "model"), max_length=64, cache_dir=cache)
    mm3 = PretrainDataset(path, tok, max_length=64, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert mm3[0][0][0] == tok.bos_token_id and mm2[0][0][0] != tok.bos_token_id
