"""trainer/core/progress.py: the CPU peak measurement and the parameter count behind the progress line's MFU."""
import json

import pytest
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


@pytest.mark.parametrize("overrides", [
    {}, {"use_moe": True},                                                                      # MiniMind2
    {"model_family": "minimind3"}, {"model_family": "minimind3", "use_moe": True},
    {"model_family": "minimind3", "head_dim": 12, "use_moe": True, "moe_intermediate_size": 96},   # head_dim != h/heads
    {"model_family": "minimind3", "tie_word_embeddings": False},
])
def test_flops_parameter_count_equals_the_model_parameter_shapes(overrides):
    """MFU's 6 * active parameters: lm_config_params (from the config alone) against the parameters the model
    actually builds, counted from their shapes: tied matrices once; active = all but the routed experts a token
    does not use (minimind-3: top-1 of 4, no shared expert, q/k norms, its own head_dim and expert width)."""
    from model.model_minimind import MiniMindForCausalLM
    from tests.conftest import tiny_config
    from trainer.core.progress import lm_config_params
    cfg = tiny_config(**overrides)
    with torch.device("meta"):
        model = MiniMindForCausalLM(cfg)
    params = dict(model.named_parameters())          # tied weights appear once
    total = sum(p.numel() for p in params.values())
    unused = 0
    if cfg.use_moe:
        per_expert = sum(p.numel() for n, p in params.items() if ".mlp.experts.0." in n) // cfg.num_hidden_layers
        unused = cfg.num_hidden_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    assert lm_config_params(cfg) == (total, total - unused)
