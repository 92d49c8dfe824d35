"""Loading MiniMind models, written once: every entry point uses this module (eval_llm.py, the server, the
web demo, the eval scripts, convert_model.py, the benches, and the trainers for their weight files).

    # in a script (the flags are model/cli.py's):
    #   args = add_model_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args()
    #   model, tokenizer, description = load_model(args)

What it does, each in one place:
  * finding a weight by stage, size and MoE (find_weight): the size flags name the file; when no size flag
    was typed and the original's default `{weight}_512.pth` is absent, the one `{weight}_<hidden>[_moe].pth`
    in the folder is used, and several are an error that lists them with the flags that pick each;
  * its config (native_config): the `.json` the trainers write next to the weight (a typed size flag that
    contradicts it is an error), else the size in the file name and the size flags;
  * native `.pth` files (read and CRC-checked by model/weights.py), loaded strictly (every key, every shape);
    transformers folders (MiniMind and Llama folders are read directly into MiniMindForCausalLM, any other
    architecture through AutoModelForCausalLM); LoRA adapters, a name under `{save_dir}/lora/` (also the
    original's name without `_moe`) or a path, merged into the weights; the tokenizer, which never runs
    custom code;
  * paths the user types (resolve_path): an absolute path as given; a relative path against the current
    directory when it exists there, else against the repository root (ROOT, defined here once), so the
    original's `--save_dir out` and `--load_from model` work from any directory;
  * errors are model/weights.py's LoadError, whose message is one line naming the file and what to do
    (NotFoundError, for a missing file, is a LoadError and also a FileNotFoundError).
Reads files only; writes nothing. Imports model_minimind, model_lora, weights and cli only.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

from model.cli import SIZE_DEFAULTS, typed_sizes
from model.model_lora import apply_lora, load_lora, merge_lora
from model.model_minimind import YARN_ROPE_SCALING, MiniMindConfig, MiniMindForCausalLM
from model.weights import LoadError, NotFoundError, read_state_dict, short_error, weight_path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "model"
# each family's shipped tokenizer: ours for MiniMind2, the original's newest (tools, thinking) for minimind-3
FAMILY_TOKENIZER_DIR = {"minimind2": TOKENIZER_DIR, "minimind3": ROOT / "model" / "minimind3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# which stage writes which weight prefix (for error messages)
PRODUCED_BY = {"pretrain": "trainer/train_pretrain.py", "full_sft": "trainer/train_full_sft.py",
               "dpo": "trainer/train_dpo.py", "reason": "trainer/train_reason.py",
               "full_dist": "trainer/train_distillation.py", "ppo_actor": "trainer/train_ppo.py",
               "grpo": "trainer/train_grpo.py", "spo": "trainer/train_spo.py"}
_WEIGHT_NAME = re.compile(r"(?P<prefix>.+)_(?P<hidden>\d+)(?P<moe>_moe)?")


# ---- paths ----
def resolve_path(path) -> Path:
    """A path the user typed: absolute as given; relative, against the cwd when it exists there, else against
    the repository root (where the original's relative defaults point)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.absolute()
    return ROOT / p


def is_transformers_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def has_tokenizer(folder) -> bool:
    return Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def _size_flags(path: Path) -> str:
    """The flags that name weight file `path` (layers from its .json when there is one)."""
    m = _WEIGHT_NAME.fullmatch(path.stem)
    flags = f"--hidden_size {m['hidden']}" if m else ""
    try:
        config = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        flags += f" --num_hidden_layers {config['num_hidden_layers']}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return flags + (" --use_moe 1" if m and m["moe"] else "")


def _same_stage(save_dir: Path, weight: str, use_moe=None) -> list:
    """The `{weight}_<hidden>[_moe].pth` files in save_dir (only MoE or only dense ones when use_moe is given)."""
    if not save_dir.is_dir():
        return []
    found = []
    for p in sorted(save_dir.glob("*.pth")):
        m = _WEIGHT_NAME.fullmatch(p.stem)
        if m and m["prefix"] == weight and (use_moe is None or bool(m["moe"]) == bool(use_moe)):
            found.append(p)
    return found


def missing_weight(path, what_to_set: str = "--save_dir, --weight and the size flags") -> str:
    """One line for a weight file that does not exist: the stage that writes it, and the sizes that do exist."""
    path = Path(path)
    m = _WEIGHT_NAME.fullmatch(path.stem)
    prefix = m["prefix"] if m else path.stem
    stage = PRODUCED_BY.get(prefix)
    text = f"weight file {path} not found: " + (f"it is written by {stage}; run that stage first, or check "
                                                f"{what_to_set}" if stage else f"check {what_to_set}")
    others = [p for p in _same_stage(path.parent, prefix) if p != path]
    if others:
        text += "; " + "; ".join(f"{p.name} exists: add {_size_flags(p)}" for p in others)
    return text


def find_weight(save_dir, weight: str, hidden_size: int = None, use_moe: int = None) -> Path:
    """The native weight `{save_dir}/{weight}_{hidden}[_moe].pth`. None means the flag was not typed: the
    original's default (512, dense) names the file, and when it is missing the one `{weight}_<hidden>[_moe].pth`
    in save_dir is used (several: a LoadError listing them with the flags that pick each)."""
    save_dir = Path(save_dir)
    path = weight_path(save_dir, weight, argparse.Namespace(
        hidden_size=hidden_size or SIZE_DEFAULTS["hidden_size"], use_moe=bool(use_moe)))
    if path.is_file():
        return path
    if hidden_size is None:
        found = _same_stage(save_dir, weight, use_moe)
        if len(found) == 1:
            return found[0]
        if found:
            raise LoadError(f"{path.name} not found and {save_dir} has several {weight} weights: "
                            + ", ".join(f"{p.name} ({_size_flags(p)})" for p in found) + "; pick one with its flags")
    raise NotFoundError(missing_weight(path, "--save_dir, --weight and the size flags, or --load_from a "
                                             "transformers folder"))


# ---- configs ----
def native_config(path, hidden_size: int = None, num_hidden_layers: int = None, use_moe: int = None,
                  rope_scaling: bool = False) -> MiniMindConfig:
    """The MiniMindConfig of native weight `path`: its `.json` (a size given here that contradicts it is a
    LoadError), else the size in the file name (`_{hidden}[_moe]`) and the size arguments, else the original's
    defaults. rope_scaling=True turns YaRN on."""
    path = Path(path)
    given = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "use_moe": use_moe}
    config_file = path.with_suffix(".json")
    if config_file.is_file():
        try:
            values = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LoadError(f"{config_file}: not a readable config ({short_error(err)}); delete it and pass the size "
                            "flags") from None
        for key, value in given.items():
            if value is not None and key in values and (bool(value) if key == "use_moe" else value) != values[key]:
                raise LoadError(f"--{key} {value} contradicts {config_file} ({key}={values[key]}); drop the flag or "
                                "point at the right weight file")
    else:
        m = _WEIGHT_NAME.fullmatch(path.stem)
        named = {"hidden_size": int(m["hidden"]), "use_moe": bool(m["moe"])} if m else {}
        values = {key: value if value is not None else named.get(key, SIZE_DEFAULTS[key])
                  for key, value in given.items()}
        values["use_moe"] = bool(values["use_moe"])
    if rope_scaling:
        values.update(inference_rope_scaling=True, rope_scaling=None)  # None: rebuilt from the flag
    return MiniMindConfig.from_dict(values)


