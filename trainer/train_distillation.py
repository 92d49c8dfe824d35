"""White-box knowledge distillation: a small student learns from a bigger teacher's token distributions.

    python trainer/train_distillation.py                    # student 512x8 <- teacher 768x16, both full_sft
    torchrun --nproc_per_node 2 trainer/train_distillation.py
    python trainer/train_distillation.py --device cpu --student_hidden_size 64 --student_num_layers 2 \\
        --teacher_hidden_size 96 --teacher_num_layers 2 --max_steps 20
Reads out/full_sft_<student>.pth, out/full_sft_<teacher>.pth and dataset/sft_mini_512.jsonl (demo SFT when absent).
Writes out/full_dist_<student>[_moe].pth and checkpoints/full_dist_<student>[_moe]_resume.pth.
The teacher is of the student's model family (--model_family, or the student weight's): they share a tokenizer.

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T) on supervised
tokens (Hinton et al. 2015), with both distributions softened by the temperature T.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F

from dataset.lm_dataset import SFTDataset
from model.cli import Typed, cli, was_typed
from model.model_minimind import MiniMindConfig
from trainer.core.batch_plan import supervised_collate
from trainer.core.loop import train_loop
from trainer.core.tracking import init_tracker
from trainer.core.stage import (DATA, batch_stats, build_parser, data_kwargs, init_config, init_model, init_run,
                                   masked_cross_entropy, resolve_data, restore, wrap_model)


def distillation_loss(student_logits, teacher_logits, targets, loss_mask, alpha: float, temperature: float):
    """(loss, ce, kd); kd = T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over supervised tokens."""
    ce = masked_cross_entropy(student_logits, targets, loss_mask)
    keep = loss_mask.reshape(-1) > 0
    s = student_logits.reshape(-1, student_logits.shape[-1])[keep].float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep, : s.shape[-1]].float() / temperature
    if s.shape[0] == 0:
        kd = ce * 0.0
    else:
        kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        kd = kd * temperature ** 2
    return alpha * ce + (1 - alpha) * kd, ce, kd


def distill_step(student, teacher, batch, alpha: float, temperature: float):
    """The student's distillation loss on one batch (+ its MoE aux loss); the teacher runs without a graph."""
    at = batch["loss_at"]                     # both output layers run on the supervised positions only
    inputs = dict(position_ids=batch.get("position_ids"), packed=batch["packed"], logits_at=at)
    out = student(batch["input_ids"], **inputs)
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"], **inputs).logits
    targets = batch["labels"].reshape(-1).index_select(0, at)
    supervised = targets >= 0                 # all of them, but with --use_compile 1 (-100 = no loss here)
    loss, ce, kd = distillation_loss(out.logits, teacher_logits, targets, supervised, alpha, temperature)
    return loss + out.aux_loss, {"ce": ce.detach(), "distill": kd.detach(), **batch_stats(batch)}


def main(argv=None):
    parser = build_parser("MiniMind Knowledge Distillation", save_weight="full_dist", epochs=6, batch_size=32,
                          learning_rate=5e-6, accumulation_steps=1, max_seq_len=512, from_weight="full_sft",
                          data_path=DATA / "sft_mini_512.jsonl", demo_data="sft.jsonl",
                          wandb_project="MiniMind-Distillation", packing=1)
    parser.add_argument("--student_hidden_size", type=int, default=512, action=Typed,
                        help="student width (default 512; 768 with --model_family minimind3, as the original's)")
    parser.add_argument("--student_num_layers", type=int, default=8)
    parser.add_argument("--teacher_hidden_size", type=int, default=768,
                        help="teacher width; the teacher is of the student's family (one tokenizer)")
    parser.add_argument("--teacher_num_layers", type=int, default=16)
    parser.add_argument("--teacher_use_moe", type=int, default=None, choices=[0, 1],
                        help="teacher MoE flag (default: same as --use_moe, as the original)")
    parser.add_argument("--from_student_weight", type=str, default="full_sft", help="student start weight prefix")
    parser.add_argument("--from_teacher_weight", type=str, default="full_sft", help="teacher weight prefix")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the CE term (1 - alpha: KD term)")
    parser.add_argument("--temperature", type=float, default=1.5, help="softening temperature T")
    args = parser.parse_args(argv)
    args.hidden_size, args.num_hidden_layers = args.student_hidden_size, args.student_num_layers
    if was_typed(args, "student_hidden_size"):      # the student is the run's model: its size rules as --hidden_size
        args.typed = args.typed | {"hidden_size"}
    args.from_weight = args.from_student_weight
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. student config + resume state
    tracker = init_tracker(args, ckp, f"MiniMind-Distill-S{lm_config.hidden_size}T{args.teacher_hidden_size}-"
                                      f"Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")  # 3.
    model, tokenizer = init_model(lm_config, args, run.device, stage="student")      # 4. student and teacher
    teacher_config = MiniMindConfig(model_family=lm_config.model_family, hidden_size=args.teacher_hidden_size,
                                    num_hidden_layers=args.teacher_num_layers,
                                    use_moe=bool(args.use_moe if args.teacher_use_moe is None else args.teacher_use_moe))
    teacher, _ = init_model(teacher_config, args, run.device, args.from_teacher_weight, stage="teacher")
    teacher.eval().requires_grad_(False)
    train_ds = SFTDataset(resolve_data(args), tokenizer, **data_kwargs(args))        # 5. data and optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, **run.adamw)
    start = restore(ckp, model, optimizer, run.scaler)                # 6. resume
    model = wrap_model(model, run, args, [optimizer])                 # 7. DDP or FSDP, compile
    return train_loop(run, args, model, [optimizer], train_ds,        # 8. train
                      lambda batch: distill_step(model, teacher, batch, args.alpha, args.temperature),
                      collate_fn=supervised_collate(args), lm_config=lm_config, tracker=tracker, start=start)


if __name__ == "__main__":
    cli(main)
