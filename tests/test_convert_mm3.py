"""scripts/convert_model.py for minimind-3 (the original's newest family), each export checked by what loads it.

Qwen3 folder (--to qwen3, the default for minimind-3, as the original publishes it): transformers' own
Qwen3ForCausalLM / Qwen3MoeForCausalLM (no custom code) give our logits and greedy tokens, on the weights made by the
original's newest code (tests/goldens/model3_*.pt), YaRN included; the minimind-3 tokenizer goes with it; back to
.pth the round trip is exact. GGUF: llama.cpp's "qwen3" / "qwen3moe" conventions (no rope permutation, NEOX rope,
q/k norms, stacked experts), read back with gguf.GGUFReader and run by a forward pass written here; with
llama-cpp-python installed, llama.cpp itself (slow suite). Ollama: the Modelfile's TEMPLATE, evaluated by a small Go
text/template evaluator written here (and by Go itself in the slow suite, with the fields of Ollama's template
data), renders the goldens' conversations as the jinja chat template does.
"""
import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from model.cli import cli
from model.loading import load_native
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights
from scripts.convert_model import OLLAMA_TEMPLATE_MINIMIND3, main, write_modelfile
from tests.conftest import GOLDENS, ROOT, tiny_config
from tests.test_convert import read_gguf

MM3_TOKENIZER = ROOT / "model" / "minimind3"
CHAT = json.loads((GOLDENS / "mm3_chat_templates.json").read_text(encoding="utf-8"))


