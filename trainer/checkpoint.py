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

from model.loading import verify_checkpoint, weight_path


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


def half_state_dict(model) -> dict:
    """The original's weight format: every tensor fp16 on the CPU (both tied keys present). `model` may also
    be a full state dict already (what FSDP gathers on rank 0)."""
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().half().cpu() for k, v in state.items()}


def save_weights(model, path, lm_config=None) -> Path:
    atomic_save(half_state_dict(model), path)
    if lm_config is not None:
        atomic_save(json.dumps(lm_config.to_dict(), indent=2, ensure_ascii=False), Path(path).with_suffix(".json"))
    return Path(path)


def lm_checkpoint(lm_config, weight: str = "full_sft", model=None, optimizer=None, epoch: int = 0, step: int = 0,
                  wandb=None, save_dir="checkpoints", **kwargs):
    """Save mode (model given): write the resume file. Load mode: return the resume dict or None.

    Unlike the original, the resume file keeps the model in fp32 (resuming from an fp16 copy would
    change the master weights) and no third copy of the weights is written. On load, a different
    number of processes converts the step as the original does: step * saved_ws // current_ws.
    `model` and `optimizer` may also be full state dicts already (what FSDP gathers on rank 0)."""
    resume_path = weight_path(save_dir, weight, lm_config, suffix="_resume.pth")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if model is not None:
        model_state = model if isinstance(model, dict) else model.state_dict()
        state = {"model": {k: v.detach().cpu() for k, v in model_state.items()},
                 "optimizer": optimizer if isinstance(optimizer, dict) or optimizer is None else optimizer.state_dict(),
                 "epoch": epoch, "step": step, "world_size": world,
                 "wandb_id": getattr(wandb, "id", None)}
        for key, value in kwargs.items():
            if value is not None:
                state[key] = value.state_dict() if hasattr(value, "state_dict") else value
        atomic_save(state, resume_path)
        return resume_path
    if not resume_path.exists():
        return None
    verify_checkpoint(resume_path)
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
