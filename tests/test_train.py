"""The one loop end to end on CPU (pretrain and SFT): outputs, exact resume (packed and not), accumulation,
kill safety, launch forms, and nothing lost: resume without a file, non-finite losses, finished runs, Ctrl-C."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import (ROOT, check_two_ranks, dist_probe_argv, run_launcher, tiny_train_args,
                            write_tiny_corpus)
from trainer import train_full_sft, train_pretrain


def metrics(path):
    return [json.loads(line) for line in open(path)]


def test_pretrain_then_sft_outputs(tmp_path):
    data = write_tiny_corpus(tmp_path / "data")
    path, loss = train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], learning_rate=2e-3,
                                                     accumulation_steps=1, epochs=2))
    assert path == tmp_path / "out" / "pretrain_64.pth" and path.exists()
    assert (tmp_path / "out" / "pretrain_64.json").exists() and (tmp_path / "ckpt" / "pretrain_64_resume.pth").exists()
    log = metrics(tmp_path / "out" / "pretrain_64_metrics.jsonl")
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert math_finite(loss) and last < first - 0.5            # it learns
    assert all(r["tok_s"] > 0 for r in log) and {"epoch", "step", "lr"} <= set(log[0])
    sd = torch.load(path)
    assert all(v.dtype == torch.float16 for v in sd.values())
    before = {k: v.clone() for k, v in sd.items()}
    path, loss = train_full_sft.main(tiny_train_args(tmp_path, data["sft"], learning_rate=1e-3, epochs=1))
    assert path.name == "full_sft_64.pth" and math_finite(loss)
    after = torch.load(path)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def math_finite(x):
    return x == x and abs(x) != float("inf")


@pytest.mark.parametrize("packing,dtype", [(0, "float32"), (1, "float32"), (1, "bfloat16")])
def test_resume_equals_uninterrupted(tmp_path, packing, dtype):
    """Stop in epoch 2, resume with --from_resume 1: same losses and bit-identical weights, in both precisions
    (--dtype auto would test only the one this CPU picks; bf16 runs the cheaper packed case)."""
    data = write_tiny_corpus(tmp_path / "data", n=64)
    common = dict(accumulation_steps=2, epochs=2, learning_rate=1e-3, batch_size=4, packing=packing, dtype=dtype)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train_pretrain.main(tiny_train_args(full_dir, data["pretrain"], **common))
    full_log = {(r["epoch"], r["step"]): r["loss"] for r in metrics(full_dir / "out" / "pretrain_64_metrics.jsonl")}
    iters = max(step for epoch, step in full_log if epoch == 1)
    assert iters == 16                    # 64 samples / --batch_size 4, packed or not: the original's step count
    # stopped 6 micro-batches into epoch 2, at an optimizer-step boundary: the resume point
    train_pretrain.main(tiny_train_args(cut_dir, data["pretrain"], max_steps=iters + 6, **common))
    cut = torch.load(cut_dir / "ckpt" / "pretrain_64_resume.pth", weights_only=False)
    assert (cut["epoch"], cut["step"]) == (1, 6)
    train_pretrain.main(tiny_train_args(cut_dir, data["pretrain"], from_resume=1, **common))
    a, b = torch.load(full_dir / "out" / "pretrain_64.pth"), torch.load(cut_dir / "out" / "pretrain_64.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = torch.load(full_dir / "ckpt" / "pretrain_64_resume.pth", weights_only=False), \
        torch.load(cut_dir / "ckpt" / "pretrain_64_resume.pth", weights_only=False)
    assert all(torch.equal(ra["model"][k], rb["model"][k]) for k in ra["model"])
    cut_log = {(r["epoch"], r["step"]): r["loss"] for r in metrics(cut_dir / "out" / "pretrain_64_metrics.jsonl")}
    assert len(full_log) == 2 * iters and full_log == cut_log


def test_packing_changes_only_the_layout_of_each_step(tmp_path):
    """Same seed, --packing 1 vs 0: the same samples in every micro-batch, so the same losses at every step and
    the same weights after an epoch (fp32, up to the kernels' rounding); the packed run computes fewer positions."""
    data = write_tiny_corpus(tmp_path / "data", n=48)
    runs = {}
    for packing in (0, 1):
        out = tmp_path / f"p{packing}"
        train_pretrain.main(tiny_train_args(out, data["pretrain"], accumulation_steps=2, batch_size=6,
                                            learning_rate=1e-3, packing=packing, dtype="float32"))
        runs[packing] = (metrics(out / "out" / "pretrain_64_metrics.jsonl"), torch.load(out / "out" / "pretrain_64.pth"))
    (log0, w0), (log1, w1) = runs[0], runs[1]
    assert [r["step"] for r in log0] == [r["step"] for r in log1] == list(range(1, 9))
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(log0, log1))
    assert all(torch.allclose(w0[k].float(), w1[k].float(), atol=2e-3) for k in w0)
    assert sum(r["pad"] for r in log1) < sum(r["pad"] for r in log0)


