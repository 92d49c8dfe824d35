"""Resume files, in the original's name and format, written atomically (model/weights.py's atomic_save).

    checkpoints/{name}_{hidden}[_moe]_resume.pth   model (fp32), optimizer, scaler, epoch, step,
                                               world_size, wandb_id, rng, model_family (+ whatever a stage adds)

The weight files (out/{name}_{hidden}[_moe].pth + .json) are model/weights.py's: serving reads them too.
"""
import torch
import torch.distributed as dist

from model.weights import atomic_save, verify_checkpoint, weight_path


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
                 "wandb_id": getattr(wandb, "id", None),
                 "model_family": getattr(lm_config, "model_family", "minimind2")}
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
