"""The one training loop. Every stage (pretrain, full SFT, LoRA, DPO, distillation, reasoning, PPO, GRPO,
SPO) ends its main() with one call to train_loop. A supervised stage passes a step function written in its
own script:

    loss, stats = step_fn(batch)      # stats: floats to log, plus "tokens" (useful tokens of the batch)
                                      # and, optionally, "positions" (all positions, padding included)

an RL stage (PPO, GRPO, SPO) passes a rollout and an update, and the loop runs, for every batch of prompts:

    rollout = rollout_fn(batch)                    # no gradients: sampling, rewards, advantages, reference log-probs
    for k in range(updates):                       # K policy updates of the same rollout (GRPO --num_iterations)
        loss, stats = update_fn(rollout, k)        # backward, then the guarded optimizer step below
        on_update(k)                               # after every applied step (PPO refreshes its old actor)

so no stage ever steps an optimizer itself. With K > 1 (--accumulation_steps 1) every update is its own
optimizer step, and the schedulers (whose length counts optimizer steps of one update) step once per
rollout, so the lr stays constant over its updates.

train_loop owns everything else, once:
  * the batches of every epoch (--batch_size samples each, seeded, split across ranks, laid out by the
    stage's collate: batch_plan.py) and, on resume, skipping exactly the micro-batches already done;
  * the learning rate: the original's cosine (get_lr) per micro-batch, or the stage's schedulers (the RL
    stages), stepped after every optimizer step, or after a rollout's K updates if any was applied;
  * gradient accumulation: an optimizer step every --accumulation_steps micro-batches and at the end of an
    epoch. The step's loss is the token mean over its whole window: each supervised micro-batch's mean loss
    is weighted by its share of the window's supervised tokens (counted by the collate, on the host); other
    batches (DPO, RL) by 1 / the window's micro-batches. DDP all-reduces only at the window's last micro-batch;
  * one optimizer step for every optimizer: GradScaler (CUDA fp16), the gradient norm, clipping to
    --grad_clip, and a guard: a non-finite gradient (or loss) skips the step with a warning, and
    MAX_NONFINITE skips in a row stop training with one clear line; non-finite weights are never saved.
    On CUDA with fused AdamW the guard needs no host sync: the fused kernel skips a non-finite step itself
    and its flag is read one step later (defers_finite_check); a due save still waits for it;
  * autocast: one region for a rollout and one for each update (autocast caches the low-precision copy of
    a weight until its region ends: an update must not see the weights of before the previous step);
  * saving on optimizer-step boundaries (--save_interval, the last step, Ctrl-C): the fp16 weights to
    --save_dir, the resume file to --checkpoint_dir. A boundary's state is written at the next optimizer
    step, once that step's gradients show its weights are sound (finite), before the update: a step that
    blows the weights up never replaces good files (the last step is saved at once);
  * --max_steps, and the progress line: step, loss, lr, useful tokens/s, padding share, MFU, ETA of the run.

Steps count micro-batches (an RL stage's: batches of prompts, each one rollout), 1-based within an epoch,
as in the original; `global step` = epoch * iters + step. Resuming, --max_steps, logging and saving go by them.
"""
import copy
import shlex
import signal
import sys
import time
from contextlib import closing
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.cli import CLIError
from model.weights import save_weights, weight_path
from trainer.core.resume import lm_checkpoint
from trainer.core.batch_plan import BatchPlan
from trainer.core.fsdp import full_model_state, full_optimizer_state, is_fsdp, no_sync
from trainer.core.progress import Logger, Progress, is_main_process

MAX_NONFINITE = 5   # optimizer steps in a row with a non-finite gradient before training stops


class TrainingError(CLIError, RuntimeError):
    """Training cannot go on (e.g. it diverged); the message is one line for the user. cli() exits with 1 (the
    run failed), not the 2 of bad input."""
    exit_code = 1


@dataclass
class ResumePoint:
    """Where a run continues: `step` micro-batches of `epoch` (0-based) are already done."""
    epoch: int = 0
    step: int = 0


def get_lr(current_step: int, total_steps: int, lr: float) -> float:
    """The original's schedule: cosine from lr (step 0) down to lr/10 (last step), no warmup."""
    import math
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * current_step / total_steps)))


def clip_and_check(run, optimizers, grad_clip: float) -> bool:
    """First half of an optimizer step: unscale, clip to grad_clip (0 = no clipping). Returns whether every
    gradient (and so the loss) is finite: the one host sync of an optimizer step."""
    finite = clip_on_device(run, optimizers, grad_clip)
    return bool(finite) if finite is not None else True


