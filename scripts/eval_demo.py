"""Scripted chat over the held-out demo questions: prints each answer and the accuracy.

    python scripts/eval_demo.py --weight full_sft                 # out/full_sft_<hidden>.pth + its .json config
    python scripts/eval_demo.py --weight full_sft --hidden_size 256 --lora_weight lora_identity --kinds identity
    python scripts/eval_demo.py --save_dir /tmp/run/out --weight dpo --show 5 --json results.json
The weight is found as everywhere else (model/loading.py): the size flags name `{weight}_{hidden}[_moe].pth`,
and without them the one `{weight}_*.pth` in --save_dir is used; the weight's family (MiniMind2 or minimind-3, from
its keys) picks the tokenizer unless --tokenizer_path is given. Questions come from dataset/demo/eval.jsonl
(written by dataset/demo_data.py); answers are scored by dataset/scoring.py. Greedy decoding through the
batching engine (model/engine.py). Writes nothing unless --json. A weight that cannot be loaded is one error
line, exit code 2.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json

from dataset.scoring import evaluate
from model.cli import add_family_arg, add_size_args, cli, typed_sizes
from model.loading import (ROOT, add_lora, family_of, find_weight, load_native, load_tokenizer, resolve_path,
                           tokenizer_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer the held-out demo questions and report accuracy",
                                allow_abbrev=False)
    p.add_argument("--save_dir", type=str, default="out", help="folder of the native weights (default: out)")
    p.add_argument("--weight", type=str, default="full_sft", help="weight prefix (default: full_sft)")
    add_size_args(p)
    add_family_arg(p)
    p.add_argument("--lora_weight", type=str, default=None, help="adapter name under {save_dir}/lora/, or a .pth path")
    p.add_argument("--tokenizer_path", type=str, default=None,
                   help="tokenizer folder (default: the weight's family's: model/, or model/minimind3 for minimind-3)")
    p.add_argument("--eval_path", type=str, default=str(ROOT / "dataset" / "demo" / "eval.jsonl"),
                   help="questions, one {\"question\", \"answer\", \"kind\"} per line")
    p.add_argument("--kinds", type=str, default=None, help="comma-separated question kinds (default: all)")
    p.add_argument("--max_new_tokens", type=int, default=48, help="most tokens per answer")
    p.add_argument("--show", type=int, default=12, help="how many question/answer pairs to print")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    sizes = typed_sizes(args)
    save_dir = resolve_path(args.save_dir)
    path = find_weight(save_dir, args.weight, sizes["hidden_size"], sizes["use_moe"], args.model_family)
    model = load_native(path, **sizes, model_family=args.model_family)
    if args.lora_weight:
        add_lora(model, args.lora_weight, save_dir)
    tokenizer = load_tokenizer(tokenizer_folder(family_of(model), tokenizer_path=args.tokenizer_path))
    result = evaluate(model, tokenizer, resolve_path(args.eval_path),
                      args.kinds.split(",") if args.kinds else None, args.max_new_tokens)
    print(f"{path.name}" + (f" + LoRA {args.lora_weight}" if args.lora_weight else ""))
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
    cli(main)
