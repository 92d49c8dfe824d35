"""Greedy answers to the demo's eval questions: the engine (dataset/scoring.answer_questions, what eval_demo.py
and bench_distill.py call) against the path it replaced, model.generate() on left-padded batches.

    python dataset/demo_data.py --out_dir /tmp/demo && python bench/bench_answers.py --eval_path /tmp/demo/eval.jsonl
    python bench/bench_answers.py --hidden_size 64 --num_hidden_layers 2 --limit 20 --max_new_tokens 8   # quick
Random weights (fp32, CPU unless --device), so every answer runs to --max_new_tokens. Both paths run in the same
process, alternating, best of --repeats; the table says whether their answers are identical. Writes nothing.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import time

import torch

from dataset.lm_dataset import read_jsonl
from dataset.scoring import answer_questions
from model.loading import ROOT, TOKENIZER_DIR, load_tokenizer
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.core.progress import cpu_description


def generate_batched(model, tokenizer, questions, max_new_tokens, batch_size):
    """The previous answer_questions: model.generate() on left-padded batches of `batch_size` questions."""
    answers = []
    for i in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in questions[i:i + batch_size]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        return_token_type_ids=False).to(model.device)   # transformers 4 adds them; generate() refuses
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--eval_path", type=str, default=str(ROOT / "dataset" / "demo" / "eval.jsonl"))
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=48, help="eval_demo.py's default")
    p.add_argument("--batch_sizes", type=str, default="16,32", help="engine slots; generate() batches use the first")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions (0 = all)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", type=str, default="cpu")
    args = p.parse_args(argv)
    if not Path(args.eval_path).exists():
        sys.exit(f"{args.eval_path} not found: python dataset/demo_data.py writes it (--out_dir to put it elsewhere)")
    questions = [r["question"] for r in read_jsonl(Path(args.eval_path), required=("question",))]
    questions = questions[:args.limit] if args.limit else questions
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=args.hidden_size,
                                               num_hidden_layers=args.num_hidden_layers)).to(args.device).eval()
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = {f"generate(), left-padded batches of {sizes[0]}":
            lambda: generate_batched(model, tokenizer, questions, args.max_new_tokens, sizes[0])}
    for b in sizes:
        runs[f"engine, max_batch {b}"] = lambda b=b: answer_questions(model, tokenizer, questions,
                                                                      args.max_new_tokens, batch_size=b)
    best, answers = {name: float("inf") for name in runs}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            answers[name] = run()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"{len(questions)} questions, {args.hidden_size}x{args.num_hidden_layers} random weights, "
          f"{args.max_new_tokens} new tokens each, best of {args.repeats}\n")
    reference = next(iter(runs))
    print("| path | seconds | answers/s | vs generate() | same answers |\n|---|---|---|---|---|")
    for name in runs:
        same = sum(a == b for a, b in zip(answers[name], answers[reference]))
        print(f"| {name} | {best[name]:.2f} | {len(questions) / best[name]:.1f} | "
              f"{best[reference] / best[name]:.2f}x | {same}/{len(questions)} |")
    return best, answers


if __name__ == "__main__":
    main()