def clip_on_device(run, optimizers, grad_clip: float):
    """clip_and_check without the host sync: whether every gradient is finite, as a 0-dim bool tensor on the
    device (None when no optimizer holds a gradient)."""
    norms = []
    for opt in optimizers:
        run.scaler.unscale_(opt)
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])   # FSDP: reduced over the shards (a DTensor)
        if grad_clip > 0:         # takes the parameters and scales their .grad (given the grads, it clipped nothing)
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return torch.stack(norms).isfinite().all() if norms else None


def apply_step(run, optimizers, finite: bool) -> None:
    """Second half: step every optimizer when the gradients are finite (with a CUDA fp16 GradScaler the
    scaler skips a non-finite step and lowers its scale, as usual), then zero the gradients."""
    if finite or run.scaler.is_enabled():
        for opt in optimizers:
            run.scaler.step(opt)
    run.scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def defers_finite_check(run, optimizers, schedulers, updates: int, on_update) -> bool:
    """Whether an optimizer step may be taken without waiting for the device (CUDA, every optimizer a fused
    AdamW, no GradScaler, no scheduler or update hook that must know at once whether the step applied): the
    fused kernel then skips a non-finite step itself (found_inf), and the loop reads the flag a step later."""
    return (run.device_type == "cuda" and not run.scaler.is_enabled() and schedulers is None and updates == 1
            and on_update is None and all(opt.defaults.get("fused") for opt in optimizers))


def apply_step_on_device(optimizers, finite: torch.Tensor) -> None:
    """apply_step for fused AdamW without a host sync: the kernel leaves weights, moments and step count as
    they were where found_inf is 1 (as it does for a GradScaler), then the gradients are zeroed."""
    found_inf = (~finite).float()
    for opt in optimizers:
        opt.found_inf, opt.grad_scale = found_inf, None
        try:
            opt.step()
        finally:
            del opt.found_inf, opt.grad_scale
        opt.zero_grad(set_to_none=True)


class _PendingChecks:
    """The finite flags of steps taken on the device, copied to the host behind the step (pinned memory and an
    event on CUDA) and read once a later step has been queued, so the host never waits for the device idle."""

    def __init__(self):
        self.items = []

    def push(self, finite: torch.Tensor, epoch: int, step: int, loss: torch.Tensor):
        host = torch.empty((), dtype=torch.bool, pin_memory=finite.is_cuda)
        host.copy_(finite, non_blocking=True)
        event = None
        if finite.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.items.append((host, event, epoch, step, loss.detach().clone()))   # a graph replay may reuse the loss

    def pop(self, keep: int = 0) -> list:
        """(finite, epoch, step, loss) of every pending step but the newest `keep`, oldest first."""
        ready, self.items = self.items[:max(len(self.items) - keep, 0)], self.items[max(len(self.items) - keep, 0):]
        out = []
        for host, event, epoch, step, loss in ready:
            if event is not None:
                event.synchronize()
            out.append((bool(host), epoch, step, loss))
        return out


