"""The shipped tokenizer (model/): spec 3.1 files and ids, no BOS/EOS, the exact chat renders of spec 3.2,
lossless round trips, parity with the original tokenizer files, and a tiny end-to-end training run."""
import json
import string
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trainer import train_tokenizer as tt

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
UPSTREAM = Path(__file__).resolve().parent / "goldens" / "upstream_tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYS = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
              "function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call><|im_end|>\n")
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def upstream():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(UPSTREAM)


# ---- files and ids (spec 3.1) ----

def test_loads_with_special_ids(tok):
    assert len(tok) == 6400
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                           "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.model_max_length == 32768 and tok.padding_side == "right"


def test_tokenizer_json_structure():
    d = json.loads((MODEL / "tokenizer.json").read_text(encoding="utf-8"))
    m = d["model"]
    assert m["type"] == "BPE" and m["unk_token"] is None and m["dropout"] is None
    assert not m["byte_fallback"] and m["continuing_subword_prefix"] is None
    assert d["pre_tokenizer"] == dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
    assert d["decoder"]["type"] == "ByteLevel" and d["normalizer"] is None and d["post_processor"] is None
    assert len(m["vocab"]) == 6400 and len(m["merges"]) == 6400 - 3 - 256
    assert m["vocab"]["!"] == 3 and sorted(m["vocab"].values()) == list(range(6400))
    assert [(t["id"], t["content"], t["special"], t["normalized"]) for t in d["added_tokens"]] == \
           [(i, s, True, False) for i, s in enumerate(SPECIALS)]


def test_config_matches_spec_and_script():
    cfg = json.loads((MODEL / "tokenizer_config.json").read_text(encoding="utf-8"))
    expected = dict(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
                    add_prefix_space=False, model_max_length=32768, clean_up_tokenization_spaces=False, legacy=True,
                    spaces_between_special_tokens=False, bos_token="<|im_start|>", eos_token="<|im_end|>",
                    pad_token="<|endoftext|>", unk_token="<|endoftext|>", additional_special_tokens=[])
    assert {k: cfg[k] for k in expected} == expected
    assert cfg == tt.tokenizer_config()  # the shipped config is the script's output, template included
    assert not (MODEL / "chat_template.jinja").exists()  # it would take priority over the config's template


def test_no_bos_or_eos_added(tok):
    for text in ["你好", "Hello world", "1+1=2", ""]:
        ids = tok(text).input_ids
        assert ids == tok(text, add_special_tokens=False).input_ids
        assert 1 not in ids and 2 not in ids


def test_special_tokens_inside_text(tok):
    assert tok("<|im_start|>assistant\n").input_ids[0] == 1
    assert tok("<|im_end|>").input_ids == [2]
    assert tok("a<|endoftext|>b").input_ids[1] == 0
    # the reasoning tags are ordinary text, split into several pieces (spec 3.1)
    for tag in ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>"]:
        ids = tok(tag).input_ids
        assert len(ids) > 1 and min(ids) > 2


# ---- chat template (spec 3.2, renders copied from the spec) ----

def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c, **kw: {"role": "assistant", "content": c, **kw}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731
T = lambda c: {"role": "tool", "content": c}  # noqa: E731

