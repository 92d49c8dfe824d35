"""Scripted chat over the held-out demo questions: prints each answer and the accuracy.

    python scripts/eval_demo.py --weight full_sft                 # out/full_sft_<hidden>.pth + its .json config
    python scripts/eval_demo.py --weight full_sft --lora_weight lora_identity --kinds identity
    python scripts/eval_demo.py --save_dir /tmp/run/out --weight dpo --show 5 --json results.json
Questions come from dataset/demo/eval.jsonl (written by dataset/demo_data.py); answers are scored with
dataset/scoring.py. Greedy decoding, batched with left padding. Writes nothing unless --json.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json

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
    from dataset.scoring import evaluate
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
