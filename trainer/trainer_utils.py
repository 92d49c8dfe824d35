"""Plumbing shared by every training stage, written once: flags, device/precision/DDP set-up,
model loading, resume, the supervised training loop. Checkpoint files (weights, resume state) live in
trainer/checkpoint.py, the batch order in trainer/data_order.py, progress lines and tracking in
trainer/progress.py (their names are re-exported here).

A stage script (train_pretrain.py, train_full_sft.py, ...) shows only what differs: its defaults,
its data, what it trains and its loss. See ../shared/STYLE.md section 3.
"""
import argparse
import atexit
import math
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "dataset"
OUT = ROOT / "out"
CKPT = ROOT / "checkpoints"
TOKENIZER_DIR = ROOT / "model"

from trainer.checkpoint import (atomic_save, lm_checkpoint, load_weights, save_weights,  # noqa: E402
                                weight_path)
from trainer.data_order import SkipBatchSampler, epoch_loader  # noqa: E402
from trainer.progress import Logger, Progress, init_tracker, is_main_process  # noqa: E402

__all__ = ["ROOT", "DATA", "OUT", "CKPT", "to_argv", "build_parser", "init_run", "init_config", "init_model", "init_tracker",
           "restore", "wrap_ddp", "unwrap", "epoch_loader", "train_epoch", "masked_cross_entropy", "lm_loss", "Logger",
           "is_main_process", "get_lr", "weight_path", "save_weights", "lm_checkpoint", "atomic_save",
           "load_weights", "resolve_data", "data_kwargs", "cli", "SkipBatchSampler", "train", "init_stage", "fit"]


# ---- small helpers ----
def cli(main) -> None:
    """Run a stage's main(): a bad flag, path or data line (FileNotFoundError/ValueError, whose messages name
    the file, line or flag) ends with that one message and exit code 2, not a traceback.
    MINIMIND_DEBUG=1 shows the traceback."""
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        if os.environ.get("MINIMIND_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def get_lr(current_step: int, total_steps: int, lr: float) -> float:
    """The original's schedule: cosine from lr (step 0) down to lr/10 (last step), no warmup."""
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * current_step / total_steps)))


def setup_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def lm_loss(model, batch):
    """Cross-entropy on supervised tokens (every real token in pretraining, assistant tokens in SFT),
    plus the MoE load-balancing loss. The loss of pretrain, full SFT and LoRA."""
    X, Y, loss_mask = batch
    out = model(X)
    return masked_cross_entropy(out.logits, Y, loss_mask) + out.aux_loss


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean of the cross-entropy over supervised positions (loss_mask > 0).

    Only the supervised rows are gathered before the (fp32) log-softmax, so padding and prompt
    positions cost nothing; an all-zero mask gives 0 instead of a division by zero."""
    mask = loss_mask.reshape(-1) > 0
    rows = logits.reshape(-1, logits.shape[-1])[mask]
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(rows.float(), targets.reshape(-1)[mask])


# ---- flags ----
class _Explicit(argparse.Action):
    """Store the value and remember that the user typed the flag (used for --dtype on CPU)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_explicit", True)


