"""Convert MiniMind weights: native .pth <-> transformers folders, LoRA merge, GGUF for llama.cpp/Ollama.

    python scripts/convert_model.py --weight full_sft --hidden_size 512                 # MiniMind folder (MoE too)
    python scripts/convert_model.py --weight full_sft --to llama --out ../MiniMind2-Small   # stock Llama (dense only)
    python scripts/convert_model.py --weight full_sft --to gguf                         # .gguf + Ollama Modelfile
    python scripts/convert_model.py --hf_path out/full_sft_512-minimind --to torch --out out/back_512.pth
    python scripts/convert_model.py --weight full_sft --lora_path out/lora/lora_identity_512.pth --to torch
    python scripts/convert_model.py --torch_path /tmp/x/pretrain_64.pth --to minimind --dtype float32  # tiny, seconds

Input: a native weight (`--torch_path`, or `{save_dir}/{weight}_{hidden}[_moe].pth` from the size flags; the model
config comes from the `.json` the trainers write next to it, the size flags only fill in when it is absent), or a
transformers folder (`--hf_path`, MiniMind or Llama). `--lora_path` merges an adapter into the base first.
Output (`--to`), by default under `--save_dir`:
    minimind  {stem}-minimind/  config.json (auto_map), model_minimind.py, model.safetensors, tokenizer, generation_config
    llama     {stem}-llama/     LlamaForCausalLM, loads with no custom code (dense models only; YaRN -> rope_parameters)
    gguf      {stem}-gguf/{stem}.gguf + Modelfile   llama.cpp "llama" architecture, gpt2-style BPE tokenizer
    torch     {save_dir}/{save_weight}_{hidden}[_moe].pth + .json   fp16, the original's keys (both tied keys)
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager

import torch

from model.model_lora import apply_lora, load_lora, merge_lora
from model.model_minimind import YARN_ROPE_SCALING, MiniMindConfig, MiniMindForCausalLM
from trainer.checkpoint import atomic_save, save_weights, weight_path
from trainer.trainer_utils import OUT, ROOT, TOKENIZER_DIR

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
SIZE_FLAGS = {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": 0}   # the original's defaults


# ---- loading ----
def load_config(path, hidden_size=None, num_hidden_layers=None, use_moe=None, **extra) -> MiniMindConfig:
    """The config for weight file `path`: its `{stem}.json` if present (size flags that contradict it are an
    error naming the file), else the size flags with the original's defaults."""
    flags = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "use_moe": use_moe}
    json_path = Path(path).with_suffix(".json")
    if json_path.exists():
        saved = json.loads(json_path.read_text(encoding="utf-8"))
        for key, value in flags.items():
            if value is not None and key in saved and (bool(value) if key == "use_moe" else value) != saved[key]:
                raise ValueError(f"--{key} {value} contradicts {json_path} ({key}={saved[key]}); "
                                 "drop the flag or point at the right weight file")
        saved.update(extra)
        return MiniMindConfig.from_dict(saved)
    return sized_config(**flags, **extra)


def sized_config(hidden_size=None, num_hidden_layers=None, use_moe=None, **extra) -> MiniMindConfig:
    """A config from the size flags, None meaning the original's default (512 x 8, dense)."""
    return MiniMindConfig(hidden_size=hidden_size or SIZE_FLAGS["hidden_size"],
                          num_hidden_layers=num_hidden_layers or SIZE_FLAGS["num_hidden_layers"],
                          use_moe=bool(use_moe if use_moe is not None else SIZE_FLAGS["use_moe"]), **extra)


def find_weight(save_dir, weight: str, **sizes) -> Path:
    """`{save_dir}/{weight}_{hidden}[_moe].pth` named by the size flags (defaults 512, dense), as eval_llm does."""
    return weight_path(save_dir, weight, sized_config(**sizes))


