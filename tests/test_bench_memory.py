"""bench/bench_memory.py: its activation formula equals the bytes autograd really saves (tiny configs,
dense and MoE), parameter counts match a real model, and the tables print."""
import pytest

from bench import bench_memory
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM


DENSE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, use_moe=True)


@pytest.mark.parametrize("fields", [DENSE, MOE])
def test_activation_estimate_equals_measured_saved_tensors(fields):
    estimate = bench_memory.activation_bytes_per_token(MiniMindConfig(**fields))
    assert bench_memory.measured_bytes_per_token(fields, seq_len=32) == pytest.approx(estimate, rel=0.01)


def test_counts_and_tables(capsys):
    fields = dict(hidden_size=64, num_hidden_layers=2, use_moe=True)
    counts = bench_memory.param_counts(bench_memory.build_meta(fields))
    real = MiniMindForCausalLM(MiniMindConfig(**fields))
    assert (counts["total"], counts["active"]) == real.count_parameters()
    assert counts["root"] == real.model.embed_tokens.weight.numel() + real.model.norm.weight.numel()
    ddp, fsdp = (bench_memory.per_gpu(counts, 0, 4, mode) for mode in ("ddp", "fsdp"))
    assert ddp["adamw"] == pytest.approx(8 * counts["total"] / 2 ** 30)
    assert fsdp["adamw"] * 4 == pytest.approx(ddp["adamw"])
    bench_memory.main(["--batch_size", "2", "--seq_len", "16", "--gpus", "1,2"])
    out = capsys.readouterr().out
    assert "| ~1B | 2048x22 | 16 / 4 | 5504 | 987.9M |" in out and "FSDP N=2" in out
