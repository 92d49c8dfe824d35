"""Does RL with a verifiable reward work here? GRPO, PPO and SPO start from the demo's SFT model, train on
the demo's unit-conversion RL prompts and are scored on held-out prompts before and during training.

    bash scripts/run_demo.sh                                   # once: writes out/full_sft_256.pth (6 min)
    python bench/bench_rl.py                                   # about 15 min on a 2-core CPU, all three algorithms
    python bench/bench_rl.py --algos grpo --rl_steps 200       # a quicker look
    python bench/bench_rl.py --rl_data dataset/demo/rlaif.jsonl --eval_data dataset/demo/eval.jsonl   # the mix
    python bench/bench_rl.py --mode tasks --hidden_size 128    # its own small arithmetic SFT model first
Demo mode (default): (1) the SFT weight `{from_dir}/full_sft_<hidden>.pth`; (2) RL prompts --rl_data
(dataset/demo/rlaif_units.jsonl: unit conversions on training pairs, with the reference answer); reward = 1
if the answer's last number is right (rl, --reward rule); (3) held-out prompts --eval_data
(dataset/demo/rlaif_units_eval.jsonl: every (unit, number) pair no training file contains, in all phrasings).
Tasks mode: SFT from scratch on the demo generator's arithmetic dialogues, then RL prompts and held-out
prompts from the same generator (--tasks). Each algorithm runs in segments through its real trainer
(trainer/train_<algo>.py, resumed with --from_resume 1); after each segment its weights are scored on the
held-out prompts: greedy accuracy and the mean reward of --eval_samples (4) samples per prompt at the
training temperature. --broad_eval (dataset/demo/eval.jsonl) is scored before and after each algorithm.
Writes {work_dir}/ (weights, metrics, rl_bench.json) and images/rl_reward.png; prints markdown tables.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import random
import re
import time
import zlib

import torch

from dataset import demo_data
from dataset.lm_dataset import read_jsonl
from trainer import train_full_sft, train_grpo, train_ppo, train_spo
from trainer.core.rl import Rewards, encode_prompts, rollout
from model.loading import ROOT, TOKENIZER_DIR, find_weight, load_native, load_tokenizer
from model.weights import weight_path
from trainer.core.stage import OUT, to_argv

DEMO = ROOT / "dataset" / "demo"

TRAINERS = {"grpo": train_grpo, "ppo": train_ppo, "spo": train_spo}
WEIGHT = {"grpo": "grpo", "ppo": "ppo_actor", "spo": "spo"}


def qa_add_digits(rng, lang, heldout=False):
    """The demo generator's addition questions, restricted to single-digit operands."""
    while True:
        qa = demo_data.qa_arith(rng, lang, heldout)
        m = re.match(r"(\d+)\+(\d+)=", qa["a"])
        if m and int(m.group(1)) < 10 and int(m.group(2)) < 10:
            return qa


TASKS = {"arith": demo_data.qa_arith, "add_digits": qa_add_digits, "compare": demo_data.qa_compare,
         "sort": demo_data.qa_sort, "multi": demo_data.qa_multi, "unit": demo_data.qa_unit}


def split_of(qa, sft_share: float) -> str:
    """'sft' or 'rl': a fixed split of the question instances by the numbers of their answer (a+b=c: the
    pair), so the RL prompts ask about pairs the SFT data never showed."""
    key = ",".join(re.findall(r"\d+", qa["a"]))
    return "sft" if zlib.crc32(key.encode()) % 100 < 100 * sft_share else "rl"