def test_a_step_is_the_token_mean_over_its_accumulation_window(tmp_path, monkeypatch):
    """With accumulation, each micro-batch's mean loss is weighted by its share of the window's supervised
    tokens (counted by the collate), so the gradient of one optimizer step is that of the token mean over the
    whole window (sum of weights 1: a partial window at the end of the epoch needs no rescaling)."""
    from trainer.core import loop
    weights = []
    real = loop._token_weights

    def spy(batches):
        w = real(batches)
        weights.append((w, [b["loss_tokens"] for b in batches]))
        return w

    monkeypatch.setattr(loop, "_token_weights", spy)
    data = write_tiny_corpus(tmp_path / "data", n=20)
    train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], accumulation_steps=2, batch_size=4, epochs=1))
    assert [len(w) for w, _ in weights] == [2, 2, 1]                   # 5 micro-batches: windows 2, 2, 1
    for w, counts in weights:
        assert w == [n / sum(counts) for n in counts] and abs(sum(w) - 1) < 1e-12
    assert real([{"x": 1}, {"x": 2}]) == [0.5, 0.5]                    # no token counts (DPO, RL): 1 / window


def test_accumulation_steps_and_epoch_flush(tmp_path, monkeypatch):
    """5 micro-batches with accumulation 2: optimizer steps after micro-batches 2, 4 and 5 (no off-by-one)."""
    data = write_tiny_corpus(tmp_path / "data", n=20)
    steps = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps.append(len(seen))
        return real_step(self, *a, **k)

    seen = []
    real_loss = train_pretrain.pretrain_loss

    def counting_loss(model, batch):
        seen.append(1)
        return real_loss(model, batch)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(train_pretrain, "pretrain_loss", counting_loss)
    train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], accumulation_steps=2, epochs=1, packing=0))
    assert steps == [2, 4, 5]


