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
from model.cli import cli
from model.model_lora import apply_lora, freeze_non_lora, lora_parameters, save_lora
from model.weights import weight_path
from trainer.core.batch_plan import supervised_collate
from trainer.core.loop import train_loop
from trainer.core.tracking import init_tracker
from trainer.core.stage import (DATA, OUT, Logger, batch_stats, build_parser, data_kwargs, init_config, init_model,
                                   init_run, resolve_data, restore, wrap_model)


def lora_loss(model, batch):
    """The SFT loss (token-mean cross-entropy on the assistant's tokens, + MoE aux loss); gradients reach only
    the adapters."""
    at = batch["loss_at"]
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), packed=batch["packed"], logits_at=at,
                loss_targets=batch["labels"].view(-1)[at])
    return out.loss + out.aux_loss, batch_stats(batch)


def main(argv=None):
    parser = build_parser("MiniMind LoRA Fine-tuning", save_dir=OUT / "lora", from_dir=OUT, epochs=50, batch_size=32,
                          learning_rate=1e-4, accumulation_steps=1, log_interval=10, save_interval=1, max_seq_len=512,
                          from_weight="full_sft", data_path=DATA / "lora_identity.jsonl",
                          demo_data="lora_identity.jsonl", wandb_project="MiniMind-LoRA", packing=1)
    parser.add_argument("--lora_name", type=str, default="lora_identity", help="adapter name (file prefix)")
    parser.add_argument("--lora_rank", type=int, default=8, help="rank of each adapter")
    args = parser.parse_args(argv)
    if args.fsdp:
        raise ValueError("--fsdp 1 is for full-parameter stages; LoRA trains small adapters on a frozen model: use DDP")
    args.save_weight = args.lora_name
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. model config + resume state
    tracker = init_tracker(args, ckp, f"MiniMind-LoRA-{args.lora_name}-Epoch-{args.epochs}-"
                                      f"BatchSize-{args.batch_size}-LR-{args.learning_rate}")   # 3. tracking
    model, tokenizer = init_model(lm_config, args, run.device, stage="base model")   # 4. the full_sft model
    apply_lora(model, rank=args.lora_rank)                            # + adapters on the square layers;
    freeze_non_lora(model)                                            #   the base is frozen
    params = lora_parameters(model)
    total, lora = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    Logger(f"LoRA params: {lora / 1e6:.3f}M of {total / 1e6:.3f}M ({100 * lora / total:.2f}%)")
    train_ds = SFTDataset(resolve_data(args), tokenizer, **data_kwargs(args))        # 5. data and optimizer
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, **run.adamw)
    start = restore(ckp, model, optimizer, run.scaler)                # 6. resume (the full model with adapters)
    model = wrap_model(model, run, args, [optimizer])                 # 7. DDP or FSDP, compile
    save_path = weight_path(args.save_dir, args.lora_name, lm_config)
    _, loss = train_loop(run, args, model, [optimizer], train_ds,     # 8. train, saving only the adapters
                         lambda batch: lora_loss(model, batch), collate_fn=supervised_collate(args),
                         lm_config=lm_config, tracker=tracker, start=start,
                         save_fn=lambda raw: save_lora(raw, save_path))
    return save_path, loss


if __name__ == "__main__":
    cli(main)
