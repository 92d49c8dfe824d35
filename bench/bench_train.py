"""Training throughput side by side with the original, and what packing does to the held-out loss.

    python bench/bench_train.py                     # 512x8, batch 8, pretrain and SFT at 512 and 340, ~30 min
    python bench/bench_train.py --hidden_size 64 --num_hidden_layers 2 --steps 3 --rows pretrain:128 \\
        --loss_samples 200                          # quick check, a minute
    python bench/bench_train.py --original_dir /work/orig --original_python /work/orig-venv/bin/python

Every row runs a real trainer in a fresh process on the same synthetic data (mixed Chinese/English text with
a long-tailed length, SFT dialogues of 1-3 turns) and the original's tokenizer, for --warmup untimed and
--steps timed micro-batches of --batch_size rows, accumulation 1:
  original (fa82707)   the original trainer (its own code and pins), when --original_dir/--original_python
                       exist; it pads every sample to max_seq_len; its useful tokens are counted from the data
  --packing 0 fp32     ours with the original's batches (one sample per row, padded to the batch's longest)
  default              ours with default flags (packing, --dtype auto)
  default + compile    the same with --use_compile 1 (the timed window starts after compilation)
Columns: useful (non-padding) tokens/s and its ratio to the original, the padding share of the positions
computed, MFU (6 x params x useful tokens/s over the measured matmul peak), peak RSS of the process.
Then, with --loss_samples > 0: one epoch of pretraining on the demo corpus (a 128x4 model) unpacked, packed
(default: the same samples per step), --batch_unit rows with the same --batch_size (fewer, larger steps) and
with about as many samples per step, and the cross-entropy of each on held-out demo lines.
Nothing is written outside a temporary directory. Prints markdown tables.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import os
import random
import re
import subprocess
import tempfile
import time

from trainer.core.progress import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_TOKENIZER = ROOT / "tests" / "goldens" / "upstream_tokenizer"

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


def plain(rng, n):
    return synthetic_text(rng, n).replace("<|im_start|>", "").replace("<|im_end|>", "")


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
                conv.append({"role": "user", "content": plain(rng, rng.randint(10, 120))})
                conv.append({"role": "assistant", "content": plain(rng, int(rng.lognormvariate(4.8, 0.8)))})
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    return pre, sft


def mean_useful_tokens(stage: str, data: Path, max_seq_len: int, tokenizer_path) -> float:
    """Mean input positions that are not padding per sample, as the original's datasets build them."""
    from transformers import AutoTokenizer
    from dataset.lm_dataset import PretrainDataset, SFTDataset
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    ds = (PretrainDataset if stage == "pretrain" else SFTDataset)(str(data), tok, max_length=max_seq_len,
                                                                   skip_bad_lines=True)
    return sum(len(ds[i][0]) for i in range(len(ds))) / len(ds)


