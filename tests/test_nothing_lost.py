"""Training never destroys good weights and fails in one clear line (issue: nothing lost): a resume request
that finds no file, non-finite losses, a finished run resumed, bad data lines, bad resume files, a full
disk, and Ctrl-C. Each test drives the real stage script on a tiny model: its main() under the script's own
cli() wrapper in this process (run_cli), or the script itself in a subprocess where the process is what is
tested (the command line's exit code and stderr, Ctrl-C)."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from model.cli import cli
from tests.conftest import ROOT, tiny_train_args, write_tiny_corpus
from trainer import train_pretrain

SCRIPT = str(ROOT / "trainer" / "train_pretrain.py")


def run_script(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MINIMIND_DEBUG", None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.fixture
def run_cli(capfd, monkeypatch):
    """What `python trainer/train_pretrain.py ARGS` does (`cli(main)`, see the script's last lines), in this
    process: returns (returncode, stdout, stderr) as run_script does, stdout and stderr read at the file
    descriptors (DataLoader workers included)."""
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)

    def run(args):
        capfd.readouterr()
        code = 0
        try:
            cli(lambda: train_pretrain.main(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capfd.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


def one_error_line(res):
    """The stderr of a failed run is exactly one `error:` line (warnings aside)."""
    lines = [line for line in res.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  warnings.warn")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    return lines[0]


@pytest.fixture
def corpus(tmp_path):
    return write_tiny_corpus(tmp_path / "data", n=48)


def test_resume_without_a_resume_file_never_overwrites_trained_weights(tmp_path, corpus, run_cli):
    args = tiny_train_args(tmp_path, corpus["pretrain"], max_steps=4)
    train_pretrain.main(args)
    out = tmp_path / "out" / "pretrain_64.pth"
    before = out.read_bytes()
    typo = [a if a != str(tmp_path / "ckpt") else str(tmp_path / "checkpoint") for a in args]   # a typo in the dir
    res = run_script(typo + ["--from_resume", "1"])
    assert res.returncode == 2
    line = one_error_line(res)
    assert str(tmp_path / "checkpoint" / "pretrain_64_resume.pth") in line and str(out) in line
    assert out.read_bytes() == before
    # with no trained weight in the way, a first --from_resume 1 run starts fresh and says so
    fresh = tiny_train_args(tmp_path / "new", corpus["pretrain"], max_steps=2, from_resume=1)
    res = run_cli(fresh)
    assert res.returncode == 0 and "no resume file" in res.stdout and "starting a new run" in res.stdout


def test_non_finite_loss_skips_steps_then_stops_without_saving(tmp_path, corpus, run_cli):
    good = tiny_train_args(tmp_path, corpus["pretrain"], max_steps=3, packing=0, accumulation_steps=1)
    train_pretrain.main(good)
    out = tmp_path / "out" / "pretrain_64.pth"
    before = out.read_bytes()
    bad = tiny_train_args(tmp_path, corpus["pretrain"], learning_rate=1e5, grad_clip=0, save_interval=1,
                          packing=0, accumulation_steps=1, epochs=3)
    res = run_cli(bad)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "optimizer step skipped" in res.stdout
    line = one_error_line(res)
    assert "diverged" in line and "--learning_rate" in line
    assert out.read_bytes() == before                     # the diverging run never replaced the good weights


def test_a_skipped_nan_step_keeps_the_weights(tmp_path, corpus, monkeypatch):
    """One NaN loss: the step is skipped with a counted warning, training goes on, the weights stay finite."""
    calls = []
    real = train_pretrain.pretrain_loss

    def sometimes_nan(model, batch):
        loss, stats = real(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(train_pretrain, "pretrain_loss", sometimes_nan)
    path, loss = train_pretrain.main(tiny_train_args(tmp_path, corpus["pretrain"], max_steps=6, packing=0,
                                                     accumulation_steps=1))
    sd = torch.load(path)
    assert all(torch.isfinite(v.float()).all() for v in sd.values()) and loss == loss
    log = [json.loads(line) for line in open(tmp_path / "out" / "pretrain_64_metrics.jsonl")]
    assert len(log) == 6


def fused_adamw_deferred(monkeypatch, defer: bool):
    """This run's AdamW fused (as on CUDA) and its finite check deferred (as on CUDA) or not, on CPU."""
    import dataclasses
    from trainer.core import loop, stage
    real_init = stage.init_run
    monkeypatch.setattr(train_pretrain, "init_run",
                        lambda args: dataclasses.replace(real_init(args), adamw={"fused": True}))
    monkeypatch.setattr(loop, "defers_finite_check", lambda run, opts, *rest: defer and
                        all(o.defaults.get("fused") for o in opts))


@pytest.mark.parametrize("nan_at, save_interval", [([4], 2), ([3], 1000), ([2, 3, 4, 5, 6, 7, 8], 2)],
                         ids=["nan-on-a-deferred-step", "nan-no-saves", "diverging"])
def test_deferred_finite_check_skips_on_the_device_exactly_as_the_synced_guard(tmp_path, corpus, monkeypatch,
                                                                                 capsys, nan_at, save_interval):
    """On CUDA the guard reads a step's finite flag one step later and fused AdamW skips a non-finite step on
    the device (found_inf): the same weights, moments, warnings and saves as the guard that waits for the
    flag, and MAX_NONFINITE skips in a row still stop the run with the same line (run here on CPU, where fused
    AdamW takes found_inf too). A step after a save point waits for its flag (the save is due): the NaN at step 4
    (save_interval 2) and every step without saves go through the deferred path."""
    from trainer.core.loop import TrainingError
    real = train_pretrain.pretrain_loss
    results = []
    for defer in (False, True):
        calls = []

        def sometimes_nan(model, batch):
            loss, stats = real(model, batch)
            calls.append(1)
            return (loss * float("nan") if len(calls) in nan_at else loss), stats

        monkeypatch.setattr(train_pretrain, "pretrain_loss", sometimes_nan)
        fused_adamw_deferred(monkeypatch, defer)
        run_dir = tmp_path / str(defer)
        args = tiny_train_args(run_dir, corpus["pretrain"], max_steps=10, packing=0, accumulation_steps=1,
                               save_interval=save_interval)
        error = None
        try:
            train_pretrain.main(args)
        except TrainingError as err:
            error = str(err).replace(str(run_dir), "RUN")
        out = capsys.readouterr().out
        warnings = [line for line in out.splitlines() if line.startswith("warning")]
        resume_file = run_dir / "ckpt" / "pretrain_64_resume.pth"
        if not resume_file.exists():          # diverged before a save was confirmed: nothing written
            results.append((error, warnings, None, None, None))
            continue
        resume = torch.load(resume_file, weights_only=False)
        results.append((error, warnings, resume["step"], torch.load(run_dir / "out" / "pretrain_64.pth"),
                        resume["optimizer"]["state"]))
    (error_a, warn_a, step_a, weights_a, moments_a), (error_b, warn_b, step_b, weights_b, moments_b) = results
    assert error_a == error_b and warn_a == warn_b and step_a == step_b and len(warn_a) == min(len(nan_at), 5)
    assert (error_a is None) == (len(nan_at) == 1) and (step_a is None) == (len(nan_at) > 1)
    for k in weights_a or {}:
        assert torch.equal(weights_a[k], weights_b[k])
    for i, state in (moments_a or {}).items():
        assert all(torch.equal(v, moments_b[i][k]) for k, v in state.items())


def test_ctrl_c_after_a_pending_fifth_nan_step_stops_as_diverged(tmp_path, corpus, monkeypatch):
    """Deferred guard: Ctrl-C at the step whose flag is still pending reads it first, so a 5th non-finite step in a
    row ends the run with the divergence line, not with a resume file past the divergence (exit 130)."""
    from trainer.core import loop
    real = train_pretrain.pretrain_loss
    calls = []

    def nan_from_4(model, batch):
        loss, stats = real(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 4 else loss), stats

    class CtrlCAtStep8(loop._StopOnCtrlC):
        @property
        def pressed(self):
            return len(calls) >= 8

        @pressed.setter
        def pressed(self, value):
            pass

    monkeypatch.setattr(train_pretrain, "pretrain_loss", nan_from_4)
    monkeypatch.setattr(loop, "_StopOnCtrlC", CtrlCAtStep8)
    fused_adamw_deferred(monkeypatch, True)
    with pytest.raises(loop.TrainingError, match="5 optimizer steps in a row"):
        train_pretrain.main(tiny_train_args(tmp_path, corpus["pretrain"], max_steps=10, packing=0,
                                            accumulation_steps=1))


def test_a_finished_run_resumed_is_a_no_op(tmp_path, corpus, capsys):
    args = tiny_train_args(tmp_path, corpus["pretrain"], max_steps=5, accumulation_steps=2)
    train_pretrain.main(args)
    out, resume = tmp_path / "out" / "pretrain_64.pth", tmp_path / "ckpt" / "pretrain_64_resume.pth"
    before = (out.read_bytes(), torch.load(resume, weights_only=False)["step"])
    for _ in range(2):
        train_pretrain.main(args + ["--from_resume", "1"])
        assert "nothing to do" in capsys.readouterr().out
        assert (out.read_bytes(), torch.load(resume, weights_only=False)["step"]) == before


@pytest.mark.parametrize("line,skip", [
    ('{"text": "abc \\ud800 def"}', "surrogate"),
    ("[" * 50000 + "]" * 50000, "nested too deeply"),
    ('{"text": ' + "1" * 5000 + "}", "4300 digits"),
], ids=["lone-surrogate", "deep-nesting", "5000-digits"])
@pytest.mark.parametrize("workers", [0, 1])
def test_hostile_data_lines_are_one_line_naming_the_file_and_line(tmp_path, corpus, line, skip, workers, run_cli):
    path = tmp_path / "bad.jsonl"
    lines = corpus["pretrain"].read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:5] + [line] + lines[5:]) + "\n", encoding="utf-8")
    # workers 0: packing measures every sample at start-up; workers 1: unpacked, the bad line fails in a worker
    res = run_cli(tiny_train_args(tmp_path, path, num_workers=workers, packing=1 - workers))
    assert res.returncode == 2
    assert one_error_line(res).startswith(f"error: {path}:6: ")
    # --skip_bad_lines 1 trains past it
    with pytest.warns(UserWarning, match="skipped 1 of 49 lines"):
        train_pretrain.main(tiny_train_args(tmp_path, path, max_steps=2, num_workers=workers, skip_bad_lines=1))


