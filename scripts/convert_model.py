"""Convert MiniMind weights: native .pth <-> transformers folders, LoRA merge, GGUF for llama.cpp/Ollama.

    python scripts/convert_model.py --weight full_sft                                   # MiniMind folder (MoE too)
    python scripts/convert_model.py --weight full_sft --to llama --out ../MiniMind2-Small   # stock Llama (dense only)
    python scripts/convert_model.py --weight full_sft --model_family minimind3   # minimind-3: stock Qwen3 (its default)
    python scripts/convert_model.py --weight full_sft --to gguf                         # .gguf + Ollama Modelfile
    python scripts/convert_model.py --hf_path out/full_sft_512-minimind --to torch --out out/back_512.pth
    python scripts/convert_model.py --weight full_sft --lora_path out/lora/lora_identity_512.pth --to torch
    python scripts/convert_model.py --torch_path /tmp/x/pretrain_64.pth --to minimind --dtype float32  # tiny, seconds

Input: a native weight (`--torch_path`, or the `--weight` weight in `--save_dir`, found as eval_llm.py finds it: the
size flags name `{weight}_{hidden}[_moe].pth`, and without them the one `{weight}_*.pth` there is used; the model
config comes from the `.json` the trainers write next to it), or a transformers folder (`--hf_path`, MiniMind, Llama
or Qwen3). `--lora_path` merges an adapter into the base first. Loading is model/loading.py's: every .pth is checked
against its CRC-32s, and a missing, damaged or mismatched input is one `error:` line, exit code 2. Both families
convert: MiniMind2 (the default) and minimind-3 (`model_family` "minimind3", told by the weight's config or keys).
Output (`--to`; default: minimind for MiniMind2, qwen3 for minimind-3, as the original exports it), under `--save_dir`:
    minimind  {stem}-minimind/  config.json (auto_map), model_minimind.py, model.safetensors, tokenizer, generation_config
              (the tokenizer runs no custom code: AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    llama     {stem}-llama/     MiniMind2: LlamaForCausalLM, loads with no custom code (dense models only; YaRN ->
              rope_parameters, rope_scaling under transformers 4)
    qwen3     {stem}-qwen3/     minimind-3: Qwen3ForCausalLM (dense) or Qwen3MoeForCausalLM (MoE), no custom code; the
              config.json also carries transformers 4's keys (rope_theta, rope_scaling, num_experts)
    gguf      {stem}-gguf/{stem}.gguf + Modelfile   llama.cpp "llama" (MiniMind2, dense) or "qwen3"/"qwen3moe"
              (minimind-3) architecture, gpt2-style BPE tokenizer; the Modelfile's template is the family's chat format
    torch     {save_dir}/{save_weight}_{hidden}[_moe].pth + .json   fp16, the original's keys (both tied keys)
The tokenizer written with an export is --tokenizer_path, else the --hf_path folder's own, else the family's shipped
one (model/ for MiniMind2, model/minimind3/ for minimind-3).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import inspect
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager

import torch

from model.cli import add_family_arg, add_size_args, cli, typed_sizes
from model.loading import (FAMILY_TOKENIZER_DIR, ROOT, TOKENIZER_DIR, TOKENIZER_FILES, add_lora, find_weight,
                           has_tokenizer, load_native, load_transformers, resolve_path)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import LoadError, atomic_save, save_weights, weight_path

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GENERATION = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---- writing ----
@contextmanager
def staged_dir(out_dir: Path):
    """Yield a temp folder next to out_dir; on success move each of its files into out_dir with an atomic
    rename, on failure delete it, so an interrupted export never leaves a half-written folder behind."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        yield tmp
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(tokenizer_dir, out_dir: Path) -> None:
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir / 'tokenizer.json'} not found (pass --tokenizer_path)")
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)


