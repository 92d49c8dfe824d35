"""DPO (Rafailov et al. 2023): prefer the chosen answer over the rejected one, against a frozen reference.

    python trainer/train_dpo.py                             # or: cd trainer && python train_dpo.py
    torchrun --nproc_per_node 2 trainer/train_dpo.py        # deepspeed --num_gpus=2 trainer/train_dpo.py
    python trainer/train_dpo.py --device cpu --hidden_size 64 --num_hidden_layers 2 --max_steps 20 --ref_cache 1
Reads out/full_sft_<hidden>.pth (policy and reference) and dataset/dpo.jsonl (the demo pairs when absent).
Writes out/dpo_<hidden>[_moe].pth and checkpoints/dpo_<hidden>[_moe]_resume.pth.

Sequence log-probs are length-normalised (the mean over answer tokens), as the original does;
`--logp_reduction sum` gives the paper's summed form. `--ref_cache 1` computes the reference
log-probs once for the whole dataset, then frees the reference model.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dataset.lm_dataset import DPODataset, dpo_collate
from model.cli import cli
from trainer.core.rl import sequence_logps, token_logps
from trainer.core.loop import train_loop
from trainer.core.tracking import init_tracker
from trainer.core.stage import (DATA, Logger, build_parser, data_kwargs, init_config, init_model, init_run,
                                   resolve_data, restore, wrap_model)


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float):
    """-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), plus the implicit-reward accuracy and margin."""
    chosen_reward, rejected_reward = beta * (pol_chosen - ref_chosen), beta * (pol_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    stats = {"acc": (chosen_reward > rejected_reward).float().mean().item(),
             "margin": (chosen_reward - rejected_reward).mean().item()}
    return loss, stats


def pair_logps(model, batch, reduction):
    """Policy or reference sequence log-probs of chosen and rejected, in one forward of [2B, T]."""
    x = torch.cat([batch["x_chosen"], batch["x_rejected"]])
    y = torch.cat([batch["y_chosen"], batch["y_rejected"]])
    mask = torch.cat([batch["mask_chosen"], batch["mask_rejected"]])
    out = model(x)
    seq = sequence_logps(token_logps(out.logits, y), mask, reduction)
    return seq.chunk(2) + (out.aux_loss,)


class WithReferenceLogps(Dataset):
    """A DPO dataset plus the cached reference log-probs of each pair."""

    def __init__(self, ds, ref_chosen, ref_rejected):
        self.ds, self.ref_chosen, self.ref_rejected = ds, ref_chosen, ref_rejected

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "ref_chosen": self.ref_chosen[i], "ref_rejected": self.ref_rejected[i]}

    def lengths(self):
        return self.ds.lengths()


def cached_collate(batch):
    """dpo_collate plus the cached reference log-probs of each pair."""
    out = dpo_collate([{k: v for k, v in s.items() if not k.startswith("ref_")} for s in batch])
    return {**out, "ref_chosen": torch.stack([s["ref_chosen"] for s in batch]),
            "ref_rejected": torch.stack([s["ref_rejected"] for s in batch])}


@torch.no_grad()
def cache_reference(ref_model, ds, args, run):
    """Reference log-probs for every pair, computed once without a graph."""
    chosen, rejected = [], []
    loader = DataLoader(ds, batch_size=args.batch_size, collate_fn=dpo_collate, num_workers=args.num_workers)
    for batch in loader:
        batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with run.autocast_ctx:
            c, r, _ = pair_logps(ref_model, batch, args.logp_reduction)
        chosen.append(c.float().cpu()), rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def dpo_step(model, ref_model, batch, beta: float, reduction: str):
    """The DPO loss of one batch of pairs (+ the policy's MoE aux loss); the reference log-probs come from the
    frozen reference model, or from the batch when they were cached (--ref_cache 1)."""
    pol_c, pol_r, aux = pair_logps(model, batch, reduction)
    if ref_model is None:
        ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    else:
        with torch.no_grad():
            ref_c, ref_r, _ = pair_logps(ref_model, batch, reduction)
    loss, stats = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
    return loss + aux, {**stats, "tokens": batch["tokens"], "positions": 2 * batch["x_chosen"].numel()}


def main(argv=None):
    parser = build_parser("MiniMind DPO", save_weight="dpo", epochs=1, batch_size=4, learning_rate=4e-8,
                          accumulation_steps=1, max_seq_len=1024, from_weight="full_sft", data_path=DATA / "dpo.jsonl",
                          demo_data="dpo.jsonl", wandb_project="MiniMind-DPO")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta")
    parser.add_argument("--logp_reduction", type=str, default="mean", choices=["mean", "sum"],
                        help="sequence log-prob: mean over answer tokens (original) or sum (DPO paper)")
    parser.add_argument("--ref_cache", type=int, default=0, choices=[0, 1],
                        help="1 = precompute reference log-probs once and free the reference model")
    args = parser.parse_args(argv)
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. model config + resume state
    tracker = init_tracker(args, ckp)                                 # 3. swanlab/wandb, or a no-op
    model, tokenizer = init_model(lm_config, args, run.device, stage="policy")       # 4. policy and reference
    ref_model, _ = init_model(lm_config, args, run.device, stage="reference")
    ref_model.eval().requires_grad_(False)
    # 5. data; under --use_compile 1 every pair padded to max_seq_len: one shape to compile
    kwargs = {**data_kwargs(args), "pad_to_max": bool(args.pad_to_max or args.use_compile)}
    train_ds, collate = DPODataset(resolve_data(args), tokenizer, **kwargs), dpo_collate
    if args.ref_cache:
        train_ds = WithReferenceLogps(train_ds, *cache_reference(ref_model, train_ds, args, run))
        ref_model, collate = None, cached_collate
        Logger(f"cached reference log-probs for {len(train_ds)} pairs; reference model freed")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, **run.adamw)
    start = restore(ckp, model, optimizer, run.scaler)                # 6. resume
    model = wrap_model(model, run, args, [optimizer])                 # 7. DDP or FSDP, compile
    return train_loop(run, args, model, [optimizer], train_ds,        # 8. train
                      lambda batch: dpo_step(model, ref_model, batch, args.beta, args.logp_reduction),
                      lm_config=lm_config, tracker=tracker, start=start, collate_fn=collate)


if __name__ == "__main__":
    cli(main)