def task_rows(args, n: int, seed: str, part: str, dialogue: bool):
    """n questions from the demo generator (tasks in turn, zh and en alternating) as SFT dialogues or RLAIF
    prompts with their reference answer. part: 'sft' or 'rl' (the bench's split of the demo's training
    pairs), or 'heldout' (the pairs the demo corpus keeps out of every training file)."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        lang, make = ("zh", "en")[(i // len(args.tasks)) % 2], TASKS[args.tasks[i % len(args.tasks)]]
        qa = make(rng, lang, heldout=part == "heldout")
        while part != "heldout" and split_of(qa, args.sft_share) != part:
            qa = make(rng, lang)
        answer = qa["a"] if dialogue else "无"
        row = {"conversations": [{"role": "user", "content": qa["q"]}, {"role": "assistant", "content": answer}]}
        rows.append(row if dialogue else {**row, "answer": qa["key"], "kind": qa["kind"]})
    return rows


@torch.no_grad()
def score_weights(args, directory, weight: str, eval_rows):
    """Greedy accuracy and the mean reward of --eval_samples sampled answers per held-out prompt."""
    model = load_native(find_weight(directory, weight, args.hidden_size), num_hidden_layers=args.num_hidden_layers)
    tok = load_tokenizer(args.tokenizer_path)
    prompts = [tok.apply_chat_template(r["conversations"][:1], tokenize=False, add_generation_prompt=True)
               for r in eval_rows]
    refs = [r["answer"] for r in eval_rows]
    reward_fn = Rewards("rule", reasoning=False)
    ids, mask = encode_prompts(tok, prompts, args.max_seq_len)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_gen_len,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    greedy = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    _, greedy_stats = reward_fn([[]] * len(refs), greedy, refs)
    torch.manual_seed(0)
    samples = args.eval_samples
    roll = rollout(model, tok, prompts, args, samples)
    rewards, _ = reward_fn([[]] * len(roll.texts), roll.texts, [r for r in refs for _ in range(samples)])
    return {"greedy_acc": greedy_stats["acc"], "sample_reward": rewards.mean().item(),
            "example": f"{eval_rows[0]['conversations'][0]['content']} -> {greedy[0]!r}"}


def train_sft(args, work):
    """SFT from scratch on the demo generator's arithmetic dialogues (only when no SFT weight exists)."""
    data = demo_data.write_jsonl(work / "sft_arith.jsonl", task_rows(args, args.sft_rows, "bench-sft", "sft", True))
    flags = dict(device="cpu", hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                 save_dir=work, checkpoint_dir=work / "ckpt", tokenizer_path=args.tokenizer_path, data_path=data,
                 from_weight="none", epochs=args.sft_epochs, batch_size=32, learning_rate=2e-3, max_seq_len=96,
                 accumulation_steps=1, num_workers=0, log_interval=50, save_interval=100000, group_by_length=1)
    train_full_sft.main(to_argv(flags))