def export_minimind(model: MiniMindForCausalLM, out_dir, tokenizer_dir=TOKENIZER_DIR, dtype=torch.float16) -> Path:
    """A transformers folder in the MiniMind architecture; loads with AutoModelForCausalLM(trust_remote_code=True)."""
    from transformers import GenerationConfig
    out_dir = Path(out_dir)
    model.config.auto_map = {"AutoConfig": "model_minimind.MiniMindConfig",
                             "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"}
    model.generation_config = GenerationConfig(**GENERATION)
    with staged_dir(out_dir) as tmp:
        copy_tokenizer(tokenizer_dir, tmp)
        model.to(dtype).save_pretrained(tmp)  # safetensors; the tied lm_head is stored once
        shutil.copy(ROOT / "model" / "model_minimind.py", tmp / "model_minimind.py")
    return out_dir


def rope_kwargs(config_class, lm_config: MiniMindConfig) -> dict:
    """MiniMind's RoPE as keyword arguments of a transformers config class (LlamaConfig, Qwen3Config, ...):
    rope_parameters under transformers 5, rope_theta + rope_scaling under transformers 4. MiniMind's YaRN equals
    transformers' "yarn" rope type (same beta_fast/beta_slow correction range with floor/ceil, same linear ramp,
    attention_factor 1.0 given explicitly) whenever MiniMind applies it, i.e. max_position_embeddings >
    original_max_position_embeddings."""
    rope = {"rope_type": "default", "rope_theta": float(lm_config.rope_theta)}
    scaling = lm_config.rope_scaling
    if scaling is not None:
        orig = scaling.get("original_max_position_embeddings", 2048)
        if lm_config.max_position_embeddings / orig > 1.0:
            rope = {"rope_type": "yarn", "rope_theta": float(lm_config.rope_theta),
                    "factor": float(scaling.get("factor", 16)), "original_max_position_embeddings": orig,
                    "beta_fast": float(scaling.get("beta_fast", 32.0)), "beta_slow": float(scaling.get("beta_slow", 1.0)),
                    "attention_factor": float(scaling.get("attention_factor", 1.0)), "truncate": True}
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        return dict(rope_parameters=rope)
    theta = rope.pop("rope_theta")   # transformers 4: the old keys
    return dict(rope_theta=theta, rope_scaling=rope if rope["rope_type"] == "yarn" else None)


def llama_config(lm_config: MiniMindConfig):
    """The equivalent transformers LlamaConfig (MiniMind2)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=lm_config.vocab_size, hidden_size=lm_config.hidden_size,
                       intermediate_size=lm_config.intermediate_size, num_hidden_layers=lm_config.num_hidden_layers,
                       num_attention_heads=lm_config.num_attention_heads, num_key_value_heads=lm_config.num_key_value_heads,
                       head_dim=lm_config.head_dim, hidden_act=lm_config.hidden_act,
                       max_position_embeddings=lm_config.max_position_embeddings, rms_norm_eps=lm_config.rms_norm_eps,
                       **rope_kwargs(LlamaConfig, lm_config), tie_word_embeddings=lm_config.tie_word_embeddings,
                       attention_bias=False, mlp_bias=False, **GENERATION)


def check_family(lm_config: MiniMindConfig, target: str) -> None:
    """--to llama is MiniMind2's stock architecture and --to qwen3 minimind-3's: the other family is a ValueError
    that names the right one (Llama has no per-head q/k norm, Qwen3 always has it)."""
    if target == "llama" and lm_config.model_family == "minimind3":
        raise ValueError("--to llama: this is a minimind-3 model, whose per-head q/k norm Llama does not have; "
                         "export it as a stock Qwen3 with --to qwen3")
    if target == "qwen3" and lm_config.model_family != "minimind3":
        raise ValueError("--to qwen3 is for minimind-3 models; this is a MiniMind2 model (no q/k norm): use --to llama "
                         "(dense) or --to minimind")


def check_dense(lm_config: MiniMindConfig, target: str) -> None:
    if lm_config.use_moe:
        raise ValueError(f"--to {target}: MoE models have no {target} equivalent here; export them in the MiniMind "
                         "architecture with --to minimind (loads with trust_remote_code=True)")


def export_llama(model: MiniMindForCausalLM, out_dir, tokenizer_dir=TOKENIZER_DIR, dtype=torch.float16) -> Path:
    """A stock LlamaForCausalLM folder (no custom code). Key names are identical, so the state dict loads strictly."""
    from transformers import GenerationConfig, LlamaForCausalLM
    check_family(model.config, "llama")
    check_dense(model.config, "llama")
    out_dir = Path(out_dir)
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(model.state_dict(), strict=True)
    llama.generation_config = GenerationConfig(**GENERATION)
    with staged_dir(out_dir) as tmp:
        copy_tokenizer(tokenizer_dir, tmp)
        llama.to(dtype).save_pretrained(tmp)
    return out_dir


# ---- stock Qwen3 / Qwen3-MoE (minimind-3) ----
def qwen3_config(lm_config: MiniMindConfig):
    """The transformers Qwen3Config (dense) or Qwen3MoeConfig (MoE) that computes what minimind-3 computes: the same
    attention with per-head q/k RMSNorm before RoPE, no biases, no sliding window; MoE in every layer
    (decoder_sparse_step 1, no mlp_only_layers), router softmax -> top-k -> renormalised when norm_topk_prob."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    c = lm_config
    config_class = Qwen3MoeConfig if c.use_moe else Qwen3Config
    fields = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                  tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, use_sliding_window=False,
                  sliding_window=None, **rope_kwargs(config_class, c), **GENERATION)
    if c.use_moe:
        fields.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                      moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=c.router_aux_loss_coef)
    return config_class(**fields)