def test_bad_resume_files_and_a_full_disk_are_one_line(tmp_path, corpus, run_cli, monkeypatch):
    args = tiny_train_args(tmp_path, corpus["pretrain"], max_steps=2)
    train_pretrain.main(args)
    resume = tmp_path / "ckpt" / "pretrain_64_resume.pth"
    good = resume.read_bytes()
    resume.write_bytes(good[: len(good) // 2])                         # truncated
    res = run_cli(args + ["--from_resume", "1", "--max_steps", "4"])
    assert res.returncode == 2 and "is corrupted (damaged or truncated" in one_error_line(res)
    resume.write_bytes(good)
    other = [a if a != "2" else "3" for a in args]                     # --num_hidden_layers 3, same file name
    res = run_cli(other + ["--from_resume", "1", "--max_steps", "4"])
    assert res.returncode == 2 and "does not fit this run" in one_error_line(res)
    # a full disk: the save fails with ENOSPC, the previous files stay as they were
    import errno

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", full)
        res = run_cli(args + ["--max_steps", "3"])
    assert res.returncode == 2 and "No space left on device" in one_error_line(res)
    assert resume.read_bytes() == good


def test_log_lines_come_at_the_interval_asked_for(tmp_path, corpus):
    train_pretrain.main(tiny_train_args(tmp_path, corpus["pretrain"], max_steps=11, packing=0, log_interval=4,
                                        accumulation_steps=3))
    log = [json.loads(line) for line in open(tmp_path / "out" / "pretrain_64_metrics.jsonl")]
    assert [r["step"] for r in log] == [4, 8, 11]
    assert all({"tok_s", "pad", "eta_min", "lr", "loss"} <= set(r) for r in log)


def test_ctrl_c_saves_the_last_step_and_prints_the_resume_command(tmp_path, corpus):
    args = tiny_train_args(tmp_path, corpus["pretrain"], packing=0, accumulation_steps=1, epochs=200,
                           save_interval=100000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = tmp_path / "out" / "pretrain_64_metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    resume = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=False)
    assert resume["step"] >= 5 and f"saved epoch {resume['epoch'] + 1} step {resume['step']}" in out
    command = out.strip().splitlines()[-1].strip()
    assert command.startswith("python ") and command.endswith("--from_resume 1") and "--epochs 200" in command


@pytest.mark.parametrize("save_interval", [1, 2, 1000])
def test_the_last_step_is_always_saved(tmp_path, corpus, save_interval):
    """Whatever --save_interval, the files hold the last step (a deferred save of the step before must not
    swallow the final one)."""
    train_pretrain.main(tiny_train_args(tmp_path, corpus["pretrain"], max_steps=3, accumulation_steps=1,
                                        save_interval=save_interval, packing=0))
    assert torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=False)["step"] == 3
