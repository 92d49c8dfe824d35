"""Full-parameter SFT: teaches a pretrained MiniMind the ChatML dialogue format.

    python trainer/train_full_sft.py                        # or: cd trainer && python train_full_sft.py
    torchrun --nproc_per_node 2 trainer/train_full_sft.py   # deepspeed --num_gpus=2 trainer/train_full_sft.py
    python trainer/train_full_sft.py --device cpu --hidden_size 64 --num_hidden_layers 2 \\
        --data_path dataset/demo/sft.jsonl --max_steps 20   # tiny CPU run, seconds
Reads dataset/sft_mini_512.jsonl (the built-in demo corpus when absent) and out/pretrain_<hidden>.pth.
Writes out/full_sft_<hidden>[_moe].pth (+ .json config) and checkpoints/full_sft_<hidden>[_moe]_resume.pth.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from dataset.lm_dataset import SFTDataset
from trainer.trainer_utils import cli, DATA, build_parser, fit, init_stage, lm_loss, data_kwargs, resolve_data


def main(argv=None):
    args = build_parser("MiniMind Full SFT", save_weight="full_sft", epochs=2, batch_size=16, learning_rate=5e-7,
                        accumulation_steps=1, max_seq_len=512, from_weight="pretrain",
                        data_path=DATA / "sft_mini_512.jsonl", demo_data="sft.jsonl",
                        wandb_project="MiniMind-Full-SFT").parse_args(argv)
    run, lm_config, ckp, tracker, model, tokenizer = init_stage(args)     # 1-5. run, config, tracker, model
    train_ds = SFTDataset(resolve_data(args), tokenizer, **data_kwargs(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    # 6-8. resume, DDP, train on lm_loss: cross-entropy on assistant tokens only (+ MoE aux loss)
    return fit(run, args, model, optimizer, train_ds, lm_loss, tracker, lm_config, ckp)


if __name__ == "__main__":
    cli(main)