def to_argv(flags: dict) -> list[str]:
    """{"epochs": 2, ...} -> ["--epochs", "2", ...]: how benches and tests call a stage's main(argv)."""
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def build_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """Every common flag of the original, with this stage's defaults (keyword arguments)."""
    d = dict(save_dir=OUT, save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, num_workers=1,
             accumulation_steps=8, grad_clip=1.0, log_interval=100, save_interval=100, hidden_size=512,
             num_hidden_layers=8, max_seq_len=512, use_moe=0, data_path=DATA / "pretrain_hq.jsonl",
             from_weight="none", wandb_project="MiniMind-Pretrain", demo_data="pretrain.jsonl")
    unknown = set(defaults) - set(d) - {"from_dir"}
    if unknown:
        raise TypeError(f"build_parser: unknown stage defaults {sorted(unknown)}")
    d.update(defaults)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--save_dir", type=str, default=str(d["save_dir"]), help="where weights are written")
    p.add_argument("--save_weight", type=str, default=d["save_weight"], help="prefix of the saved weight file")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch_size", type=int, default=d["batch_size"], help="samples per micro-batch and process")
    p.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="peak LR (cosine to LR/10)")
    p.add_argument("--device", type=str, default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=str, default="bfloat16", action=_Explicit,
                   help="autocast dtype: bfloat16 or float16 (GradScaler) on CUDA; on CPU fp32 unless typed")
    p.add_argument("--num_workers", type=int, default=d["num_workers"], help="DataLoader worker processes")
    p.add_argument("--accumulation_steps", type=int, default=d["accumulation_steps"],
                   help="micro-batches per optimizer step")
    p.add_argument("--grad_clip", type=float, default=d["grad_clip"], help="max gradient norm (0 = no clipping)")
    p.add_argument("--log_interval", type=int, default=d["log_interval"], help="micro-batches between log lines")
    p.add_argument("--save_interval", type=int, default=d["save_interval"], help="micro-batches between saves")
    p.add_argument("--hidden_size", type=int, default=d["hidden_size"])
    p.add_argument("--num_hidden_layers", type=int, default=d["num_hidden_layers"])
    p.add_argument("--max_seq_len", type=int, default=d["max_seq_len"], help="tokens per sample (truncation)")
    p.add_argument("--use_moe", type=int, default=d["use_moe"], choices=[0, 1])
    p.add_argument("--data_path", type=str, default=str(d["data_path"]), action=_Explicit,
                   help="training jsonl; when the default file is absent the demo corpus is used")
    p.add_argument("--from_weight", type=str, default=d["from_weight"], help="weight prefix to start from, none = random")
    p.add_argument("--from_resume", type=int, default=0, choices=[0, 1], help="1 = continue from the resume file")
    p.add_argument("--use_wandb", action="store_true", help="log to swanlab (or wandb, see --tracker)")
    p.add_argument("--wandb_project", type=str, default=d["wandb_project"])
    # added flags; their defaults keep the original's behaviour
    p.add_argument("--tracker", type=str, default="swanlab", choices=["swanlab", "wandb"],
                   help="experiment tracker used by --use_wandb (the original imports swanlab)")
    p.add_argument("--tokenizer_path", type=str, default=str(TOKENIZER_DIR), help="tokenizer directory")
    p.add_argument("--checkpoint_dir", type=str, default=str(CKPT), help="where resume files are written")
    p.add_argument("--from_dir", type=str, default=str(d.get("from_dir") or ""),
                   help="where --from_weight is read (default: --save_dir)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many micro-batches (0 = all)")
    p.add_argument("--pad_to_max", type=int, default=0, choices=[0, 1],
                   help="1 = pad every sample to max_seq_len like the original (0 = pad to the batch's longest)")
    p.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1 = check every line first and drop (and count) the bad ones; 0 = stop at the first, "
                        "naming its file and line")
    p.add_argument("--group_by_length", type=int, default=0, choices=[0, 1],
                   help="1 = batch samples of similar length together (less padding, faster)")
    p.add_argument("--seed", type=int, default=42, help="base seed (each rank uses seed + rank)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    p.set_defaults(demo_data=d["demo_data"], dtype_explicit=False, data_path_explicit=False)
    return p


def resolve_data(args) -> str:
    """The stage's data file. When the user did not name one and the default (the original's file
    name under dataset/) is absent, fall back to the built-in demo corpus, generating it if needed."""
    path = Path(args.data_path)
    if args.data_path_explicit or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"--data_path {path} does not exist")
        return str(path)
    demo = DATA / "demo" / args.demo_data
    if not demo.exists():
        if is_main_process():
            from dataset.demo_data import write_demo_data
            write_demo_data(demo.parent)
        if dist.is_initialized():
            dist.barrier()
    Logger(f"{path} not found: using the built-in demo corpus {demo} "
           f"(put the real MiniMind data at {path} to train on it)")
    return str(demo)


# ---- run context: distributed, device, precision ----
@dataclass
class RunContext:
    device: str
    device_type: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False
    autocast_ctx: object = None
    scaler: object = None
    dtype: torch.dtype = torch.float32


