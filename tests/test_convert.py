"""scripts/convert_model.py: every export is checked by the consumer that will load it.

MiniMind folder: transformers in a fresh process (only the folder's own model_minimind.py, via
trust_remote_code) gives our logits and greedy tokens. Llama folder: transformers' own LlamaForCausalLM,
YaRN included. Back to .pth: the original's fp16 key format, round trip exact. LoRA merge. GGUF: read back
with gguf.GGUFReader, and a forward pass written here in llama.cpp's conventions (interleaved "normal"
RoPE, llama.cpp tensor names) on the GGUF tensors reproduces our logits; with llama-cpp-python
installed, llama.cpp itself (slow). Clear errors for missing or mismatched weights.
"""
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.model_lora import apply_lora, save_lora
from model.model_minimind import YARN_ROPE_SCALING, MiniMindForCausalLM, precompute_freqs_cis
from model.loading import load_native
from model.weights import save_weights
from scripts.convert_model import main, permute_rope_rows, unpermute_rope_rows, write_modelfile
from tests.conftest import ROOT, tiny_config, tokenizer_dir

IDS = torch.randint(3, 6400, (2, 24), generator=torch.Generator().manual_seed(0))


def make_weight(directory: Path, name: str = "full_sft", seed: int = 0, **overrides) -> Path:
    """A random tiny model saved the way the trainers save it: fp16 .pth + .json config."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(**overrides))
    path = directory / f"{name}_{model.config.hidden_size}{'_moe' if model.config.use_moe else ''}.pth"
    save_weights(model, path, model.config)
    return path


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def convert(*flags) -> Path:
    return main([*map(str, flags), "--tokenizer_path", str(tokenizer_dir())])


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(weight path, fp32 model holding exactly the fp16 file's values)."""
    path = make_weight(tmp_path_factory.mktemp("native"))
    return path, load_native(path)


