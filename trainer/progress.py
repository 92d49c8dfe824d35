"""Progress lines, metrics files and experiment tracking for every stage (logging on rank 0 only).

    Epoch:[1/2](300/1200) loss:2.3451 lr:0.00050000 tok/s:12,345 eta:3.2min     # one line per --log_interval
    out/{stage}_{hidden}[_moe]_metrics.jsonl                                     # the same numbers, for plots
--use_wandb logs to swanlab (default, local mode) or wandb (--tracker wandb, offline); a missing package or
no network is one warning and a no-op tracker.
"""
import json
import time
from pathlib import Path

import torch.distributed as dist

from trainer.checkpoint import weight_path
from trainer.tracking import init_tracker  # noqa: F401  (re-exported; the trackers live there)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def Logger(content) -> None:
    if is_main_process():
        print(content, flush=True)


class Progress:
    """One line per log interval: `Epoch:[1/2](300/1200) loss:2.3451 lr:0.00050000 tok/s:12,345 eta:3.2min`,
    the same numbers appended as JSON to `{save_dir}/{weight}_metrics.jsonl`."""

    def __init__(self, args, lm_config, epoch: int, iters: int, start_step: int, tracker):
        self.args, self.epoch, self.iters, self.tracker = args, epoch, iters, tracker
        run_steps = args.epochs * iters
        if getattr(args, "max_steps", 0):      # --max_steps ends the run early: the total and ETA say so
            run_steps = min(run_steps, args.max_steps)
        self.last = min(iters, run_steps - epoch * iters)          # this epoch's last step
        self.later = run_steps - epoch * iters - self.last           # steps in the epochs after this one
        self.t0, self.start_step, self.tokens = time.time(), start_step, 0
        self.window_t, self.window_tokens = time.time(), 0
        name = weight_path(args.save_dir, args.save_weight, lm_config).stem
        self.metrics_path = Path(args.save_dir) / f"{name}_metrics.jsonl"
        if epoch == 0 and start_step == 0 and not args.from_resume and is_main_process():
            self.metrics_path.unlink(missing_ok=True)      # a fresh run starts a fresh file; a resumed one appends

    def add_tokens(self, n: int):
        self.tokens += n
        self.window_tokens += n

    def log(self, step: int, loss: float, lr: float, **extra):
        now = time.time()
        tok_s = self.window_tokens / max(now - self.window_t, 1e-9)
        done = step - self.start_step
        eta_min = (now - self.t0) / max(done, 1) * (self.last - step + self.later) / 60
        self.window_t, self.window_tokens = now, 0
        extras = "".join(f" {k}:{v:.4f}" for k, v in extra.items())
        Logger(f"Epoch:[{self.epoch + 1}/{self.args.epochs}]({step}/{self.last}) loss:{loss:.4f}{extras} "
               f"lr:{lr:.8f} tok/s:{tok_s:,.0f} eta:{eta_min:.1f}min")
        record = {"epoch": self.epoch + 1, "step": step, "iters": self.iters, "loss": loss, "lr": lr,
                  "tok_s": tok_s, "tokens": self.tokens, "time": now, **extra}
        self.tracker.log({"loss": loss, "lr": lr, "tok_s": tok_s, **extra}, step=self.epoch * self.iters + step)
        if is_main_process():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
