"""Scripted chat over the held-out demo questions: prints each answer and the accuracy.

    python scripts/eval_demo.py --weight full_sft                 # out/full_sft_<hidden>.pth + its .json config
    python scripts/eval_demo.py --weight full_sft --lora_weight lora_identity --kinds identity
    python scripts/eval_demo.py --save_dir /tmp/run/out --weight dpo --show 5 --json results.json
Questions come from dataset/demo/eval.jsonl (written by dataset/demo_data.py); answers are scored with
dataset.demo_data.check_answer. Greedy decoding, batched with left padding. Writes nothing unless --json.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
from collections import defaultdict

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_native(save_dir, weight: str, hidden_size: int = None, tokenizer_path=ROOT / "model", lora_weight=None,
                device: str = "cpu"):
    """A native weight `{save_dir}/{weight}_{hidden}[_moe].pth` with the config saved next to it, plus an
    optional LoRA adapter `{save_dir}/lora/{lora_weight}_{hidden}.pth` merged in (scripts/inference_utils)."""
    from scripts import inference_utils as iu
    save_dir = Path(save_dir)
    path = iu.find_native_weight(save_dir, weight, hidden_size or 0, 0, typed=hidden_size is not None)
    model = iu.load_native(path)
    if lora_weight:
        iu.add_lora(model, lora_weight, save_dir)
    return model.eval().to(device), iu.load_tokenizer(tokenizer_path)


@torch.no_grad()
def answer_all(model, tokenizer, questions, max_new_tokens: int = 48, batch_size: int = 16, system=None):
    """Greedy answers to single-turn questions, in order."""
    answers = []
    device = next(model.parameters()).device
    for i in range(0, len(questions), batch_size):
        prompts = []
        for q in questions[i:i + batch_size]:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
            prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate(model, tokenizer, eval_path=ROOT / "dataset" / "demo" / "eval.jsonl", kinds=None, max_new_tokens=48):
    """{'accuracy', 'by_kind': {kind: (right, total)}, 'rows': [...]} over the held-out questions."""
    from dataset.demo_data import check_answer
    rows = [json.loads(line) for line in open(eval_path, encoding="utf-8") if line.strip()]
    if kinds:
        rows = [r for r in rows if r["kind"] in kinds]
    preds = answer_all(model, tokenizer, [r["question"] for r in rows], max_new_tokens)
    by_kind = defaultdict(lambda: [0, 0])
    for row, pred in zip(rows, preds):
        row["prediction"], row["correct"] = pred, check_answer(pred, row["answer"])
        by_kind[row["kind"]][0] += row["correct"]
        by_kind[row["kind"]][1] += 1
    right = sum(r["correct"] for r in rows)
    return {"accuracy": right / max(len(rows), 1), "right": right, "total": len(rows),
            "by_kind": {k: tuple(v) for k, v in sorted(by_kind.items())}, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer the held-out demo questions and report accuracy")
    p.add_argument("--save_dir", type=str, default=str(ROOT / "out"))
    p.add_argument("--weight", type=str, default="full_sft")
    p.add_argument("--hidden_size", type=int, default=None, help="pick among several sizes (default: the only one)")
    p.add_argument("--lora_weight", type=str, default=None, help="adapter name under {save_dir}/lora/")
    p.add_argument("--tokenizer_path", type=str, default=str(ROOT / "model"))
    p.add_argument("--eval_path", type=str, default=str(ROOT / "dataset" / "demo" / "eval.jsonl"))
    p.add_argument("--kinds", type=str, default=None, help="comma-separated question kinds (default: all)")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--show", type=int, default=12, help="how many question/answer pairs to print")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    args = p.parse_args(argv)
    model, tokenizer = load_native(args.save_dir, args.weight, args.hidden_size, args.tokenizer_path, args.lora_weight)
    result = evaluate(model, tokenizer, args.eval_path, args.kinds.split(",") if args.kinds else None,
                      args.max_new_tokens)
    for row in result["rows"][: args.show]:
        print(f"{'✓' if row['correct'] else '✗'} Q: {row['question']}\n  A: {row['prediction']}   (expected {row['answer']})")
    print("| kind | correct | total |\n|---|---|---|")
    for kind, (right, total) in result["by_kind"].items():
        print(f"| {kind} | {right} | {total} |")
    print(f"accuracy on held-out demo questions: {result['right']}/{result['total']} = {result['accuracy']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=1))
    return result


if __name__ == "__main__":
    main()
