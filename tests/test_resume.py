"""trainer/core/resume.py: the resume file (its keys, fp32 master weights, the step rescaled when the world size
changes, a missing file is None)."""
import torch

from tests.conftest import tiny_config
from trainer.core.resume import lm_checkpoint


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


def test_a_resume_file_remembers_what_batch_size_counted(tmp_path, capsys):
    """Steps count micro-batches, so a run resumed under another --batch_unit would skip other samples: the resume
    file records the unit, and resuming under the other one is one clear error; an older file (no unit) warns."""
    import pytest
    from tests.conftest import tiny_train_args, write_tiny_corpus
    from trainer import train_pretrain
    data = write_tiny_corpus(tmp_path / "data", n=24)
    train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], max_steps=2))
    path = tmp_path / "ckpt" / "pretrain_64_resume.pth"
    assert torch.load(path, weights_only=False)["batch_unit"] == "samples"
    with pytest.raises(ValueError, match="written with --batch_unit samples"):
        train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], from_resume=1, batch_unit="rows"))
    ckp = torch.load(path, weights_only=False)
    del ckp["batch_unit"]
    torch.save(ckp, path)
    capsys.readouterr()
    train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], from_resume=1, max_steps=3))
    assert "add --batch_unit rows to continue it exactly" in capsys.readouterr().out
