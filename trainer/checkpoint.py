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
    """torch.save (or text/bytes) to a temp file next to `path`, fsync, then os.replace (atomic on POSIX and
    Windows). The temp name carries the writer's pid, so temp files left by a killed writer are removed by
    the next save of the same file. The file gets the usual permissions (0666 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError):   # e.g. a full disk: name the file, not the temp file
            raise OSError(err.errno, f"{err.strerror or err}; the previous file is unchanged", str(path)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temps(path: Path) -> None:
    """Delete `.{name}.{pid}.*.tmp` files next to `path` whose writer process is gone."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False        # our own earlier temp file: that save failed and is over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_file(path) -> None:
    """A file written by torch.save is a zip archive with a CRC32 per record: check them all (about 2 ms per
    MB), so a corrupted or truncated file is one clear error instead of NaNs loaded silently."""
    import zipfile
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path} is truncated or corrupted ({err}); restore it or train again") from None
    if bad is not None:
        raise ValueError(f"{path} is corrupted (CRC mismatch in record {bad}); restore it or train again")


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
    verify_file(path)
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
    verify_file(resume_path)
    try:
        ckp = torch.load(resume_path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{resume_path}: not a readable resume file ({err.__class__.__name__}: {err}); delete it "
                         "to start over, or restore it") from None
    if not isinstance(ckp, dict) or not {"model", "epoch", "step"} <= set(ckp):
        raise ValueError(f"{resume_path}: not a resume file of this trainer (no model/epoch/step)")
    saved_ws = ckp.get("world_size", 1)
    if saved_ws != world:
        ckp["step"] = ckp["step"] * saved_ws // world
        print(f"number of processes changed ({saved_ws} -> {world}): step converted to {ckp['step']}", flush=True)
    return ckp
