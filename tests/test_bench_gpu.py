"""bench/bench_gpu.py: the one-command GPU bench, run here on CPU with --smoke (tiny sizes)."""
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_COLUMNS = ["run", "samples/s (steady)", "step ms", "MFU (bf16 peak)", "compile s", "epoch wall s",
                 "held-out CE", "samples/s vs original"]
DECODE_COLUMNS = ["code", "batch", "tokens/s (end to end)", "vs original", "tokens = ours model.generate",
                  "tokens = original"]


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_steady_window_skips_the_warmup_and_reads_samples_per_second():
    """The steady window starts at the first progress line past --warmup_frac of the epoch."""
    from bench.bench_gpu import steady
    lines = [(100.0 + s * 0.5 + (5.0 if s > 2 else 0.0), f"Epoch:[1/1]({s}/10) loss:1.0") for s in range(2, 12, 2)]
    run = dict(start=90.0, lines=lines)
    got = steady(run, Namespace(warmup_frac=0.2, batch_size=8))
    # from step 4 (t=107, the first past 20% of 10) to step 10 (t=110): 6 steps of 8 samples in 3 s
    assert got["samples_s"] == pytest.approx(16.0) and got["step_ms"] == pytest.approx(500.0)
    assert got["to_steady"] == pytest.approx(17.0) and got["steps"] == 10
    assert steady(dict(start=0.0, lines=lines[:1]), Namespace(warmup_frac=0.2, batch_size=8)) == {}
    # a compile inside the window (our trainer's "compiled in 1.0 s" line at t=108) leaves the rate; all count
    run["compiles"] = [(95.0, 4.0), (108.0, 1.0)]
    got = steady(run, Namespace(warmup_frac=0.2, batch_size=8))
    assert got["samples_s"] == pytest.approx(24.0) and got["compile_s"] == pytest.approx(5.0)


def test_steady_tokens_is_the_median_rate_past_the_warmup():
    """The MFU part's rate: the trainer's own tok/s (compiling steps already left out), median of the lines past
    --warmup_frac; a line of only compiling steps ("tok/s:-") has no rate."""
    from bench.bench_gpu import steady_tokens
    rates = ["900", "-", "2,000", "1,000", "3,000", "1,500"]
    lines = [(0.0, f"Epoch:[1/1]({s}/12) loss:1.0 lr:0.1 tok/s:{r} pad:0%") for s, r in zip(range(2, 14, 2), rates)]
    assert steady_tokens(dict(lines=lines), 0.2) == 2000.0       # steps 4-12: 2,000 1,000 3,000 1,500 (no "-")
    assert steady_tokens(dict(lines=lines[:1]), 0.2) == 0.0
    # a run over 3 epochs of 4 steps: the warm-up is 20% of all 12 steps, and step ms counts across epochs
    from bench.bench_gpu import steady
    epochs = [(100.0 + 0.1 * (4 * e + s), f"Epoch:[{e + 1}/3]({s}/4) loss:1.0 tok/s:{100 * (4 * e + s)} pad:0%")
              for e in range(3) for s in range(1, 5)]
    run = dict(start=99.0, lines=epochs)
    assert steady_tokens(run, 0.2) == 800.0                     # global steps 3..12 -> rates 300..1200, median 800
    got = steady(run, Namespace(warmup_frac=0.2, batch_size=8))
    assert got["step_ms"] == pytest.approx(100.0) and got["steps"] == 12


def test_lean_smoke_run_prints_every_table_in_ci():
    """`python bench/bench_gpu.py --smoke` without the original, at its smallest (~15 s on 2 cores): the training
    and decoding parts run and print their tables (the MFU part, a second training run of the same code, in the
    slow smoke test below); the engine's greedy tokens equal model.generate's."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--original_dir", "none",
                          "--train_lines", "48", "--heldout_lines", "16", "--mfu_model", "", "--batch_sizes", "1,4"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    train = next(i for i, s in enumerate(lines) if s.startswith("| run | samples/s"))
    ours = next(cells(s) for s in lines[train:] if s.startswith("| ours (default flags)"))
    assert cells(lines[train]) == TRAIN_COLUMNS and float(ours[1].replace(",", "")) > 0 and float(ours[6]) > 0
    engine = [cells(s) for s in lines if s.startswith("| ours engine")]
    assert [r[1] for r in engine] == ["1", "4"] and all(r[4] == "True" for r in engine)


@pytest.mark.slow
def test_smoke_run_prints_both_tables_with_equal_tokens():
    """`python bench/bench_gpu.py --smoke` on CPU (the original side by side when ../orig is there): ~25 s
    alone, ~60 s with the original."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke"], capture_output=True,
                         text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    train = next(i for i, s in enumerate(lines) if s.startswith("| run |"))
    assert cells(lines[train]) == TRAIN_COLUMNS
    ours = next(cells(s) for s in lines[train:] if s.startswith("| ours (default flags)"))
    assert float(ours[1].replace(",", "")) > 0 and float(ours[6]) > 0
    mfu = next(i for i, s in enumerate(lines) if s.startswith("| run | useful tokens/s"))
    row = cells(lines[mfu + 2])
    assert row[0] == "ours 64x2 (default flags)" and float(row[1].replace(",", "")) > 0 and row[5] == "1.00x"
    decode = next(i for i, s in enumerate(lines) if s.startswith("| code |"))
    assert cells(lines[decode]) == DECODE_COLUMNS
    engine = [cells(s) for s in lines[decode:] if s.startswith("| ours engine")]
    assert [r[1] for r in engine] == ["1", "16"] and all(r[4] == "True" for r in engine)
    assert all(r[5] in ("True", "-") for r in engine)
    assert "# total wall time:" in out.stdout and "train_pretrain.py" in out.stdout   # the commands it ran