def run_rl(args, work, algo, train_path, eval_rows, table):
    """Train `algo` in segments of --eval_every steps, scoring the weights after each."""
    out = work / algo
    per_step = args.prompts_per_step
    batch = per_step // args.num_generations if algo == "grpo" else per_step   # same completions per step
    iters = args.rl_prompts // batch
    flags = dict(device="cpu", hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                 save_dir=out, checkpoint_dir=out / "ckpt", from_dir=args.sft_dir, tokenizer_path=args.tokenizer_path,
                 data_path=train_path, reasoning=0, reward="rule", batch_size=batch, max_seq_len=args.max_seq_len,
                 max_gen_len=args.max_gen_len, learning_rate=args.lr[algo], epochs=-(-args.rl_steps // iters),
                 num_workers=0, log_interval=args.eval_every, save_interval=100000, accumulation_steps=1,
                 temperature=args.temperature)
    if algo == "grpo":
        flags.update(num_generations=args.num_generations)
    if algo == "ppo":
        flags.update(critic_learning_rate=args.lr[algo] * 10)
    t0 = time.time()
    for done in range(args.eval_every, args.rl_steps + 1, args.eval_every):
        argv = (to_argv({**flags, "max_steps": done, "from_resume": int(done > args.eval_every)})
                + args.trainer_flags.split())
        TRAINERS[algo].main(argv)
        row = {"algo": algo, "step": done, "completions": done * per_step, "minutes": (time.time() - t0) / 60,
               **score_weights(args, out, WEIGHT[algo], eval_rows)}
        table.append(row)
        print(f"| {algo} | {done} | {row['completions']} | {row['sample_reward']:.3f} | {row['greedy_acc']:.3f} | "
              f"{row['minutes']:.1f} |", flush=True)


def plot_rewards(table, path, label="held-out questions"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for algo in dict.fromkeys(r["algo"] for r in table if r["algo"] != "sft"):
        rows = [r for r in table if r["algo"] in ("sft", algo)]
        for ax, key in zip(axes, ("sample_reward", "greedy_acc")):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=algo.upper())
    for ax, title in zip(axes, ("mean reward of sampled answers (T=0.8)", "greedy accuracy")):
        ax.set_xlabel("RL step"), ax.set_title(f"{label}: {title}", fontsize=10), ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def prompts_with_answers(path) -> list[dict]:
    """An eval.jsonl-layout file {question, answer} as single-turn prompts with their reference."""
    return [{"conversations": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
            for r in read_jsonl(path, required=("question", "answer"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--mode", choices=["demo", "tasks"], default="demo",
                   help="demo: start from {from_dir}/full_sft_<hidden>.pth and the demo files; "
                        "tasks: train a small arithmetic SFT model in work_dir and generate the tasks (--tasks)")
    p.add_argument("--work_dir", type=Path, default=OUT / "rl_bench", help="RL runs and results")
    p.add_argument("--from_dir", type=Path, default=OUT, help="demo mode: where full_sft_<hidden>.pth is")
    p.add_argument("--tokenizer_path", type=str, default=str(TOKENIZER_DIR))
    p.add_argument("--hidden_size", type=int, default=256, help="256 = the demo's SFT model")
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--rl_data", type=str, default=str(DEMO / "rlaif_units.jsonl"),
                   help="demo mode: RLAIF jsonl with reference answers to train on")
    p.add_argument("--eval_data", type=str, default=str(DEMO / "rlaif_units_eval.jsonl"),
                   help="demo mode: held-out prompts, eval.jsonl layout {question, answer}")
    p.add_argument("--broad_eval", type=str, default=str(DEMO / "eval.jsonl"),
                   help="demo mode: questions also scored before and after each algorithm ('' = none)")
    p.add_argument("--tasks", type=str, default="arith,compare", help=f"tasks mode: question kinds, from {sorted(TASKS)}")
    p.add_argument("--sft_share", type=float, default=0.5, help="tasks mode: share of the training pairs SFT sees")
    p.add_argument("--sft_rows", type=int, default=4000, help="tasks mode: arithmetic dialogues for SFT")
    p.add_argument("--sft_epochs", type=int, default=3)
    p.add_argument("--rl_prompts", type=int, default=1000, help="tasks mode: training prompts")
    p.add_argument("--eval_prompts", type=int, default=100, help="tasks mode: held-out prompts")
    p.add_argument("--algos", type=str, default="grpo,ppo,spo")
    p.add_argument("--rl_steps", type=int, default=400)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--prompts_per_step", type=int, default=32, help="completions per RL step, for every algorithm")
    p.add_argument("--num_generations", type=int, default=8, help="GRPO group size")
    p.add_argument("--max_seq_len", type=int, default=64)
    p.add_argument("--max_gen_len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--eval_samples", type=int, default=4, help="sampled answers per held-out question")
    p.add_argument("--trainer_flags", type=str, default="",
                   help='more flags for every RL trainer, e.g. "--beta 0.01 --num_iterations 2"')
    p.add_argument("--grpo_lr", type=float, default=1e-4)
    p.add_argument("--ppo_lr", type=float, default=1e-4)
    p.add_argument("--spo_lr", type=float, default=1e-4)
    p.add_argument("--plot", type=Path, default=ROOT / "images" / "rl_reward.png")
    args = p.parse_args(argv)
    args.lr = {"grpo": args.grpo_lr, "ppo": args.ppo_lr, "spo": args.spo_lr}
    algos = [a for a in args.algos.split(",") if a]
    args.tasks = args.tasks.split(",")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    broad = []
    if args.mode == "demo":
        args.sft_dir = args.from_dir
        sft = weight_path(args.sft_dir, "full_sft", args)
        if not sft.is_file():
            raise SystemExit(f"no SFT weight at {sft}: run `bash scripts/run_demo.sh` first (it writes "
                             f"out/full_sft_256.pth), or pass --from_dir, or use --mode tasks")
        if not Path(args.rl_data).is_file() and Path(args.rl_data).parent == DEMO:
            demo_data.write_demo_data(DEMO)        # the demo files are generated, not shipped
        train_path, eval_rows = Path(args.rl_data), prompts_with_answers(args.eval_data)
        broad = prompts_with_answers(args.broad_eval) if args.broad_eval else []
    else:
        args.sft_dir = work
        if not weight_path(work, "full_sft", args).exists():
            train_sft(args, work)
        train_path = demo_data.write_jsonl(work / "rl_train.jsonl",
                                           task_rows(args, args.rl_prompts, "bench-rl", "rl", False))
        eval_rows = task_rows(args, args.eval_prompts, "bench-eval", "heldout", False)
    sft_minutes = (time.time() - t0) / 60
    args.rl_prompts = sum(1 for _ in open(train_path, encoding="utf-8"))
    table = [{"algo": "sft", "step": 0, "completions": 0, "minutes": sft_minutes,
              **score_weights(args, args.sft_dir, "full_sft", eval_rows)}]
    broad_scores = {"sft": score_weights(args, args.sft_dir, "full_sft", broad)} if broad else {}
    print(f"\n# RL on {train_path.name} ({args.rl_prompts} prompts), scored on {len(eval_rows)} held-out prompts; "
          f"MiniMind {args.hidden_size}x{args.num_hidden_layers}, {args.prompts_per_step} completions per step, "
          f"max {args.max_gen_len} new tokens, temperature {args.temperature}")
    print("| algorithm | RL step | completions | mean sampled reward | greedy accuracy | minutes |")
    print("|---|---|---|---|---|---|")
    print(f"| SFT (start) | 0 | 0 | {table[0]['sample_reward']:.3f} | {table[0]['greedy_acc']:.3f} | {sft_minutes:.1f} |")
    for algo in algos:
        run_rl(args, work, algo, train_path, eval_rows, table)
        if broad:
            broad_scores[algo] = score_weights(args, work / algo, WEIGHT[algo], broad)
    print("\n| algorithm | reward before | reward after | greedy acc before | greedy acc after |")
    print("|---|---|---|---|---|")
    for algo in algos:
        last = [r for r in table if r["algo"] == algo][-1]
        print(f"| {algo.upper()} | {table[0]['sample_reward']:.3f} | {last['sample_reward']:.3f} | "
              f"{table[0]['greedy_acc']:.3f} | {last['greedy_acc']:.3f} |")
    if broad_scores:
        print(f"\n{Path(args.broad_eval).name} ({len(broad)} questions), before and after each algorithm:")
        print("| weights | mean sampled reward | greedy accuracy |\n|---|---|---|")
        for name, r in broad_scores.items():
            print(f"| {name.upper()} | {r['sample_reward']:.3f} | {r['greedy_acc']:.3f} |")
    print(f"\ntotal {(time.time() - t0) / 60:.1f} min")
    result = {"curve": table, "broad_eval": broad_scores}
    (work / "rl_bench.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    plot_rewards(table, args.plot, Path(args.eval_data).name if args.mode == "demo" else "held-out questions")
    return result


if __name__ == "__main__":
    main()