def init_distributed_mode() -> tuple:
    """(rank, local_rank, world_size) from the torchrun/deepspeed environment; (0, 0, 1) when not launched so."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    atexit.register(_shutdown_distributed)
    return rank, local_rank, world


def _shutdown_distributed():
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def init_run(args) -> RunContext:
    """1. distributed + seed + device, 3. autocast context and GradScaler."""
    rank, local_rank, world = init_distributed_mode()
    if world > 1 and torch.cuda.is_available():
        args.device = f"cuda:{local_rank}"
    elif world > 1:
        args.device = "cpu"
    setup_seed(args.seed + rank)
    device_type = "cuda" if "cuda" in args.device else ("mps" if "mps" in args.device else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(args.dtype)
    if dtype is None:
        raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {args.dtype!r}")
    if device_type != "cuda" and not args.dtype_explicit:
        dtype = torch.float32  # CPU and MPS train in fp32 unless a dtype is asked for
    if device_type == "cpu" and dtype == torch.float16:
        raise ValueError("--dtype float16 needs a GPU; use bfloat16 or float32 on CPU")
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16 and device_type == "cuda"))
    return RunContext(args.device, device_type, rank, local_rank, world, world > 1, autocast, scaler, dtype)


def init_config(args, **extra):
    """2. the model config from the flags, plus the resume state (None unless --from_resume 1)."""
    from model.model_minimind import MiniMindConfig
    lm_config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                               use_moe=bool(args.use_moe), **extra)
    os.makedirs(args.save_dir, exist_ok=True)
    ckp = lm_checkpoint(lm_config, args.save_weight, save_dir=args.checkpoint_dir) if args.from_resume else None
    return lm_config, ckp


def init_model(lm_config, from_weight: str = "pretrain", tokenizer_path=TOKENIZER_DIR, save_dir=OUT,
               device: str = "cpu"):
    """Build MiniMind, load `{save_dir}/{from_weight}_{hidden}[_moe].pth` ('none' = random init),
    and load the tokenizer. Loading is strict: a missing or mismatched weight is an error naming the file."""
    from transformers import AutoTokenizer
    from model.model_minimind import MiniMindForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    model = MiniMindForCausalLM(lm_config)
    if from_weight != "none":
        load_weights(model, weight_path(save_dir, from_weight, lm_config))
    total, active = unwrap(model).count_parameters()
    Logger(f"Model params: {total / 1e6:.3f}M" + (f" (active {active / 1e6:.3f}M)" if active != total else ""))
    return model.to(device), tokenizer


# ---- model wrapping and resume ----
def unwrap(model):
    """The raw module behind DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def wrap_ddp(model, run: RunContext):
    """7. DistributedDataParallel when launched with several processes (RoPE tables are not synced)."""
    if not run.ddp:
        return model
    from torch.nn.parallel import DistributedDataParallel
    model._ddp_params_and_buffers_to_ignore = {name for name, _ in model.named_buffers()}
    device_ids = [run.local_rank] if run.device_type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@dataclass
class Start:
    epoch: int = 0
    step: int = 0
    wandb_id: str = None


def restore(ckp, model, optimizer, scaler=None, **extra) -> Start:
    """6. load model/optimizer/scaler (and any extra state_dict holders) from a resume dict."""
    if ckp is None:
        return Start()
    model.load_state_dict(ckp["model"])
    optimizer.load_state_dict(ckp["optimizer"])
    if scaler is not None and ckp.get("scaler") is not None:
        scaler.load_state_dict(ckp["scaler"])
    for key, holder in extra.items():
        if ckp.get(key) is not None:
            holder.load_state_dict(ckp[key])
    if ckp.get("rng") is not None:
        _set_rng_state(ckp["rng"])
    Logger(f"resuming from epoch {ckp['epoch'] + 1}, step {ckp['step']}")
    return Start(ckp["epoch"], ckp["step"], ckp.get("wandb_id"))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the shared supervised loop ----
