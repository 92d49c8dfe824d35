"""The CUDA paths of training (skipped without CUDA; run them on a GPU machine with `python -m pytest -m gpu`):
auto precision (bf16, or fp16 with a GradScaler), packed rows on the GPU, torch.compile, and two processes
over nccl. Each trains the tiny model for a few steps and checks what only the GPU path can get wrong."""
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


def test_compile_on_cuda(tmp_path):
    data = write_tiny_corpus(tmp_path / "data", n=64)
    path, loss = train_pretrain.main(cuda_args(tmp_path, data["pretrain"], max_steps=5, use_compile=1))
    assert loss == loss and not any("_orig_mod" in k for k in torch.load(path))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_two_gpus_over_nccl(tmp_path):
    data = write_tiny_corpus(tmp_path / "data", n=64)
    args = cuda_args(tmp_path, data["pretrain"], max_steps=4)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(ROOT / "trainer" / "train_pretrain.py"), *args],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout and (tmp_path / "out" / "pretrain_64.pth").exists()
