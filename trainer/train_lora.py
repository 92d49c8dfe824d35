"""LoRA fine-tuning: trains low-rank adapters on q_proj/o_proj of a frozen full_sft model.

    python trainer/train_lora.py                            # identity data -> out/lora/lora_identity_512.pth
    python trainer/train_lora.py --lora_name lora_medical --data_path dataset/lora_medical.jsonl
    torchrun --nproc_per_node 2 trainer/train_lora.py       # deepspeed --num_gpus=2 trainer/train_lora.py
    python trainer/train_lora.py --device cpu --hidden_size 64 --num_hidden_layers 2 --max_steps 20
Reads out/full_sft_<hidden>.pth and dataset/lora_identity.jsonl (the demo identity set when absent).
Writes only the adapter, out/lora/{lora_name}_<hidden>[_moe].pth (keys `...q_proj.lora.A.weight`, fp32),
and checkpoints/{lora_name}_<hidden>[_moe]_resume.pth. Use it with eval_llm.py --lora_weight, or fold it
into the base weight with scripts/convert_model.py --lora_path.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from dataset.lm_dataset import SFTDataset
from model.model_lora import apply_lora, freeze_non_lora, lora_parameters, save_lora
from trainer.trainer_utils import (cli, DATA, OUT, Logger, build_parser, data_kwargs, fit, init_stage, lm_loss, resolve_data,
                                   weight_path)


def main(argv=None):
    parser = build_parser("MiniMind LoRA Fine-tuning", save_dir=OUT / "lora", from_dir=OUT, epochs=50, batch_size=32,
                          learning_rate=1e-4, accumulation_steps=1, log_interval=10, save_interval=1, max_seq_len=512,
                          from_weight="full_sft", data_path=DATA / "lora_identity.jsonl",
                          demo_data="lora_identity.jsonl", wandb_project="MiniMind-LoRA")
    parser.add_argument("--lora_name", type=str, default="lora_identity", help="adapter name (file prefix)")
    parser.add_argument("--lora_rank", type=int, default=8, help="rank of each adapter")
    args = parser.parse_args(argv)
    args.save_weight = args.lora_name
    run_name = f"MiniMind-LoRA-{args.lora_name}-Epoch-{args.epochs}-BatchSize-{args.batch_size}-LR-{args.learning_rate}"
    run, lm_config, ckp, tracker, model, tokenizer = init_stage(args, run_name)   # 1-5. run, config, tracker, model
    apply_lora(model, rank=args.lora_rank)                 # adapters on the square layers; the base is frozen
    freeze_non_lora(model)
    params = lora_parameters(model)
    total, lora = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    Logger(f"LLM params: {total / 1e6:.3f}M, LoRA params: {lora / 1e6:.3f}M ({100 * lora / total:.2f}%)")
    train_ds = SFTDataset(resolve_data(args), tokenizer, **data_kwargs(args))
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    save_path = weight_path(args.save_dir, args.lora_name, lm_config)

    def save_adapter(raw_model):
        save_lora(raw_model, save_path)

    # 6-8. resume (the full model incl. adapters), DDP, train: SFT loss, clipping and saving only the adapters
    _, loss = fit(run, args, model, optimizer, train_ds, lm_loss, tracker, lm_config, ckp, params=params,
                  save_fn=save_adapter)
    return save_path, loss


if __name__ == "__main__":
    cli(main)
