"""Experiment tracking: swanlab (default, local mode) or wandb (offline) with --use_wandb, continued on
resume; a missing package or no network is one warning and a no-op tracker."""
import os
import warnings
from pathlib import Path

from trainer.progress import is_main_process


class _NoTracker:
    id = None

    def log(self, *_, **__):
        pass

    def finish(self):
        pass


def init_tracker(args, ckp=None, run_name: str = None):
    """4. a swanlab/wandb run (continued on resume), or a no-op with the same .log/.finish."""
    if not args.use_wandb or not is_main_process():
        return _NoTracker()
    run_id = (ckp or {}).get("wandb_id")
    name = run_name or f"{args.wandb_project}-Epoch-{args.epochs}-BatchSize-{args.batch_size}-LR-{args.learning_rate}"
    try:
        if args.tracker == "swanlab":
            import swanlab
            mode = os.environ.get("SWANLAB_MODE", "local" if not os.environ.get("SWANLAB_API_KEY") else "cloud")
            run = swanlab.init(project=args.wandb_project, experiment_name=name, id=run_id,
                               resume="must" if run_id else None, mode=mode, logdir=str(Path(args.save_dir) / "swanlog"))
            run.id = getattr(run, "id", None) or swanlab.get_run().id
        else:
            import wandb
            os.environ.setdefault("WANDB_MODE", "offline")
            run = wandb.init(project=args.wandb_project, name=name, id=run_id, resume="must" if run_id else None,
                             dir=args.save_dir)
        return run
    except Exception as err:  # a missing package or no network must not stop training
        warnings.warn(f"--use_wandb: {args.tracker} unavailable ({err.__class__.__name__}: {err}); not tracking")
        return _NoTracker()


