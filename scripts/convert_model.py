"""Convert MiniMind weights: native .pth <-> transformers folders, LoRA merge, GGUF for llama.cpp/Ollama.

    python scripts/convert_model.py --weight full_sft                                   # MiniMind folder (MoE too)
    python scripts/convert_model.py --weight full_sft --to llama --out ../MiniMind2-Small   # stock Llama (dense only)
    python scripts/convert_model.py --weight full_sft --to gguf                         # .gguf + Ollama Modelfile
    python scripts/convert_model.py --hf_path out/full_sft_512-minimind --to torch --out out/back_512.pth
    python scripts/convert_model.py --weight full_sft --lora_path out/lora/lora_identity_512.pth --to torch
    python scripts/convert_model.py --torch_path /tmp/x/pretrain_64.pth --to minimind --dtype float32  # tiny, seconds

Input: a native weight (`--torch_path`, or the `--weight` weight in `--save_dir`, found as eval_llm.py finds it: the
size flags name `{weight}_{hidden}[_moe].pth`, and without them the one `{weight}_*.pth` there is used; the model
config comes from the `.json` the trainers write next to it), or a transformers folder (`--hf_path`, MiniMind or
Llama). `--lora_path` merges an adapter into the base first. Loading is model/loading.py's: every .pth is checked
against its CRC-32s, and a missing, damaged or mismatched input is one `error:` line, exit code 2.
Output (`--to`), by default under `--save_dir`:
    minimind  {stem}-minimind/  config.json (auto_map), model_minimind.py, model.safetensors, tokenizer, generation_config
              (the tokenizer runs no custom code: AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    llama     {stem}-llama/     LlamaForCausalLM, loads with no custom code (dense models only; YaRN -> rope_parameters,
              rope_scaling under transformers 4)
    gguf      {stem}-gguf/{stem}.gguf + Modelfile   llama.cpp "llama" architecture, gpt2-style BPE tokenizer
    torch     {save_dir}/{save_weight}_{hidden}[_moe].pth + .json   fp16, the original's keys (both tied keys)
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

from model.cli import add_size_args, cli, typed_sizes
from model.loading import (ROOT, TOKENIZER_DIR, TOKENIZER_FILES, add_lora, find_weight, load_native, load_transformers,
                           resolve_path)
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


def llama_config(lm_config: MiniMindConfig):
    """The equivalent transformers LlamaConfig. MiniMind's YaRN equals transformers' "yarn" rope type (same
    beta_fast/beta_slow correction range with floor/ceil, same linear ramp, attention_factor 1.0 given
    explicitly) whenever MiniMind applies it, i.e. max_position_embeddings > original_max_position_embeddings."""
    from transformers import LlamaConfig
    rope = {"rope_type": "default", "rope_theta": float(lm_config.rope_theta)}
    scaling = lm_config.rope_scaling
    if scaling is not None:
        orig = scaling.get("original_max_position_embeddings", 2048)
        if lm_config.max_position_embeddings / orig > 1.0:
            rope = {"rope_type": "yarn", "rope_theta": float(lm_config.rope_theta),
                    "factor": float(scaling.get("factor", 16)), "original_max_position_embeddings": orig,
                    "beta_fast": float(scaling.get("beta_fast", 32.0)), "beta_slow": float(scaling.get("beta_slow", 1.0)),
                    "attention_factor": float(scaling.get("attention_factor", 1.0)), "truncate": True}
    rope_kwargs = dict(rope_parameters=rope)
    if "rope_parameters" not in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 4: the old keys
        theta = rope.pop("rope_theta")
        rope_kwargs = dict(rope_theta=theta, rope_scaling=rope if rope["rope_type"] == "yarn" else None)
    return LlamaConfig(vocab_size=lm_config.vocab_size, hidden_size=lm_config.hidden_size,
                       intermediate_size=lm_config.intermediate_size, num_hidden_layers=lm_config.num_hidden_layers,
                       num_attention_heads=lm_config.num_attention_heads, num_key_value_heads=lm_config.num_key_value_heads,
                       head_dim=lm_config.head_dim, hidden_act=lm_config.hidden_act,
                       max_position_embeddings=lm_config.max_position_embeddings, rms_norm_eps=lm_config.rms_norm_eps,
                       **rope_kwargs, tie_word_embeddings=lm_config.tie_word_embeddings,
                       attention_bias=False, mlp_bias=False, **GENERATION)


def check_dense(lm_config: MiniMindConfig, target: str) -> None:
    if lm_config.use_moe:
        raise ValueError(f"--to {target}: MoE models have no {target} equivalent here; export them in the MiniMind "
                         "architecture with --to minimind (loads with trust_remote_code=True)")


def export_llama(model: MiniMindForCausalLM, out_dir, tokenizer_dir=TOKENIZER_DIR, dtype=torch.float16) -> Path:
    """A stock LlamaForCausalLM folder (no custom code). Key names are identical, so the state dict loads strictly."""
    from transformers import GenerationConfig, LlamaForCausalLM
    check_dense(model.config, "llama")
    out_dir = Path(out_dir)
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(model.state_dict(), strict=True)
    llama.generation_config = GenerationConfig(**GENERATION)
    with staged_dir(out_dir) as tmp:
        copy_tokenizer(tokenizer_dir, tmp)
        llama.to(dtype).save_pretrained(tmp)
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


def gguf_tensors(model: MiniMindForCausalLM) -> dict:
    """llama.cpp tensor name -> torch tensor (fp32), q/k rows permuted for interleaved RoPE. The tied lm_head
    is left out: llama.cpp then uses token_embd as the output matrix."""
    cfg, sd = model.config, model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            w = sd[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                w = permute_rope_rows(w, cfg.num_attention_heads)
            elif theirs == "attn_k":
                w = permute_rope_rows(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{theirs}.weight"] = w
    return {k: v.detach().float().cpu() for k, v in out.items()}


def gguf_vocab(tokenizer_dir) -> dict:
    """tokens (id order), token types, merges and special ids from tokenizer.json / tokenizer_config.json."""
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
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {name: vocab[tok_cfg[name]] for name in ("bos_token", "eos_token", "pad_token", "unk_token")
           if isinstance(tok_cfg.get(name), str) and tok_cfg[name] in vocab}
    return {"tokens": tokens, "special": special, "merges": merges, "ids": ids,
            "chat_template": tok_cfg.get("chat_template")}


def export_gguf(model: MiniMindForCausalLM, out_path, tokenizer_dir=TOKENIZER_DIR, dtype=torch.float16,
                name: str = "MiniMind") -> Path:
    """A .gguf in llama.cpp's "llama" architecture, plus an Ollama Modelfile in the same folder."""
    try:
        import gguf
    except ImportError:
        raise SystemExit("GGUF export needs the gguf package: pip install gguf") from None
    cfg = model.config
    check_dense(cfg, "gguf")
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
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")          # ByteLevel(use_regex=True) = the GPT-2 split regex
        w.add_token_list(vocab["tokens"])
        w.add_token_types([gguf.TokenType.CONTROL if i in vocab["special"] else gguf.TokenType.NORMAL
                           for i in range(len(vocab["tokens"]))])
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
            keep_f32 = t.ndim == 1 or dtype == torch.float32   # norms stay fp32, as llama.cpp expects
            w.add_tensor(tname, t.numpy() if keep_f32 else t.half().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_modelfile(out_path)
    return out_path


OLLAMA_TEMPLATE = """<|im_start|>system
{{ if .System }}{{ .System }}{{ else }}You are a helpful assistant{{ end }}<|im_end|>
{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""


def write_modelfile(gguf_path: Path, temperature: float = 0.85, top_p: float = 0.85, num_ctx: int = 8192) -> Path:
    """Ollama Modelfile next to the .gguf: `ollama create minimind -f Modelfile` in that folder. The TEMPLATE
    renders exactly what the ChatML chat template renders for system/user/assistant messages."""
    text = (f"FROM ./{gguf_path.name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind weight conversion (native .pth, transformers, GGUF)",
                                allow_abbrev=False)
    p.add_argument("--to", default="minimind", choices=["minimind", "llama", "gguf", "torch"],
                   help="output format: MiniMind transformers folder, stock Llama folder, GGUF + Ollama Modelfile, "
                        "or a native .pth (default: minimind)")
    p.add_argument("--torch_path", default=None, help="native weight file; default: the {weight} weight in --save_dir, "
                                                      "found as eval_llm.py finds it")
    p.add_argument("--hf_path", default=None, help="read a transformers folder (MiniMind or Llama) instead of a .pth")
    p.add_argument("--save_dir", default="out", help="where native weights are read from and outputs go by default "
                                                     "(default: out)")
    p.add_argument("--weight", default="full_sft", help="weight prefix of the input .pth (default: full_sft)")
    p.add_argument("--save_weight", default=None,
                   help="prefix of the output .pth for --to torch (default: 'converted', or {weight}_{lora name})")
    p.add_argument("--lora_path", default=None, help="LoRA adapter file to merge into the base weight; none = no merge")
    p.add_argument("--out", default=None, help="output folder (minimind, llama), .gguf file or .pth file")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="dtype of the written weights (default: float16)")
    p.add_argument("--tokenizer_path", default=str(TOKENIZER_DIR), help="folder with tokenizer.json/tokenizer_config.json")
    add_size_args(p)
    p.add_argument("--inference_rope_scaling", action="store_true",
                   help="export with YaRN enabled (x16, 2048 -> 32768 positions); not for GGUF")
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    sizes, rope = typed_sizes(args), args.inference_rope_scaling
    save_dir = resolve_path(args.save_dir)
    if args.hf_path:
        source = resolve_path(args.hf_path)
        model = load_transformers(source, rope)
        if not isinstance(model, MiniMindForCausalLM):
            raise LoadError(f"--hf_path {source}: model_type {model.config.model_type!r}, expected minimind or llama")
        stem = source.name
    else:
        source = resolve_path(args.torch_path) if args.torch_path else \
            find_weight(save_dir, args.weight, sizes["hidden_size"], sizes["use_moe"])
        model = load_native(source, **sizes, rope_scaling=rope)
        stem = source.stem
    if args.lora_path:
        lora = add_lora(model, args.lora_path)
        lora_name = lora.stem.removesuffix("_moe").removesuffix(f"_{model.config.hidden_size}")
        stem = f"{stem}-{lora_name}"
    cfg, dtype = model.config, DTYPES[args.dtype]
    if args.to == "torch":
        if args.save_weight is None:
            prefix = f"{args.weight}_{lora_name}" if args.lora_path and not args.hf_path else "converted"
        else:
            prefix = args.save_weight
        out = Path(args.out) if args.out else weight_path(save_dir, prefix, cfg)
        if out.resolve() == source.resolve():
            raise ValueError(f"refusing to overwrite the input {source}; pass --out or --save_weight")
        save_weights(model, out, cfg)   # fp16, the original's keys, + {stem}.json
    elif args.to == "gguf":
        out = Path(args.out) if args.out else save_dir / f"{stem}-gguf" / f"{stem}.gguf"
        export_gguf(model, out, args.tokenizer_path, dtype, name=stem)
    else:
        out = Path(args.out) if args.out else save_dir / f"{stem}-{args.to}"
        export = export_minimind if args.to == "minimind" else export_llama
        export(model, out, args.tokenizer_path, dtype)
    total, active = model.count_parameters()
    print(f"{source} -> {out} ({args.to}, {args.dtype}, {total / 1e6:.2f}M params"
          + (f", {active / 1e6:.2f}M active" if active != total else "") + ")", flush=True)
    return out


if __name__ == "__main__":
    cli(main)
