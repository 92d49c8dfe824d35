"""Runs a training script under a launcher and records, per rank, what the launch tests check.

    torchrun --nproc_per_node 2 tests/dist_probe.py OUT_DIR trainer/train_pretrain.py --device cpu ...
    deepspeed --num_gpus 2 tests/dist_probe.py OUT_DIR trainer/train_pretrain.py --device cpu ...

The script runs unchanged (as __main__, its own flags) except that trainer.core.loop.train_loop is wrapped
so that its step function notes every sample the rank trains on (each sample of a packed row apart). Writes OUT_DIR/rank{RANK}.json: `rows` (a hash per
trained sample), `checksum` and `first` (the rank's weights after training), `writes` (every path the
rank opened for writing or renamed onto, seen through an audit hook). The deepspeed launcher's
`--local_rank=N` argument is passed on to the script, whose parser accepts it.
"""
import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from trainer.core import loop


def record_writes(writes: list):
    def hook(event, args):
        if event == "open" and isinstance(args[0], str):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                writes.append(args[0])
        elif event == "os.rename" and isinstance(args[1], str):   # os.replace raises the same event
            writes.append(args[1])
    sys.addaudithook(hook)


def sample_hashes(batch) -> list:
    """A short hash of every sample's real tokens in a supervised batch (packed rows split at position 0)."""
    out = []
    for r, ids in enumerate(batch["input_ids"]):
        n = int((batch["loss_mask"][r] > 0).nonzero().max()) + 1 if batch["loss_mask"][r].any() else 0
        pieces = [ids[:n]]
        if "position_ids" in batch:
            starts = (batch["position_ids"][r][:n] == 0).nonzero().flatten().tolist() + [n]
            pieces = [ids[a:b] for a, b in zip(starts, starts[1:])]
        out += [hashlib.sha1(str(p.tolist()).encode()).hexdigest()[:16] for p in pieces]
    return out


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    out_dir, script, flags = Path(argv[0]), argv[1], argv[2:]
    rows, model, writes = [], [], []
    real_loop = loop.train_loop

    def recording_loop(run, args, m, optimizers, dataset, step_fn, **kw):
        model[:] = [m]

        def step(batch):
            rows.extend(sample_hashes(batch))
            return step_fn(batch)
        return real_loop(run, args, m, optimizers, dataset, step, **kw)

    loop.train_loop = recording_loop          # the stage script imports it from trainer.core.loop when it runs
    record_writes(writes)
    sys.argv = [script, *local_rank, *flags]
    runpy.run_path(script, run_name="__main__")
    flat = torch.cat([p.detach().flatten() for p in model[0].parameters()])
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"rows": rows, "checksum": flat.double().sum().item(), "first": flat[:50].tolist(), "writes": writes}))


if __name__ == "__main__":
    main()
