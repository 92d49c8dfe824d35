"""Pretraining: next-token prediction on plain text, from random weights.

    python trainer/train_pretrain.py                        # or: cd trainer && python train_pretrain.py
    torchrun --nproc_per_node 2 trainer/train_pretrain.py   # deepspeed --num_gpus=2 trainer/train_pretrain.py
    python trainer/train_pretrain.py --model_family minimind3   # the original's newest family: out/pretrain_768.pth
    python trainer/train_pretrain.py --device cpu --hidden_size 64 --num_hidden_layers 2 \\
        --data_path dataset/demo/pretrain.jsonl --batch_size 8 --max_steps 20   # tiny CPU run, seconds
Reads dataset/pretrain_hq.jsonl (the built-in demo corpus when that file is absent).
Writes out/pretrain_<hidden>[_moe].pth (+ .json config) and checkpoints/pretrain_<hidden>[_moe]_resume.pth.

--batch_size counts texts, as the original. Each micro-batch's texts are packed (--packing 1): several share a
row of max_seq_len tokens, each attending only to itself, so almost no position is padding; --packing 0 gives
the original's one text per row, padded.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from dataset.lm_dataset import PretrainDataset
from model.cli import cli
from trainer.core.batch_plan import supervised_collate
from trainer.core.loop import train_loop
from trainer.core.tracking import init_tracker
from trainer.core.stage import (DATA, batch_stats, build_parser, data_kwargs, init_config, init_model, init_run,
                                   resolve_data, restore, wrap_model)


def pretrain_loss(model, batch):
    """Token-mean cross-entropy on every real token (the loss mask is 0 only on padding), plus the MoE
    load-balancing loss. Only the supervised positions (loss_at, from the collate) reach the output layer."""
    at = batch["loss_at"]
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), packed=batch["packed"], logits_at=at,
                loss_targets=batch["labels"].view(-1)[at])
    return out.loss + out.aux_loss, batch_stats(batch)


def main(argv=None):
    args = build_parser("MiniMind Pretraining", save_weight="pretrain", epochs=1, batch_size=32,
                        learning_rate=5e-4, accumulation_steps=8, max_seq_len=512, from_weight="none",
                        data_path=DATA / "pretrain_hq.jsonl", demo_data="pretrain.jsonl",
                        wandb_project="MiniMind-Pretrain", packing=1).parse_args(argv)
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. model config + resume state
    tracker = init_tracker(args, ckp)                                 # 3. swanlab/wandb, or a no-op
    model, tokenizer = init_model(lm_config, args, run.device)        # 4. the model (random init) + tokenizer
    train_ds = PretrainDataset(resolve_data(args), tokenizer, **data_kwargs(args))   # 5. data and optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, **run.adamw)
    start = restore(ckp, model, optimizer, run.scaler)                # 6. resume
    model = wrap_model(model, run, args, [optimizer])                 # 7. DDP or FSDP, compile
    return train_loop(run, args, model, [optimizer], train_ds,        # 8. train
                      lambda batch: pretrain_loss(model, batch), collate_fn=supervised_collate(args),
                      lm_config=lm_config, tracker=tracker, start=start)


if __name__ == "__main__":
    cli(main)
