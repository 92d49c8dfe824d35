"""minimind-3 next to MiniMind2: fidelity to the original's newest code, the stock-Qwen3 export, the published
sizes, and the cost of a training step of each family side by side.

    python bench/bench_minimind3.py              # ~1 min on 2 cores
    python bench/bench_minimind3.py --steps 30 --hidden 256 --layers 8

Tables:
  1. goldens made by the original's newest code (tests/goldens/model3_*.pt, random weights, fp16 as its .pth):
     max |logits - original| in fp32, greedy tokens equal (16 new), MoE aux loss difference;
  2. scripts/convert_model.py's --to qwen3 folder loaded by stock transformers (no remote code): max |logits - ours|;
  3. parameter counts of the published sizes (768x8 dense and MoE), ours against the original's (model3_counts.json);
  4. one training step (forward + backward + AdamW, batch x seq_len random tokens, fp32 and bf16 autocast) of each
     family at the same width and depth, median of --steps after 3 warm-up steps, and minimind-3 over MiniMind2.
The CPU is named in the header: speeds are only comparable within one run.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from trainer.core.progress import cpu_description  # noqa: E402

GOLDENS = ROOT / "tests" / "goldens"


def golden(name):
    g = torch.load(GOLDENS / f"model3_{name}.pt")
    model = MiniMindForCausalLM(MiniMindConfig.from_dict(dict(g["config_json"])))
    model.load_state_dict(g["state_dict"], strict=True)
    return g, model.eval()


def fidelity_rows():
    rows = []
    for name in ("dense", "moe", "yarn"):
        g, model = golden(name)
        keep = 8 if name == "yarn" else 0
        with torch.no_grad():
            diff = (model(g["input_ids"], logits_to_keep=keep).logits - g["logits"]).abs().max().item()
            gen = model.generate(g["greedy_prompt"], max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, 8:]
        aux = "-"
        if "train_aux_loss" in g:
            model.train()
            aux = f"{abs(model(g['input_ids']).aux_loss.item() - g['train_aux_loss'].item()):.1e}"
        rows.append((name, f"{diff:.1e}", str(gen.tolist() == g["greedy_16"].view(-1).tolist()), aux))
    return rows


def export_rows():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from scripts.convert_model import export_qwen3
    hf_logging.disable_progress_bar()
    rows = []
    for name in ("dense", "moe"):
        g, model = golden(name)
        with tempfile.TemporaryDirectory() as tmp:
            export_qwen3(model, Path(tmp) / "q", dtype=torch.float32)
            stock = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "q"), dtype=torch.float32).eval()
            with torch.no_grad():
                diff = (stock(g["input_ids"]).logits - model(g["input_ids"]).logits).abs().max().item()
        rows.append((name, type(stock).__name__, f"{diff:.1e}"))
    return rows


def size_rows():
    counts = json.loads((GOLDENS / "model3_counts.json").read_text())
    rows = []
    for name, use_moe in (("dense", False), ("moe", True)):
        with torch.device("meta"):
            model = MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", use_moe=use_moe))
        total, active = model.count_parameters()
        rows.append((f"768x8 {name}", f"{total:,}", f"{active:,}", f"{counts[name]['total']:,}",
                     f"{counts[name]['active']:,}"))
    return rows


def step_time(family, args, dtype):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(model_family=family, hidden_size=args.hidden,
                                               num_hidden_layers=args.layers)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, 6400, (args.batch, args.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(args.steps + 3):
        start = time.perf_counter()
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times), sum(p.numel() for p in model.parameters())


def table(title, header, rows):
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    print(f"CPU: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    table("1. minimind-3 against the original's newest code (goldens, fp32)",
          ["model", "max |logits - original|", "greedy 16 equal", "aux loss |diff|"], fidelity_rows())
    table("2. --to qwen3 export in stock transformers (no remote code)",
          ["model", "class", "max |logits - ours|"], export_rows())
    table("3. published sizes", ["model", "ours total", "ours active", "original total", "original active"],
          size_rows())
    rows = []
    for dtype in ("fp32", "bf16"):
        (t2, n2), (t3, n3) = step_time("minimind2", args, dtype), step_time("minimind3", args, dtype)
        tokens = args.batch * args.seq_len
        rows.append((dtype, f"{n2 / 1e6:.2f}M / {n3 / 1e6:.2f}M", f"{tokens / t2:,.0f}", f"{tokens / t3:,.0f}",
                     f"{t2 / t3:.2f}x"))
    table(f"4. one training step, {args.hidden}x{args.layers}, batch {args.batch} x {args.seq_len} tokens "
          f"(median of {args.steps})", ["dtype", "params (MiniMind2 / minimind-3)", "MiniMind2 tokens/s",
                                        "minimind-3 tokens/s", "minimind-3 speed / MiniMind2"], rows)


if __name__ == "__main__":
    main()