SPEC_RENDERS = {
    "A": ([U("你好")], {}, '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n'),
    "B": ([U("你好")], dict(add_generation_prompt=True),
          '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n'),
    "C": ([S("S"), U("Q"), A("A")], {},
          '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n'),
    "D": ([U("Q1"), A("A1"), U("Q2")], dict(add_generation_prompt=True),
          '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n'),
    "E": ([U("Q")], dict(add_generation_prompt=True, enable_thinking=False),
          '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'),
    "F": ([U("Q")], dict(add_generation_prompt=True, tools=WEATHER),
          '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n'),
    "G": ([S("S"), U("Q")], dict(tools=[{"name": "f", "description": "d"}]),
          '<|im_start|>system\nS\n\n' + TOOLS_HEAD + '\n{"name": "f", "description": "d"}' + TOOLS_TAIL
          + '<|im_start|>user\nQ<|im_end|>\n'),
    "H": ([U("Q"), A("", tool_calls=[{"function": {"name": "f", "arguments": {"x": 1}}}]), T("R1"), T("R2"), A("done")], {},
          '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nR1\n</tool_response>\n<tool_response>\nR2\n</tool_response><|im_end|>\n<|im_start|>assistant\ndone<|im_end|>\n'),
    "I": ([U("Q"), A("ok", tool_calls=[{"function": {"name": "f", "arguments": '{"x": 1}'}},
                                      {"function": {"name": "g", "arguments": {}}}])], {},
          SYS + '<|im_start|>user\nQ<|im_end|>\n'
          + '<|im_start|>assistant\nok\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call><|im_end|>\n'),
    "J": ([U("Q"), S("S2"), A("A")], {},
          '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>system\nS2<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n'),
    "K": ([S("S")], dict(add_generation_prompt=True), '<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n'),
    "L": ([U("Q"), A("<think>\nT\n</think>\n<answer>\nA\n</answer>")], {},
          SYS + '<|im_start|>user\nQ<|im_end|>\n'
          + '<|im_start|>assistant\n<think>\nT\n</think>\n<answer>\nA\n</answer><|im_end|>\n'),
}


@pytest.mark.parametrize("name", sorted(SPEC_RENDERS))
def test_chat_template_spec_renders(tok, name):
    messages, kwargs, expected = SPEC_RENDERS[name]
    assert render(tok, messages, **kwargs) == expected


def test_chat_template_details(tok):
    q = [U("Q")]
    assert render(tok, q, add_generation_prompt=True, enable_thinking=True) == \
           render(tok, q, add_generation_prompt=True)
    assert render(tok, [U("Q"), {"role": "narrator", "content": "x"}]) == render(tok, q)  # unknown roles dropped
    assert render(tok, [U([{"type": "text", "text": "hi"}])]) == SYS + "<|im_start|>user\n<|im_end|>\n"  # non-string
    assert "你好" in render(tok, q, tools=[{"name": "说你好"}])  # tojson keeps non-ASCII text
    with pytest.raises(Exception):
        render(tok, [])


# ---- round trips ----

SAMPLES = [
    "你好，世界！今天天气很好，我们去公园散步吧。", "The quick brown fox jumps over the lazy dog.",
    "3.14159 2024-05-12 1,234,567 0x1F600 ١٢٣", "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tpass\n",
    "emoji 😀🎉👍🏽 👨‍👩‍👧 ❤️ ✓ →", "  leading and trailing spaces  \n\n\r\n", "Ünïcödé Ελληνικά русский 日本語 한국어",
    "<think>\n想一想\n</think>\n<answer>\n3+5=8。\n</answer>", "\x00\x01\x7f control", "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tok, text):
    assert tok.decode(tok(text).input_ids) == text


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=80).filter(lambda s: not any(t in s for t in SPECIALS)))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok(text).input_ids) == text


# ---- the original files (skipped when ../shared/reference is absent) ----

@pytest.mark.parametrize("text,ids", [
    ("<|im_start|>assistant", [1, 1078, 538, 501]), ("<|im_start|>assistant\n", [1, 1078, 538, 501, 201]),
    ("<|im_end|>", [2]), ("<think>", [30, 450, 1573, 32]), ("</think>", [5540, 450, 1573, 32]),
    ("<answer>", [30, 662, 89, 275, 32]), ("</answer>", [5540, 662, 89, 275, 32]),
    ("You are a helpful assistant", [59, 292, 389, 260, 3836, 1861, 501]), ("你好", [5134]),
    ("Hello world", [42, 392, 338, 1636]),
])
def test_upstream_token_vectors(upstream, text, ids):
    assert upstream(text).input_ids == ids


def test_upstream_template_vectors(upstream):
    a = upstream.apply_chat_template([U("你好"), A("你好！")], tokenize=False)
    assert upstream(a).input_ids == [1, 85, 736, 201, 59, 292, 389, 260, 3836, 1861, 501, 2, 201, 1, 320, 275, 201,
                                     5134, 2, 201, 1, 1078, 538, 501, 201, 5134, 2207, 2, 201]


