"""Two-rank FSDP2 check driver for tests/test_fsdp.py: trains a tiny MiniMind with trainer/core/fsdp.py.

    torchrun --nproc_per_node 2 tests/fsdp_driver.py OUT_DIR     # CPU, gloo, a few seconds

Each rank trains on its half of every global micro-batch (accumulation over ACCUM micro-batches,
gradient clipping, AdamW), in three ways that must agree:
  A. uninterrupted: optimizer built on the unsharded model and re-pointed by wrap_fsdp; the full
     model and optimizer state gathered at micro-batch CUT and saved as a resume file;
  B. resumed from that file: optimizer built after wrapping, load_full_state, micro-batches CUT..;
  C. resumed the way a plain run restores (load_state_dict before wrapping), then wrapped;
then the MoE variant (A only), and one bf16 step.
Rank 0 writes OUT_DIR/result.pt: losses, gradient norms, final fp32 states, the fp16 weight file
(OUT_DIR/fsdp_64.pth, saved as the loop saves it), the wrapped model's logits on a probe input, the MoE
run's losses and weights, and a bf16 (MixedPrecisionPolicy + autocast) step's loss.
train_micro_batches() is also the single-process reference the test compares with.
"""
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.distributed as dist

from trainer.core.fsdp import (clip_grad_norm, full_model_state, full_optimizer_state, load_full_state, no_sync,
                          wrap_fsdp)

STEPS, ACCUM, CUT, CLIP, LR = 8, 2, 4, 0.5, 1e-2   # 8 micro-batches = 4 optimizer steps; resume after 2
GLOBAL_BATCH, SEQ = 4, 16


def tiny_model(seed: int, use_moe: bool = False):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, use_moe=use_moe))


def global_batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ + 1) random tokens: fixed length, so every row has the same number of
    supervised tokens and the mean over ranks' halves equals the mean over the global batch."""
    return torch.randint(3, 6400, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def train_micro_batches(model, optimizer, batches, start: int, end: int, rank: int = 0, world: int = 1,
                        autocast=nullcontext()):
    """Micro-batches start..end-1 (this rank's rows), optimizer step every ACCUM. Returns the global
    mean loss of each micro-batch and the gradient norm before clipping of each optimizer step."""
    from trainer.core.stage import masked_cross_entropy
    losses, norms = [], []
    rows = GLOBAL_BATCH // world
    for i in range(start, end):
        tokens = batches[i, rank * rows:(rank + 1) * rows]
        x, y = tokens[:, :-1], tokens[:, 1:]
        last = (i + 1) % ACCUM == 0
        no_sync(model, skip=not last)
        with autocast:
            loss = masked_cross_entropy(model(x).logits, y, torch.ones_like(y))
        (loss / ACCUM).backward()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
        if last:
            norms.append(clip_grad_norm(model.parameters(), CLIP))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses, norms


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR)


def main(out_dir: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    run = SimpleNamespace(world_size=world, device_type="cpu", dtype=torch.float32)
    batches = global_batches()
    probe = batches[0, :2, :-1]
    resume_file = out_dir / "fsdp_resume.pth"

    model = tiny_model(seed=0)
    optimizer = adamw(model)
    model = wrap_fsdp(model, run, optimizer)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    shard_rows = model.lm_head.weight.to_local().shape[0]
    losses, norms = train_micro_batches(model, optimizer, batches, 0, CUT, rank, world)
    model_state, optim_state = full_model_state(model), full_optimizer_state(model, optimizer)
    if rank == 0:
        torch.save({"model": model_state, "optimizer": optim_state, "step": CUT}, resume_file)
    dist.barrier()
    more_losses, more_norms = train_micro_batches(model, optimizer, batches, CUT, STEPS, rank, world)
    final = full_model_state(model)
    final_optim = full_optimizer_state(model, optimizer)
    with torch.no_grad():
        logits = model(probe).logits
    if rank == 0:
        torch.save({k: v.half() for k, v in final.items()}, out_dir / "fsdp_64.pth")

    ckp = torch.load(resume_file, weights_only=False)   # read afresh for each resume: loading aliases its tensors
    model_b = wrap_fsdp(tiny_model(seed=1), run)
    optimizer_b = adamw(model_b)
    load_full_state(model_b, optimizer_b, ckp["model"], ckp["optimizer"])
    losses_b, _ = train_micro_batches(model_b, optimizer_b, batches, CUT, STEPS, rank, world)
    final_b = full_model_state(model_b)

    ckp = torch.load(resume_file, weights_only=False)
    model_c = tiny_model(seed=2)
    model_c.load_state_dict(ckp["model"])
    optimizer_c = adamw(model_c)
    optimizer_c.load_state_dict(ckp["optimizer"])
    model_c = wrap_fsdp(model_c, run, optimizer_c)
    losses_c, _ = train_micro_batches(model_c, optimizer_c, batches, CUT, STEPS, rank, world)
    final_c = full_model_state(model_c)

    bf16_run = SimpleNamespace(world_size=world, device_type="cpu", dtype=torch.bfloat16)
    model_d = tiny_model(seed=0)
    optimizer_d = adamw(model_d)
    model_d = wrap_fsdp(model_d, bf16_run, optimizer_d)
    bf16_losses, _ = train_micro_batches(model_d, optimizer_d, batches, 0, ACCUM, rank, world,
                                         autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    model_e = tiny_model(seed=0, use_moe=True)
    optimizer_e = adamw(model_e)
    model_e = wrap_fsdp(model_e, run, optimizer_e)
    moe_losses, _ = train_micro_batches(model_e, optimizer_e, batches, 0, STEPS, rank, world)
    moe_final = full_model_state(model_e)
    if rank == 0:
        torch.save({"world": world, "moe_losses": moe_losses, "moe_final": moe_final, "tied": tied,
                    "losses": losses + more_losses, "norms": norms + more_norms,
                    "final": final, "final_optimizer": final_optim, "logits": logits.detach(), "probe": probe,
                    "losses_b": losses_b, "final_b": final_b, "losses_c": losses_c, "final_c": final_c,
                    "bf16_losses": bf16_losses, "shard_rows": shard_rows},
                   out_dir / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
