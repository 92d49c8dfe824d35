"""trainer_utils / checkpoint / data_order: schedule, names, resume bookkeeping, batch order (shuffled, grouped,
packed), flags, precision, one-line errors. Atomic writes and the weight format: tests/test_weights.py."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, tiny_config
from model.cli import one_line
from model.loading import load_weights
from model.weights import save_weights, weight_path
from trainer.checkpoint import lm_checkpoint
from trainer.loop import get_lr
from trainer.trainer_utils import (OUT, build_parser, choose_dtype, init_run, masked_cross_entropy, resolve_data,
                                   supervised_loss)


def test_get_lr_reference_values():
    assert get_lr(0, 100, 5e-4) == pytest.approx(5e-4)
    assert get_lr(50, 100, 5e-4) == pytest.approx(2.75e-4)
    assert get_lr(100, 100, 5e-4) == pytest.approx(5e-5)
    assert get_lr(25, 100, 1.0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_weight_path_names():
    assert weight_path("out", "pretrain", tiny_config(hidden_size=512)).name == "pretrain_512.pth"
    assert weight_path("out", "dpo", tiny_config(hidden_size=640, use_moe=True)).name == "dpo_640_moe.pth"
    assert weight_path("ck", "full_sft", tiny_config(), suffix="_resume.pth").name == "full_sft_64_resume.pth"


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
def test_supervised_loss_equals_the_full_logits_loss(moe):
    """Logits computed only at supervised positions give the same loss and gradients as the full logits
    followed by masked_cross_entropy (packed rows with position_ids too); an all-zero mask gives 0 + aux."""
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(use_moe=moe))
    ids = torch.randint(3, 400, (3, 12))
    mask = (torch.rand(3, 12) < 0.4).long()
    batch = {"input_ids": ids, "labels": torch.randint(0, 400, (3, 12)), "loss_mask": mask,
             "position_ids": torch.tensor([list(range(5)) + list(range(7))] * 3)}
    loss, _ = supervised_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    out = model(ids, position_ids=batch["position_ids"])
    full = masked_cross_entropy(out.logits, batch["labels"], mask) + out.aux_loss
    full_grads = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    assert torch.allclose(loss, full, atol=1e-6, rtol=0)
    for g, h in zip(grads, full_grads):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, atol=1e-6, rtol=1e-5))
    zero, out = supervised_loss(model, {**batch, "loss_mask": torch.zeros_like(mask)})
    assert out.logits.shape == (0, model.config.vocab_size)
    assert torch.allclose(zero, out.aux_loss) and zero.requires_grad


def test_load_weights_errors_name_the_file_and_stage(tmp_path):
    from model.model_minimind import MiniMindForCausalLM
    model = MiniMindForCausalLM(tiny_config())
    with pytest.raises(FileNotFoundError, match=r"full_sft_64\.pth.*train_full_sft\.py"):
        load_weights(model, tmp_path / "full_sft_64.pth")
    other = MiniMindForCausalLM(tiny_config(hidden_size=128))
    path = save_weights(other, tmp_path / "pretrain_64.pth")
    with pytest.raises(ValueError, match=r"pretrain_64\.pth.*hidden_size"):
        load_weights(model, path)
    (tmp_path / "junk_64.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk_64.pth"):
        load_weights(model, tmp_path / "junk_64.pth")


def test_resume_step_rescaled_by_world_size(tmp_path, capsys):
    from model.model_minimind import MiniMindForCausalLM
    cfg = tiny_config()
    model = MiniMindForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters())
    lm_checkpoint(cfg, "pretrain", model=model, optimizer=opt, epoch=1, step=30, save_dir=tmp_path)
    path = tmp_path / "pretrain_64_resume.pth"
    ckp = torch.load(path, weights_only=False)
    assert set(ckp) >= {"model", "optimizer", "epoch", "step", "world_size", "wandb_id"}
    assert all(v.dtype == torch.float32 for v in ckp["model"].values())   # fp32 master weights, not fp16
    ckp["world_size"] = 4
    torch.save(ckp, path)
    assert lm_checkpoint(cfg, "pretrain", save_dir=tmp_path)["step"] == 120
    assert lm_checkpoint(cfg, "missing", save_dir=tmp_path) is None


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
    import trainer.trainer_utils as tu
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
    import trainer.trainer_utils as tu
    real_open = builtins.open
    for flags, expected in (("fpu sse avx2", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
        assert tu.cpu_has_bf16_units() is expected
        monkeypatch.setattr(builtins, "open", real_open)


def test_corrupted_or_truncated_files_are_one_clear_error(tmp_path):
    from model.model_minimind import MiniMindForCausalLM
    cfg = tiny_config()
    model = MiniMindForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters())
    resume = lm_checkpoint(cfg, "pretrain", model=model, optimizer=opt, epoch=0, step=3, save_dir=tmp_path)
    weights = save_weights(model, weight_path(tmp_path, "pretrain", cfg), cfg)
    for path in (resume, weights):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4096] = os.urandom(4096)
        path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{resume}.*corrupted"):
        lm_checkpoint(cfg, "pretrain", save_dir=tmp_path)
    with pytest.raises(ValueError, match=f"{weights}.*corrupted"):
        load_weights(MiniMindForCausalLM(cfg), weights)
    weights.write_bytes(weights.read_bytes()[:5000])                      # truncated
    with pytest.raises(ValueError, match="corrupted .damaged or truncated"):
        load_weights(MiniMindForCausalLM(cfg), weights)


def test_one_line_keeps_the_file_and_line_of_a_dataloader_worker_error():
    err = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                     '  File "x.py", line 3, in f\n    raise ValueError(msg)\nValueError: data.jsonl:7: bad JSON: x\n')
    assert one_line(err) == "data.jsonl:7: bad JSON: x"
    assert one_line(OSError(28, "No space left on device", "out/w.pth")) == "out/w.pth: No space left on device"


def test_resolve_data_falls_back_to_demo(tmp_path, monkeypatch):
    import trainer.trainer_utils as tu
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


def test_tracker_missing_package_is_one_warning(monkeypatch):
    import builtins
    from trainer.tracking import init_tracker
    real_import = builtins.__import__

    def no_trackers(name, *a, **k):
        if name in ("swanlab", "wandb"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    for tracker in ("swanlab", "wandb"):
        args = build_parser("t").parse_args(["--use_wandb", "--tracker", tracker])
        with pytest.warns(UserWarning, match=tracker):
            run = init_tracker(args)
        run.log({"loss": 1.0})   # a no-op tracker: the loop never needs `if wandb:`
        run.finish()
    assert init_tracker(build_parser("t").parse_args([])).id is None


def test_no_command_accepts_abbreviated_flags():
    """One behaviour everywhere: `--max_step` is an error, not a silent `--max_steps` (argparse allow_abbrev=False)."""
    import re
    offenders = []
    for path in ROOT.glob("**/*.py"):
        if ".git" in path.parts or "tests" in path.parts:
            continue
        for call in re.findall(r"ArgumentParser\((?:[^()]|\([^()]*\))*\)", path.read_text(encoding="utf-8")):
            if "allow_abbrev=False" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call[:60]}")
    assert not offenders, offenders


def test_cpu_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    """A peak measured while the machine was busy is too low and made MFU read above 100%: the cache keeps
    the best rate seen, so a later quiet start corrects it, and a later busy start cannot lower it."""
    from trainer import progress
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path))
    key = f"{progress._cpu_model()}|{torch.float32}|{torch.get_num_threads()}|{torch.__version__}"
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: 1.0}))        # stale: measured under load
    measured = progress.cpu_peak_flops()
    assert measured > 1e8
    assert json.loads((tmp_path / "cpu_peak.json").read_text())[key] == measured
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: 1e18}))       # better than any measurement
    assert progress.cpu_peak_flops() == 1e18


def test_cpu_peak_measurement_leaves_the_run_rng_alone(tmp_path, monkeypatch):
    """The start-up matmul once drew from torch's global RNG, so a resumed run (which measures again after
    restoring the RNG) sampled differently from the uninterrupted one and RL resume was no longer exact."""
    from trainer import progress
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    progress.cpu_peak_flops()
    assert torch.equal(torch.rand(4), expected)
