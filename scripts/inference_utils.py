"""Model loading shared by eval_llm.py, scripts/serve_openai_api.py and scripts/web_demo.py: the
model-loading flags and the one loader behind them. (The prompt, the output parser and generation
live in model/chat_format.py and model/engine.py.)

Which loader runs depends on what `--load_from` is, never on its name:
  * a folder with config.json      -> a transformers folder (AutoModelForCausalLM + AutoTokenizer, local files only)
  * a .pth file                    -> that native weight file (config from the .json next to it)
  * any other folder (default `model`) -> native weights `{save_dir}/{weight}_{hidden}[_moe].pth` with the config
                                       from the `.json` written next to them, and the tokenizer from --tokenizer_path
                                       (default: --load_from when it holds tokenizer files, else ROOT/model)
Relative paths are tried against the cwd first, then against the repo root, so the original's
commands (`--save_dir out` from the repo root, `../out` from scripts/) work from anywhere.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.checkpoint import PRODUCED_BY, load_weights, weight_path  # noqa: E402
from trainer.trainer_utils import ROOT  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SIZE_FLAGS = ("hidden_size", "num_hidden_layers", "use_moe")


class LoadError(Exception):
    """A model that cannot be loaded; the message is one line meant for the user."""


# ---- flags ----
class _Typed(argparse.Action):
    """Store the value and remember that the user typed the flag (a size flag that was not typed
    may be replaced by the size of the one weight file that exists)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.typed = getattr(namespace, "typed", set()) | {self.dest}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The original's model-loading flags with its defaults (shared by the CLI, the server and the web demo)."""
    p = parser
    p.add_argument("--load_from", type=str, default="model",
                   help="a transformers model folder (one with config.json), a native .pth weight file, or the "
                        "folder holding the tokenizer of native weights (default: model)")
    p.add_argument("--save_dir", type=str, default="out", help="folder of the native weight files")
    p.add_argument("--weight", type=str, default="full_sft",
                   help="weight prefix: pretrain, full_sft, dpo, reason, ppo_actor, grpo, spo, full_dist")
    p.add_argument("--lora_weight", type=str, default="None",
                   help="LoRA name (file {save_dir}/lora/{name}_{hidden}.pth) or a .pth path; None = no LoRA")
    p.add_argument("--hidden_size", type=int, default=512, action=_Typed,
                   help="used when the weight has no .json config; if this default file is missing and exactly one "
                        "{weight}_*.pth exists, that one is used")
    p.add_argument("--num_hidden_layers", type=int, default=8, action=_Typed,
                   help="used when the weight has no .json config")
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1], action=_Typed,
                   help="1 = the MoE weight file ({weight}_{hidden}_moe.pth)")
    p.add_argument("--inference_rope_scaling", action="store_true",
                   help="YaRN RoPE scaling (16x longer positions, from 2048 original positions)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available), cpu, cuda:1, ...")
    p.add_argument("--tokenizer_path", type=str, default=None,
                   help="tokenizer folder for native weights (default: --load_from if it holds tokenizer files, "
                        "else the repo's model/)")
    p.set_defaults(typed=set())
    return p


