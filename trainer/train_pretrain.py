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
from trainer.trainer_utils import (DATA, build_parser, init_config, init_model, init_run, init_tracker,
                                   lm_loss, resolve_data, restore, train, wrap_ddp)


def main(argv=None):
    args = build_parser("MiniMind Pretraining", save_weight="pretrain", epochs=1, batch_size=32,
                        learning_rate=5e-4, accumulation_steps=8, max_seq_len=512, from_weight="none",
                        data_path=DATA / "pretrain_hq.jsonl", demo_data="pretrain.jsonl",
                        wandb_project="MiniMind-Pretrain").parse_args(argv)
    run = init_run(args)                                   # 1. distributed, device, seed  3. autocast, scaler
    lm_config, ckp = init_config(args)                     # 2. model config + resume data (None if fresh)
    tracker = init_tracker(args, ckp)                      # 4. swanlab/wandb, or a no-op
    model, tokenizer = init_model(lm_config, args.from_weight, args.tokenizer_path,   # 5. this stage
                                  args.from_dir or args.save_dir, run.device)
    train_ds = PretrainDataset(resolve_data(args), tokenizer, max_length=args.max_seq_len,
                               pad_to_max=bool(args.pad_to_max))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    start = restore(ckp, model, optimizer, run.scaler)    # 6. resume
    model = wrap_ddp(model, run)                           # 7. DDP
    return train(run, args, model, optimizer, train_ds, lm_loss, tracker, lm_config, start)   # 8. train


if __name__ == "__main__":
    main()