def train_epoch(run: RunContext, args, model, optimizer, loader, iters: int, loss_fn, tracker, lm_config,
                epoch: int, start_step: int = 0, params=None, save_fn=None, wandb_id=None):
    """8. one epoch of the supervised loop shared by pretrain, SFT, LoRA, DPO, distillation and reasoning.

    loss_fn(model, batch) -> loss tensor, or (loss, {name: float}) to log extra numbers.
    Steps count micro-batches (1-based, as the original); the optimizer steps every
    `accumulation_steps` micro-batches and once more at the end of the epoch for a partial window.
    Saves happen on optimizer-step boundaries, so a resume never loses accumulated gradients.
    Returns the last logged loss."""
    params = list(params if params is not None else unwrap(model).parameters())
    accum = args.accumulation_steps
    progress = Progress(args, lm_config, epoch, iters, start_step, tracker)
    window, pending_save, last_loss, extra = [], False, float("nan"), {}
    step = start_step
    for step, batch in enumerate(loader, start=start_step + 1):
        batch = [b.to(run.device, non_blocking=True) for b in batch] if isinstance(batch, (list, tuple)) else \
            {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        lr = get_lr(epoch * iters + step, args.epochs * iters, args.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with run.autocast_ctx:
            out = loss_fn(model, batch)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        run.scaler.scale(loss / accum).backward()
        window.append(loss.detach())
        progress.add_tokens(_count_tokens(batch))
        last_step = step == iters or bool(args.max_steps and _global_step(epoch, iters, step) >= args.max_steps)
        pending_save |= step % args.save_interval == 0 or last_step
        if step % accum == 0 or last_step:
            if step % accum:  # partial window at the epoch end: rescale to a mean over what was accumulated
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(accum / (step % accum))
            _optimizer_step(run, optimizer, params, args.grad_clip)
            last_loss = torch.stack(window).float().mean().item()
            window = []
            if step % args.log_interval < accum or last_step:
                progress.log(step, last_loss, lr, **extra)
            if pending_save:
                _save(run, args, model, optimizer, lm_config, epoch, step, save_fn, tracker)
                pending_save = False
        if last_step:
            break
    return last_loss


def _global_step(epoch, iters, step):
    return epoch * iters + step


def _count_tokens(batch) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch.get("x_chosen", next(iter(batch.values())))
    return int((x != 0).sum()) if torch.is_tensor(x) else 0


def _optimizer_step(run, optimizer, params, grad_clip):
    run.scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _save(run, args, model, optimizer, lm_config, epoch, step, save_fn, tracker):
    if is_main_process():
        raw = unwrap(model)
        was_training = raw.training
        raw.eval()
        if save_fn is not None:
            save_fn(raw)
        else:
            save_weights(raw, weight_path(args.save_dir, args.save_weight, lm_config), lm_config)
        lm_checkpoint(lm_config, args.save_weight, model=raw, optimizer=optimizer, epoch=epoch, step=step,
                      wandb=tracker, save_dir=args.checkpoint_dir, scaler=run.scaler, rng=_rng_state())
        raw.train(was_training)
    if dist.is_initialized():
        dist.barrier()


def data_kwargs(args) -> dict:
    """Dataset options every stage takes from its flags."""
    return dict(max_length=args.max_seq_len, pad_to_max=bool(args.pad_to_max), skip_bad_lines=bool(args.skip_bad_lines))


def init_stage(args, run_name: str = None, from_dir=None):
    """Steps 1-5 shared by the supervised stages: (run, lm_config, ckp, tracker, model, tokenizer).
    1. distributed + seed + device  2. config + resume data  3. autocast/scaler  4. tracker
    5. the model loaded from `{from_dir or --from_dir or --save_dir}/{--from_weight}_...pth` and the tokenizer."""
    run = init_run(args)
    lm_config, ckp = init_config(args)
    tracker = init_tracker(args, ckp, run_name)
    model, tokenizer = init_model(lm_config, args.from_weight, args.tokenizer_path,
                                  from_dir or args.from_dir or args.save_dir, run.device)
    return run, lm_config, ckp, tracker, model, tokenizer


def fit(run: RunContext, args, model, optimizer, dataset, loss_fn, tracker, lm_config, ckp, params=None,
        save_fn=None, collate_fn=None):
    """Steps 6-8 shared by the supervised stages: resume, DDP wrap, train.
    Returns (path of the saved weight, last logged loss)."""
    start = restore(ckp, model, optimizer, run.scaler)
    model = wrap_ddp(model, run)
    return train(run, args, model, optimizer, dataset, loss_fn, tracker, lm_config, start, params, save_fn,
                 collate_fn)


def train(run: RunContext, args, model, optimizer, dataset, loss_fn, tracker, lm_config, start: Start,
          params=None, save_fn=None, collate_fn=None):
    """8. the epoch loop around train_epoch; stops early after --max_steps micro-batches.
    Returns (path of the saved weight, last logged loss)."""
    last_loss = float("nan")
    for epoch in range(start.epoch, args.epochs):
        loader, iters = epoch_loader(dataset, args, epoch, start, run, collate_fn)
        if args.max_steps and epoch * iters >= args.max_steps:
            break
        last_loss = train_epoch(run, args, model, optimizer, loader, iters, loss_fn, tracker, lm_config, epoch,
                                start.step if epoch == start.epoch else 0, params, save_fn)
    tracker.finish()
    return weight_path(args.save_dir, args.save_weight, lm_config), last_loss
