"""trainer/core/progress.py: the CPU peak measurement behind the progress line's MFU."""
import json

import torch


def test_cpu_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    """A peak measured while the machine was busy is too low and made MFU read above 100%: the cache keeps
    the best rate seen, so a later quiet start corrects it, and a later busy start cannot lower it."""
    from trainer.core import progress
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path))
    monkeypatch.setattr(progress, "_MEASURED", {})                          # a fresh process
    key = f"{progress._cpu_model()}|{torch.float32}|{torch.get_num_threads()}|{torch.__version__}"
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: 1.0}))        # stale: measured under load
    measured = progress.cpu_peak_flops()
    assert measured > 1e8
    assert json.loads((tmp_path / "cpu_peak.json").read_text())[key] == measured
    assert progress.cpu_peak_flops() == measured                           # measured once per process
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: 1e18}))       # better than any measurement
    monkeypatch.setattr(progress, "_MEASURED", {})                          # the next process
    assert progress.cpu_peak_flops() == 1e18


def test_cpu_peak_measurement_leaves_the_run_rng_alone(tmp_path, monkeypatch):
    """The start-up matmul once drew from torch's global RNG, so a resumed run (which measures again after
    restoring the RNG) sampled differently from the uninterrupted one and RL resume was no longer exact."""
    from trainer.core import progress
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path))
    monkeypatch.setattr(progress, "_MEASURED", {})
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    progress.cpu_peak_flops()
    assert torch.equal(torch.rand(4), expected)
