"""Full-parameter SFT: teaches a pretrained MiniMind the ChatML dialogue format.

    python trainer/train_full_sft.py                        # or: cd trainer && python train_full_sft.py
    torchrun --nproc_per_node 2 trainer/train_full_sft.py   # deepspeed --num_gpus=2 trainer/train_full_sft.py
    python trainer/train_full_sft.py --device cpu --hidden_size 64 --num_hidden_layers 2 \\
        --data_path dataset/demo/sft.jsonl --batch_size 8 --max_steps 20   # tiny CPU run, seconds
Reads dataset/sft_mini_512.jsonl (the built-in demo corpus when absent) and out/pretrain_<hidden>.pth.
Writes out/full_sft_<hidden>[_moe].pth (+ .json config) and checkpoints/full_sft_<hidden>[_moe]_resume.pth.

A jsonl line becomes a sample in dataset/lm_dataset.py (SFTDataset: chat template, then a loss mask that
is 1 on the assistant's tokens only); trainer/core/loop.py takes --batch_size samples per micro-batch,
lays them out with the collate chosen below (supervised_collate: packed rows, trainer/core/batch_plan.py), calls
sft_loss below on each batch and steps the optimizer; the model is model/model_minimind.py.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from dataset.lm_dataset import SFTDataset
from model.cli import cli
from trainer.core.batch_plan import supervised_collate
from trainer.core.loop import train_loop
from trainer.core.tracking import init_tracker
from trainer.core.stage import (DATA, batch_stats, build_parser, data_kwargs, init_config, init_model, init_run,
                                   resolve_data, restore, wrap_model)


def sft_loss(model, batch):
    """Token-mean cross-entropy on the assistant's tokens only (loss_mask), plus the MoE load-balancing loss.
    Prompt tokens and padding skip the output layer: only loss_at (the collate's supervised positions) reach it."""
    at = batch["loss_at"]
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), packed=batch["packed"], logits_at=at,
                loss_targets=batch["labels"].view(-1)[at])
    return out.loss + out.aux_loss, batch_stats(batch)


def main(argv=None):
    args = build_parser("MiniMind Full SFT", save_weight="full_sft", epochs=2, batch_size=16, learning_rate=5e-7,
                        accumulation_steps=1, max_seq_len=512, from_weight="pretrain",
                        data_path=DATA / "sft_mini_512.jsonl", demo_data="sft.jsonl",
                        wandb_project="MiniMind-Full-SFT", packing=1).parse_args(argv)
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. model config + resume state
    tracker = init_tracker(args, ckp)                                 # 3. swanlab/wandb, or a no-op
    model, tokenizer = init_model(lm_config, args, run.device)        # 4. the pretrained model + tokenizer
    train_ds = SFTDataset(resolve_data(args), tokenizer, **data_kwargs(args))        # 5. data and optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, **run.adamw)
    start = restore(ckp, model, optimizer, run.scaler)                # 6. resume
    model = wrap_model(model, run, args, [optimizer])                 # 7. DDP or FSDP, compile
    return train_loop(run, args, model, [optimizer], train_ds,        # 8. train
                      lambda batch: sft_loss(model, batch), collate_fn=supervised_collate(args),
                      lm_config=lm_config, tracker=tracker, start=start)


if __name__ == "__main__":
    cli(main)
