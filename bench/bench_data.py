"""Benchmark: our offset-indexed PretrainDataset against the original's load-everything dataset.

    python bench/bench_data.py                        # writes a ~1 GiB synthetic pretrain jsonl to a temp dir
    python bench/bench_data.py --size_mb 16           # quick run, seconds
    python bench/bench_data.py --path data.jsonl      # use (or create, if missing) this file

Each dataset is built in its own subprocess, so peak RSS (ru_maxrss) belongs to that dataset alone;
"baseline" is the process RSS after importing torch/transformers and loading the tokenizer.
Prints a markdown table; writes nothing but the synthetic file (deleted unless --path is given).
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


def write_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    """Lines like pretrain_hq.jsonl: several '<|im_start|>...<|im_end|>' segments of mixed
    Chinese/English separated by spaces, each segment under 512 characters."""
    rng, target, n = random.Random(seed), size_mb << 20, 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        while f.tell() < target:
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
    """Build one dataset, fetch random samples, print one JSON line of measurements."""
    import resource
    import psutil
    from transformers import AutoTokenizer
    from dataset.lm_dataset import PretrainDataset
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if args.child == "ours":
        ds = PretrainDataset(args.path, tokenizer, max_length=args.max_length)
    else:
        ds = OriginalPretrainDataset(args.path, tokenizer, max_length=args.max_length)
    construct = time.perf_counter() - t0
    peak_construct = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
    idx = random.Random(1).choices(range(len(ds)), k=args.samples)
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    fetch = time.perf_counter() - t0
    print(json.dumps(dict(rows=len(ds), baseline=baseline, construct=construct, peak=peak_construct, fetch=fetch)))


def main():
    p = argparse.ArgumentParser(description="PretrainDataset construction time, peak RSS and fetch speed", allow_abbrev=False)
    p.add_argument("--size_mb", type=int, default=1024, help="size of the synthetic jsonl in MiB")
    p.add_argument("--path", type=str, default=None, help="jsonl to use; created (and kept) if missing")
    p.add_argument("--tokenizer_path", type=str, default=str(ROOT / "model"), help="tokenizer directory")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--samples", type=int, default=1000, help="random samples fetched after construction")
    p.add_argument("--child", choices=["ours", "original"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if not (Path(args.tokenizer_path) / "tokenizer.json").exists():
        sys.exit(f"no tokenizer.json in {args.tokenizer_path}; pass --tokenizer_path")

    tmp = None
    if args.path is None:
        tmp = tempfile.TemporaryDirectory()
        args.path = str(Path(tmp.name) / "pretrain_bench.jsonl")
    if not Path(args.path).exists():
        Path(args.path).parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rows = write_corpus(Path(args.path), args.size_mb)
        print(f"wrote {args.path}: {rows:,} rows, {os.path.getsize(args.path) / 2**20:,.0f} MiB "
              f"in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    results = {}
    for name in ("original", "ours"):
        cmd = [sys.executable, __file__, "--child", name, "--path", args.path, "--tokenizer_path",
               args.tokenizer_path, "--max_length", str(args.max_length), "--samples", str(args.samples)]
        results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    mib = lambda b: f"{b / 2**20:,.0f}"
    size = os.path.getsize(args.path)
    print(f"\nPretrainDataset on {mib(size)} MiB jsonl ({results['ours']['rows']:,} rows), "
          f"max_length {args.max_length}, {args.samples} random samples\n")
    print("| dataset | construct (s) | peak RSS (MiB) | peak - baseline (MiB) | fetch (ms/sample) |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("original", "original (json.loads all rows)"), ("ours", "ours (offset index)")):
        r = results[name]
        print(f"| {label} | {r['construct']:.2f} | {mib(r['peak'])} | {mib(r['peak'] - r['baseline'])} "
              f"| {1000 * r['fetch'] / args.samples:.3f} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