def load_state(model, state: dict, source) -> None:
    """Strict load of `state` into `model`; any missing, unexpected or mis-shaped key is one error naming `source`."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    hint = "(check --hidden_size, --num_hidden_layers and --use_moe, or the .json next to the weight)"
    if missing or unexpected:
        moe_file, moe_model = any(".experts." in k for k in state), model.config.use_moe
        kind = f" The file holds a {'MoE' if moe_file else 'dense'} model, the config a " \
               f"{'MoE' if moe_model else 'dense'} one." if moe_file != moe_model else ""
        raise ValueError(f"{source} does not fit this model:{kind} missing {missing[:4]}{'...' * (len(missing) > 4)}, "
                         f"unexpected {unexpected[:4]}{'...' * (len(unexpected) > 4)} {hint}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(own[key].shape)} {hint}")
    model.load_state_dict(state, strict=True)


def load_native(path, lm_config: MiniMindConfig) -> MiniMindForCausalLM:
    """A MiniMind model (fp32, eval mode) with the weights of native file `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} not found (train it first, or pass --torch_path / --save_dir, "
                                "--weight and the size flags that name it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable weight file ({err.__class__.__name__}: {err})") from None
    model = MiniMindForCausalLM(lm_config)
    load_state(model, {k: v.float() for k, v in state.items()}, path)
    return model.eval()


def llama_to_minimind_config(cfg: dict, source) -> MiniMindConfig:
    """A Llama config.json as a MiniMindConfig; anything MiniMind cannot express is an error."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: this Llama uses biases or a non-SiLU activation, which MiniMind does not have")
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"{source}: rope type {rope_type!r} has no MiniMind equivalent")
    scaling = None
    if rope_type == "yarn":
        scaling = {**YARN_ROPE_SCALING, **{k: rope[k] for k in YARN_ROPE_SCALING if k in rope and k != "type"}}
    return MiniMindConfig(hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["num_hidden_layers"],
                          num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
                          intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                          max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                          rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
                          rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 1e6)),
                          inference_rope_scaling=scaling is not None, rope_scaling=scaling,
                          tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                          bos_token_id=cfg.get("bos_token_id", 1), eos_token_id=cfg.get("eos_token_id", 2))


def load_hf_folder(folder) -> MiniMindForCausalLM:
    """A MiniMind model from a transformers folder written by this script (MiniMind or Llama architecture).
    The weights are read directly (no remote code runs)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} not found: --hf_path must be a transformers model folder")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") == "minimind":
        for key in ("auto_map", "architectures", "dtype", "torch_dtype", "transformers_version"):
            cfg.pop(key, None)
        lm_config = MiniMindConfig.from_dict(cfg)
    elif cfg.get("model_type") == "llama":
        lm_config = llama_to_minimind_config(cfg, folder / "config.json")
    else:
        raise ValueError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r}, expected 'minimind' or 'llama'")
    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {k: v for f in files for k, v in load_file(f).items()}
    elif (folder / "pytorch_model.bin").is_file():  # the original exporter's format
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model.bin weight file")
    if "lm_head.weight" not in state and lm_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = MiniMindForCausalLM(lm_config)
    load_state(model, {k: v.float() for k, v in state.items()}, folder)
    return model.eval()


def merge_lora_file(model: MiniMindForCausalLM, lora_path) -> None:
    """Fold the adapter in `lora_path` into `model` (rank read from the file)."""
    lora_path = Path(lora_path)
    if not lora_path.is_file():
        raise FileNotFoundError(f"LoRA file {lora_path} not found (trainer/train_lora.py writes out/lora/...)")
    ranks = {v.shape[0] for k, v in torch.load(lora_path, map_location="cpu", weights_only=True).items()
             if k.endswith("lora.A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{lora_path}: expected LoRA A/B weights of one rank, found ranks {sorted(ranks)}")
    apply_lora(model, rank=ranks.pop())
    load_lora(model, lora_path)
    merge_lora(model)


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
    for name in TOKENIZER_FILES:
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
    return LlamaConfig(vocab_size=lm_config.vocab_size, hidden_size=lm_config.hidden_size,
                       intermediate_size=lm_config.intermediate_size, num_hidden_layers=lm_config.num_hidden_layers,
                       num_attention_heads=lm_config.num_attention_heads, num_key_value_heads=lm_config.num_key_value_heads,
                       head_dim=lm_config.head_dim, hidden_act=lm_config.hidden_act,
                       max_position_embeddings=lm_config.max_position_embeddings, rms_norm_eps=lm_config.rms_norm_eps,
                       rope_parameters=rope, tie_word_embeddings=lm_config.tie_word_embeddings,
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
    p = argparse.ArgumentParser(description="MiniMind weight conversion (native .pth, transformers, GGUF)")
    p.add_argument("--to", default="minimind", choices=["minimind", "llama", "gguf", "torch"],
                   help="output format: MiniMind transformers folder, stock Llama folder, GGUF + Ollama Modelfile, "
                        "or a native .pth")
    p.add_argument("--torch_path", default=None, help="native weight file; default {save_dir}/{weight}_{hidden}[_moe].pth")
    p.add_argument("--hf_path", default=None, help="read a transformers folder (MiniMind or Llama) instead of a .pth")
    p.add_argument("--save_dir", default=OUT, help="where native weights are read from and outputs go by default")
    p.add_argument("--weight", default="full_sft", help="weight prefix of the input .pth")
    p.add_argument("--save_weight", default=None,
                   help="prefix of the output .pth for --to torch (default: 'converted', or {weight}_{lora name})")
    p.add_argument("--lora_path", default=None, help="LoRA adapter file to merge into the base weight; none = no merge")
    p.add_argument("--out", default=None, help="output folder (minimind, llama), .gguf file or .pth file")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="dtype of the written weights")
    p.add_argument("--tokenizer_path", default=TOKENIZER_DIR, help="folder with tokenizer.json/tokenizer_config.json")
    p.add_argument("--hidden_size", default=None, type=int, help="only used when the weight has no .json (default 512)")
    p.add_argument("--num_hidden_layers", default=None, type=int, help="only used without a .json (default 8)")
    p.add_argument("--use_moe", default=None, type=int, choices=[0, 1], help="only used without a .json (default 0)")
    p.add_argument("--inference_rope_scaling", action="store_true",
                   help="export with YaRN enabled (x16, 2048 -> 32768 positions); not for GGUF")
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    extra = {"inference_rope_scaling": True, "rope_scaling": dict(YARN_ROPE_SCALING)} \
        if args.inference_rope_scaling else {}
    sizes = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=args.use_moe)
    if args.hf_path:
        source = Path(args.hf_path)
        model = load_hf_folder(source)
        if extra:
            model.config.update(extra)
            model.model.freqs_cos, model.model.freqs_sin = model.model.rope_tables()
        stem = source.name
    else:
        source = Path(args.torch_path) if args.torch_path else find_weight(args.save_dir, args.weight, **sizes)
        model = load_native(source, load_config(source, **sizes, **extra))
        stem = source.stem
    if args.lora_path:
        merge_lora_file(model, args.lora_path)
        lora_name = Path(args.lora_path).stem.removesuffix(f"_{model.config.hidden_size}")
        stem = f"{stem}-{lora_name}"
    cfg, dtype = model.config, DTYPES[args.dtype]
    if args.to == "torch":
        if args.save_weight is None:
            prefix = f"{args.weight}_{lora_name}" if args.lora_path and not args.hf_path else "converted"
        else:
            prefix = args.save_weight
        out = Path(args.out) if args.out else weight_path(args.save_dir, prefix, cfg)
        if out.resolve() == source.resolve():
            raise ValueError(f"refusing to overwrite the input {source}; pass --out or --save_weight")
        save_weights(model, out, cfg)   # fp16, the original's keys, + {stem}.json
    elif args.to == "gguf":
        out = Path(args.out) if args.out else Path(args.save_dir) / f"{stem}-gguf" / f"{stem}.gguf"
        export_gguf(model, out, args.tokenizer_path, dtype, name=stem)
    else:
        out = Path(args.out) if args.out else Path(args.save_dir) / f"{stem}-{args.to}"
        export = export_minimind if args.to == "minimind" else export_llama
        export(model, out, args.tokenizer_path, dtype)
    total, active = model.count_parameters()
    print(f"{source} -> {out} ({args.to}, {args.dtype}, {total / 1e6:.2f}M params"
          + (f", {active / 1e6:.2f}M active" if active != total else "") + ")", flush=True)
    return out


if __name__ == "__main__":
    main()
