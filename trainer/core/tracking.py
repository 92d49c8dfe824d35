"""Experiment tracking for --use_wandb: a swanlab run (the original's tracker, the default) or a wandb
run (--tracker wandb), continued on --from_resume 1, or a no-op with the same methods.

    python trainer/train_pretrain.py --device cpu --hidden_size 64 --num_hidden_layers 2 --max_steps 20 \\
        --data_path dataset/demo/pretrain.jsonl --use_wandb                  # swanlab, on disk only
    ... --use_wandb --tracker wandb                                          # wandb, offline

Nothing leaves the machine unless asked for: swanlab runs in its `offline` mode (its run files under
{save_dir}/swanlog, to view or upload later with `swanlab sync`) unless SWANLAB_MODE is set
(online, local, disabled) or SWANLAB_API_KEY is; wandb runs with WANDB_MODE=offline (files under
{save_dir}/wandb, `wandb sync`) unless WANDB_MODE says otherwise. The run id is stored in the resume
file as `wandb_id`. A missing package, no network or a refused login is one warning and a no-op
tracker: training never stops for tracking.
"""
import os
import warnings
from pathlib import Path

import torch.distributed as dist


class NoTracker:
    """What the loop gets when nothing is tracked (also on every rank but 0)."""
    id = None

    def log(self, metrics: dict, step: int = None) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker:
    """A started swanlab or wandb run behind the three things the loop uses: .id, .log, .finish."""

    def __init__(self, run, run_id: str):
        self.run, self.id = run, run_id

    def log(self, metrics: dict, step: int = None) -> None:
        """step: the global micro-batch step, so a resumed run continues the same x axis."""
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def init_tracker(args, ckp: dict = None, run_name: str = None):
    """4. a swanlab/wandb run named after the run's settings, continuing `ckp["wandb_id"]` when resuming;
    NoTracker without --use_wandb, on ranks other than 0, or when the tracker cannot start."""
    if not args.use_wandb or (dist.is_initialized() and dist.get_rank() != 0):
        return NoTracker()
    run_id = (ckp or {}).get("wandb_id")
    name = run_name or f"{args.wandb_project}-Epoch-{args.epochs}-BatchSize-{args.batch_size}-LR-{args.learning_rate}"
    config = {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for k, v in vars(args).items()}
    try:
        start = _start_swanlab if args.tracker == "swanlab" else _start_wandb
        return start(args.wandb_project, name, run_id, config, Path(args.save_dir))
    except ImportError as err:
        warnings.warn(f"--use_wandb: {args.tracker} is not installed ({err}); not tracking. "
                      "Install it with: pip install -r requirements.txt", stacklevel=2)
    except Exception as err:  # no network, a refused key: never a reason to stop training
        warnings.warn(f"--use_wandb: {args.tracker} unavailable ({err.__class__.__name__}: {err}); not tracking",
                      stacklevel=2)
    return NoTracker()


def _start_swanlab(project, name, run_id, config, save_dir) -> Tracker:
    import swanlab
    mode = os.environ.get("SWANLAB_MODE") or ("online" if os.environ.get("SWANLAB_API_KEY") else "offline")
    run = swanlab.init(project=project, name=name, id=run_id, resume="allow" if run_id else None, mode=mode,
                       config=config, log_dir=str(save_dir / "swanlog"))
    return Tracker(run, run.id)


def _start_wandb(project, name, run_id, config, save_dir) -> Tracker:
    import wandb
    run = wandb.init(project=project, name=name, id=run_id, resume="allow" if run_id else None,
                     mode=os.environ.get("WANDB_MODE", "offline"), config=config, dir=str(save_dir))
    return Tracker(run, run.id)