def llama_to_minimind_config(cfg: dict, source) -> MiniMindConfig:
    """A Llama config.json as a MiniMindConfig; anything MiniMind cannot express is a LoadError."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{source}: this Llama uses biases or a non-SiLU activation, which MiniMind does not have")
    heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise LoadError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise LoadError(f"{source}: rope type {rope_type!r} has no MiniMind equivalent")
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


def load_state(model, state: dict, source) -> None:
    """Strict load of `state` into `model`: a missing, unexpected or mis-shaped key is a LoadError naming `source`."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    hint = "(check --hidden_size, --num_hidden_layers and --use_moe, or the .json next to the weight)"
    if missing or unexpected:
        moe_file, moe_model = any(".experts." in k for k in state), bool(getattr(model.config, "use_moe", False))
        kind = (f" The file holds a {'MoE' if moe_file else 'dense'} model, the config a "
                f"{'MoE' if moe_model else 'dense'} one." if moe_file != moe_model else "")
        raise LoadError(f"{source} does not fit this model:{kind} missing {missing[:4]}{'...' * (len(missing) > 4)}, "
                        f"unexpected {unexpected[:4]}{'...' * (len(unexpected) > 4)} {hint}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise LoadError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)} {hint}")
    model.load_state_dict(state, strict=True)


