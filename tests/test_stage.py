"""trainer/core/stage.py (and the loop's get_lr): schedule, each stage's supervised loss, flags, precision, the demo-data
fallback. Elsewhere: tests/test_batch_plan.py, test_resume.py, test_weights.py, test_cli.py, test_progress.py."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, tiny_config
from trainer.core.loop import get_lr
from trainer.core.batch_plan import _finish
from trainer.core.stage import OUT, build_parser, choose_dtype, init_run, masked_cross_entropy, resolve_data


def test_get_lr_reference_values():
    assert get_lr(0, 100, 5e-4) == pytest.approx(5e-4)
    assert get_lr(50, 100, 5e-4) == pytest.approx(2.75e-4)
    assert get_lr(100, 100, 5e-4) == pytest.approx(5e-5)
    assert get_lr(25, 100, 1.0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_masked_cross_entropy_matches_formula():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none").view(2, 5)
    expected = (ce * mask).sum() / mask.sum()
    assert torch.allclose(masked_cross_entropy(logits, targets, mask), expected, atol=1e-6)
    zero = masked_cross_entropy(logits.requires_grad_(), targets, torch.zeros_like(mask))
    assert zero.item() == 0.0
    zero.backward()   # no division by zero, still differentiable


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("stage", ["pretrain", "full_sft", "lora"])
@pytest.mark.parametrize("compiled", [False, True], ids=["supervised-positions", "compile-all-positions"])
def test_each_stage_loss_equals_the_full_logits_loss(moe, stage, compiled):
    """Each supervised script's loss, with logits computed only at the collate's supervised positions (loss_at)
    and the collate's packed count, gives the loss and gradients of the full logits followed by
    masked_cross_entropy (packed rows with position_ids); also with --use_compile 1's fixed-shape batch
    (compiled: loss_at = every position, labels -100 where no loss is taken)."""
    import importlib
    from model.model_minimind import MiniMindForCausalLM
    loss_fn = {"pretrain": "pretrain_loss", "full_sft": "sft_loss", "lora": "lora_loss"}[stage]
    loss_fn = getattr(importlib.import_module(f"trainer.train_{stage}"), loss_fn)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(use_moe=moe))
    ids = torch.randint(3, 400, (3, 12))
    mask = (torch.rand(3, 12) < 0.4).long()
    labels = torch.randint(0, 400, (3, 12))
    batch = _finish({"input_ids": ids, "labels": labels, "loss_mask": mask, "tokens": 36,
                     "position_ids": torch.tensor([list(range(5)) + list(range(7))] * 3)}, samples=6,
                    compiled=compiled)
    # 3 row starts + 3 restarts = 6 samples; under compile room for 8 (a power of two: few shapes)
    assert batch["packed"] == (8 if compiled else 6) and batch["loss_tokens"] == int(mask.sum())
    assert batch["loss_at"].numel() == (36 if compiled else int(mask.sum()))
    loss, stats = loss_fn(model, batch)
    assert stats == {"tokens": 36, "positions": 36}
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    out = model(ids, position_ids=batch["position_ids"])
    full = masked_cross_entropy(out.logits, labels, mask) + out.aux_loss
    full_grads = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    assert torch.allclose(loss, full, atol=1e-6, rtol=0)
    for g, h in zip(grads, full_grads):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, atol=1e-6, rtol=1e-5))


def test_parser_has_upstream_flags_and_defaults():
    args = build_parser("t").parse_args(["--local_rank=1"])   # the deepspeed launcher appends this
    expected = dict(save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, dtype="auto",
                    num_workers=1, accumulation_steps=8, grad_clip=1.0, log_interval=100, save_interval=100,
                    hidden_size=512, num_hidden_layers=8, max_seq_len=512, use_moe=0, from_weight="none",
                    from_resume=0, use_wandb=False, wandb_project="MiniMind-Pretrain")
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.save_dir == str(OUT) and args.checkpoint_dir == str(ROOT / "checkpoints")
    with pytest.raises(SystemExit):
        build_parser("t").parse_args(["--use_moe", "2"])
    with pytest.raises(SystemExit):
        build_parser("t").parse_args(["--max_step", "3"])       # no silent abbreviations
    assert build_parser("t", packing=1).parse_args([]).packing == 1 and not hasattr(args, "packing")


def test_precision_auto_follows_the_hardware(monkeypatch):
    import trainer.core.stage as tu
    monkeypatch.setattr(tu, "cpu_has_bf16_units", lambda: False)
    run = init_run(build_parser("t").parse_args(["--device", "cpu"]))
    assert run.dtype == torch.float32 and not run.scaler.is_enabled()
    monkeypatch.setattr(tu, "cpu_has_bf16_units", lambda: True)
    assert choose_dtype("auto", "cpu")[0] == torch.bfloat16
    assert choose_dtype("float32", "cpu")[0] == torch.float32         # an explicit --dtype always wins
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        choose_dtype("float16", "cpu")
    run = init_run(build_parser("t").parse_args(["--device", "cpu", "--dtype", "bfloat16"]))
    assert run.dtype == torch.bfloat16
    with run.autocast_ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins
    import trainer.core.stage as tu
    real_open = builtins.open
    for flags, expected in (("fpu sse avx2", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
        assert tu.cpu_has_bf16_units() is expected
        monkeypatch.setattr(builtins, "open", real_open)


def test_resolve_data_falls_back_to_demo(tmp_path, monkeypatch):
    import trainer.core.stage as tu
    monkeypatch.setattr(tu, "DATA", tmp_path)
    demo = tmp_path / "demo" / "pretrain.jsonl"
    demo.parent.mkdir()
    demo.write_text('{"text": "x"}\n')
    args = build_parser("t", data_path=tmp_path / "pretrain_hq.jsonl").parse_args([])
    assert resolve_data(args) == str(demo)
    args = build_parser("t").parse_args(["--data_path", str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        resolve_data(args)
    assert os.path.exists(demo)