def qwen3_state_dict(model: MiniMindForCausalLM, qwen3_keys) -> dict:
    """Our state dict under the keys of the Qwen3 model whose state-dict keys are `qwen3_keys`. The names are
    the same, except where that model fuses each layer's experts (transformers 5): `mlp.experts.gate_up_proj`
    [E, 2I, H] (every expert's gate_proj rows, then its up_proj rows) and `mlp.experts.down_proj` [E, H, I];
    transformers 4 keeps per-expert keys, which are ours."""
    state = model.state_dict()
    if not any(k.endswith(".mlp.experts.gate_up_proj") for k in qwen3_keys):
        return state
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        experts = range(model.config.num_experts)
        gate = torch.stack([state[f"{p}.{e}.gate_proj.weight"] for e in experts])
        up = torch.stack([state[f"{p}.{e}.up_proj.weight"] for e in experts])
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in experts])
    return out


def add_transformers4_keys(config_file: Path, lm_config: MiniMindConfig) -> None:
    """Make a config.json written by transformers 5 load the same under transformers 4 (what the original pins):
    add its rope_theta / rope_scaling and, for MoE, num_experts (transformers 5 writes num_local_experts).
    transformers 5 reads rope_parameters and ignores the rest."""
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters")
    if rope is not None:
        cfg.setdefault("rope_theta", rope.get("rope_theta", float(lm_config.rope_theta)))
        cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"}
                       if rope.get("rope_type") == "yarn" else None)
    if lm_config.use_moe:
        cfg.setdefault("num_experts", lm_config.num_experts)
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_qwen3(model: MiniMindForCausalLM, out_dir, tokenizer_dir=None, dtype=torch.float16) -> Path:
    """A stock Qwen3ForCausalLM (dense) or Qwen3MoeForCausalLM (MoE) folder, no custom code, as the original publishes
    minimind-3. The weights load strictly into the Qwen3 model, whatever expert layout its transformers uses."""
    from transformers import GenerationConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM
    check_family(model.config, "qwen3")
    out_dir = Path(out_dir)
    qwen3 = (Qwen3MoeForCausalLM if model.config.use_moe else Qwen3ForCausalLM)(qwen3_config(model.config))
    qwen3.load_state_dict(qwen3_state_dict(model, qwen3.state_dict()), strict=True)
    qwen3.generation_config = GenerationConfig(**GENERATION)
    with staged_dir(out_dir) as tmp:
        copy_tokenizer(tokenizer_dir or FAMILY_TOKENIZER_DIR["minimind3"], tmp)
        qwen3.to(dtype).save_pretrained(tmp)   # transformers 5 writes per-expert keys again, as transformers 4 does
        add_transformers4_keys(tmp / "config.json", model.config)
    return out_dir