# ---- MiniMind-architecture transformers folder ----
PROBE = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ids = torch.tensor(json.loads(sys.argv[1]))
    model = AutoModelForCausalLM.from_pretrained("export", trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained("export")
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    project = [m for m in sys.modules if m == "model" or m.startswith(("model.", "trainer", "scripts"))]
    torch.save({"logits": logits, "gen": gen, "class": type(model).__module__, "project": project,
                "path": sys.path, "eos": tok.eos_token_id, "dtype": str(model.dtype)}, "result.pt")
""")


def test_minimind_folder_loads_with_remote_code_in_fresh_process(native, tmp_path):
    path, model = native
    out = convert("--torch_path", path, "--to", "minimind", "--dtype", "float32", "--out", tmp_path / "exp")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MiniMindForCausalLM"] and cfg["model_type"] == "minimind"
    assert cfg["auto_map"] == {"AutoConfig": "model_minimind.MiniMindConfig",
                               "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}
    assert cfg["dtype"] == "float32" and cfg["hidden_size"] == 64
    assert cfg.get("tie_word_embeddings", True)   # transformers 4 leaves out a value equal to its default (True)
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert (gen_cfg["bos_token_id"], gen_cfg["eos_token_id"], gen_cfg["pad_token_id"]) == (1, 2, 0)
    assert (out / "model_minimind.py").read_bytes() == (ROOT / "model" / "model_minimind.py").read_bytes()
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    # a copy outside the repo, cwd there, isolated interpreter: nothing of ours is importable
    iso = tmp_path / "iso"
    shutil.copytree(out, iso / "export")
    (iso / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "probe.py", json.dumps(IDS.tolist())], cwd=iso, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = torch.load(iso / "result.pt", weights_only=False)
    assert res["class"].startswith("transformers_modules.") and res["project"] == []
    assert str(ROOT) not in res["path"] and res["dtype"] == "torch.float32" and res["eos"] == 2
    assert (res["logits"] - logits(model)).abs().max() <= 1e-5
    with torch.no_grad():
        ours = model.generate(IDS[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(res["gen"], ours)


def test_minimind_folder_round_trips_to_native_fp16(native, tmp_path):
    path, model = native
    folder = convert("--torch_path", path, "--to", "minimind", "--out", tmp_path / "exp")  # default float16
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    back = convert("--hf_path", folder, "--to", "torch", "--save_dir", tmp_path)
    assert back == tmp_path / "converted_64.pth" and back.with_suffix(".json").exists()
    original, again = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert list(again) == list(original)                        # the original's keys and order, both tied keys
    for key, value in original.items():
        assert again[key].dtype == torch.float16 and torch.equal(again[key], value), key
    saved_cfg = json.loads(back.with_suffix(".json").read_text())
    assert (saved_cfg["hidden_size"], saved_cfg["num_hidden_layers"], saved_cfg["num_attention_heads"]) == (64, 2, 4)


def test_moe_exports_to_minimind_but_not_llama_or_gguf(tmp_path):
    path = make_weight(tmp_path, use_moe=True)
    model = load_native(path)
    folder = convert("--torch_path", path, "--to", "minimind", "--dtype", "float32", "--out", tmp_path / "moe")
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.use_moe and (logits(loaded) - logits(model)).abs().max() <= 1e-5
    for target in ("llama", "gguf"):
        with pytest.raises(ValueError, match="MoE.*--to minimind"):
            convert("--torch_path", path, "--to", target, "--out", tmp_path / target)


# ---- stock Llama ----
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_llama_export_matches_transformers_llama(native, tmp_path, yarn):
    from transformers import LlamaForCausalLM
    path, _ = native
    flags = ["--inference_rope_scaling"] if yarn else []
    folder = convert("--torch_path", path, "--to", "llama", "--dtype", "float32", "--out", tmp_path / "llama", *flags)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5 and cfg["intermediate_size"] == 192
    assert cfg["max_position_embeddings"] == 32768 and cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    rope = cfg.get("rope_parameters") or {**(cfg["rope_scaling"] or {"rope_type": "default"}),   # transformers 4
                                          "rope_theta": cfg["rope_theta"]}
    assert rope["rope_theta"] == 1e6 and rope["rope_type"] == ("yarn" if yarn else "default")
    if yarn:
        assert (rope["factor"], rope["original_max_position_embeddings"], rope["attention_factor"]) == (16, 2048, 1.0)
    llama = LlamaForCausalLM.from_pretrained(folder).eval()
    ours = load_native(path, rope_scaling=yarn)
    assert (ours.config.rope_scaling is not None) == yarn
    ids = torch.randint(3, 6400, (1, 600), generator=torch.Generator().manual_seed(1))
    assert (logits(llama, ids) - logits(ours, ids)).abs().max() <= 1e-4
    back = convert("--hf_path", folder, "--to", "torch", "--out", tmp_path / "from_llama_64.pth")
    for key, value in torch.load(path, weights_only=True).items():
        assert torch.equal(torch.load(back, weights_only=True)[key], value), key


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96])
def test_yarn_matches_transformers_yarn_frequencies(head_dim):
    """The mapping to Llama's rope_parameters is exact: same inverse frequencies, attention factor 1."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 2048,
            "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0, "truncate": True}
    rope_kwargs = dict(rope_parameters=rope)
    if "rope_parameters" not in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 4: the old keys
        rope_kwargs = dict(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=32768,
                      **rope_kwargs)
    theirs, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    _, sin = precompute_freqs_cis(head_dim, 32768, 1e6, dict(YARN_ROPE_SCALING))
    ours = torch.asin(sin[1, : head_dim // 2].double())   # position 1: the angle is the inverse frequency (all < 1)
    assert scale == 1.0 and torch.allclose(ours, theirs.double(), rtol=1e-5, atol=0)


# ---- LoRA merge ----
def test_lora_merge_into_native_and_export(native, tmp_path):
    path, base = native
    torch.manual_seed(3)
    adapted = load_native(path)
    apply_lora(adapted, rank=4)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora.B" in name:
                p.normal_(0, 0.1)
    lora_path = tmp_path / "lora" / "lora_identity_64.pth"
    save_lora(adapted, lora_path)
    merged = convert("--torch_path", path, "--lora_path", lora_path, "--to", "torch", "--save_dir", tmp_path,
                     "--weight", "full_sft")
    assert merged == tmp_path / "full_sft_lora_identity_64.pth"
    state = torch.load(merged, weights_only=True)
    assert list(state) == list(torch.load(path, weights_only=True)) and not any("lora" in k for k in state)
    folder = convert("--torch_path", path, "--lora_path", lora_path, "--to", "minimind", "--dtype", "float32",
                     "--out", tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert (logits(loaded) - logits(adapted)).abs().max() <= 1e-5
    assert (logits(loaded) - logits(base)).abs().max() > 1e-3   # the adapter really changed the model
    reloaded = load_native(merged)                             # fp16-rounded merge
    assert (logits(reloaded) - logits(adapted)).abs().max() <= 1e-2


# ---- GGUF ----
def test_rope_row_permutation_is_the_interleaved_layout():
    """Half-split pairs (j, j + D/2) become adjacent rows (2j, 2j + 1), per head; unpermute inverts it."""
    heads, d = 3, 8
    w = torch.arange(heads * d).float().unsqueeze(1)
    p = permute_rope_rows(w, heads).squeeze(1).long().view(heads, d)
    for h in range(heads):
        for j in range(d // 2):
            assert (p[h, 2 * j], p[h, 2 * j + 1]) == (h * d + j, h * d + j + d // 2)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, heads), heads), w)


def read_gguf(path):
    import gguf
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
               .reshape(t.data.shape) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


def llama_cpp_style_forward(t: dict, fields: dict, ids: torch.Tensor) -> torch.Tensor:
    """A llama forward on GGUF tensors in llama.cpp's conventions: interleaved ("normal") RoPE, where
    dimensions (2j, 2j + 1) rotate together by pos * base^(-2j/D), and output = token_embd when absent."""
    n_head, n_kv = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    eps, base = fields["llama.attention.layer_norm_rms_epsilon"], fields["llama.rope.freq_base"]
    n_layer, d = fields["llama.block_count"], fields["llama.rope.dimension_count"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # (T, H, D)
        pos = torch.arange(x.shape[0], dtype=torch.float64)[:, None, None]
        theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cos, sin = theta.cos().float(), theta.sin().float()
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    x = t["token_embd.weight"][ids]                                       # (T, C)
    T = ids.shape[0]
    for i in range(n_layer):
        g = lambda name: t[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = rms(x, g("attn_norm"))
        q = rope((h @ g("attn_q").T).view(T, n_head, d))
        k = rope((h @ g("attn_k").T).view(T, n_kv, d))
        v = (h @ g("attn_v").T).view(T, n_kv, d)
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + att.transpose(0, 1).reshape(T, -1) @ g("attn_output").T
        h = rms(x, g("ffn_norm"))
        x = x + (F.silu(h @ g("ffn_gate").T) * (h @ g("ffn_up").T)) @ g("ffn_down").T
    return rms(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_metadata_tensors_and_llama_cpp_conventions(native, tmp_path, dtype):
    pytest.importorskip("gguf")
    path, model = native
    out = convert("--torch_path", path, "--to", "gguf", "--dtype", dtype, "--out", tmp_path / "m.gguf")
    fields, tensors, types = read_gguf(out)
    cfg = model.config
    assert fields["general.architecture"] == "llama"
    expected = {"llama.context_length": 32768, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 192, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 16, "llama.rope.freq_base": 1e6, "llama.vocab_size": 6400,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
                "tokenizer.ggml.add_bos_token": False}
    assert {k: fields[k] for k in expected} == expected
    assert math.isclose(fields["llama.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    tok = json.loads((tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]          # the three specials are CONTROL
    assert fields["tokenizer.ggml.merges"][0] == " ".join(tok["model"]["merges"][0])
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert "<|im_start|>" in fields["tokenizer.chat_template"]

    layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in layer}          # tied: no output.weight
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == dtype.replace("float", "F")
    sd = model.state_dict()
    ours = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(2):
        ours.update({f"blk.{i}.{n}.weight": sd[f"model.layers.{i}.{m}.weight"] for n, m in names.items()})
    for name, value in tensors.items():
        if ".attn_q." in name or ".attn_k." in name:
            value = unpermute_rope_rows(value, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        assert value.shape == ours[name].shape and torch.equal(value, ours[name]), name  # weights are fp16 values
    # the permuted tensors under llama.cpp's interleaved RoPE compute exactly our model
    ids = IDS[0]
    assert (llama_cpp_style_forward(tensors, fields, ids) - logits(model, ids[None])[0]).abs().max() <= 1e-4
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_with_yarn_warns_and_writes_plain_rope(native, tmp_path):
    pytest.importorskip("gguf")
    path, _ = native
    with pytest.warns(UserWarning, match="without rope scaling"):
        out = convert("--torch_path", path, "--to", "gguf", "--inference_rope_scaling", "--out", tmp_path / "y.gguf")
    fields, _, _ = read_gguf(out)
    assert not any(k.startswith("llama.rope.scaling") for k in fields)


def test_modelfile_template_renders_like_the_chat_template(tmp_path):
    """Ollama's Go template, evaluated by hand for its three constructs, gives the jinja template's text."""
    from transformers import AutoTokenizer
    write_modelfile(tmp_path / "x.gguf")
    text = (tmp_path / "Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    for system in (None, "Be brief."):
        msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "1+1?"}]
        head, rest = template.split("{{ range .Messages }}")
        body, tail = rest.split("{{ end }}{{ end }}")
        body = body.replace('{{ if ne .Role "system" }}', "")
        rendered = head.replace("{{ if .System }}{{ .System }}{{ else }}You are a helpful assistant{{ end }}",
                                system or "You are a helpful assistant")
        rendered += "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                            for m in msgs) + tail
        full = ([{"role": "system", "content": system}] if system else []) + msgs
        assert rendered == tok.apply_chat_template(full, tokenize=False, add_generation_prompt=True)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var data struct {
		System   string
		Messages []Message
	}
	raw, _ := os.ReadFile(os.Args[2])
	if err := json.Unmarshal(raw, &data); err != nil {
		panic(err)
	}
	src, _ := os.ReadFile(os.Args[1])
	tmpl := template.Must(template.New("t").Parse(string(src)))
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("go") is None, reason="needs the go toolchain (apt-get install golang-go)")
def test_modelfile_template_in_go_text_template(tmp_path):
    """Ollama renders TEMPLATE with Go's text/template; Go itself gives the jinja chat template's text."""
    from transformers import AutoTokenizer
    write_modelfile(tmp_path / "x.gguf")
    template = (tmp_path / "Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    (tmp_path / "t.tmpl").write_text(template)
    (tmp_path / "render.go").write_text(GO_RENDER)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"), GOFLAGS="-mod=mod",
               GOTOOLCHAIN="local", GOPROXY="off")
    subprocess.run(["go", "build", "-o", "render", "render.go"], cwd=tmp_path, env=env, check=True, timeout=300)
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "1+1?"}]
    for system in ("", "Be brief."):
        # Ollama puts a system message both in .System and in .Messages
        full = ([{"role": "system", "content": system}] if system else []) + msgs
        (tmp_path / "in.json").write_text(json.dumps({"System": system, "Messages": [
            {"Role": m["role"], "Content": m["content"]} for m in full]}, ensure_ascii=False))
        out = subprocess.run(["./render", "t.tmpl", "in.json"], cwd=tmp_path, capture_output=True, text=True, check=True)
        assert out.stdout == tok.apply_chat_template(full, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_like_ours(native, tmp_path):
    """llama.cpp itself (through llama-cpp-python) loads the GGUF: same tokenizer ids, same logits, same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer
    path, model = native
    out = convert("--torch_path", path, "--to", "gguf", "--dtype", "float32", "--out", tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0,
                          type_k=0, type_v=0)   # fp32 KV cache (llama.cpp defaults to fp16)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    prompts = ["Hello, world! 123", "为什么天空是蓝色的？", "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
               "  leading spaces\tand\nnewlines  ", "MiniMind 是一个很小的语言模型。"]
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode() == text
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        assert (theirs - logits(model, torch.tensor([ids]))[0]).abs().max() <= 1e-4, text
        llm.reset()
        gen = [t for _, t in zip(range(12), llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0))]
        with torch.no_grad():
            ours = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert gen == ours[0, len(ids):].tolist(), text
    llm.close()


# ---- errors ----
def test_clear_errors(native, tmp_path):
    path, _ = native
    with pytest.raises(FileNotFoundError, match="pretrain_512.pth"):
        convert("--save_dir", tmp_path, "--weight", "pretrain", "--to", "torch")
    with pytest.raises(ValueError, match=r"--hidden_size 512 contradicts .*full_sft_64.json"):
        convert("--torch_path", path, "--hidden_size", "512")
    bare = tmp_path / "bare" / "full_sft_64.pth"                         # no .json: name and size flags decide
    bare.parent.mkdir()
    shutil.copy(path, bare)
    with pytest.raises(ValueError, match=r"full_sft_64.pth.*(missing|shape)"):
        convert("--torch_path", bare, "--to", "torch", "--out", tmp_path / "x.pth")   # default 8 layers
    moe = make_weight(tmp_path / "moe", use_moe=True)
    moe.with_suffix(".json").unlink()
    renamed = moe.with_name("mystery_64.pth")                            # the name no longer says _moe
    moe.rename(renamed)
    with pytest.raises(ValueError, match=r"mystery_64.pth.*file holds a MoE model, the config a dense one"):
        convert("--torch_path", renamed, "--num_hidden_layers", "2", "--to", "torch", "--out", tmp_path / "y.pth")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        convert("--torch_path", path, "--to", "torch", "--out", path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert("--hf_path", tmp_path / "nowhere", "--to", "torch")


def test_weight_is_found_as_the_chat_finds_it_and_errors_are_one_line(tmp_path, capfd, monkeypatch):
    """Issue 21 item 3: `convert_model.py --weight full_sft` after the demo (only full_sft_256 there) converts
    that weight, as eval_llm.py and the server find it; several sizes or none are one `error:` line, exit 2
    (the first case runs the script in a subprocess, the others its `cli(main)` in this process)."""
    from model.cli import cli
    out = tmp_path / "out"
    path = make_weight(out)                                              # full_sft_64.pth, the only one
    folder = convert("--save_dir", out, "--weight", "full_sft", "--dtype", "float32")
    assert folder == out / "full_sft_64-minimind" and (folder / "model.safetensors").is_file()
    make_weight(out, hidden_size=128)
    script = [sys.executable, str(ROOT / "scripts" / "convert_model.py"), "--save_dir", str(out)]
    cases = [([], r"several full_sft weights: full_sft_128\.pth \(--hidden_size 128 --num_hidden_layers 2\), "
                  r"full_sft_64\.pth"),
             (["--weight", "dpo"], r"dpo_512\.pth not found: it is written by trainer/train_dpo\.py"),
             (["--torch_path", str(path.with_name("nope.pth"))], r"nope\.pth not found")]
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    for i, (flags, message) in enumerate(cases):
        if i == 0:
            run = subprocess.run(script + flags, capture_output=True, text=True, timeout=300, cwd=tmp_path)
            code, stdout, stderr = run.returncode, run.stdout, run.stderr
        else:
            capfd.readouterr()
            with pytest.raises(SystemExit) as exit_:
                cli(lambda: main(script[2:] + flags))
            code, (stdout, stderr) = exit_.value.code, capfd.readouterr()
        assert code == 2 and stdout == "", stderr
        assert len(stderr.strip().splitlines()) == 1 and re.match(r"error: .*" + message, stderr), stderr


def test_exported_tokenizer_loads_without_custom_code_or_question(native, tmp_path):
    """Issue 21 item 5: the exported folder's tokenizer loads in a fresh process with trust_remote_code=False (and
    as PreTrainedTokenizerFast): no "Do you wish to run the custom code?" question, no custom code imported."""
    path, _ = native
    folder = convert("--torch_path", path, "--out", tmp_path / "export")
    probe = textwrap.dedent("""
        import sys
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        auto = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
        fast = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
        chat = [{"role": "user", "content": "你好"}]
        same = auto.apply_chat_template(chat, tokenize=False) == fast.apply_chat_template(chat, tokenize=False)
        print(auto.eos_token, fast.eos_token, auto("你好").input_ids == fast("你好").input_ids, same,
              [m for m in sys.modules if m.startswith("transformers_modules")])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "-c", probe, str(folder)], stdin=subprocess.DEVNULL, cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["<|im_end|>", "<|im_end|>", "True", "True", "[]"]
    assert "custom code" not in run.stdout + run.stderr