def test_killed_run_never_leaves_a_corrupt_file(tmp_path):
    data = write_tiny_corpus(tmp_path / "data", n=400)
    args = tiny_train_args(tmp_path, data["pretrain"], save_interval=1, accumulation_steps=1, epochs=50)
    out = tmp_path / "out" / "pretrain_64.pth"
    resume = tmp_path / "ckpt" / "pretrain_64_resume.pth"
    for delay in (0.05, 0.5):
        before = resume.stat().st_mtime_ns if resume.exists() else None
        proc = subprocess.Popen([sys.executable, str(ROOT / "trainer" / "train_pretrain.py"), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120            # until this run has saved (not the last run's file: a kill
        while time.time() < deadline and (not resume.exists() or resume.stat().st_mtime_ns == before):
            time.sleep(0.02)                    # during the imports would test nothing)
        time.sleep(delay)                       # saves happen every step: kill lands at a random point
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sd = torch.load(out)                     # both files are always complete
        assert len(sd) == 21
        assert torch.load(resume, weights_only=False)["step"] >= 1


def test_runs_from_any_working_directory(tmp_path):
    data = write_tiny_corpus(tmp_path / "data", n=16)
    args = tiny_train_args(tmp_path, data["pretrain"], max_steps=2, packing=0)
    for cwd, script in ((ROOT / "trainer", "train_pretrain.py"), (tmp_path, str(ROOT / "trainer" / "train_pretrain.py"))):
        res = subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "Epoch:[1/1](2/2)" in res.stdout      # --max_steps 2 of 4 steps
    assert (tmp_path / "out" / "pretrain_64.pth").exists()
    assert not (ROOT / "trainer" / "out").exists()


@pytest.mark.parametrize("packing", [pytest.param(0, marks=pytest.mark.slow), 1])   # the default layout in CI
def test_torchrun_two_processes_on_cpu(tmp_path, packing):
    data = write_tiny_corpus(tmp_path / "data", n=32)
    res = run_launcher(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(port), *dist_probe_argv(tmp_path, data["pretrain"],
                                                                                  accumulation_steps=1, packing=packing)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FutureWarning" not in res.stderr
    # unpacked: 32 samples / 2 ranks, 4 steps of 4 each; packed: each rank its own rows, every sample trained
    check_two_ranks(tmp_path, rows_per_rank=None if packing else 16, all_samples=32 if packing else None)


@pytest.mark.slow
def test_compiled_run_saves_plain_keys_and_resumes_exactly(tmp_path, capsys):
    """--use_compile 1: weights and resume files carry no `_orig_mod.`, and a resumed compiled run equals the
    uninterrupted compiled run; the compiled training has no graph break and compiles one graph per batch
    shape (rows of max_seq_len - 1 in quarters of --batch_size), each said on its own line.
    (slow: torch.compile on CPU takes about a minute per process)"""
    from torch._dynamo.utils import counters
    data = write_tiny_corpus(tmp_path / "data", n=48)
    common = dict(use_compile=1, accumulation_steps=2, batch_size=4)
    torch._dynamo.reset()
    counters.clear()
    train_pretrain.main(tiny_train_args(tmp_path / "full", data["pretrain"], max_steps=6, **common))
    out = capsys.readouterr().out
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert 1 <= out.count("compiled in") == counters["stats"]["unique_graphs"] <= 4
    train_pretrain.main(tiny_train_args(tmp_path / "cut", data["pretrain"], max_steps=4, **common))
    train_pretrain.main(tiny_train_args(tmp_path / "cut", data["pretrain"], max_steps=6, from_resume=1, **common))
    a, b = (torch.load(tmp_path / run / "out" / "pretrain_64.pth") for run in ("full", "cut"))
    resume = torch.load(tmp_path / "cut" / "ckpt" / "pretrain_64_resume.pth", weights_only=False)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in list(a) + list(resume["model"]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_and_check_clips_to_grad_clip_as_clip_grad_norm_does():
    """Found by the real-text bench (test first): clip_and_check passed the gradients to clip_grads_with_norm_,
    which takes parameters and reads their .grad, so nothing was ever clipped (every stage trained unclipped,
    0.05-0.1 nats worse than the original on real text). It must scale exactly as torch's clip_grad_norm_."""
    from types import SimpleNamespace
    from trainer.core.loop import clip_and_check
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8)
    for m in (a, b):
        (m(x).pow(2).sum() * 100).backward()
    opt = torch.optim.AdamW(a.parameters())
    run = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))
    before = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
    assert before > 10
    assert clip_and_check(run, [opt], 1.0)
    torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    assert abs(torch.nn.utils.get_total_norm([p.grad for p in a.parameters()]).item() - 1.0) < 1e-5
    a.weight.grad[0, 0] = float("nan")
    assert not clip_and_check(run, [opt], 1.0)                      # a non-finite gradient is reported