def load_weights(model, path) -> None:
    """Load native weight file `path` into `model` (the trainers' --from_weight), verified and strict."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(missing_weight(path, "--from_weight, --save_dir and the size flags"))
    load_state(model, read_state_dict(path), path)


# ---- models ----
def load_native(path, hidden_size: int = None, num_hidden_layers: int = None, use_moe: int = None,
                rope_scaling: bool = False) -> MiniMindForCausalLM:
    """A MiniMind model (fp32, eval mode) with the weights of native file `path` and its config (native_config)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(missing_weight(path))
    model = MiniMindForCausalLM(native_config(path, hidden_size, num_hidden_layers, use_moe, rope_scaling))
    load_state(model, read_state_dict(path), path)
    return model.eval()


def _folder_state(folder: Path) -> dict:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if files:
        try:
            return {k: v for f in files for k, v in load_file(f).items()}
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise LoadError(f"{folder}: unreadable safetensors file ({short_error(err)})") from None
    if (folder / "pytorch_model.bin").is_file():  # the original exporter's format
        return read_state_dict(folder / "pytorch_model.bin")
    raise NotFoundError(f"{folder}: no *.safetensors or pytorch_model.bin weight file")


def load_transformers(folder, rope_scaling: bool = False):
    """The model of a transformers folder (fp32, eval mode). MiniMind and Llama folders are read directly into
    MiniMindForCausalLM (no remote code runs, same strict checks as native weights); any other architecture
    goes through AutoModelForCausalLM(trust_remote_code=True), local files only."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise NotFoundError(f"{config_file} not found: not a transformers model folder")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoadError(f"{config_file}: not a readable config ({short_error(err)})") from None
    model_type = cfg.get("model_type")
    if model_type not in ("minimind", "llama"):
        from transformers import AutoModelForCausalLM
        if rope_scaling:
            print(f"--inference_rope_scaling ignored for model_type {model_type}", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                    dtype=torch.float32).eval()
    if model_type == "minimind":
        for key in ("auto_map", "architectures", "dtype", "torch_dtype", "transformers_version"):
            cfg.pop(key, None)
        lm_config = MiniMindConfig.from_dict(cfg)
    else:
        lm_config = llama_to_minimind_config(cfg, config_file)
    if rope_scaling:
        lm_config.inference_rope_scaling, lm_config.rope_scaling = True, dict(YARN_ROPE_SCALING)
    state = _folder_state(folder)
    if lm_config.tie_word_embeddings:  # save_pretrained stores a tied pair once
        for a, b in (("lm_head.weight", "model.embed_tokens.weight"), ("model.embed_tokens.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    model = MiniMindForCausalLM(lm_config)
    load_state(model, state, folder)
    return model.eval()


def add_lora(model, lora_weight, save_dir=None) -> Path:
    """Attach the LoRA adapter `lora_weight` (a .pth path, or a name: `{save_dir}/lora/{name}_{hidden}[_moe].pth`,
    or the original's `{name}_{hidden}.pth`), then merge it into the weights, so generation runs at the base
    model's speed. Returns the adapter file."""
    path = resolve_path(lora_weight)
    if not path.is_file():
        if save_dir is None:
            raise NotFoundError(f"LoRA file {path} not found")
        lora_dir = Path(save_dir) / "lora"
        path = weight_path(lora_dir, lora_weight, model.config)
        legacy = lora_dir / f"{lora_weight}_{model.config.hidden_size}.pth"  # the original never adds _moe
        path = legacy if not path.is_file() and legacy.is_file() else path
    if not path.is_file():
        raise NotFoundError(f"LoRA file {path} not found: it is written by trainer/train_lora.py "
                            f"--lora_name {lora_weight}; or pass a .pth path to --lora_weight")
    state = read_state_dict(path)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight")}
    if len(ranks) != 1:
        raise LoadError(f"{path}: not a LoRA file (expected lora.A/B weights of one rank, found ranks {sorted(ranks)})")
    apply_lora(model, rank=ranks.pop())
    try:
        load_lora(model, path)
    except ValueError as err:
        raise LoadError(str(err).splitlines()[0]) from None
    merge_lora(model)
    return path


def load_tokenizer(folder=TOKENIZER_DIR):
    """The tokenizer in `folder` (local files only; trust_remote_code=False: a MiniMind tokenizer needs no code)."""
    from transformers import AutoTokenizer
    folder = resolve_path(folder)
    if not has_tokenizer(folder):
        raise NotFoundError(f"no tokenizer in {folder} (tokenizer.json / tokenizer_config.json); pass --tokenizer_path")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def load_model(args):
    """(model, tokenizer, description) from the flags of add_model_args; the model is fp32, in eval mode, on
    args.device. What --load_from is decides the loader, never its name: a folder with config.json is a
    transformers folder, a .pth file is that weight, any other folder holds the tokenizer of the native weight
    find_weight picks in --save_dir. Raises LoadError (one line)."""
    source = resolve_path(args.load_from)
    sizes = typed_sizes(args)
    if is_transformers_folder(source):
        model = load_transformers(source, args.inference_rope_scaling)
        description = f"transformers folder {source}"
    else:
        if not source.exists():
            raise NotFoundError(f"--load_from {args.load_from}: no such file or folder (expected a transformers "
                                "folder with config.json, a .pth weight, or the tokenizer folder of native weights)")
        if source.is_file():
            path = source
            m = _WEIGHT_NAME.fullmatch(path.stem)
            args.weight = m["prefix"] if m else path.stem  # e.g. pretrain: no chat template
        else:
            path = find_weight(resolve_path(args.save_dir), args.weight, sizes["hidden_size"], sizes["use_moe"])
        model = load_native(path, **sizes, rope_scaling=args.inference_rope_scaling)
        description = f"native weights {path}"
    tokenizer_dir = resolve_path(args.tokenizer_path) if args.tokenizer_path else (
        source if has_tokenizer(source) else TOKENIZER_DIR)
    tokenizer = load_tokenizer(tokenizer_dir)
    if not is_transformers_folder(source) and not path.with_suffix(".json").exists() \
            and tokenizer_dir.resolve() == TOKENIZER_DIR.resolve():
        # a weight not trained here (e.g. a published MiniMind .pth): its token ids are the original tokenizer's
        print(f"note: {path.name} has no .json config, so it was not trained with this repository; if it is a "
              "published MiniMind weight, pass --tokenizer_path (or --load_from) the original tokenizer folder, "
              "e.g. ../MiniMind2 (model/ here is a different tokenizer)", file=sys.stderr)
    if args.lora_weight not in (None, "", "None", "none"):
        description += f" + LoRA {add_lora(model, args.lora_weight, resolve_path(args.save_dir))}"
    total = sum(p.numel() for p in model.parameters())
    print(f"MiniMind模型参数: {total / 1e6:.2f} M(illion) ({description})", file=sys.stderr, flush=True)
    return model.float().eval().to(args.device), tokenizer, description
