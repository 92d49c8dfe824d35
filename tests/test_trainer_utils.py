"""trainer_utils / checkpoint: schedule, names, atomic writes, resume bookkeeping, data order, flags."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, tiny_config
from trainer import checkpoint
from trainer.trainer_utils import (OUT, SkipBatchSampler, build_parser, get_lr, init_run, lm_checkpoint,
                                   load_weights, masked_cross_entropy, resolve_data, save_weights, weight_path)


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


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    checkpoint.atomic_save({"a": torch.ones(3)}, target)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1)}, f)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"a": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(target)["a"], torch.ones(3))   # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]     # and no temp file is left behind


def test_save_weights_format_and_config(tmp_path):
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    cfg = tiny_config()
    model = MiniMindForCausalLM(cfg)
    path = save_weights(model, weight_path(tmp_path, "pretrain", cfg), cfg)
    sd = torch.load(path)
    assert list(sd) == list(model.state_dict()) and all(v.dtype == torch.float16 for v in sd.values())
    saved_cfg = MiniMindConfig.from_json_file(path.with_suffix(".json"))
    assert saved_cfg.hidden_size == 64 and saved_cfg.num_hidden_layers == 2
    fresh = MiniMindForCausalLM(cfg)
    load_weights(fresh, path)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight.half().float())


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


def test_skip_batch_sampler_order_skip_and_ranks():
    full = list(SkipBatchSampler(50, 4, epoch=0))
    assert len(full) == 13 and sorted(sum(full, [])) == list(range(50))
    assert list(SkipBatchSampler(50, 4, epoch=0, skip_batches=5)) == full[5:]      # exactly `step` batches skipped
    assert list(SkipBatchSampler(50, 4, epoch=1)) != full                          # a new order every epoch
    r0 = sum(SkipBatchSampler(50, 4, epoch=0, rank=0, world_size=2), [])
    r1 = sum(SkipBatchSampler(50, 4, epoch=0, rank=1, world_size=2), [])
    assert len(r0) == len(r1) == 25 and set(r0) | set(r1) == set(range(50)) and not set(r0) & set(r1)
    lengths = [i % 7 for i in range(64)]
    grouped = list(SkipBatchSampler(64, 8, epoch=0, lengths=lengths))
    assert sorted(sum(grouped, [])) == list(range(64))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in full[:8] if b)


def test_parser_has_upstream_flags_and_defaults():
    args = build_parser("t").parse_args(["--local_rank=1"])   # the deepspeed launcher appends this
    expected = dict(save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, dtype="bfloat16",
                    num_workers=1, accumulation_steps=8, grad_clip=1.0, log_interval=100, save_interval=100,
                    hidden_size=512, num_hidden_layers=8, max_seq_len=512, use_moe=0, from_weight="none",
                    from_resume=0, use_wandb=False, wandb_project="MiniMind-Pretrain")
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.save_dir == str(OUT) and args.checkpoint_dir == str(ROOT / "checkpoints")
    with pytest.raises(SystemExit):
        build_parser("t").parse_args(["--use_moe", "2"])


def test_cpu_precision_defaults():
    run = init_run(build_parser("t").parse_args(["--device", "cpu"]))
    assert run.dtype == torch.float32 and not run.scaler.is_enabled()
    run = init_run(build_parser("t").parse_args(["--device", "cpu", "--dtype", "bfloat16"]))
    assert run.dtype == torch.bfloat16
    with run.autocast_ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


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
    from trainer.trainer_utils import init_tracker
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
