"""Benchmark: our PretrainDataset (offset index, token cache) against the original's load-everything dataset.

    python bench/bench_data.py                        # ~1 GiB and 1M-line synthetic pretrain jsonl in a temp dir
    python bench/bench_data.py --quick                # the same tables at 16 MiB and 20,000 lines, about a minute
    python bench/bench_data.py --path data.jsonl      # use (or create, if missing) this file for the first table

First table: on a --size_mb file, construction time, peak RSS and random-sample fetch time of the
original's dataset, ours without a cache (tokenizes each sample when read), and ours with the token
cache the first time (the build, in min(cpu, 8) processes) and the second time (verify and map it).
Second table: start-up of a --lines file like pretrain_hq.jsonl, from construction to the first
sample, the first time (build, its progress lines shown) and the second time (load), against the
issue's targets: <= 3 min and <= 5 s on 2 cores, and peak RSS of the main process <= 300 MiB
above the baseline.
Each run is its own subprocess, so peak RSS (ru_maxrss) belongs to that dataset alone; "baseline"
is the process RSS after importing torch/transformers and loading the tokenizer; "workers" is the
largest build process (forked from the main one, so it counts the pages they share).
Prints markdown tables; writes nothing but the synthetic files and caches in a temp dir (the
--path file is kept).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import os
import random
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]

ZH = ["鉴别一组中文文章的风格和特点。", "光合作用是植物利用光能把二氧化碳和水转化为有机物的过程。",
      "请把下面的句子翻译成英文。", "今天的天气很好，我们去公园散步吧。", "机器学习是人工智能的一个分支。",
      "这本书讲述了一个关于勇气和友谊的故事。", "数学是研究数量、结构以及空间等概念的学科。"]
EN = ["MiniMind is a tiny language model.", "The quick brown fox jumps over the lazy dog.",
      "Attention is all you need.", "Water boils at one hundred degrees Celsius at sea level.",
      "Please summarise the following paragraph in one sentence."]


def write_corpus(path: Path, size_mb: int, seed: int = 0, lines: int | None = None) -> int:
    """Lines like pretrain_hq.jsonl: several '<|im_start|>...<|im_end|>' segments of mixed
    Chinese/English separated by spaces, each segment under 512 characters. Stops at size_mb MiB,
    or after `lines` lines when given."""
    rng, target, n = random.Random(seed), size_mb << 20, 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        while (n < lines) if lines else (f.tell() < target):
            segments = []
            for _ in range(rng.randint(1, 4)):
                pieces = rng.choices(ZH + EN, k=rng.randint(2, 12))
                segments.append("<|im_start|>" + "".join(pieces) + "<|im_end|>")
            f.write(json.dumps({"text": " ".join(segments)}, ensure_ascii=False) + "\n")
            n += 1
    return n


class OriginalPretrainDataset:
    """The original (fa82707) PretrainDataset: every row parsed into a Python list in __init__."""

    def __init__(self, data_path, tokenizer, max_length=512):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.samples = []
        with open(data_path, "r", encoding="utf-8") as f:
            for line in f:
                self.samples.append(json.loads(line.strip()))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        import torch
        encoding = self.tokenizer(str(self.samples[index]["text"]), max_length=self.max_length,
                                  padding="max_length", truncation=True, return_tensors="pt")
        input_ids = encoding.input_ids.squeeze()
        loss_mask = input_ids != self.tokenizer.pad_token_id
        return input_ids[:-1].long(), input_ids[1:].long(), loss_mask[1:].long()


def child(args) -> None:
    """Build one dataset, fetch random samples, print one JSON line of measurements (last on stdout)."""
    import resource
    import psutil
    from transformers import AutoTokenizer
    from dataset.lm_dataset import PretrainDataset
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    baseline = psutil.Process().memory_info().rss
    cpu = lambda: sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                      for f in ("ru_utime", "ru_stime"))
    t0, cpu0 = time.perf_counter(), cpu()
    if args.child == "ours":
        ds = PretrainDataset(args.path, tokenizer, max_length=args.max_length, cache_dir=args.cache_dir)
    else:
        ds = OriginalPretrainDataset(args.path, tokenizer, max_length=args.max_length)
    construct = time.perf_counter() - t0
    ds[0]
    first, cpu_first = time.perf_counter() - t0, cpu() - cpu0
    peak_construct = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10     # the largest pool worker
    idx = random.Random(1).choices(range(len(ds)), k=args.samples)
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    fetch = time.perf_counter() - t0
    print(json.dumps(dict(rows=len(ds), baseline=baseline, construct=construct, first=first, cpu=cpu_first,
                          peak=peak_construct, workers=workers, fetch=fetch)))


def run_child(args, name: str, path: str, cache_dir: str | None = None, samples: int | None = None) -> dict:
    """One measurement in a fresh process; its other output (the cache's progress lines) goes to stderr."""
    cmd = [sys.executable, __file__, "--child", name, "--path", path, "--tokenizer_path", args.tokenizer_path,
           "--max_length", str(args.max_length), "--samples", str(samples or args.samples)]
    if cache_dir:
        cmd += ["--cache_dir", cache_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not line.startswith("{"):
            print("   ", line, end="", file=sys.stderr, flush=True)
    if proc.wait():
        sys.exit(f"{name} child failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def ensure_corpus(path: Path, size_mb: int, lines: int | None = None) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = write_corpus(path, size_mb, lines=lines)
    print(f"wrote {path}: {rows:,} rows, {os.path.getsize(path) / 2**20:,.0f} MiB "
          f"in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description="PretrainDataset construction time, peak RSS and fetch speed",
                                allow_abbrev=False)
    p.add_argument("--size_mb", type=int, default=1024, help="size of the synthetic jsonl of the first table in MiB")
    p.add_argument("--lines", type=int, default=1_000_000, help="lines of the start-up table's synthetic jsonl")
    p.add_argument("--quick", action="store_true",
                   help="--size_mb 16 --lines 20000 --samples 200: a check in about a minute")
    p.add_argument("--path", type=str, default=None, help="jsonl for the first table; created (and kept) if missing")
    p.add_argument("--tokenizer_path", type=str, default=str(ROOT / "model"), help="tokenizer directory")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--samples", type=int, default=1000, help="random samples fetched after construction")
    p.add_argument("--child", choices=["ours", "original"], help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.size_mb, args.lines, args.samples = 16, 20_000, 200
    if not (Path(args.tokenizer_path) / "tokenizer.json").exists():
        sys.exit(f"no tokenizer.json in {args.tokenizer_path}; pass --tokenizer_path")
    from trainer.core.progress import cpu_description

    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    path = args.path or str(work / "pretrain_bench.jsonl")
    ensure_corpus(Path(path), args.size_mb)
    results = {name: run_child(args, name, path) for name in ("original", "ours")}
    for when in ("first", "second"):
        print(f"ours + token cache, {when} time:", file=sys.stderr)
        results[f"cache {when}"] = run_child(args, "ours", path, cache_dir=str(work / "cache"))

    startup_path = work / "pretrain_hq_like.jsonl"
    ensure_corpus(startup_path, 0, lines=args.lines)
    startup = {}
    for when in ("first", "second"):
        print(f"start-up, {when} time:", file=sys.stderr)
        startup[when] = run_child(args, "ours", str(startup_path), cache_dir=str(work / "cache"), samples=1)

    mib = lambda b: f"{b / 2**20:,.0f}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    print(f"\n{cpu_description()}, {cores} cores{load}, max_length {args.max_length}\n")
    print(f"PretrainDataset on {mib(os.path.getsize(path))} MiB jsonl ({results['original']['rows']:,} rows), "
          f"{args.samples} random samples\n")
    print("| dataset | construct (s) | peak RSS (MiB) | peak - baseline (MiB) | workers' peak (MiB) "
          "| fetch (ms/sample) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in (("original", "original (json.loads all rows)"),
                        ("ours", "ours (offset index, tokenize on read)"),
                        ("cache first", "ours + token cache, first time (build)"),
                        ("cache second", "ours + token cache, second time (load)")):
        r = results[name]
        print(f"| {label} | {r['construct']:.2f} | {mib(r['peak'])} | {mib(r['peak'] - r['baseline'])} "
              f"| {mib(r['workers']) if name == 'cache first' else '-'} | {1000 * r['fetch'] / args.samples:.3f} |")

    print(f"\nStart-up with the token cache: {args.lines:,}-line pretrain_hq-like jsonl "
          f"({mib(os.path.getsize(startup_path))} MiB), construction to first sample\n")
    print("| run | time (s) | target | CPU time, all processes (s) | peak RSS - baseline (MiB) | target |")
    print("|---|---:|---|---:|---:|---|")
    for when, label, limit in (("first", "first time (tokenize, build the cache)", 180),
                               ("second", "second time (load it)", 5)):
        r = startup[when]
        over = (r["peak"] - r["baseline"]) / 2**20
        print(f"| {label} | {r['first']:.1f} | <= {limit} s: {'met' if r['first'] <= limit else 'MISSED'} "
              f"| {r['cpu']:.1f} | {over:,.0f} | <= 300 MiB: {'met' if over <= 300 else 'MISSED'} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
