"""Runs a training script under a launcher and records, per rank, what the launch tests check.

    torchrun --nproc_per_node 2 tests/dist_probe.py OUT_DIR trainer/train_pretrain.py --device cpu ...
    deepspeed --num_gpus 2 tests/dist_probe.py OUT_DIR trainer/train_pretrain.py --device cpu ...

The script runs unchanged (as __main__, its own flags) except that trainer_utils.lm_loss is wrapped
to note every sample row the rank trains on. Writes OUT_DIR/rank{RANK}.json: `rows` (a hash per
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

from trainer import trainer_utils


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


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    out_dir, script, flags = Path(argv[0]), argv[1], argv[2:]
    rows, model, writes = [], [], []
    real_loss = trainer_utils.lm_loss

    def recording_loss(m, batch):
        model[:] = [m]
        rows.extend(hashlib.sha1(str(x.tolist()).encode()).hexdigest()[:16] for x in batch[0])
        return real_loss(m, batch)

    trainer_utils.lm_loss = recording_loss       # the stage script imports it from here when it runs
    record_writes(writes)
    sys.argv = [script, *local_rank, *flags]
    runpy.run_path(script, run_name="__main__")
    flat = torch.cat([p.detach().flatten() for p in model[0].parameters()])
    rank = int(os.environ.get("RANK", 0))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"rows": rows, "checksum": flat.double().sum().item(), "first": flat[:50].tolist(), "writes": writes}))


if __name__ == "__main__":
    main()
