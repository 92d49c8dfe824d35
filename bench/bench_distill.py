"""Does white-box distillation beat plain SFT for a small student? Both on the demo corpus, same steps.

    python bench/bench_distill.py            # about 9 min on a 2-core CPU, after scripts/run_demo.sh
Teacher: the demo's SFT model (out/full_sft_256.pth, 256x4; run scripts/run_demo.sh first). Student: a
smaller MiniMind (default 128x4), pretrained once on the demo pretrain text, then trained on the demo SFT
dialogues twice from that same start, with the same data order, steps and learning rate:
  (a) plain SFT (trainer/train_full_sft.py, cross-entropy on the assistant tokens);
  (b) distillation (trainer/train_distillation.py, alpha * CE + (1 - alpha) * T^2 * KL to the teacher).
Each model is scored on held-out SFT dialogues (the demo generator with another seed, minus any dialogue in
the training file): mean cross-entropy per supervised token, and greedy accuracy on dataset/demo/eval.jsonl.
Writes {work_dir}/ (weights, metrics, distill_bench.json) and prints a markdown table. The pretrained student
in {work_dir} is reused by the next run: delete it after changing the pretraining settings or data.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import shutil
import time

import torch

from dataset import demo_data, scoring
from dataset.lm_dataset import SFTDataset, pad_collate
from model.loading import ROOT, TOKENIZER_DIR, find_weight, load_native, load_tokenizer
from model.weights import weight_path
from trainer import train_distillation, train_full_sft, train_pretrain
from trainer.core.stage import OUT, masked_cross_entropy, to_argv

DEMO = ROOT / "dataset" / "demo"


def held_out_dialogues(path: Path, train_path: Path, n: int) -> Path:
    """n SFT dialogues from the demo generator with seed 1 that are not in the training file."""
    seen = set(train_path.read_text(encoding="utf-8").splitlines())
    rows = [r for r in demo_data.build_demo_data(seed=1, scale=0.5)["sft"]
            if json.dumps(r, ensure_ascii=False) not in seen][:n]
    demo_data.write_jsonl(path, rows)
    return path


@torch.no_grad()
def score(args, directory, weight: str, hidden_size: int, num_layers: int, val_path: Path) -> dict:
    """Mean CE per supervised token on the held-out dialogues, and greedy accuracy on eval.jsonl."""
    model = load_native(find_weight(directory, weight, hidden_size), num_hidden_layers=num_layers)
    tok = load_tokenizer(args.tokenizer_path)
    ds = SFTDataset(str(val_path), tok, max_length=args.max_seq_len, skip_bad_lines=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=pad_collate)
    total, count = 0.0, 0
    for batch in loader:
        n = batch["loss_mask"].sum().item()
        total += masked_cross_entropy(model(batch["input_ids"]).logits, batch["labels"], batch["loss_mask"]).item() * n
        count += n
    acc = scoring.evaluate(model, tok, args.eval_path)
    return {"val_ce": total / count, "accuracy": acc["accuracy"], "right": acc["right"], "total": acc["total"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--work_dir", type=Path, default=OUT / "distill_bench")
    p.add_argument("--teacher_dir", type=Path, default=OUT, help="where full_sft_<teacher_hidden>.pth is")
    p.add_argument("--teacher_hidden_size", type=int, default=256)
    p.add_argument("--teacher_num_layers", type=int, default=4)
    p.add_argument("--student_hidden_size", type=int, default=128)
    p.add_argument("--student_num_layers", type=int, default=4)
    p.add_argument("--tokenizer_path", type=str, default=str(TOKENIZER_DIR))
    p.add_argument("--pretrain_path", type=Path, default=DEMO / "pretrain.jsonl")
    p.add_argument("--sft_path", type=Path, default=DEMO / "sft.jsonl")
    p.add_argument("--eval_path", type=Path, default=DEMO / "eval.jsonl")
    p.add_argument("--val_dialogues", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3, help="SFT / distillation epochs (same for both)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="packed rows per step (one 512-token row holds about 9 demo dialogues, as in the demo)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--alpha", type=float, default=0.5, help="CE weight of the distillation loss")
    p.add_argument("--temperature", type=float, default=1.5)
    p.add_argument("--max_steps", type=int, default=0, help="cap every training run (0 = full epochs; for tests)")
    args = p.parse_args(argv)
    work, sh, sl = args.work_dir, args.student_hidden_size, args.student_num_layers
    work.mkdir(parents=True, exist_ok=True)
    teacher = weight_path(args.teacher_dir, "full_sft", argparse.Namespace(hidden_size=args.teacher_hidden_size))
    if not teacher.exists():
        raise FileNotFoundError(f"teacher weight {teacher} not found: run scripts/run_demo.sh first, or pass "
                                "--teacher_dir/--teacher_hidden_size")
    if args.teacher_hidden_size == sh:
        raise ValueError("--student_hidden_size must differ from --teacher_hidden_size (they share a folder)")
    for suffix in (".pth", ".json"):   # the distillation script reads student and teacher from one folder
        src = teacher.with_suffix(suffix)
        if src.exists():
            shutil.copy(src, work / src.name)
    common = dict(device="cpu", tokenizer_path=args.tokenizer_path, save_dir=work, checkpoint_dir=work / "ckpt",
                  num_workers=0, log_interval=100, save_interval=100000, group_by_length=1, accumulation_steps=1,
                  max_steps=args.max_steps)
    times = {}
    t0 = time.time()
    if not weight_path(work, "pretrain", argparse.Namespace(hidden_size=sh)).exists():
        train_pretrain.main(to_argv({**common, "hidden_size": sh, "num_hidden_layers": sl, "from_weight": "none",
                                     "data_path": args.pretrain_path, "epochs": 2, "batch_size": 2,
                                     "max_seq_len": 256, "learning_rate": 2e-3}))   # the demo's pretraining
    times["pretrain"] = time.time() - t0
    stage = {**common, "data_path": args.sft_path, "epochs": args.epochs, "batch_size": args.batch_size,
             "learning_rate": args.learning_rate, "max_seq_len": args.max_seq_len}
    t0 = time.time()
    train_full_sft.main(to_argv({**stage, "hidden_size": sh, "num_hidden_layers": sl, "from_weight": "pretrain"}))
    times["sft"] = time.time() - t0
    t0 = time.time()
    train_distillation.main(to_argv({**stage, "student_hidden_size": sh, "student_num_layers": sl,
                                     "teacher_hidden_size": args.teacher_hidden_size,
                                     "teacher_num_layers": args.teacher_num_layers,
                                     "from_student_weight": "pretrain", "from_teacher_weight": "full_sft",
                                     "alpha": args.alpha, "temperature": args.temperature}))
    times["distill"] = time.time() - t0

    val = held_out_dialogues(work / "val_sft.jsonl", args.sft_path, args.val_dialogues)
    rows = [("teacher (SFT)", f"{args.teacher_hidden_size}x{args.teacher_num_layers}", "-",
             score(args, work, "full_sft", args.teacher_hidden_size, args.teacher_num_layers, val)),
            ("student, plain SFT", f"{sh}x{sl}", f"{times['sft'] / 60:.1f}", score(args, work, "full_sft", sh, sl, val)),
            (f"student, distillation (alpha {args.alpha}, T {args.temperature})", f"{sh}x{sl}",
             f"{times['distill'] / 60:.1f}", score(args, work, "full_dist", sh, sl, val))]
    print(f"\n# {args.epochs} epochs on {args.sft_path.name} from the same pretrained student; "
          f"held-out: {val.name} ({args.val_dialogues} dialogues), {args.eval_path.name}")
    print("| model | size | minutes | held-out CE per token | eval accuracy |")
    print("|---|---|---|---|---|")
    for name, size, minutes, r in rows:
        print(f"| {name} | {size} | {minutes} | {r['val_ce']:.3f} | {r['accuracy']:.3f} ({r['right']}/{r['total']}) |")
    (work / "distill_bench.json").write_text(json.dumps([{"model": n, "size": s, **r} for n, s, _, r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
