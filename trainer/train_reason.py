"""Reasoning distillation: SFT on R1-style answers, with extra loss weight on the format tags.

    python trainer/train_reason.py                          # alias: trainer/train_distill_reason.py
    torchrun --nproc_per_node 2 trainer/train_reason.py
    python trainer/train_reason.py --device cpu --hidden_size 64 --num_hidden_layers 2 --max_steps 20
Reads out/dpo_<hidden>.pth and dataset/r1_mix_1024.jsonl (the demo R1 set when absent); targets look like
"<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>".
Writes out/reason_<hidden>[_moe].pth and checkpoints/reason_<hidden>[_moe]_resume.pth.

The tags are not special tokens (each is several pieces: '<', 'th', 'ink', '>'), so the original
weighted every occurrence of those pieces anywhere, prompt positions included. Here only complete
tag sequences inside supervised positions get --tag_weight.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset
from dataset.scoring import TAGS
from model.cli import cli
from trainer.core.batch_plan import supervised_collate
from trainer.core.loop import train_loop
from trainer.core.tracking import init_tracker
from trainer.core.stage import (DATA, batch_stats, build_parser, data_kwargs, init_config, init_model, init_run,
                                   resolve_data, restore, wrap_model)

def tag_weights(targets: torch.Tensor, loss_mask: torch.Tensor, tag_ids, weight: float) -> torch.Tensor:
    """loss_mask with `weight` on every position that belongs to a complete, supervised tag sequence."""
    weights = loss_mask.float().clone()
    for ids in tag_ids:
        n = len(ids)
        if targets.shape[1] < n:
            continue
        windows = targets.unfold(1, n, 1)                                     # (B, T-n+1, n)
        hit = (windows == torch.tensor(ids, device=targets.device)).all(-1)   # tag starts here
        hit &= loss_mask.unfold(1, n, 1).bool().all(-1)                       # and is supervised
        for k in range(n):
            weights[:, k: k + hit.shape[1]][hit] = weight
    return weights


def reason_loss(model, batch, tag_ids, tag_weight: float):
    """Cross-entropy on supervised tokens with `tag_weight` on the think/answer tags, normalised by the
    unweighted count of supervised tokens (as the original); plus the MoE load-balancing loss."""
    targets, at = batch["labels"], batch["loss_at"]      # only supervised positions reach the output layer
    weights = tag_weights(targets, batch["loss_mask"], tag_ids, tag_weight).reshape(-1).index_select(0, at)
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), packed=batch["packed"], logits_at=at)
    ce = F.cross_entropy(out.logits.float(), targets.reshape(-1).index_select(0, at), reduction="none")
    return (ce * weights).sum() / max(batch["loss_tokens"], 1) + out.aux_loss, batch_stats(batch)


def main(argv=None):
    parser = build_parser("MiniMind Reasoning Distillation", save_weight="reason", epochs=1, batch_size=8,
                          learning_rate=1e-6, accumulation_steps=1, max_seq_len=1024, from_weight="dpo",
                          data_path=DATA / "r1_mix_1024.jsonl", demo_data="r1.jsonl",
                          wandb_project="MiniMind-Reasoning", packing=1)
    parser.add_argument("--tag_weight", type=float, default=10.0, help="loss weight of the think/answer tag tokens")
    args = parser.parse_args(argv)
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. model config + resume state
    tracker = init_tracker(args, ckp)                                 # 3. swanlab/wandb, or a no-op
    model, tokenizer = init_model(lm_config, args, run.device)        # 4. the dpo model + tokenizer
    tag_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in TAGS]
    train_ds = SFTDataset(resolve_data(args), tokenizer, **data_kwargs(args))        # 5. data and optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, **run.adamw)
    start = restore(ckp, model, optimizer, run.scaler)                # 6. resume
    model = wrap_model(model, run, args, [optimizer])                 # 7. DDP or FSDP, compile
    return train_loop(run, args, model, [optimizer], train_ds,        # 8. train
                      lambda batch: reason_loss(model, batch, tag_ids, args.tag_weight),
                      collate_fn=supervised_collate(args), lm_config=lm_config, tracker=tracker, start=start)


if __name__ == "__main__":
    cli(main)