def watch(cmd, cwd, lines_wanted: int, env=None):
    """Run cmd, timestamp its progress lines ('Epoch:['), stop it after lines_wanted of them.
    -> (arrival times, peak RSS in MiB from /proc/<pid>/status VmHWM)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    times, peak, tail = [], 0.0, []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        try:
            status = open(f"/proc/{proc.pid}/status").read()
            peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024)
        except (OSError, AttributeError):
            pass
        if line.startswith("Epoch:["):
            times.append(time.time())
            if len(times) >= lines_wanted:
                break
    proc.kill()
    proc.wait()
    if len(times) < lines_wanted:
        raise RuntimeError(f"{cmd[:3]} stopped after {len(times)} progress lines:\n{''.join(tail)}")
    return times, peak


def run_ours(stage, label, data, seq, args, tmp):
    out = Path(tmp) / f"{stage}-{seq}-{re.sub(r'[^a-z0-9]+', '-', label)}"
    warmup = args.warmup + (3 if "compile" in label else 0)        # compilation (and a recompile) come first
    flags = ["--device", "cpu", "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
             "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--max_seq_len", str(seq),
             "--data_path", str(data), "--save_dir", str(out), "--checkpoint_dir", str(out), "--from_weight", "none",
             "--tokenizer_path", str(args.tokenizer_path), "--num_workers", "1", "--log_interval", "1",
             "--save_interval", "100000", "--max_steps", str(args.steps + warmup), "--epochs", "1",
             "--skip_bad_lines", "1"]
    if label.startswith("--packing 0"):
        flags += ["--packing", "0", "--dtype", "float32"]
    if "compile" in label:
        flags += ["--use_compile", "1"]
    script = ROOT / "trainer" / f"train_{stage}.py"
    env = {**os.environ, "MINIMIND_CACHE": str(Path(tmp) / "cache")}
    _, peak = watch([sys.executable, str(script), *flags], ROOT, args.steps + warmup, env)
    records = [json.loads(line) for line in open(out / f"{stage}_{args.hidden_size}_metrics.jsonl")]
    before, timed = records[warmup - 1], records[warmup:]
    seconds = timed[-1]["time"] - before["time"]
    tok_s = (timed[-1]["tokens"] - before["tokens"]) / seconds
    pad = sum(r["pad"] for r in timed) / len(timed)
    # MFU of the whole timed span: per-line MFUs of unpacked rows swing with each batch's padding, so their
    # mean is not the span's; FLOPs per useful token over the peak is the same on every line
    mfu = timed[-1]["mfu"] / timed[-1]["tok_s"] * tok_s if timed[-1]["mfu"] and timed[-1]["tok_s"] else None
    return tok_s, pad, mfu, peak


def run_original(stage, data, seq, args, tmp, useful_per_sample):
    """The original trainer from its own trainer/ folder (it writes to ../out there, never here)."""
    flags = ["--device", "cpu", "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
             "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--max_seq_len", str(seq),
             "--data_path", str(data), "--num_workers", "1", "--log_interval", "1", "--save_interval", "100000",
             "--epochs", "1", "--from_weight", "none"]
    times, peak = watch([args.original_python, f"train_{stage}.py", *flags], Path(args.original_dir) / "trainer",
                        args.steps + args.warmup)
    seconds = times[-1] - times[args.warmup - 1]
    tok_s = args.steps * args.batch_size * useful_per_sample / seconds
    pad = 1 - useful_per_sample / (seq - 1)
    return tok_s, pad, None, peak


def loss_check(args, tmp):
    """Held-out CE after one epoch of pretraining on the demo corpus: unpacked and packed with --batch_size 16
    samples (the same batches, so the same steps), and --batch_unit rows with 16 rows (fewer and larger steps)
    and with about 16 samples' worth of rows."""
    import torch
    from transformers import AutoTokenizer
    from dataset.demo_data import write_demo_data
    from dataset.lm_dataset import PretrainDataset, pad_collate
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from model.loading import load_weights
    from trainer.core.stage import masked_cross_entropy
    demo = Path(tmp) / "demo"
    write_demo_data(demo)
    lines = (demo / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    lines = lines[:args.loss_samples]
    held = max(len(lines) // 10, 1)
    train, val = Path(tmp) / "loss_train.jsonl", Path(tmp) / "loss_val.jsonl"
    train.write_text("\n".join(lines[held:]) + "\n", encoding="utf-8")
    val.write_text("\n".join(lines[:held]) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    val_ds = PretrainDataset(str(val), tok, max_length=256)
    train_ds = PretrainDataset(str(train), tok, max_length=256)
    per_row = 255 / (sum(len(train_ds[i][0]) for i in range(len(train_ds))) / len(train_ds))
    batch = 16
    rows = max(1, round(batch / per_row))
    runs = [("--packing 0, batch 16 samples", ["--packing", "0"], batch),
            ("default (packed), batch 16 samples", [], batch),
            ("--batch_unit rows, batch 16 rows", ["--batch_unit", "rows"], batch),
            (f"--batch_unit rows, batch {rows} rows (~{rows * per_row:.0f} samples)", ["--batch_unit", "rows"], rows)]
    print(f"\n# held-out loss after one epoch: demo pretrain text, {len(lines) - held} training / {held} held-out "
          f"lines ({per_row:.1f} samples per packed row), 128x4, max_seq_len 256, lr 2e-3, accumulation 1")
    print("| run | optimizer steps | minutes | held-out CE (nats/token) |")
    print("|---|---|---|---|")
    for k, (name, extra, rows) in enumerate(runs):
        out = Path(tmp) / f"loss-{k}"
        flags = ["--device", "cpu", "--hidden_size", "128", "--num_hidden_layers", "4", "--max_seq_len", "256",
                 "--batch_size", str(rows), "--accumulation_steps", "1", "--learning_rate", "2e-3",
                 "--data_path", str(train), "--save_dir", str(out), "--checkpoint_dir", str(out),
                 "--log_interval", "1000", "--save_interval", "100000", "--num_workers", "1", *extra]
        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "trainer" / "train_pretrain.py"), *flags], check=True,
                       capture_output=True, text=True)
        minutes = (time.time() - t0) / 60
        steps = [json.loads(line) for line in open(out / "pretrain_128_metrics.jsonl")][-1]["iters"]
        model = MiniMindForCausalLM(MiniMindConfig(hidden_size=128, num_hidden_layers=4)).eval()
        load_weights(model, out / "pretrain_128.pth")
        total = count = 0.0
        with torch.no_grad():
            for i in range(0, len(val_ds), 16):
                b = pad_collate([val_ds[j] for j in range(i, min(i + 16, len(val_ds)))])
                n = b["loss_mask"].sum().item()
                ce = masked_cross_entropy(model(b["input_ids"]).logits, b["labels"], b["loss_mask"])
                total, count = total + ce.item() * n, count + n
        print(f"| {name} | {steps} | {minutes:.1f} | {total / count:.4f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed micro-batches per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed first micro-batches (compile rows: + compilation)")
    p.add_argument("--samples", type=int, default=3000, help="synthetic samples written per stage")
    p.add_argument("--tokenizer_path", type=str, default=str(UPSTREAM_TOKENIZER))
    p.add_argument("--rows", type=str, default="pretrain:512,pretrain:340,full_sft:512,full_sft:340",
                   help='stage:max_seq_len,... ("" = only the loss check)')
    p.add_argument("--labels", type=str, default="original (fa82707),--packing 0 fp32,default,default + compile")
    p.add_argument("--original_dir", type=str, default=str(ROOT.parent / "orig"),
                   help="a checkout of the original at fa82707 (skipped when absent)")
    p.add_argument("--original_python", type=str, default=str(ROOT.parent / "orig-venv" / "bin" / "python"),
                   help="a Python with the original's pins")
    p.add_argument("--loss_samples", type=int, default=6000, help="demo lines for the loss check (0 = skip it)")
    args = p.parse_args()
    import torch
    have_original = Path(args.original_dir, "trainer").is_dir() and Path(args.original_python).exists()
    labels = [label for label in args.labels.split(",") if have_original or not label.startswith("original")]
    if not have_original:
        print(f"(the original is not at {args.original_dir} / {args.original_python}: its rows are skipped)")
    rows = [row for row in args.rows.split(",") if row]     # --rows "" runs only the loss check
    machine = f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_description()}"
    print(f"# train: {args.hidden_size}x{args.num_hidden_layers}, batch {args.batch_size} rows, {args.steps} timed "
          f"steps per row, {machine}" if rows else f"# {machine}")
    if rows:
        print("| stage | max_seq_len | run | useful tokens/s | x original | padding | MFU | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        pre, sft = write_data(Path(tmp), args.samples) if rows else (None, None)
        for row in rows:
            stage, seq = row.split(":")
            seq, data, base = int(seq), pre if stage == "pretrain" else sft, None
            for label in labels:
                if label.startswith("original"):
                    useful = mean_useful_tokens(stage, data, seq, args.tokenizer_path)
                    tok_s, pad, mfu, peak = run_original(stage, data, seq, args, tmp, useful)
                    base = tok_s
                else:
                    tok_s, pad, mfu, peak = run_ours(stage, label, data, seq, args, tmp)
                ratio = f"{tok_s / base:.2f}x" if base else "-"
                mfu_text = f"{100 * mfu:.1f}%" if mfu else "-"
                print(f"| {stage} | {seq} | {label} | {tok_s:,.0f} | {ratio} | {100 * pad:.0f}% | {mfu_text} | "
                      f"{peak:,.0f} |", flush=True)
        if args.loss_samples:
            loss_check(args, tmp)


if __name__ == "__main__":
    main()
