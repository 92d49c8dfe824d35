"""What the integrity check costs: model/loading.verify_checkpoint (a CRC-32 over every record of a torch.save zip)
next to the torch.load it precedes, on weight files of several sizes.

    python bench/bench_loading.py                       # 100 MB file + MiniMind2-Small / MiniMind2 fp16 weights
    python bench/bench_loading.py --sizes_mb 5 --models none --repeats 3     # tiny, seconds
Files are written with torch.save into --work_dir (default: a temporary folder, deleted afterwards) and read once
before timing, so every figure is a warm page cache read: the check's CPU cost, not the disk's. Prints a markdown
table (median of --repeats runs) and the CPU model; writes nothing else.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import statistics
import tempfile
import time
import zlib

import torch

from model.weights import read_state_dict, verify_checkpoint
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.core.progress import cpu_description

MODELS = {"minimind2-small": dict(hidden_size=512, num_hidden_layers=8),
          "minimind2": dict(hidden_size=768, num_hidden_layers=16)}



def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def crc_speed(mb: int = 64) -> float:
    """GiB/s of zlib.crc32 over an in-memory buffer."""
    data = torch.randint(0, 256, (mb * 2 ** 20,), dtype=torch.uint8).numpy().tobytes()
    return mb / 1024 / median_seconds(lambda: zlib.crc32(data), 5)


def files(work: Path, sizes_mb: list, models: list) -> list:
    """(label, path) of the files to time: random fp16 tensors of each size, and the fp16 MiniMind weights."""
    out = []
    for mb in sizes_mb:
        path = work / f"random_{mb}mb.pth"
        n = mb * 2 ** 20 // 2 // 16
        torch.save({f"w{i}": torch.randn(n).half() for i in range(16)}, path)
        out.append((f"{mb} MiB of random fp16", path))
    for name in models:
        model = MiniMindForCausalLM(MiniMindConfig(**MODELS[name]))
        path = work / f"{name}.pth"
        torch.save({k: v.half() for k, v in model.state_dict().items()}, path)   # the trainers' format
        out.append((f"{name} fp16 weight", path))
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--sizes_mb", type=int, nargs="*", default=[100], help="random files of these sizes (MiB)")
    p.add_argument("--models", type=str, nargs="*", default=list(MODELS), choices=[*MODELS, "none"],
                   help="MiniMind sizes saved as fp16 weights (none = skip)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per file (median)")
    p.add_argument("--work_dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for label, path in files(work, args.sizes_mb, [m for m in args.models if m != "none"]):
            read_state_dict(path)   # warm the page cache
            load = median_seconds(lambda: torch.load(path, map_location="cpu", weights_only=True), args.repeats)
            check = median_seconds(lambda: verify_checkpoint(path), args.repeats)
            both = median_seconds(lambda: read_state_dict(path), args.repeats)
            rows.append({"file": label, "mb": path.stat().st_size / 2 ** 20, "load_ms": load * 1e3,
                         "verify_ms": check * 1e3, "both_ms": both * 1e3, "ratio": check / load})
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; median of {args.repeats} runs, warm page cache")
    print("| file | size (MiB) | torch.load (ms) | verify_checkpoint (ms) | verify / load | verify GiB/s | "
          "read_state_dict = both (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['mb']:.1f} | {r['load_ms']:.1f} | {r['verify_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['mb'] / 1024 / (r['verify_ms'] / 1e3):.2f} | {r['both_ms']:.1f} |")
    print(f"CRC-32 itself (zlib {zlib.ZLIB_RUNTIME_VERSION}) runs at "
          f"{crc_speed():.2f} GiB/s here: the floor of any full check")
    return rows


if __name__ == "__main__":
    main()