def resolve_path(path) -> Path:
    """A path the user typed: absolute, or relative to the cwd when it exists there, else relative to the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.absolute()
    return ROOT / p


def is_transformers_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


# ---- loading ----
def load_model(args):
    """(model, tokenizer, description) from the flags of add_model_args; raises LoadError with a one-line message."""
    source = resolve_path(args.load_from)
    if is_transformers_folder(source):
        model, tokenizer = load_transformers(source, args.tokenizer_path, args.inference_rope_scaling)
        description = f"transformers folder {source}"
    else:
        if not source.exists():
            raise LoadError(f"--load_from {args.load_from}: no such file or folder (expected a transformers folder "
                            "with config.json, or the tokenizer folder of native weights)")
        tokenizer_dir = args.tokenizer_path or (source if source.is_dir() and any(
            (source / f).exists() for f in TOKENIZER_FILES) else ROOT / "model")
        if source.is_file():
            path = source
            args.weight = re.sub(r"_\d+(_moe)?$", "", path.stem)  # e.g. pretrain: no chat template
        else:
            path = find_native_weight(resolve_path(args.save_dir), args.weight, args.hidden_size, args.use_moe,
                                      typed=bool(set(SIZE_FLAGS) & args.typed))
        model = load_native(path, args.num_hidden_layers, args.inference_rope_scaling)
        tokenizer = load_tokenizer(tokenizer_dir)
        description = f"native weights {path}"
        if not path.with_suffix(".json").exists() and Path(tokenizer_dir).resolve() == (ROOT / "model").resolve():
            # a weight not trained here (e.g. a published MiniMind .pth): its token ids are the original tokenizer's
            print(f"note: {path.name} has no .json config, so it was not trained with this repository; if it is a "
                  "published MiniMind weight, pass --tokenizer_path (or --load_from) the original tokenizer folder, "
                  "e.g. ../MiniMind2 (model/ here is a different tokenizer)", file=sys.stderr)
    if args.lora_weight not in (None, "", "None", "none"):
        description += f" + LoRA {add_lora(model, args.lora_weight, resolve_path(args.save_dir))}"
    total = sum(p.numel() for p in model.parameters())
    print(f"MiniMind模型参数: {total / 1e6:.2f} M(illion) ({description})", file=sys.stderr, flush=True)
    return model.float().eval().to(args.device), tokenizer, description


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    folder = resolve_path(folder)
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise LoadError(f"no tokenizer in {folder} (tokenizer.json / tokenizer_config.json); pass --tokenizer_path")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def find_native_weight(save_dir: Path, weight: str, hidden_size: int, use_moe: int, typed: bool = False) -> Path:
    """`{save_dir}/{weight}_{hidden}[_moe].pth`; when that file is missing and no size flag was typed,
    the single `{weight}_<hidden>[_moe].pth` in save_dir (an error if there are several)."""
    path = weight_path(save_dir, weight, argparse.Namespace(hidden_size=hidden_size, use_moe=use_moe))
    if not path.exists() and not typed and save_dir.is_dir():
        found = sorted(p for p in save_dir.glob(f"{glob_escape(weight)}_*.pth")
                       if re.fullmatch(rf"{re.escape(weight)}_\d+(_moe)?", p.stem))
        if len(found) == 1:
            return found[0]
        if found:
            raise LoadError(f"{path} not found, and {save_dir} has several {weight} weights "
                            f"({', '.join(p.name for p in found)}): choose one with --hidden_size / --use_moe")
    if not path.exists():
        stage = PRODUCED_BY.get(weight)
        hint = f"it is written by {stage}; run that stage first, or" if stage else "check --weight, or"
        raise LoadError(f"weight file {path} not found: {hint} set --save_dir/--hidden_size/--use_moe, "
                        "or --load_from a transformers folder")
    return path


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def native_config(path: Path, num_hidden_layers: int = 8, rope_scaling: bool = False):
    """The MiniMindConfig of a native weight: the `.json` saved next to it, else sizes from the file
    name (`_{hidden}[_moe]`) and num_hidden_layers."""
    from model.model_minimind import MiniMindConfig
    config_file = path.with_suffix(".json")
    if config_file.exists():
        values = json.loads(config_file.read_text(encoding="utf-8"))
    else:
        match = re.search(r"_(\d+)(_moe)?$", path.stem)
        if not match:
            raise LoadError(f"{path}: no {config_file.name} next to it and no _<hidden_size> in its name")
        values = dict(hidden_size=int(match.group(1)), use_moe=bool(match.group(2)),
                      num_hidden_layers=num_hidden_layers)
    if rope_scaling:
        values.update(inference_rope_scaling=True, rope_scaling=None)  # None: rebuilt from the flag
    return MiniMindConfig.from_dict(values)


def load_native(path: Path, num_hidden_layers: int = 8, rope_scaling: bool = False):
    from model.model_minimind import MiniMindForCausalLM
    model = MiniMindForCausalLM(native_config(path, num_hidden_layers, rope_scaling))
    try:
        load_weights(model, path)
    except (FileNotFoundError, ValueError) as err:
        raise LoadError(str(err)) from None
    return model


def load_transformers(folder: Path, tokenizer_path=None, rope_scaling: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM
    from model.model_minimind import YARN_ROPE_SCALING  # importing registers model_type "minimind" with Auto*
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    if rope_scaling and config.model_type == "minimind":
        config.inference_rope_scaling, config.rope_scaling = True, dict(YARN_ROPE_SCALING)
    elif rope_scaling:
        print(f"--inference_rope_scaling ignored for model_type {config.model_type}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, trust_remote_code=True,
                                                 local_files_only=True)
    has_tokenizer = any((folder / f).exists() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(tokenizer_path or (folder if has_tokenizer else ROOT / "model"))
    return model, tokenizer


def add_lora(model, lora_weight: str, save_dir: Path) -> Path:
    """Attach and load a LoRA (a name under {save_dir}/lora/ or a .pth path), then merge it into the
    weights, so generation runs at the base model's speed."""
    from model.model_lora import apply_lora, load_lora, merge_lora
    path = resolve_path(lora_weight)
    if not path.is_file():
        path = weight_path(save_dir / "lora", lora_weight, model.config)
        legacy = save_dir / "lora" / f"{lora_weight}_{model.config.hidden_size}.pth"  # the original never adds _moe
        path = legacy if not path.exists() and legacy.exists() else path
    if not path.is_file():
        raise LoadError(f"LoRA file {path} not found: it is written by trainer/train_lora.py "
                        f"--lora_name {lora_weight}; or pass a .pth path to --lora_weight")
    state = torch.load(path, map_location="cpu", weights_only=True)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora.A.weight")}
    if len(ranks) != 1:
        raise LoadError(f"{path}: not a LoRA file (no lora.A.weight tensors of one rank)")
    apply_lora(model, rank=ranks.pop())
    try:
        load_lora(model, path)
    except ValueError as err:
        raise LoadError(str(err)) from None
    merge_lora(model)
    return path