def train_loop(run, args, model, optimizers, dataset, step_fn=None, *, lm_config, tracker, start: ResumePoint,
               collate_fn=None, schedulers=None, save_fn=None, state=None,
               rollout_fn=None, update_fn=None, updates: int = 1, on_update=None):
    """8. Train `model` (already wrapped for DDP/compile) with `optimizers` on `dataset` until the last epoch or
    --max_steps. `schedulers`: one per optimizer, stepped after each optimizer step (after each rollout, below;
    default: get_lr on every micro-batch with the peak --learning_rate). `save_fn(raw_model)` replaces the default weight save (LoRA saves
    only its adapter); `state` holds what the resume file keeps besides the model, the first optimizer and its
    scheduler (a critic, its optimizer, SPO's tracker...).
    The RL stages pass, instead of step_fn, `rollout_fn(batch) -> rollout` (run without gradients) and
    `update_fn(rollout, k) -> (loss, stats)` for k in range(updates); with updates > 1 (needs
    --accumulation_steps 1) each update is its own guarded optimizer step, and the schedulers step once per
    rollout that applied at least one; stats["skip_step"] = True (the same on every rank) back-propagates the
    update but applies no optimizer step. `on_update(k)` is called after every applied optimizer step.
    Returns (path of the saved weight, loss of the last logged window)."""
    if (step_fn is None) == (update_fn is None):
        raise TypeError("train_loop takes either step_fn or update_fn (with an optional rollout_fn)")
    if step_fn is not None:
        update_fn = lambda batch, k: step_fn(batch)
    if updates < 1:
        raise ValueError(f"updates per rollout must be at least 1, got {updates}")
    if updates > 1 and args.accumulation_steps > 1:
        raise ValueError(f"{updates} optimizer steps per rollout need --accumulation_steps 1")
    raw = unwrap(model)
    out_path = weight_path(args.save_dir, args.save_weight, lm_config)
    plan = BatchPlan(dataset, args, run, collate_fn)
    iters = [plan.num_batches(epoch) for epoch in range(args.epochs)]   # packed epochs differ by a few rows
    offset = [sum(iters[:epoch]) for epoch in range(args.epochs)]
    total = sum(iters)
    end = min(total, args.max_steps) if args.max_steps else total
    done = offset[start.epoch] + start.step if start.epoch < args.epochs else total
    if done >= end:
        Logger(f"nothing to do: this run already reached step {done} of {end} (resume file in {args.checkpoint_dir}); "
               f"the weights are in {out_path}. Raise --epochs or --max_steps to train further.")
        tracker.finish()
        return out_path, float("nan")

    accum = args.accumulation_steps
    compiling = bool(getattr(args, "use_compile", 0))
    cuda_graphs = compiling and getattr(args, "compile_mode", "") in CUDA_GRAPH_MODES and run.device_type == "cuda"
    Logger(plan.describe())
    progress = Progress(args, lm_config, run, tracker, iters, end, done)
    saver = _Saver(run, args, raw, optimizers, schedulers, lm_config, tracker, save_fn, state, out_path)
    nonfinite, last_loss = 0, float("nan")
    deferred = defers_finite_check(run, optimizers, schedulers, updates, on_update)
    pending = _PendingChecks()

    def count(finite: bool, epoch, step, k, loss) -> bool:
        """The bookkeeping of a step's finite flag: reset or count the skips in a row, warn, stop at MAX_NONFINITE."""
        nonlocal nonfinite
        if finite:
            nonfinite = 0
            return True
        nonfinite += 1
        progress.skipped += 1
        where = f"epoch {epoch + 1} step {step}" + (f" update {k + 1}/{updates}" if updates > 1 else "")
        Logger(f"warning: {where}: the loss or a gradient is not finite (loss {loss.item():.4g}); optimizer step "
               f"skipped ({nonfinite} in a row, {progress.skipped} in this run)")
        if nonfinite >= MAX_NONFINITE:
            raise TrainingError(
                f"training diverged: {nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                f"({where}); {saver.last_saved_text()}. Lower --learning_rate or set --grad_clip, then resume "
                "with --from_resume 1")
        return False

    def settle(keep: int = 0):
        for finite, epoch, step, loss in pending.pop(keep):
            count(finite, epoch, step, 0, loss)

    def guarded_step(epoch, step, k, loss) -> bool:
        """One optimizer step of every optimizer, or none when a gradient is not finite (counted). On CUDA with
        fused AdamW (deferred) the step is taken on the device and its flag read at the next step, unless a save
        is due, which waits for the flag: weights are saved only once their gradients proved finite."""
        if deferred and saver.due is None:
            finite_t = clip_on_device(run, optimizers, args.grad_clip)
            if finite_t is None:
                finite_t = torch.ones((), dtype=torch.bool, device=run.device)
            apply_step_on_device(optimizers, finite_t)
            pending.push(finite_t, epoch, step, loss)
            settle(keep=1)
            return True
        settle()
        finite = clip_and_check(run, optimizers, args.grad_clip)
        if finite and saver.due is not None:   # the last step's weights gave finite gradients: save
            saver.save(saver.due)              # them now, before this step changes them
        apply_step(run, optimizers, finite)
        if finite and on_update is not None:
            on_update(k)
        return count(finite, epoch, step, k, loss)

    with closing(plan), _StopOnCtrlC() as ctrl_c:       # closing: the loader's workers end with the run
        for epoch in range(start.epoch, args.epochs):
            skip = start.step if epoch == start.epoch else 0
            rng = torch.get_rng_state()       # creating a DataLoader iterator draws a seed from the global RNG,
            batches = iter(plan.loader(epoch, skip))    # which would shift a resumed run's sampling by one draw
            torch.set_rng_state(rng)
            stop = min(iters[epoch], end - offset[epoch])      # the epoch's last micro-batch in this run
            for window in _windows(batches, skip + 1, accum, stop):
                weights = _token_weights([batch for _, batch in window])
                for (step, batch), weight in zip(window, weights):
                    global_step = offset[epoch] + step
                    last = step == stop
                    boundary = step == window[-1][0]        # always, with several updates per rollout
                    if schedulers is None:
                        lr = get_lr(global_step, total, args.learning_rate)
                        for opt in optimizers:
                            for group in opt.param_groups:
                                group["lr"] = lr
                    lr = optimizers[0].param_groups[0]["lr"]
                    _set_grad_sync(model, boundary)
                    batch = _to_device(batch, run.device)
                    if rollout_fn is not None:
                        with run.autocast_ctx, torch.no_grad():
                            batch = rollout_fn(batch)
                    applied = False
                    for k in range(updates):
                        if cuda_graphs:           # the last step's graph outputs are no longer read
                            torch.compiler.cudagraph_mark_step_begin()
                        graphs, started = compiled_graphs() if compiling else 0, time.time()
                        with run.autocast_ctx:    # one region per update: autocast caches weight casts until it exits
                            loss, stats = update_fn(batch, k)
                        run.scaler.scale(loss * weight).backward()
                        if compiling and compiled_graphs() != graphs:   # this step compiled a new shape: timed apart
                            progress.compiled(time.time() - started, int(stats.get("tokens", 0)),
                                              tuple(batch["input_ids"].shape) if "input_ids" in batch else ())
                        if stats.pop("skip_step", False) and boundary:
                            # an update that must not move the weights (PPO after its early stop): its backward
                            # kept every rank's DDP in step; no optimizer step (AdamW would still move them)
                            for opt in optimizers:
                                opt.zero_grad(set_to_none=True)
                        elif boundary:
                            applied |= guarded_step(epoch, step, k, loss)
                    progress.add(loss.detach(), stats)     # the rollout's last update
                    saver.pending |= step % args.save_interval == 0 or last
                    if boundary:
                        if applied:
                            for sched in schedulers or []:
                                sched.step()
                        saver.mark(ResumePoint(epoch, step))   # a skipped step consumed its batches, kept the weights
                        if saver.pending:         # the last step is saved at once; any other at the next step,
                            if last:              # once its gradients show that these weights are sound
                                settle()
                                saver.save(saver.boundary)
                            else:
                                saver.due, saver.due_snapshot = saver.boundary, saver.snapshot
                            saver.pending = False
                    if step % args.log_interval == 0 or last:
                        last_loss = progress.log(epoch, step, lr)
                    if ctrl_c.pressed:
                        settle()                  # a pending 5th non-finite step stops the run, not Ctrl-C
                        saver.interrupted(ResumePoint(epoch, step))
            if offset[epoch] + iters[epoch] >= end:
                break
    settle()
    tracker.finish()
    Logger(f"done: {progress.summary()}; weights in {saver.where()}")
    return out_path, last_loss


