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
