"""The CUDA paths of training (skipped without CUDA; run them on a GPU machine with `python -m pytest -m gpu`):
auto precision (bf16, or fp16 with a GradScaler), packed rows on fused attention kernels (never SDPA's math
kernel), RMSNorm in bf16, torch.compile with static shapes (no graph break, one graph per batch shape, CUDA
graphs), fused AdamW, and two processes over nccl. Each checks what only the GPU path can get wrong
(tests/test_gpu_path.py checks the same pieces on CPU where they run there)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, tiny_train_args, write_tiny_corpus
from trainer import train_full_sft, train_pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_args(tmp_path, data, **flags):
    args = tiny_train_args(tmp_path, data, **flags)
    return [a if a != "cpu" else "cuda:0" for a in args]


def metrics(tmp_path, name):
    return [json.loads(line) for line in open(tmp_path / "out" / f"{name}_metrics.jsonl")]


def test_auto_precision_on_cuda_trains_and_saves_fp16(tmp_path, capsys):
    data = write_tiny_corpus(tmp_path / "data", n=64)
    path, loss = train_pretrain.main(cuda_args(tmp_path, data["pretrain"], max_steps=6, learning_rate=2e-3))
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert f"precision {expected}" in capsys.readouterr().out
    sd = torch.load(path)
    assert loss == loss and all(v.dtype == torch.float16 and torch.isfinite(v.float()).all() for v in sd.values())


def test_fp16_grad_scaler_steps_and_resumes(tmp_path):
    """--dtype float16: the GradScaler scales, skips overflowing steps by itself and is saved for resume."""
    data = write_tiny_corpus(tmp_path / "data", n=64)
    train_pretrain.main(cuda_args(tmp_path, data["pretrain"], max_steps=4, dtype="float16", accumulation_steps=2))
    ckp = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=False)
    assert ckp["scaler"] and ckp["scaler"]["scale"] > 0
    _, loss = train_pretrain.main(cuda_args(tmp_path, data["pretrain"], max_steps=8, dtype="float16",
                                            accumulation_steps=2, from_resume=1))
    assert loss == loss


def test_packed_sft_on_cuda_matches_the_cpu_loss(tmp_path):
    """The same packed batches on CUDA (fp32) and CPU give the same first losses."""
    data = write_tiny_corpus(tmp_path / "data", n=64)
    for device in ("cpu", "cuda"):    # from random weights: the test writes no pretrain weight to start from
        args = tiny_train_args(tmp_path / device, data["sft"], max_steps=3, dtype="float32", packing=1,
                               from_weight="none")
        if device == "cuda":
            args = [a if a != "cpu" else "cuda:0" for a in args]
        train_full_sft.main(args)
    cpu, cuda = (metrics(tmp_path / d, "full_sft_64") for d in ("cpu", "cuda"))
    assert [round(r["loss"], 3) for r in cpu] == [round(r["loss"], 3) for r in cuda]


def test_adamw_is_fused_on_cuda():
    from types import SimpleNamespace

    from trainer.core.stage import init_run
    run = init_run(SimpleNamespace(device="cuda:0", dtype="auto", seed=42, fsdp=0))
    assert run.adamw == {"fused": True}
    param = torch.nn.Parameter(torch.ones(3, device="cuda"))
    param.grad = torch.ones_like(param)
    torch.optim.AdamW([param], lr=0.1, **run.adamw).step()
    assert torch.allclose(param.detach().cpu(), torch.full((3,), 0.899), atol=1e-5)   # decay 1e-3, then -lr


def test_a_nan_step_on_cuda_is_skipped_on_the_device(tmp_path, capsys, monkeypatch):
    """CUDA + fused AdamW: the guard takes the step without a host sync (the kernel skips a non-finite step
    itself) and warns one step later; the saved weights stay finite."""
    from trainer.core import loop
    decided = []
    real_defers = loop.defers_finite_check
    monkeypatch.setattr(loop, "defers_finite_check", lambda *a: decided.append(real_defers(*a)) or decided[-1])
    calls, real = [], train_pretrain.pretrain_loss

    def sometimes_nan(model, batch):
        loss, stats = real(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(train_pretrain, "pretrain_loss", sometimes_nan)
    data = write_tiny_corpus(tmp_path / "data", n=64)
    path, loss = train_pretrain.main(cuda_args(tmp_path, data["pretrain"], max_steps=6, accumulation_steps=1))
    assert decided == [True] and "epoch 1 step 3: the loss or a gradient is not finite" in capsys.readouterr().out
    assert all(torch.isfinite(v.float()).all() for v in torch.load(path).values())


def test_compile_on_cuda_has_no_graph_break_and_one_graph_per_batch_shape(tmp_path, capsys):
    """--use_compile 1: static shapes (rows of max_seq_len - 1, their count in quarters of --batch_size, the loss
    over every position) give one graph per shape and no graph break; each compile is said and timed apart."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    data = write_tiny_corpus(tmp_path / "data", n=64)
    path, loss = train_pretrain.main(cuda_args(tmp_path, data["pretrain"], max_steps=12, use_compile=1,
                                               accumulation_steps=1))
    out = capsys.readouterr().out
    assert loss == loss and not any("_orig_mod" in k for k in torch.load(path))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    compiles = out.count("compiled in")
    assert 1 <= compiles == counters["stats"]["unique_graphs"] <= 5      # 4 row buckets (+ a last short batch)
    torch._dynamo.reset()