@pytest.mark.parametrize("name", sorted(SPEC_RENDERS))
def test_upstream_renders_match_spec(upstream, name):
    messages, kwargs, expected = SPEC_RENDERS[name]
    assert render(upstream, messages, **kwargs) == expected


_text = st.text(alphabet=string.ascii_letters + "你好\n <>{}\"'", max_size=12)
_call = st.fixed_dictionaries({"name": _text, "arguments": st.one_of(
    _text, st.dictionaries(st.sampled_from(["x", "城市"]), st.one_of(st.integers(), _text), max_size=2))})
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "assistant", "other"]),
                           "content": st.one_of(_text, st.none(), st.just([{"type": "text", "text": "x"}]))}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": _text,
                           "tool_calls": st.lists(st.one_of(_call, st.fixed_dictionaries({"function": _call})),
                                                  max_size=2)}))
_tools = st.one_of(st.none(), st.just([]), st.just(WEATHER), st.just([{"name": "f", "description": "中文"}]))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_message, min_size=1, max_size=6), tools=_tools, agp=st.booleans(),
       thinking=st.sampled_from(["unset", True, False]))
def test_template_matches_upstream(tok, upstream, messages, tools, agp, thinking):
    kw = dict(add_generation_prompt=agp, tools=tools)
    if thinking != "unset":
        kw["enable_thinking"] = thinking
    if tools and messages[0]["role"] == "system" and not isinstance(messages[0].get("content"), str):
        messages[0]["content"] = "S"  # upstream concatenates it as a string; non-strings raise there
    assert _render_or_error(tok, messages, **kw) == _render_or_error(upstream, messages, **kw)


def _render_or_error(tok, messages, **kw):
    """The render, or the exception type when the template raises (e.g. a first system message without content)."""
    try:
        return render(tok, messages, **kw)
    except Exception as e:  # noqa: BLE001 - the same failure on both sides is parity too
        return type(e).__name__


# ---- training (tiny, seconds) ----

def _tiny_corpus(path: Path) -> Path:
    lines = ["<|im_start|>法国的首都是巴黎。<|im_end|> <|im_start|>The capital of France is Paris.<|im_end|>",
             "3+5=8。 def f(x): return x * 2  # 😀", "Hello world, 你好世界！" * 3] * 30
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
    return path


def test_train_tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    data = _tiny_corpus(tmp_path / "corpus.jsonl")
    out = tt.main(["--data_path", str(data), "--vocab_size", "300", "--save_dir", str(tmp_path / "tok")])
    hf = AutoTokenizer.from_pretrained(out)
    assert len(hf) == 300 and [hf.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2]
    assert hf.decode(hf("巴黎 Paris 😀").input_ids) == "巴黎 Paris 😀"
    messages, kwargs, expected = SPEC_RENDERS["E"]
    assert render(hf, messages, **kwargs) == expected
    # deterministic: a second run writes the same bytes
    tt.main(["--data_path", str(data), "--vocab_size", "300", "--save_dir", str(tmp_path / "tok2")])
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (tmp_path / "tok2" / "tokenizer.json").read_bytes()


