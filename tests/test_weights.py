"""model/weights.py: weight files are written atomically (a crash leaves the old file, a killed writer's temp
files are removed), in the original's format (fp16, every key) with the .json config next to them; names; a corrupted
or truncated file is one clear error."""
import os
import subprocess
import sys

import pytest
import torch

from model.loading import load_weights
from model.weights import atomic_save, save_weights, weight_path
from tests.conftest import tiny_config
from trainer.core.resume import lm_checkpoint


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    atomic_save({"a": torch.ones(3)}, target)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1)}, f)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"a": torch.zeros(3)}, target)
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


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    target = tmp_path / "w.pth"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".w.pth.{dead.stdout.strip()}.abc123.tmp"      # left by a writer that was killed
    stale.write_bytes(b"x" * 1000)
    alive = tmp_path / f".w.pth.{os.getppid()}.def456.tmp"             # a live writer's file is kept
    alive.write_bytes(b"y")
    atomic_save({"a": torch.ones(1)}, target)
    assert not stale.exists() and alive.exists() and target.exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())   # not the 0600 of a temp file


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_weight_path_names():
    assert weight_path("out", "pretrain", tiny_config(hidden_size=512)).name == "pretrain_512.pth"
    assert weight_path("out", "dpo", tiny_config(hidden_size=640, use_moe=True)).name == "dpo_640_moe.pth"
    assert weight_path("ck", "full_sft", tiny_config(), suffix="_resume.pth").name == "full_sft_64_resume.pth"


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