def test_compile_reduce_overhead_trains_like_default_mode(tmp_path):
    """--compile_mode reduce-overhead (CUDA graphs over the fixed shapes): the same first losses as mode default."""
    data = write_tiny_corpus(tmp_path / "data", n=64)
    losses = []
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        train_pretrain.main(cuda_args(tmp_path / mode, data["pretrain"], max_steps=6, use_compile=1,
                                      compile_mode=mode, dtype="float32", accumulation_steps=1))
        losses.append([round(r["loss"], 3) for r in metrics(tmp_path / mode, "pretrain_64")])
    torch._dynamo.reset()
    assert losses[0] == losses[1] and all(x == x for x in losses[0])
    with pytest.raises(ValueError, match="--accumulation_steps 1"):    # a replay would overwrite the summed grads
        train_pretrain.main(cuda_args(tmp_path / "acc", data["pretrain"], max_steps=2, use_compile=1,
                                      compile_mode="reduce-overhead", accumulation_steps=2))


def _packed_cuda_batch(dtype):
    from tests.test_model import pack_rows
    ids, pos, spans = pack_rows([[37, 110, 30, 70], [90, 130, 20]], width=320)
    return ids.cuda(), pos.cuda(), spans


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_rows_on_cuda_use_a_fused_kernel_never_the_math_one(dtype):
    """Packed rows on CUDA: bf16 through varlen flash attention, fp32 through FlexAttention; SDPA's math kernel
    never runs (profiled, forward and backward), and each sample gets the logits and the gradients it gets alone
    (dense block mask as the reference)."""
    import model.model_minimind as mm
    from tests.test_model import random_model
    model = random_model(seed=7).cuda().train()
    ids, pos, spans = _packed_cuda_batch(dtype)
    expected = "varlen" if dtype == torch.bfloat16 and mm.varlen_kernel() else "flex"
    assert mm.packed_kernel(ids, dtype, 0.0) == expected

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(ids, position_ids=pos, packed=16).logits
        logits.float().square().mean().backward()
        return logits.float().detach(), [p.grad.float().clone() for p in model.parameters()]

    step()                                                 # warm-up: FlexAttention compiles here
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        logits, grads = step()
    names = {e.name for e in prof.events()}
    assert not any("_scaled_dot_product_attention_math" in n for n in names), sorted(names)
    if expected == "varlen":
        assert any("flash" in n.lower() for n in names), sorted(names)
    mm.PACKED_ATTENTION = "mask"
    try:
        want_logits, want_grads = step()
    finally:
        mm.PACKED_ATTENTION = None
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for r, row_spans in enumerate(spans):
        for start, sample in row_spans:
            got, want = logits[r, start:start + len(sample)], want_logits[r, start:start + len(sample)]
            assert (got - want).abs().max().item() <= tol * (want.abs().max().item() + 1)
    for g, h in zip(grads, want_grads):
        assert (g - h).abs().max().item() <= tol * (h.abs().max().item() + 1e-6)


def test_rms_norm_leaves_in_bf16_under_cuda_autocast():
    from tests.test_model import random_model
    model = random_model(seed=2).cuda()
    ids = torch.randint(3, 6400, (2, 16), device="cuda")
    seen = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(ids)
    assert seen == [torch.bfloat16]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_two_gpus_over_nccl(tmp_path):
    data = write_tiny_corpus(tmp_path / "data", n=64)
    args = cuda_args(tmp_path, data["pretrain"], max_steps=4)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(ROOT / "trainer" / "train_pretrain.py"), *args],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout and (tmp_path / "out" / "pretrain_64.pth").exists()