def test_train_tiny_minimind3_tokenizer(tmp_path):
    """--model_family minimind3: the shipped minimind-3 tokenizer's added tokens, ids, special flags and template."""
    from transformers import AutoTokenizer
    data = _tiny_corpus(tmp_path / "corpus.jsonl")
    out = tt.main(["--data_path", str(data), "--vocab_size", "330", "--save_dir", str(tmp_path / "tok"),
                   "--model_family", "minimind3"])
    hf, shipped = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(MODEL / "minimind3")
    assert len(hf) == 330
    added = lambda t: {i: (a.content, a.special) for i, a in t.added_tokens_decoder.items()}  # noqa: E731
    assert added(hf) == added(shipped) and len(added(hf)) == 36
    assert (added(hf)[20], added(hf)[21], added(hf)[35]) == (("<tts_text_bos_single>", True), ("<tool_call>", False),
                                                            ("<|buffer9|>", False))
    trained = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert trained == json.loads((MODEL / "minimind3" / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")) == \
           json.loads((MODEL / "minimind3" / "tokenizer_config.json").read_text(encoding="utf-8"))
    text = "<think>巴黎</think> Paris 😀"
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text
    chat = [S("S"), U("你好"), A("A", reasoning_content="R")]
    tool_chat = [U("Q"), A("", tool_calls=[{"name": "get_weather", "arguments": {"city": "北京"}}]), T("晴")]
    for kw in ({}, dict(add_generation_prompt=True), dict(add_generation_prompt=True, open_thinking=True)):
        assert render(hf, chat, **kw) == render(shipped, chat, **kw)
        assert render(hf, tool_chat, tools=WEATHER, **kw) == render(shipped, tool_chat, tools=WEATHER, **kw)
    assert render(hf, chat) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n" \
                               "<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    from dataset.lm_dataset import is_minimind3_tokenizer
    assert is_minimind3_tokenizer(hf)  # so the datasets build minimind-3 samples with it
    # the MiniMind2 default is untouched
    assert tt.added_tokens() == [(t, True) for t in SPECIALS]
    assert "open_thinking" not in tt.tokenizer_config()["chat_template"]


def test_refuses_to_overwrite_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(tt, "ROOT", tmp_path)  # pretend tmp_path is the repo, so nothing real is at risk
    monkeypatch.setattr(tt, "MINIMIND3", tmp_path / "model" / "minimind3")
    (tmp_path / "model" / "minimind3").mkdir(parents=True)
    data = _tiny_corpus(tmp_path / "corpus.jsonl")
    for shipped in (tmp_path / "model", tmp_path / "model" / "minimind3"):
        with pytest.raises(SystemExit):
            tt.main(["--data_path", str(data), "--vocab_size", "300", "--save_dir", str(shipped)])
    assert list((tmp_path / "model").iterdir()) == [tmp_path / "model" / "minimind3"]
    assert list((tmp_path / "model" / "minimind3").iterdir()) == []
    tt.main(["--data_path", str(data), "--vocab_size", "300", "--save_dir", str(tmp_path / "model"),
             "--overwrite_shipped"])
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(tt.read_texts(bad))


def test_corpus_generators_are_deterministic():
    pytest.importorskip("jieba")
    pytest.importorskip("spellchecker")
    import random
    from dataset import tokenizer_corpus as tc
    zh = [list(tc.chinese_text(random.Random(1), 3000)) for _ in range(2)]
    en = [list(tc.english_word_text(random.Random(1), 3000)) for _ in range(2)]
    assert zh[0] == zh[1] and en[0] == en[1]
    assert sum("\u4e00" <= c <= "\u9fff" for c in "".join(zh[0])) > 2000
    assert not any(stem in "".join(en[0]).lower() for stem in tc.SKIP_STEMS)


@pytest.mark.slow
def test_shipped_tokenizer_is_what_the_command_builds(tmp_path):
    """The documented command (train_tokenizer.py with no --data_path) rebuilds the shipped tokenizer: the same
    config, special tokens and chat template byte for byte, and its vocabulary up to the few merges that the demo
    corpus's later edits moved (~20 s). The shipped files stay frozen: trained weights depend on their ids."""
    try:
        pins = (version("jieba"), version("pyspellchecker"), version("tokenizers"))
    except PackageNotFoundError as e:
        pytest.skip(f"{e.name} is not installed")
    if sys.version_info[:2] != (3, 11) or pins != ("0.42.1", "0.9.1", "0.23.3"):
        pytest.skip("reproducible only with Python 3.11, jieba 0.42.1, pyspellchecker 0.9.1, tokenizers 0.23.3")
    out = tt.main(["--save_dir", str(tmp_path / "tok")])
    assert (out / "tokenizer_config.json").read_bytes() == (MODEL / "tokenizer_config.json").read_bytes()
    built, shipped = (json.loads((d / "tokenizer.json").read_text(encoding="utf-8")) for d in (out, MODEL))
    assert {k: v for k, v in built.items() if k != "model"} == {k: v for k, v in shipped.items() if k != "model"}
    vocab, ship_vocab = built["model"]["vocab"], shipped["model"]["vocab"]
    assert len(vocab) == len(ship_vocab) == 6400
    assert len(vocab.keys() & ship_vocab.keys()) >= 0.98 * len(ship_vocab)   # 6308 of 6400 at the last check
