"""Pretraining: next-token prediction on plain text, from random weights.

    python trainer/train_pretrain.py                        # or: cd trainer && python train_pretrain.py
    torchrun --nproc_per_node 2 trainer/train_pretrain.py   # deepspeed --num_gpus=2 trainer/train_pretrain.py
    python trainer/train_pretrain.py --device cpu --hidden_size 64 --num_hidden_layers 2 \\
        --data_path dataset/demo/pretrain.jsonl --max_steps 20   # tiny CPU run, seconds
Reads dataset/pretrain_hq.jsonl (the built-in demo corpus when that file is absent).
Writes out/pretrain_<hidden>[_moe].pth (+ .json config) and checkpoints/pretrain_<hidden>[_moe]_resume.pth.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from dataset.lm_dataset import PretrainDataset
from trainer.trainer_utils import cli, DATA, build_parser, fit, init_stage, lm_loss, data_kwargs, resolve_data


def main(argv=None):
    args = build_parser("MiniMind Pretraining", save_weight="pretrain", epochs=1, batch_size=32,
                        learning_rate=5e-4, accumulation_steps=8, max_seq_len=512, from_weight="none",
                        data_path=DATA / "pretrain_hq.jsonl", demo_data="pretrain.jsonl",
                        wandb_project="MiniMind-Pretrain").parse_args(argv)
    run, lm_config, ckp, tracker, model, tokenizer = init_stage(args)     # 1-5. run, config, tracker, model
    train_ds = PretrainDataset(resolve_data(args), tokenizer, **data_kwargs(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    # 6-8. resume, DDP, train on lm_loss: cross-entropy on every real token (+ MoE aux loss)
    return fit(run, args, model, optimizer, train_ds, lm_loss, tracker, lm_config, ckp)


if __name__ == "__main__":
    cli(main)
