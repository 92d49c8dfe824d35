"""Training throughput: useful (non-pad) tokens/s and peak RSS of pretrain and SFT on CPU.

    python bench/bench_train.py                     # 512x8, batch 8, fp32 (+ one bf16 row), ~10 min
    python bench/bench_train.py --hidden_size 64 --num_hidden_layers 2 --steps 4   # quick check
Each row runs the real stage script (trainer/train_pretrain.py or train_full_sft.py) in a fresh
process on the same synthetic data, and reads its metrics JSONL. Rows:
  original-style  pad every sample to max_seq_len, full-vocab CE over every position then mask
                  (what the original does; same numerics)
  dynamic         pad each batch to its longest sample (our default)
  grouped         dynamic + --group_by_length 1 (batches of similar length)
  grouped bf16    the same under CPU bf16 autocast (--dtype bfloat16)
Prints a markdown table. Nothing is written outside a temporary directory.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import os
import platform
import random
import resource
import subprocess
import tempfile

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_TOKENIZER = ROOT.parent / "shared" / "reference" / "upstream_tokenizer"

ZH = "天空是蓝色的因为大气散射太阳光中的短波长光线所以我们看到蓝天白云水是生命之源植物通过光合作用把二氧化碳和水变成有机物"
EN = ("the quick brown fox jumps over the lazy dog while small language models learn to predict the next token "
      "from large amounts of text and become useful assistants").split()


def synthetic_text(rng, n_chars):
    """Mixed Chinese/English text with the original corpus's <|im_start|>...<|im_end|> segments."""
    parts, size = [], 0
    while size < n_chars:
        seg = "".join(rng.choice(ZH) for _ in range(rng.randint(20, 80))) if rng.random() < 0.6 else \
            " ".join(rng.choice(EN) for _ in range(rng.randint(10, 40)))
        parts.append(f"<|im_start|>{seg}<|im_end|>")
        size += len(seg)
    return " ".join(parts)


def write_data(directory: Path, n: int, seed: int = 0):
    """Pretrain lines whose lengths spread from short to longer than max_seq_len (about a third of a
    512-token padded batch is real text), and SFT conversations of 1-3 turns."""
    rng = random.Random(seed)
    pre, sft = directory / "pretrain.jsonl", directory / "sft.jsonl"
    with open(pre, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"text": synthetic_text(rng, int(rng.lognormvariate(5.0, 0.7)))}, ensure_ascii=False) + "\n")
    with open(sft, "w", encoding="utf-8") as f:
        for _ in range(n):
            conv = []
            for _ in range(rng.randint(1, 3)):
                conv.append({"role": "user", "content": synthetic_text(rng, rng.randint(10, 120)).replace("<|im_start|>", "").replace("<|im_end|>", "")})
                conv.append({"role": "assistant", "content": synthetic_text(rng, int(rng.lognormvariate(4.8, 0.8))).replace("<|im_start|>", "").replace("<|im_end|>", "")})
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    return pre, sft


CHILD = r'''
import sys, json, resource
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
stage, style, argv = sys.argv[2], sys.argv[3], sys.argv[4:]
mod = __import__(f"trainer.train_{stage}", fromlist=["main"])
if style == "original":
    def original_loss(model, batch):   # CrossEntropyLoss(reduction='none') over every position, then the mask
        X, Y, mask = batch
        out = model(X)
        ce = F.cross_entropy(out.logits.view(-1, out.logits.size(-1)), Y.view(-1), reduction="none").view(Y.size())
        return (ce * mask).sum() / mask.sum() + out.aux_loss
    mod.lm_loss = original_loss
mod.main(argv)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def run_row(stage, style, data, args, tmp, extra):
    out = Path(tmp) / f"{stage}-{style}-{len(extra)}"
    flags = ["--device", "cpu", "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
             "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--max_seq_len", str(extra["max_seq_len"]),
             "--data_path", str(data), "--save_dir", str(out), "--checkpoint_dir", str(out), "--from_weight", "none",
             "--tokenizer_path", str(args.tokenizer_path), "--num_workers", "0", "--log_interval", "1",
             "--save_interval", "100000", "--max_steps", str(args.steps + args.warmup), "--epochs", "1"]
    flags += ["--pad_to_max", "1" if style == "original" else "0",
              "--group_by_length", "1" if "grouped" in style else "0"]
    if "bf16" in style:
        flags += ["--dtype", "bfloat16"]
    if stage == "full_sft":
        flags += ["--save_weight", "full_sft"]
    res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), stage, style.split()[0], *flags],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    rss = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_mb"]
    name = "pretrain" if stage == "pretrain" else "full_sft"
    records = [json.loads(line) for line in open(out / f"{name}_{args.hidden_size}_metrics.jsonl")][args.warmup:]
    seconds = records[-1]["time"] - json.loads(open(out / f"{name}_{args.hidden_size}_metrics.jsonl").readlines()[args.warmup - 1])["time"]
    tokens = records[-1]["tokens"] - json.loads(open(out / f"{name}_{args.hidden_size}_metrics.jsonl").readlines()[args.warmup - 1])["tokens"]
    return tokens / seconds, rss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--tokenizer_path", type=str,
                   default=str(UPSTREAM_TOKENIZER if UPSTREAM_TOKENIZER.exists() else ROOT / "model"))
    p.add_argument("--rows", type=str, default="pretrain:512,pretrain:340,full_sft:512")
    p.add_argument("--styles", type=str, default="original-style,dynamic,grouped,grouped bf16")
    args = p.parse_args()
    import torch
    print(f"# train: {args.hidden_size}x{args.num_hidden_layers}, batch {args.batch_size}, {args.steps} steps/row, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.machine()}, tokenizer {Path(args.tokenizer_path).name}")
    print("| stage | max_seq_len | batching | useful tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        pre, sft = write_data(Path(tmp), args.samples)
        for row in args.rows.split(","):
            stage, seq = row.split(":")
            for style in args.styles.split(","):
                tps, rss = run_row(stage, style, pre if stage == "pretrain" else sft, args, tmp,
                                   {"max_seq_len": int(seq)})
                print(f"| {stage} | {seq} | {style} | {tps:,.0f} | {rss:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