# ---- helpers of the loop ----
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # the --compile_mode values that replay CUDA graphs


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process (0 without compile)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def unwrap(model):
    """The raw module behind DDP, FSDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _windows(batches, first: int, accum: int, stop: int):
    """Group (step, batch) from step `first` on into accumulation windows: each ends at a multiple of `accum`
    or at `stop` (the epoch's last micro-batch in this run), where the optimizer steps."""
    window = []
    for step, batch in enumerate(batches, start=first):
        window.append((step, batch))
        if step % accum == 0 or step == stop:
            yield window
            window = []
        if step == stop:
            return
    if window:
        yield window


def _token_weights(batches: list) -> list[float]:
    """What each micro-batch's (mean) loss is multiplied by before backward. Supervised batches (whose collate
    counts "loss_tokens" on the host): its share of the window's supervised tokens, so the step's gradient is
    that of the token mean over the whole window (no host sync). Otherwise the mean over the window's
    micro-batches, as the original (1/accum; a partial window at the end of an epoch is rescaled to its size)."""
    counts = [b.get("loss_tokens") if isinstance(b, dict) else None for b in batches]
    if None in counts or sum(counts) == 0:
        return [1.0 / len(batches)] * len(batches)
    total = sum(counts)
    return [n / total for n in counts]


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return [b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]


def _set_grad_sync(model, sync: bool):
    """DDP and FSDP reduce gradients only on the last micro-batch of an accumulation window (as nanoGPT)."""
    no_sync(getattr(model, "_orig_mod", model), skip=not sync)


def _weights_finite(model) -> bool:
    """Every weight finite, on every rank (FSDP: each rank checks its shards)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if not dist.is_initialized():
        return local
    flag = torch.tensor(float(local), device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class _StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop at the next micro-batch (it saves and says how to resume);
    a second one interrupts at once. Only in the main thread of the main process."""

    def __init__(self):
        self.pressed, self._old = False, None

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        Logger("Ctrl-C: stopping after this micro-batch and saving (press Ctrl-C again to quit at once, unsaved)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _Saver:
    """Writes the weights and the resume file (rank 0; the other ranks wait at a barrier) and remembers
    the last optimizer-step boundary, the only state that can be saved exactly."""

    def __init__(self, run, args, raw, optimizers, schedulers, lm_config, tracker, save_fn, state, out_path):
        self.run, self.args, self.raw, self.optimizers, self.schedulers = run, args, raw, optimizers, schedulers
        self.lm_config, self.tracker, self.save_fn, self.state, self.out_path = lm_config, tracker, save_fn, state, out_path
        self.pending, self.boundary, self.saved, self.due = False, None, None, None
        self.snapshot = self.due_snapshot = None   # (RNG states, volatile stage state) at self.boundary / self.due

    def mark(self, point: ResumePoint):
        """An optimizer-step boundary. A save of it may be written later (at the next step, or on Ctrl-C), after
        the next batches drew from the RNG (RL sampling, dropout) and updated stage state such as SPO's value
        tracker: what those change is kept now, so the file holds exactly this boundary's state. Models,
        optimizers and schedulers change only at the next optimizer step, after a due save is written."""
        frozen = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
        volatile = {k: copy.deepcopy(v.state_dict() if hasattr(v, "state_dict") else v)
                    for k, v in (self.state or {}).items() if not isinstance(v, frozen)}
        self.boundary, self.snapshot = point, (rng_state(), volatile)

    def save(self, point: ResumePoint, barrier: bool = True):
        if not _weights_finite(self.raw):
            raise TrainingError(f"the weights hold NaN or inf at epoch {point.epoch + 1} step {point.step}; not "
                                f"saving them over {self.out_path}. {self.last_saved_text()}")
        model_state, optim_state = self.raw, self.optimizers[0]
        if is_fsdp(self.raw):   # collectives: every rank gathers, rank 0 receives the full fp32 states
            model_state, optim_state = full_model_state(self.raw), full_optimizer_state(self.raw, self.optimizers[0])
        rng, volatile = rng_state(), {}
        snapshot = self.due_snapshot if point == self.due else self.snapshot if point == self.boundary else None
        if snapshot is not None:
            rng, volatile = snapshot
        rng_ranks = None
        if dist.is_initialized() and dist.get_world_size() > 1:   # each rank's generators differ (seed + rank):
            rng_ranks = [None] * dist.get_world_size()              # keep every rank's, not only rank 0's
            dist.all_gather_object(rng_ranks, rng)
        if is_main_process():
            was_training = self.raw.training
            self.raw.eval()
            if self.save_fn is not None:
                self.save_fn(self.raw)
            else:
                save_weights(model_state, self.out_path, self.lm_config)
            extra = {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in (self.state or {}).items()}
            extra.update(volatile)
            if self.schedulers:
                extra["scheduler"] = self.schedulers[0]
            lm_checkpoint(self.lm_config, self.args.save_weight, model=model_state, optimizer=optim_state,
                          epoch=point.epoch, step=point.step, wandb=self.tracker, save_dir=self.args.checkpoint_dir,
                          scaler=self.run.scaler, rng=rng, rng_ranks=rng_ranks,
                          batch_unit=getattr(self.args, "batch_unit", None),
                          **extra)
            self.raw.train(was_training)
        if barrier and dist.is_initialized():
            dist.barrier()
        self.due, self.due_snapshot, self.saved = None, None, point

    def where(self) -> str:
        return f"{self.out_path}" + (f" (epoch {self.saved.epoch + 1}, step {self.saved.step})" if self.saved else "")

    def last_saved_text(self) -> str:
        if self.saved:
            return f"the last good weights were saved at epoch {self.saved.epoch + 1} step {self.saved.step}"
        return f"nothing was saved by this run ({self.out_path} is unchanged)"

    def interrupted(self, at: ResumePoint):
        """Ctrl-C: save the last boundary (a partial accumulation window is redone on resume), say how to go on."""
        point = self.boundary
        if point is not None and point != self.saved:
            self.save(point, barrier=False)
        command = resume_command()
        where = self.last_saved_text() if self.saved is None else \
            f"saved epoch {self.saved.epoch + 1} step {self.saved.step} to {self.out_path} and {self.args.checkpoint_dir}"
        Logger(f"interrupted at epoch {at.epoch + 1} step {at.step}: {where}. Resume with:\n  {command}")
        raise SystemExit(130)


def resume_command() -> str:
    """The command line of this run with --from_resume 1."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--from_resume":
            skip = True
            continue
        if a.startswith("--from_resume="):
            continue
        argv.append(a)
    return " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *argv, "--from_resume", "1"])


def rng_state() -> dict:
    """Every RNG a resumed run must continue from (RL sampling, dropout)."""
    import random
    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random
    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