# ---- GGUF (llama.cpp / Ollama) ----
def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q_proj/k_proj output rows from the half-split RoPE layout (MiniMind, HF Llama: dimension j pairs
    with j + D/2) to the interleaved layout of llama.cpp's LLAMA rope (dimension 2j pairs with 2j+1).
    Within each head, new row 2j + h takes old row h*D/2 + j (h = 0, 1)."""
    out_features, rest = weight.shape[0], weight.shape[1:]
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(out_features, *rest)


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_rope_rows."""
    out_features, rest = weight.shape[0], weight.shape[1:]
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(out_features, *rest)


def gguf_arch(lm_config: MiniMindConfig) -> str:
    """llama.cpp's architecture for the model: MiniMind2 is "llama"; minimind-3 is "qwen3" (dense) or "qwen3moe"
    (MoE), the architectures llama.cpp's own converter gives the Qwen3 folders of --to qwen3."""
    if lm_config.model_family == "minimind3":
        return "qwen3moe" if lm_config.use_moe else "qwen3"
    return "llama"


def gguf_tensors(model: MiniMindForCausalLM) -> dict:
    """llama.cpp tensor name -> torch tensor (fp32). The tied lm_head is left out: llama.cpp then uses token_embd as
    the output matrix. MiniMind2 ("llama"): q/k rows permuted for llama.cpp's interleaved LLAMA rope. minimind-3
    ("qwen3", "qwen3moe"): llama.cpp runs these with NEOX rope, the half-split layout of MiniMind and transformers,
    so q/k stay as they are (as llama.cpp's converter leaves Qwen3's); attn_q_norm/attn_k_norm are the per-head
    norms; MoE experts are stacked into ffn_{gate,up,down}_exps [E, out, in] and the router is ffn_gate_inp."""
    cfg, sd = model.config, model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    minimind3 = cfg.model_family == "minimind3"
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if minimind3:
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if not cfg.use_moe:
        names.update({"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"})
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            w = sd[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q" and not minimind3:
                w = permute_rope_rows(w, cfg.num_attention_heads)
            elif theirs == "attn_k" and not minimind3:
                w = permute_rope_rows(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
        if cfg.use_moe:   # minimind-3 only (MiniMind2's MoE has no GGUF export)
            p = f"model.layers.{i}.mlp"
            out[f"blk.{i}.ffn_gate_inp.weight"] = sd[f"{p}.gate.weight"]
            for proj in ("gate", "up", "down"):
                out[f"blk.{i}.ffn_{proj}_exps.weight"] = torch.stack([sd[f"{p}.experts.{e}.{proj}_proj.weight"]
                                                                      for e in range(cfg.num_experts)])
    return {k: v.detach().float().cpu() for k, v in out.items()}


def gguf_vocab(tokenizer_dir) -> dict:
    """tokens (id order), token types, merges and special ids from tokenizer.json / tokenizer_config.json. Token
    types as llama.cpp's converter sets them: an added token is CONTROL when it is special or looks special
    (`<|...|>`), else USER_DEFINED (minimind-3's `<think>`, `<tool_call>`: always one token, and printed, so
    llama.cpp and Ollama see them in the output); every other token is NORMAL."""
    import gguf
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir / 'tokenizer.json'} not found (pass --tokenizer_path)")
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE" or tok.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        raise ValueError(f"{tokenizer_dir / 'tokenizer.json'}: GGUF export supports byte-level BPE tokenizers only")
    vocab = dict(model["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for text, idx in vocab.items():
        tokens[idx] = text
    if any(t is None for t in tokens):
        raise ValueError(f"{tokenizer_dir / 'tokenizer.json'}: token ids are not contiguous")
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in tok.get("added_tokens", []):
        text = added["content"]
        looks_special = text.startswith("<|") and text.endswith("|>")
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") or looks_special \
            else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {name: vocab[tok_cfg[name]] for name in ("bos_token", "eos_token", "pad_token", "unk_token")
           if isinstance(tok_cfg.get(name), str) and tok_cfg[name] in vocab}
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "chat_template": tok_cfg.get("chat_template")}


def export_gguf(model: MiniMindForCausalLM, out_path, tokenizer_dir=TOKENIZER_DIR, dtype=torch.float16,
                name: str = "MiniMind") -> Path:
    """A .gguf in llama.cpp's "llama" (MiniMind2) or "qwen3"/"qwen3moe" (minimind-3) architecture, with the metadata
    llama.cpp's converter writes for them, plus an Ollama Modelfile in the same folder."""
    try:
        import gguf
    except ImportError:
        raise SystemExit("GGUF export needs the gguf package: pip install gguf") from None
    cfg = model.config
    arch = gguf_arch(cfg)
    if arch == "llama":
        check_dense(cfg, "gguf")
    if cfg.use_moe and not cfg.norm_topk_prob:
        raise ValueError("--to gguf: llama.cpp's qwen3moe always renormalises the top-k routing weights, and this "
                         "model has norm_topk_prob=False; export it with --to qwen3 instead")
    if dtype not in (torch.float16, torch.float32):
        raise ValueError("--to gguf supports --dtype float16 or float32")
    if cfg.rope_scaling is not None:
        warnings.warn("llama.cpp's YaRN does not reproduce MiniMind's (checked with llama-cpp-python 0.3.36: its "
                      "YaRN keys give different logits), so the GGUF is written without rope scaling; it computes "
                      "what MiniMind computes without --inference_rope_scaling")
    vocab = gguf_vocab(tokenizer_dir)
    if len(vocab["tokens"]) != cfg.vocab_size:
        raise ValueError(f"{tokenizer_dir}: {len(vocab['tokens'])} tokens, the model has vocab_size {cfg.vocab_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        if arch == "llama":
            w.add_rope_dimension_count(cfg.head_dim)
        else:   # qwen3: the rope covers the whole head, n_rot = key_length
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.use_moe:
            w.add_expert_count(cfg.num_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")          # ByteLevel(use_regex=True) = the GPT-2 split regex
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        ids = vocab["ids"]
        for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                         ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
            if key in ids:
                add(ids[key])
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])
        for tname, t in gguf_tensors(model).items():
            # norms and the MoE router stay fp32, as llama.cpp's converter keeps them
            keep_f32 = t.ndim == 1 or dtype == torch.float32 or ".ffn_gate_inp." in tname
            w.add_tensor(tname, t.numpy() if keep_f32 else t.half().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_modelfile(out_path, family=cfg.model_family)
    return out_path


OLLAMA_TEMPLATE = """<|im_start|>system
{{ if .System }}{{ .System }}{{ else }}You are a helpful assistant{{ end }}<|im_end|>
{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""


# minimind-3's chat template (model/minimind3/tokenizer_config.json) in Go's text/template, as Ollama runs it with
# .Messages (system messages included; .Thinking, .ToolCalls), .Tools and .Think. It renders what the jinja template
# renders with add_generation_prompt=True and open_thinking=.Think (Ollama turns think on by default for a model whose
# template shows .Thinking; `ollama run --think=false` or "think": false gives the closed empty think block), with one
# difference Ollama imposes: tools and tool-call arguments are printed as Go's compact JSON ({"a":1}), where the
# jinja's tojson writes {"a": 1}. Each assistant turn has its think block (.Thinking, or empty), consecutive tool
# results share one user turn. Ollama finds the thinking tags (<think>, </think>) and the tool-call tag (<tool_call>)
# in this template's structure, so its thinking and tool parsers work on the model's output.
OLLAMA_TEMPLATE_MINIMIND3 = (
    '{{ $sys := and .Messages (eq (index .Messages 0).Role "system") }}{{ $prev := "" }}'
    # the header: a first system message, and the tools
    '{{ if .Tools }}<|im_start|>system\n{{ if $sys }}{{ (index .Messages 0).Content }}\n\n{{ end }}'
    '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n<tools>'
    '{{ range .Tools }}\n{{ . }}{{ end }}\n</tools>\n\n'
    'For each function call, return a json object with function name and arguments within <tool_call></tool_call> '
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    '{{ else if $sys }}<|im_start|>system\n{{ (index .Messages 0).Content }}<|im_end|>\n{{ end }}'
    # the turns
    '{{ range $i, $m := .Messages }}'
    '{{ if and (eq $prev "tool") (ne .Role "tool") }}<|im_end|>\n{{ end }}'
    '{{ if or (eq .Role "user") (and (eq .Role "system") $i) }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
    '{{ if .Thinking }}<think>\n{{ .Thinking }}\n</think>\n\n{{ else }}<think>\n\n</think>\n\n{{ end }}{{ .Content }}'
    '{{ if .ToolCalls }}{{ range $j, $call := .ToolCalls }}'
    '{{ if or $j $m.Content }}\n<tool_call>{{ else }}<tool_call>{{ end }}'
    '\n{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}\n</tool_call>{{ end }}{{ end }}'
    '<|im_end|>\n'
    '{{ else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
    '\n<tool_response>\n{{ .Content }}\n</tool_response>'
    '{{ end }}{{ $prev = .Role }}{{ end }}'
    '{{ if eq $prev "tool" }}<|im_end|>\n{{ end }}'
    # the generation prompt: an open think block when thinking is on, else a closed empty one
    '<|im_start|>assistant\n{{ if .Think }}<think>\n{{ else }}<think>\n\n</think>\n\n{{ end }}'
)
OLLAMA_TEMPLATES = {"minimind2": OLLAMA_TEMPLATE, "minimind3": OLLAMA_TEMPLATE_MINIMIND3}


def write_modelfile(gguf_path: Path, temperature: float = 0.85, top_p: float = 0.85, num_ctx: int = 8192,
                    family: str = "minimind2") -> Path:
    """Ollama Modelfile next to the .gguf: `ollama create minimind -f Modelfile` in that folder. The TEMPLATE is the
    family's chat format: MiniMind2's renders exactly what its ChatML chat template renders for system/user/assistant
    messages; minimind-3's (OLLAMA_TEMPLATE_MINIMIND3) adds tools, tool calls and results, and thinking."""
    text = (f"FROM ./{gguf_path.name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATES[family]}"""\n'
            'PARAMETER stop "<|im_end|>"\n'
            'PARAMETER stop "<|im_start|>"\n'
            'PARAMETER stop "<|endoftext|>"\n'
            f"PARAMETER temperature {temperature}\n"
            f"PARAMETER top_p {top_p}\n"
            "PARAMETER repeat_penalty 1.0\n"
            f"PARAMETER num_ctx {num_ctx}\n")
    path = gguf_path.parent / "Modelfile"
    atomic_save(text, path)
    return path


# ---- command line ----
TARGETS = ("minimind", "llama", "qwen3", "gguf", "torch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind weight conversion (native .pth, transformers, GGUF)",
                                allow_abbrev=False)
    p.add_argument("--to", default=None, choices=TARGETS,
                   help="output format: MiniMind transformers folder, stock Llama folder (MiniMind2), stock Qwen3 "
                        "folder (minimind-3), GGUF + Ollama Modelfile, or a native .pth (default: minimind for "
                        "MiniMind2, qwen3 for minimind-3)")
    p.add_argument("--torch_path", default=None, help="native weight file; default: the {weight} weight in --save_dir, "
                                                      "found as eval_llm.py finds it")
    p.add_argument("--hf_path", default=None,
                   help="read a transformers folder (MiniMind, Llama or Qwen3) instead of a .pth")
    p.add_argument("--save_dir", default="out", help="where native weights are read from and outputs go by default "
                                                     "(default: out)")
    p.add_argument("--weight", default="full_sft", help="weight prefix of the input .pth (default: full_sft)")
    p.add_argument("--save_weight", default=None,
                   help="prefix of the output .pth for --to torch (default: 'converted', or {weight}_{lora name})")
    p.add_argument("--lora_path", default=None, help="LoRA adapter file to merge into the base weight; none = no merge")
    p.add_argument("--out", default=None, help="output folder (minimind, llama, qwen3), .gguf file or .pth file")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="dtype of the written weights (default: float16)")
    p.add_argument("--tokenizer_path", default=None,
                   help="folder with tokenizer.json/tokenizer_config.json written with the export (default: the "
                        "--hf_path folder's own, else the family's: model/ for MiniMind2, model/minimind3/ for "
                        "minimind-3)")
    add_size_args(p)
    add_family_arg(p)
    p.add_argument("--inference_rope_scaling", action="store_true",
                   help="export with YaRN enabled (x16, 2048 -> 32768 positions); not for GGUF")
    return p


def export_tokenizer(args, model: MiniMindForCausalLM, source: Path) -> Path:
    """The tokenizer folder written with an export: --tokenizer_path, else the --hf_path folder's own, else the
    model family's shipped one."""
    if args.tokenizer_path:
        return resolve_path(args.tokenizer_path)
    if args.hf_path and has_tokenizer(source):
        return source
    return FAMILY_TOKENIZER_DIR[model.config.model_family]


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    sizes, rope, family = typed_sizes(args), args.inference_rope_scaling, args.model_family
    save_dir = resolve_path(args.save_dir)
    if args.hf_path:
        source = resolve_path(args.hf_path)
        model = load_transformers(source, rope, model_family=family)
        if not isinstance(model, MiniMindForCausalLM):
            raise LoadError(f"--hf_path {source}: model_type {model.config.model_type!r}, expected minimind, llama "
                            "or qwen3")
        stem = source.name
    else:
        source = resolve_path(args.torch_path) if args.torch_path else \
            find_weight(save_dir, args.weight, sizes["hidden_size"], sizes["use_moe"], model_family=family)
        model = load_native(source, **sizes, rope_scaling=rope, model_family=family)
        stem = source.stem
    if args.lora_path:
        lora = add_lora(model, args.lora_path)
        lora_name = lora.stem.removesuffix("_moe").removesuffix(f"_{model.config.hidden_size}")
        stem = f"{stem}-{lora_name}"
    cfg, dtype = model.config, DTYPES[args.dtype]
    to = args.to or ("qwen3" if cfg.model_family == "minimind3" else "minimind")   # the original's default export
    if to == "torch":
        if args.save_weight is None:
            prefix = f"{args.weight}_{lora_name}" if args.lora_path and not args.hf_path else "converted"
        else:
            prefix = args.save_weight
        out = Path(args.out) if args.out else weight_path(save_dir, prefix, cfg)
        if out.resolve() == source.resolve():
            raise ValueError(f"refusing to overwrite the input {source}; pass --out or --save_weight")
        save_weights(model, out, cfg)   # fp16, the original's keys, + {stem}.json
    elif to == "gguf":
        out = Path(args.out) if args.out else save_dir / f"{stem}-gguf" / f"{stem}.gguf"
        export_gguf(model, out, export_tokenizer(args, model, source), dtype, name=stem)
    else:
        out = Path(args.out) if args.out else save_dir / f"{stem}-{to}"
        export = {"minimind": export_minimind, "llama": export_llama, "qwen3": export_qwen3}[to]
        export(model, out, export_tokenizer(args, model, source), dtype)
    total, active = model.count_parameters()
    print(f"{source} -> {out} ({to}, {args.dtype}, {total / 1e6:.2f}M params"
          + (f", {active / 1e6:.2f}M active" if active != total else "") + ")", flush=True)
    return out


if __name__ == "__main__":
    cli(main)
