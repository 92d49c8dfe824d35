"""Weight and resume files, in the original's names and formats, always written atomically.

    out/{name}_{hidden}[_moe].pth              fp16 state dict (what eval/convert/next stages load)
    out/{name}_{hidden}[_moe].json             the model config, so later loading needs no size flags
    checkpoints/{name}_{hidden}[_moe]_resume.pth   model (fp32), optimizer, scaler, epoch, step,
                                               world_size, wandb_id, rng (+ whatever a stage adds)

Every file goes to a temporary name in the same directory and is renamed over the target, so a
process killed at any moment leaves either the old file or the new one, never half of one.
"""
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

# which stage writes which weight prefix (for error messages)
PRODUCED_BY = {"pretrain": "trainer/train_pretrain.py", "full_sft": "trainer/train_full_sft.py",
               "dpo": "trainer/train_dpo.py", "reason": "trainer/train_reason.py",
               "full_dist": "trainer/train_distillation.py", "ppo_actor": "trainer/train_ppo.py",
               "grpo": "trainer/train_grpo.py", "spo": "trainer/train_spo.py"}


def weight_path(save_dir, name: str, cfg, suffix: str = ".pth") -> Path:
    """The one place file names are built: `{save_dir}/{name}_{hidden}[_moe]{suffix}`."""
    moe = "_moe" if getattr(cfg, "use_moe", False) else ""
    return Path(save_dir) / f"{name}_{cfg.hidden_size}{moe}{suffix}"


def atomic_save(obj, path) -> None:
    """torch.save to a temp file next to `path`, fsync, then os.replace (atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def half_state_dict(model) -> dict:
    """The original's weight format: every tensor fp16 on the CPU (both tied keys present)."""
    return {k: v.detach().half().cpu() for k, v in model.state_dict().items()}


def save_weights(model, path, lm_config=None) -> Path:
    atomic_save(half_state_dict(model), path)
    if lm_config is not None:
        atomic_save(json.dumps(lm_config.to_dict(), indent=2, ensure_ascii=False), Path(path).with_suffix(".json"))
    return Path(path)


def load_weights(model, path, strict: bool = True) -> None:
    """Load a weight file into `model`; a missing, unreadable or mismatched file is one clear error."""
    path = Path(path)
    if not path.exists():
        prefix = path.stem.rsplit("_", 2 if path.stem.endswith("_moe") else 1)[0]
        stage = PRODUCED_BY.get(prefix)
        hint = f" It is written by {stage}; run that stage first" if stage else ""
        for other in sorted(path.parent.glob(f"{prefix}_*.json")):   # the same stage saved at another size
            try:
                c = json.loads(other.read_text(encoding="utf-8"))
                size = f"--hidden_size {c['hidden_size']} --num_hidden_layers {c['num_hidden_layers']}"
            except (OSError, ValueError, KeyError):
                continue
            hint += f". {other.with_suffix('.pth').name} exists: add {size}" + (" --use_moe 1" if c.get("use_moe") else "")
        raise FileNotFoundError(f"weight file {path} not found.{hint} (or point --from_weight/--from_dir elsewhere)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable weight file ({err.__class__.__name__}: {err})") from None
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    if strict:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                             f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''} "
                             "(check --hidden_size, --num_hidden_layers and --use_moe)")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                             "(check --hidden_size, --num_hidden_layers and --use_moe)")
    model.load_state_dict(state, strict=strict)


def lm_checkpoint(lm_config, weight: str = "full_sft", model=None, optimizer=None, epoch: int = 0, step: int = 0,
                  wandb=None, save_dir="checkpoints", **kwargs):
    """Save mode (model given): write the resume file. Load mode: return the resume dict or None.

    Unlike the original, the resume file keeps the model in fp32 (resuming from an fp16 copy would
    change the master weights) and no third copy of the weights is written. On load, a different
    number of processes converts the step as the original does: step * saved_ws // current_ws."""
    resume_path = weight_path(save_dir, weight, lm_config, suffix="_resume.pth")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if model is not None:
        state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "epoch": epoch, "step": step, "world_size": world,
                 "wandb_id": getattr(wandb, "id", None)}
        for key, value in kwargs.items():
            if value is not None:
                state[key] = value.state_dict() if hasattr(value, "state_dict") else value
        atomic_save(state, resume_path)
        return resume_path
    if not resume_path.exists():
        return None
    ckp = torch.load(resume_path, map_location="cpu", weights_only=False)
    saved_ws = ckp.get("world_size", 1)
    if saved_ws != world:
        ckp["step"] = ckp["step"] * saved_ws // world
        print(f"number of processes changed ({saved_ws} -> {world}): step converted to {ckp['step']}", flush=True)
    return ckp