def golden_weight(directory, name: str):
    """The original's golden weights (tests/goldens/model3_{name}.pt) saved as the trainers save: fp16 .pth + .json."""
    g = torch.load(GOLDENS / f"model3_{name}.pt")
    model = MiniMindForCausalLM(MiniMindConfig.from_dict(dict(g["config_json"])))
    model.load_state_dict(g["state_dict"], strict=True)
    path = directory / f"full_sft_64{'_moe' if model.config.use_moe else ''}.pth"
    save_weights(model, path, model.config)
    return path, g


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{kind: (weight path, the golden, fp32 model loaded from the file)} for dense and MoE."""
    out = {}
    for kind in ("dense", "moe"):
        path, g = golden_weight(tmp_path_factory.mktemp(kind), kind)
        out[kind] = path, g, load_native(path)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# ---- stock Qwen3 / Qwen3-MoE ----
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_qwen3_export_is_stock_transformers_with_our_logits(weights, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, g, ours = weights[kind]
    folder = main(["--torch_path", str(path), "--dtype", "float32", "--save_dir", str(tmp_path)])   # no --to
    assert folder == tmp_path / f"{path.stem}-qwen3"                  # minimind-3 exports to Qwen3 by default
    cfg = json.loads((folder / "config.json").read_text())
    moe = kind == "moe"
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"] and "auto_map" not in cfg
    assert cfg["model_type"] == ("qwen3_moe" if moe else "qwen3") and cfg["dtype"] == "float32"
    expected = {"vocab_size": 6400, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8, "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                "rope_theta": 1e6, "rope_scaling": None}                  # transformers 4's keys are written too
    if moe:
        expected.update(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=256, norm_topk_prob=True,
                        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=5e-4)
    assert {k: cfg.get(k) for k in expected} == expected
    assert cfg.get("rope_parameters", {"rope_type": "default", "rope_theta": 1e6}) == {"rope_type": "default",
                                                                                     "rope_theta": 1e6}
    for name in ("tokenizer.json", "tokenizer_config.json"):                # the family's own tokenizer
        assert (folder / name).read_bytes() == (MM3_TOKENIZER / name).read_bytes()

    qwen3 = AutoModelForCausalLM.from_pretrained(folder).eval()           # no auto_map: no custom code can run
    assert type(qwen3).__module__.startswith("transformers.models.qwen3")
    ids = g["input_ids"]
    assert (logits(qwen3, ids) - logits(ours, ids)).abs().max() <= 1e-4
    assert (logits(qwen3, ids) - g["logits"]).abs().max() <= 1e-4       # and the original's own logits
    with torch.no_grad():
        theirs = qwen3.generate(g["greedy_prompt"], max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    assert theirs[0, 8:].tolist() == g["greedy_16"].view(-1).tolist()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<think>") == 25
    chat = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        CHAT["plain_user|agp=True|open_thinking=None"]["text"]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_qwen3_folder_round_trips_to_native_fp16(weights, tmp_path, kind):
    path, _, _ = weights[kind]
    folder = main(["--torch_path", str(path), "--to", "qwen3", "--out", str(tmp_path / "q")])   # default float16
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    back = main(["--hf_path", str(folder), "--to", "torch", "--out", str(tmp_path / path.name)])
    original, again = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert list(again) == list(original)                               # the original's keys and order
    for key, value in original.items():
        assert again[key].dtype == torch.float16 and torch.equal(again[key], value), key
    assert load_native(back).config.model_family == "minimind3"         # its .json says the family


def test_qwen3_export_with_yarn_matches_the_originals_logits(tmp_path):
    """The original's YaRN golden (2600 positions, past the 2048 where YaRN shows): Qwen3's "yarn" rope type."""
    from transformers import AutoModelForCausalLM
    path, g = golden_weight(tmp_path, "yarn")
    folder = main(["--torch_path", str(path), "--dtype", "float32", "--out", str(tmp_path / "q")])
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]}
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"], rope["rope_theta"]) == \
        ("yarn", 16, 2048, 1e6)
    assert cfg["rope_scaling"]["rope_type"] == "yarn"                  # what transformers 4 reads
    qwen3 = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = qwen3(g["input_ids"], logits_to_keep=8).logits
    assert (out - g["logits"]).abs().max() <= 1e-4


def test_untied_head_exports_to_qwen3_and_gguf(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(model_family="minimind3", num_attention_heads=8, num_key_value_heads=4,
                                            tie_word_embeddings=False))
    path = tmp_path / "full_sft_64.pth"
    save_weights(model, path, model.config)
    ours = load_native(path)
    assert not ours.config.tie_word_embeddings
    ids = torch.randint(36, 6400, (2, 16), generator=torch.Generator().manual_seed(0))
    folder = main(["--torch_path", str(path), "--dtype", "float32", "--out", str(tmp_path / "q")])
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    assert (logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids) - logits(ours, ids)).abs().max() <= 1e-4
    gguf_file = main(["--torch_path", str(path), "--to", "gguf", "--dtype", "float32",
                      "--out", str(tmp_path / "m.gguf")])
    fields, tensors, _ = read_gguf(gguf_file)
    assert torch.equal(tensors["output.weight"], ours.lm_head.weight.detach())
    assert (qwen3_cpp_style_forward(tensors, fields, ids[0]) - logits(ours, ids[:1])[0]).abs().max() <= 1e-4


def test_family_targets_are_one_line_errors(weights, tmp_path, capfd, monkeypatch):
    """--to llama on minimind-3 and --to qwen3 on MiniMind2 name the right target: one `error:` line, exit code 2."""
    path = weights["dense"][0]
    mm2 = tmp_path / "mm2" / "full_sft_64.pth"
    mm2.parent.mkdir()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config())
    save_weights(model, mm2, model.config)
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    cases = [(["--torch_path", str(path), "--to", "llama"], r"minimind-3 model.*--to qwen3"),
             (["--torch_path", str(mm2), "--to", "qwen3"], r"MiniMind2 model.*--to llama")]
    for flags, message in cases:
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli(lambda: main(flags + ["--out", str(tmp_path / "x")]))
        stdout, stderr = capfd.readouterr()
        assert exit_.value.code == 2 and stdout == "", stderr
        assert len(stderr.strip().splitlines()) == 1 and re.match(r"error: --to .*" + message, stderr), stderr
    assert not (tmp_path / "x").exists()


# ---- GGUF (llama.cpp "qwen3" / "qwen3moe") ----
def qwen3_cpp_style_forward(t: dict, fields: dict, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's qwen3 / qwen3moe graph on GGUF tensors: per-head RMSNorm of q and k before NEOX rope (dimension j
    rotates with j + D/2, as transformers' Qwen3), output = token_embd when absent; MoE: softmax over ffn_gate_inp,
    top-k experts, weights renormalised, SwiGLU with the stacked expert tensors."""
    arch = fields["general.architecture"]
    hp = lambda key: fields[f"{arch}.{key}"]  # noqa: E731
    n_head, n_kv, d = hp("attention.head_count"), hp("attention.head_count_kv"), hp("attention.key_length")
    eps, base, n_layer = hp("attention.layer_norm_rms_epsilon"), hp("rope.freq_base"), hp("block_count")
    T = ids.shape[0]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # (T, H, D)
        inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        theta = torch.arange(T, dtype=torch.float64)[:, None, None] * inv_freq
        cos, sin = theta.cos().float(), theta.sin().float()
        x0, x1 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)

    def swiglu(h, gate, up, down):
        return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T

    x = t["token_embd.weight"][ids]
    for i in range(n_layer):
        g = lambda name: t[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = rms(x, g("attn_norm"))
        q = rope(rms((h @ g("attn_q").T).view(T, n_head, d), g("attn_q_norm")))
        k = rope(rms((h @ g("attn_k").T).view(T, n_kv, d), g("attn_k_norm")))
        v = (h @ g("attn_v").T).view(T, n_kv, d)
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + att.transpose(0, 1).reshape(T, -1) @ g("attn_output").T
        h = rms(x, g("ffn_norm"))
        if arch == "qwen3moe":
            weight, expert = torch.softmax(h @ g("ffn_gate_inp").T, dim=-1).topk(hp("expert_used_count"), dim=-1)
            weight = weight / weight.sum(-1, keepdim=True)
            y = torch.zeros_like(h)
            for tok in range(T):
                for w, e in zip(weight[tok], expert[tok]):
                    y[tok] += w * swiglu(h[tok], g("ffn_gate_exps")[e], g("ffn_up_exps")[e], g("ffn_down_exps")[e])
            x = x + y
        else:
            x = x + swiglu(h, g("ffn_gate"), g("ffn_up"), g("ffn_down"))
    return rms(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T


@pytest.mark.parametrize("kind,dtype", [("dense", "float32"), ("moe", "float32"), ("moe", "float16")])
def test_gguf_qwen3_metadata_tensors_and_llama_cpp_conventions(weights, tmp_path, kind, dtype):
    pytest.importorskip("gguf")
    path, g, ours = weights[kind]
    out = main(["--torch_path", str(path), "--to", "gguf", "--dtype", dtype, "--out", str(tmp_path / "m.gguf")])
    fields, tensors, types = read_gguf(out)
    moe = kind == "moe"
    arch = "qwen3moe" if moe else "qwen3"
    assert fields["general.architecture"] == arch
    expected = {"context_length": 32768, "embedding_length": 64, "block_count": 2, "feed_forward_length": 256,
                "attention.head_count": 8, "attention.head_count_kv": 4, "attention.key_length": 8,
                "attention.value_length": 8, "rope.freq_base": 1e6, "vocab_size": 6400}
    if moe:
        expected.update({"expert_count": 4, "expert_used_count": 1, "expert_feed_forward_length": 256})
    assert {k: fields[f"{arch}.{k}"] for k in expected} == expected
    assert math.isclose(fields[f"{arch}.attention.layer_norm_rms_epsilon"], 1e-6, rel_tol=1e-6)
    assert not any(k.startswith(f"{arch}.rope.scaling") for k in fields)
    tok = json.loads((MM3_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((MM3_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    # ids 0-20 special (CONTROL), 21-26 <tool_call> ... </think> printed (USER_DEFINED), 27-35 <|bufferN|> CONTROL
    # as llama.cpp's converter types them (they look special), then NORMAL
    assert fields["tokenizer.ggml.token_type"] == [3] * 21 + [4] * 6 + [3] * 9 + [1] * (6400 - 36)
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert fields["tokenizer.ggml.merges"][0] == " ".join(tok["model"]["merges"][0])
    assert {k: fields[f"tokenizer.ggml.{k}"] for k in ("model", "pre", "bos_token_id", "eos_token_id",
                                                        "padding_token_id", "add_bos_token")} == \
        {"model": "gpt2", "pre": "gpt-2", "bos_token_id": 1, "eos_token_id": 2, "padding_token_id": 0,
         "add_bos_token": False}
    assert fields["tokenizer.chat_template"] == tok_cfg["chat_template"]

    sd = ours.state_dict()
    mine = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(2):
        mine.update({f"blk.{i}.{n}.weight": sd[f"model.layers.{i}.{m}.weight"] for n, m in names.items()})
        p = f"model.layers.{i}.mlp"
        if moe:
            mine[f"blk.{i}.ffn_gate_inp.weight"] = sd[f"{p}.gate.weight"]
            for proj in ("gate", "up", "down"):
                mine[f"blk.{i}.ffn_{proj}_exps.weight"] = torch.stack([sd[f"{p}.experts.{e}.{proj}_proj.weight"]
                                                                      for e in range(4)])
        else:
            mine.update({f"blk.{i}.ffn_{proj}.weight": sd[f"{p}.{proj}_proj.weight"]
                         for proj in ("gate", "up", "down")})
    assert set(tensors) == set(mine)                                   # tied: no output.weight
    for name, value in tensors.items():   # q/k as they are (NEOX rope), the weights' fp16 values exactly
        assert value.shape == mine[name].shape and torch.equal(value, mine[name]), name
    half = dtype.replace("float", "F")
    assert types["blk.0.attn_q.weight"] == half and types["blk.0.attn_q_norm.weight"] == "F32"
    if moe:
        assert types["blk.0.ffn_gate_exps.weight"] == half and types["blk.0.ffn_gate_inp.weight"] == "F32"
    ids = g["input_ids"][0]
    assert (qwen3_cpp_style_forward(tensors, fields, ids) - logits(ours, ids[None])[0]).abs().max() <= 1e-4
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and f'TEMPLATE """{OLLAMA_TEMPLATE_MINIMIND3}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_refuses_a_router_llama_cpp_would_renormalise(tmp_path):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(model_family="minimind3", use_moe=True, num_experts_per_tok=2,
                                            norm_topk_prob=False))
    path = tmp_path / "full_sft_64_moe.pth"
    save_weights(model, path, model.config)
    with pytest.raises(ValueError, match="norm_topk_prob=False.*--to qwen3"):
        main(["--torch_path", str(path), "--to", "gguf", "--out", str(tmp_path / "m.gguf")])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_gguf_runs_in_llama_cpp_like_ours(weights, tmp_path, kind):
    """llama.cpp itself (llama-cpp-python) loads the qwen3 / qwen3moe GGUF: the tokenizer's ids and text (the
    <think> and <tool_call> tags printed, the special tokens only on request), our logits, our greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer
    path, _, ours = weights[kind]
    out = main(["--torch_path", str(path), "--to", "gguf", "--dtype", "float32", "--out", str(tmp_path / "m.gguf")])
    llm = llama_cpp.Llama(str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=0, type_v=0)   # fp32 KV cache (llama.cpp defaults to fp16)
    tok = AutoTokenizer.from_pretrained(MM3_TOKENIZER, local_files_only=True)
    prompts = ["Hello, world! 123", "为什么天空是蓝色的？", CHAT["tools_full|agp=True|open_thinking=None"]["text"],
               "<think>\n推理\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"]
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode() == text
        assert llm.detokenize(ids).decode() == tok.decode(ids, skip_special_tokens=True)
        llm.reset()
        llm.eval(ids)
        assert (torch.tensor(llm.scores[: len(ids)]) - logits(ours, torch.tensor([ids]))[0]).abs().max() <= 1e-4, text
        llm.reset()
        gen = [t for _, t in zip(range(12), llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0))]
        with torch.no_grad():
            greedy = ours.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert gen == greedy[0, len(ids):].tolist(), text
    llm.close()


# ---- Ollama: the Modelfile's TEMPLATE ----
class GoJSON:
    """A value that prints as Go's encoding/json writes it (compact, HTML characters escaped), as Ollama's tools
    and tool-call arguments print in a template (their String() methods)."""

    def __init__(self, value):
        self.value = value

    def __bool__(self):
        return bool(self.value)

    def __str__(self):
        text = json.dumps(self.value, separators=(",", ":"), ensure_ascii=False)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def ollama_tool(tool: dict) -> GoJSON:
    """An OpenAI-style tool as Ollama holds it: its fields in the order of Ollama's Go structs, properties sorted by
    name (a Go map), each property's fields in ToolProperty's order."""
    fn, params = tool["function"], tool["function"].get("parameters", {})
    prop_order = ("anyOf", "type", "items", "description", "enum", "properties", "required")
    props = {name: {k: p[k] for k in prop_order if p.get(k)}
             for name, p in sorted(params.get("properties", {}).items())}
    out_params = {"type": params.get("type", "object"), **({"required": params["required"]} if params.get("required")
                                                           else {}), "properties": props}
    return GoJSON({"type": tool["type"], "function": {"name": fn["name"], "description": fn.get("description", ""),
                                                      "parameters": out_params}})


def ollama_values(messages, tools, think: bool) -> dict:
    """What Ollama passes a TEMPLATE for an OpenAI-style conversation (template.go: System, Messages with Role,
    Content, Thinking and ToolCalls, Tools, Think). A reply's thinking is its own field, stored without the newlines
    around it (a <think> block inside an assistant content is split off as Ollama's thinking parser splits a reply);
    tool-call arguments are objects (a JSON string is parsed)."""
    out = []
    for m in messages:
        content, thinking = m.get("content") or "", (m.get("reasoning_content") or "").strip("\n")
        if m["role"] == "assistant" and not thinking and "</think>" in content:
            thinking = content.split("</think>")[0].split("<think>")[-1].strip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        calls = []
        for i, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function", call)
            args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
            calls.append({"ID": call.get("id", ""), "Function": {"Index": i, "Name": fn["name"],
                                                                 "Arguments": GoJSON(dict(sorted(args.items())))}})
        out.append({"Role": m["role"], "Content": content, "Thinking": thinking, "ToolCalls": calls, "ToolName": "",
                    "ToolCallID": ""})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": out, "Tools": [ollama_tool(t) for t in tools or []], "Response": "",
            "Think": think, "IsThinkSet": True}


def canonical_json_lines(text: str) -> str:
    """`text` with every line that is a JSON value rewritten canonically (sorted keys, compact): the one way Ollama's
    rendering of tools and tool calls may differ from the jinja's (Go's {"a":1} against Python's {"a": 1})."""
    lines = []
    for line in text.split("\n"):
        try:
            line = json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except ValueError:
            pass
        lines.append(line)
    return "\n".join(lines)


def template_cases():
    """(name, messages, tools, think, the jinja's text): the goldens' conversations (rendered by the original's own
    code) with the generation prompt, thinking off (open_thinking unset or False) and on, plus two conversations
    they lack (a system message after the first turn; consecutive tool results without a system prompt), rendered
    by the shipped template (the original's, verbatim)."""
    from transformers import AutoTokenizer
    cases = []
    for key, case in CHAT.items():
        name, agp, thinking = key.split("|")
        if agp == "agp=True" and thinking in ("open_thinking=None", "open_thinking=True"):
            cases.append((key, case["messages"], case["tools"], thinking == "open_thinking=True", case["text"]))
    tok = AutoTokenizer.from_pretrained(MM3_TOKENIZER, local_files_only=True)
    tool = CHAT["tools_full|agp=True|open_thinking=None"]["tools"][0]
    extra = {"system_mid_conversation": ([{"role": "user", "content": "Q"}, {"role": "system", "content": "S2"},
                                          {"role": "user", "content": "Q2"}], None),
             "tool_results_no_system": ([{"role": "user", "content": "天气?"},
                                         {"role": "assistant", "content": "",
                                          "tool_calls": [{"function": {"name": "get_current_weather",
                                                                       "arguments": {"location": "北京"}}},
                                                         {"function": {"name": "get_current_weather",
                                                                       "arguments": {"location": "上海"}}}]},
                                         {"role": "tool", "content": "28°C"}, {"role": "tool", "content": "30°C"}],
                                        [tool])}
    for name, (messages, tools) in extra.items():
        for think in (False, True):
            text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                           open_thinking=think)
            cases.append((f"{name}|think={think}", messages, tools, think, text))
    return cases


def modelfile_template(tmp_path) -> str:
    write_modelfile(tmp_path / "x.gguf", family="minimind3")
    return (tmp_path / "Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]


def test_modelfile_template_renders_like_the_minimind3_chat_template(tmp_path):
    """Plain chat, a system prompt, reasoning in the history, thinking on and off, tools, tool calls and tool
    results: the text equals the jinja's, exactly without tools, and with tools up to the JSON spacing Go uses."""
    template = modelfile_template(tmp_path)
    assert template == OLLAMA_TEMPLATE_MINIMIND3
    cases = template_cases()
    assert len(cases) == 2 * 7 + 4 and sum(bool(tools) for _, _, tools, _, _ in cases) == 6
    for name, messages, tools, think, expected in cases:
        rendered = go_render(template, ollama_values(messages, tools, think))
        if tools:
            assert rendered != expected and canonical_json_lines(rendered) == canonical_json_lines(expected), name
        else:
            assert rendered == expected, name


def test_modelfile_template_carries_ollamas_tool_and_thinking_markers():
    """What Ollama reads out of a template (documented, not run here): `.Tools` in it gives the model the tools
    capability; the first text inside `{{ if .ToolCalls }}` holds the tool-call tag it parses replies for; the
    text around `{{ .Thinking }}` inside the range over .Messages gives the thinking tags."""
    t = OLLAMA_TEMPLATE_MINIMIND3
    assert "{{ if .Tools }}" in t and "{{ range .Tools }}" in t
    assert re.search(r"\{\{ if \.ToolCalls \}\}\{\{ range [^}]*\}\}\{\{ if [^}]*\}\}\n<tool_call>", t)
    assert "{{ if .Thinking }}<think>\n{{ .Thinking }}\n</think>\n\n{{ else }}" in t
    assert t.endswith("<|im_start|>assistant\n{{ if .Think }}<think>\n{{ else }}<think>\n\n</think>\n\n{{ end }}")


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// The data Ollama gives a TEMPLATE (ollama template/template.go), with the same field names; tools and tool-call
// arguments come as the text their String() methods print (GoJSON above).
type toolCallFunction struct {
	Index     int
	Name      string
	Arguments string
}

type toolCall struct {
	ID       string
	Function toolCallFunction
}

type message struct {
	Role, Content, Thinking string
	ToolCalls               []toolCall
	ToolName, ToolCallID    string
}

func main() {
	var data struct {
		System   string
		Messages []*message
		Tools    []string
		Think    bool
	}
	raw, _ := os.ReadFile(os.Args[2])
	if err := json.Unmarshal(raw, &data); err != nil {
		panic(err)
	}
	src, _ := os.ReadFile(os.Args[1])
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(src)))
	if err := tmpl.Execute(os.Stdout, map[string]any{"System": data.System, "Messages": data.Messages,
		"Tools": data.Tools, "Response": "", "Think": data.Think, "IsThinkSet": true}); err != nil {
		panic(err)
	}
}
"""


class _Encoder(json.JSONEncoder):
    def default(self, o):
        return str(o) if isinstance(o, GoJSON) else super().default(o)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("go") is None, reason="needs the go toolchain (apt-get install golang-go)")
def test_modelfile_template_in_go_text_template(tmp_path):
    """Ollama renders TEMPLATE with Go's text/template (missingkey=zero, its json function): Go itself gives what
    the evaluator above gives, for every case (and so the jinja's text)."""
    template = modelfile_template(tmp_path)
    (tmp_path / "t.tmpl").write_text(template)
    (tmp_path / "render.go").write_text(GO_RENDER)
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"), GOFLAGS="-mod=mod",
               GOTOOLCHAIN="local", GOPROXY="off")
    subprocess.run(["go", "build", "-o", "render", "render.go"], cwd=tmp_path, env=env, check=True, timeout=300)
    for name, messages, tools, think, expected in template_cases():
        values = ollama_values(messages, tools, think)
        (tmp_path / "in.json").write_text(json.dumps(values, cls=_Encoder, ensure_ascii=False))
        out = subprocess.run(["./render", "t.tmpl", "in.json"], cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout
        assert out == go_render(template, values), name
        assert canonical_json_lines(out) == canonical_json_lines(expected), name


# ---- a small evaluator of Go's text/template, for the constructs the Modelfile TEMPLATEs use ----
# text and {{ actions }} (with {{- / -}} trimming); if / else if / else / end; range [$i, $x :=] ... end;
# $x := value and $x = value; .Field chains on the dot, on $ and on variables, and on a (parenthesised) value;
# string, number and true/false constants; the functions and, or (lazy, returning an argument, as Go),
# not, eq, ne, index, len. Values print as Go prints them: str() (a Stringer's String()).
ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<open>\()|(?P<close>\))'
                   r'|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))')


def go_parse(src: str) -> list:
    """The template as a tree: str (text), ("print", expr), ("set", name, expr, declare),
    ("if", [(cond, body), ...], else_body), ("range", names, expr, body)."""
    items, pos = [], 0
    for m in ACTION.finditer(src):
        items.append(src[pos:m.start()])
        items.append((m.group(2).strip(), bool(m.group(1)), bool(m.group(3))))
        pos = m.end()
    items.append(src[pos:])
    for i, item in enumerate(items):   # trim markers eat the whitespace next to them
        if isinstance(item, tuple):
            if item[1] and i > 0:
                items[i - 1] = items[i - 1].rstrip()
            if item[2] and i + 1 < len(items):
                items[i + 1] = items[i + 1].lstrip()
    stream = [it if isinstance(it, str) else it[0] for it in items]
    tree, rest = _block(stream, 0)
    assert rest == len(stream), "unbalanced {{ end }}"
    return tree


def _block(stream, i):
    """Nodes from stream[i] up to (not including) an else/end action; returns (nodes, index of that action)."""
    nodes = []
    while i < len(stream):
        s = stream[i] if i % 2 == 0 else None
        if s is not None:
            if s:
                nodes.append(s)
            i += 1
            continue
        act = stream[i]
        if act == "end" or act == "else" or act.startswith("else "):
            return nodes, i
        if act.startswith("if "):
            branches, cond, other = [], act[3:], []
            while True:
                body, i = _block(stream, i + 1)
                branches.append((_expr(cond), body))
                if stream[i].startswith("else if "):
                    cond = stream[i][8:]
                    continue
                if stream[i] == "else":
                    other, i = _block(stream, i + 1)
                break
            assert stream[i] == "end"
            nodes.append(("if", branches, other))
        elif act.startswith("range "):
            m = re.fullmatch(r"range\s+(?:(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*)?(.+)", act, re.S)
            names = [n for n in (m.group(1), m.group(2)) if n]
            body, i = _block(stream, i + 1)
            assert stream[i] == "end"
            nodes.append(("range", names, _expr(m.group(3)), body))
        elif re.match(r"\$\w+\s*:?=", act):
            name, op, value = re.match(r"(\$\w+)\s*(:?=)\s*(.+)", act, re.S).groups()
            nodes.append(("set", name, _expr(value), op == ":="))
        else:
            nodes.append(("print", _expr(act)))
        i += 1
    return nodes, i


def _expr(text: str):
    """A pipeline without `|`: ("call", name, args) or a single operand."""
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        assert m and m.end() > pos, f"cannot read {text[pos:]!r}"
        tokens.append((m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup) == pos))
        pos = m.end()
    node, j = _command(tokens, 0)
    assert j == len(tokens), f"unread {tokens[j:]}"
    return node


def _command(tokens, j):
    args = []
    while j < len(tokens) and tokens[j][0] != "close":
        arg, j = _operand(tokens, j)
        args.append(arg)
    if args and args[0][0] == "ident" and args[0][1] not in ("true", "false"):
        return ("call", args[0][1], args[1:]), j
    assert len(args) == 1, f"not a function call: {args}"
    return args[0], j


def _operand(tokens, j):
    kind, text, _ = tokens[j]
    if kind == "open":
        node, j = _command(tokens, j + 1)
        assert tokens[j][0] == "close"
        j += 1
        while j < len(tokens) and tokens[j][0] == "field" and tokens[j][2]:   # (value).Field
            node = ("chain", node, tokens[j][1].split(".")[1:])
            j += 1
        return node, j
    if kind == "str":
        return ("const", json.loads(text)), j + 1
    if kind == "num":
        return ("const", int(text)), j + 1
    if kind == "ident" and text in ("true", "false"):
        return ("const", text == "true"), j + 1
    return (kind, text), j + 1


def _field(value, names):
    for name in names:
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    return value


def _index(value, *keys):
    for key in keys:
        value = value[key]
    return value


def _eval(node, dot, scopes):
    kind = node[0]
    if kind == "const":
        return node[1]
    if kind == "field":
        return dot if node[1] == "." else _field(dot, node[1].split(".")[1:])
    if kind == "var":
        name, *fields = node[1].split(".")
        for scope in reversed(scopes):
            if name in scope:
                return _field(scope[name], fields)
        raise NameError(name)
    if kind == "chain":
        return _field(_eval(node[1], dot, scopes), node[2])
    name, args = node[1], node[2]
    if name in ("and", "or"):
        for arg in args:   # lazy, and the result is the deciding argument
            value = _eval(arg, dot, scopes)
            if bool(value) == (name == "or"):
                return value
        return value
    values = [_eval(a, dot, scopes) for a in args]
    funcs = {"not": lambda x: not x, "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
             "index": _index, "len": len}
    return funcs[name](*values)


def _run(nodes, dot, scopes, out):
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "print":
            value = _eval(node[1], dot, scopes)
            out.append(("true" if value else "false") if isinstance(value, bool) else str(value))
        elif node[0] == "set":
            _, name, expr, declare = node
            value = _eval(expr, dot, scopes)
            if declare:
                scopes[-1][name] = value
            else:
                next(s for s in reversed(scopes) if name in s)[name] = value
        elif node[0] == "if":
            for cond, body in node[1]:
                if _eval(cond, dot, scopes):
                    _run(body, dot, scopes + [{}], out)
                    break
            else:
                _run(node[2], dot, scopes + [{}], out)
        elif node[0] == "range":
            _, names, expr, body = node
            for i, item in enumerate(_eval(expr, dot, scopes) or []):
                bound = dict(zip(names, [i, item] if len(names) == 2 else [item]))
                _run(body, item, scopes + [bound], out)


def go_render(template: str, data: dict) -> str:
    out = []
    _run(go_parse(template), data, [{"$": data}], out)
    return "".join(out)
