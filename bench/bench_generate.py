"""Greedy decoding speed, ours against the original MiniMind (fa82707) side by side in one run.

    python bench/bench_generate.py          # 512x8 dense, fp32, 32-token prompt, 256 new tokens, batch 1 and 8
    python bench/bench_generate.py --original_dir /path/to/minimind --original_python /path/to/venv/bin/python
    python bench/bench_generate.py --hidden_size 64 --num_hidden_layers 2 --new_tokens 16 --repeats 1   # quick
    python bench/bench_generate.py --engine_static 1   # + a row for the engine's static decode step (CUDA's) on CPU
Both sides run the same measuring code in their own fresh process, each with its own transformers (the original
with the pins of its venv), taking turns repeat by repeat, on the same random fp32 weights (ours are saved, the original loads them strict:
the state-dict keys are identical) and the same prompts, through model.generate() as eval_llm.py calls it
(input ids + attention mask, greedy), and ours also through model/engine.py, the continuous-batching engine that
the chat, the server, the web demo and the RL rollouts use (one request per sequence). Without the original (no --original_dir and none at ../orig or
../minimind next to this repository) its rows are skipped with one line.
Two more rows per batch size are lower bounds for any fp32 implementation on this machine (decode tokens/s
ceilings): reading every weight once per step (memory bandwidth), and the model's linear layers alone.
Prints a markdown table: time to first token, decode tokens/s, end-to-end tokens/s, the ratio ours/original,
and whether both produced the same greedy tokens. On a busy machine pass --threads 1: OpenMP threads that
share cores with other processes stall. Writes only a temporary weight file.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import subprocess
import tempfile
import time

import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.core.progress import cpu_description

ROOT = Path(__file__).resolve().parents[1]

# A worker in a fresh interpreter for each side: argv = repo root, weight file, JSON spec. It answers requests
# {"batch": B, "new_tokens": N} read from stdin with one "@@ {seconds, tokens}" line each; the sides are asked
# in turn, repeat by repeat, so that a change in the machine's load hits both alike.
WORKER = r"""
import json, sys, time
import torch
root, weights, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, root)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
torch.set_num_threads(spec["threads"])
model = MiniMindForCausalLM(MiniMindConfig(**spec["config"])).eval()
model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
if spec.get("compile"):
    model.forward = torch.compile(model.forward, dynamic=True)
engine = None
if spec.get("engine"):   # what the chat, the server, the web demo and the RL rollouts generate with
    from model.engine import Engine, SamplingParams
    import inspect   # repeats send the same prompts: no prefix cache, or they would skip their prefill
    fresh = {"prefix_cache": 0} if "prefix_cache" in inspect.signature(Engine).parameters else {}
    if spec.get("static"):   # the fixed-shape decode step (CUDA's default), here on CPU
        fresh["static_decode"] = True
    engine = Engine(model, max_batch=max(spec["batch_sizes"]), eos_token_id=-1, **fresh)   # -1: no token ends an answer
for line in sys.stdin:
    req = json.loads(line)
    prompt = torch.randint(3, 6400, (req["batch"], spec["prompt_len"]), generator=torch.Generator().manual_seed(req["batch"]))
    with torch.inference_mode():
        t0 = time.perf_counter()
        if engine is not None:
            done = engine.generate(prompt.tolist(), SamplingParams(max_tokens=req["new_tokens"], temperature=0))
            seconds, tokens = time.perf_counter() - t0, [r.token_ids for r in done]
        else:
            out = model.generate(inputs=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=req["new_tokens"],
                                 min_new_tokens=req["new_tokens"], do_sample=False, pad_token_id=0, eos_token_id=None)
            seconds, tokens = time.perf_counter() - t0, out[:, spec["prompt_len"]:].tolist()
    print("@@ " + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
if engine is not None:
    engine.close()
"""


class Worker:
    """One side's generation process (its own interpreter, repository and transformers)."""

    def __init__(self, python, root: Path, weights: Path, spec: dict, log: Path):
        self.log, self.name = log, f"{python} on {root}"
        self.proc = subprocess.Popen([str(python), "-c", WORKER, str(root), str(weights), json.dumps(spec)], cwd=root,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)

    def generate(self, batch: int, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"batch": batch, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise SystemExit(f"{self.name} failed:\n{self.log.read_text()[-3000:]}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def measure(workers: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """Best-of-N time to first token and total time per side, the sides taking turns; plus the greedy tokens and
    the warm-up time (which includes compilation for a compiled side)."""
    res = {}
    for name, w in workers.items():
        res[name] = {"warmup": w.generate(batch, 8)["seconds"], "ttft": float("inf"), "total": float("inf")}
    for _ in range(repeats):
        for name, w in workers.items():
            res[name]["ttft"] = min(res[name]["ttft"], w.generate(batch, 1)["seconds"])
            out = w.generate(batch, new_tokens)
            res[name]["total"], res[name]["tokens"] = min(res[name]["total"], out["seconds"]), out["tokens"]
    return res


def rates(res: dict, batch: int, new_tokens: int) -> tuple:
    """(time to first token s, decode tokens/s, end-to-end tokens/s), all sequences of the batch together."""
    ttft, total = res["ttft"], res["total"]
    return ttft, batch * (new_tokens - 1) / max(total - ttft, 1e-9), batch * new_tokens / total


def floors(cfg: dict, weights: Path, batch: int, threads: int, repeats: int = 20) -> dict:
    """Lower bounds on one decode step in fp32 on this machine, as decode tokens/s ceilings: reading every weight
    once (memory bandwidth: no fp32 implementation can decode faster), and the model's linear layers alone on one
    token per sequence (what remains once attention, norms, RoPE, the cache and all dispatch cost nothing)."""
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    model = MiniMindForCausalLM(MiniMindConfig(**cfg)).eval()
    model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
    params = list(model.parameters())                       # the tied embedding / LM head once
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {n: torch.randn(batch, n) for n in {m.in_features for m in linears}}

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    with torch.inference_mode():
        read = best(lambda: [p.sum() for p in params])
        gemm = best(lambda: [F.linear(inputs[m.in_features], m.weight) for m in linears])
    return {"fp32 floor: read every weight once": batch / read, "fp32 floor: linear layers alone": batch / gemm}


def default_original() -> tuple:
    """(original_dir, original_python) found next to this repository, or (None, None)."""
    for name in ("orig", "minimind"):
        folder = ROOT.parent / name
        if (folder / "model" / "model_minimind.py").is_file() and folder.resolve() != ROOT:
            venv = ROOT.parent / f"{name}-venv" / "bin" / "python"
            return folder, venv if venv.is_file() else Path(sys.executable)
    return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--batch_sizes", type=str, default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="best of N timed runs per batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0 = torch's default)")
    p.add_argument("--compile", type=int, default=0, choices=[0, 1],
                   help="1 = add a row for ours with torch.compile(model.forward, dynamic=True); its compilation "
                        "time (the warm-up) is printed, not counted in the rates")
    p.add_argument("--engine_static", type=int, default=0, choices=[0, 1],
                   help="1 = add a row for our engine with static_decode=True (the fixed-shape decode step it takes "
                        "on CUDA; 0 = only the engine's default for this device)")
    p.add_argument("--original_dir", default=None,
                   help="a checkout of the original MiniMind (default: ../orig or ../minimind if present; "
                        "'none' = ours only)")
    p.add_argument("--original_python", default=None,
                   help="the interpreter with the original's pins (default: ../orig-venv/bin/python if present, "
                        "else this one)")
    args = p.parse_args(argv)
    cfg = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe))
    spec = dict(config=cfg, batch_sizes=[int(b) for b in args.batch_sizes.split(",")], prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, repeats=args.repeats,
                threads=args.threads or torch.get_num_threads())
    if args.original_dir is None:
        original_dir, original_python = default_original()
    elif args.original_dir == "none":
        original_dir, original_python = None, None
    else:
        original_dir, original_python = Path(args.original_dir), Path(args.original_python or sys.executable)
    if args.original_python:
        original_python = Path(args.original_python)

    print(f"# greedy generate(): {args.hidden_size}x{args.num_hidden_layers}{' MoE' if args.use_moe else ''}, fp32, "
          f"random weights, prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats}; "
          f"torch {torch.__version__}, {spec['threads']} threads; {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        torch.manual_seed(0)
        torch.save(MiniMindForCausalLM(MiniMindConfig(**cfg)).state_dict(), weights)
        sides = {}
        if original_dir is not None and (original_dir / "model" / "model_minimind.py").is_file():
            sides["original"] = Worker(original_python, original_dir, weights, spec, Path(tmp) / "original.log")
        else:
            why = "--original_dir none" if args.original_dir == "none" else \
                f"no original MiniMind at {original_dir or '../orig or ../minimind'}"
            print(f"# {why}: the original's rows are skipped")
        sides["ours"] = Worker(sys.executable, ROOT, weights, spec, Path(tmp) / "ours.log")
        sides["ours, engine"] = Worker(sys.executable, ROOT, weights, {**spec, "engine": True}, Path(tmp) / "engine.log")
        if args.engine_static:
            static = {**spec, "engine": True, "static": True}
            sides["ours, engine static"] = Worker(sys.executable, ROOT, weights, static, Path(tmp) / "static.log")
        if args.compile:
            sides["ours + compile"] = Worker(sys.executable, ROOT, weights, {**spec, "compile": True},
                                             Path(tmp) / "compiled.log")
        results = {b: measure(sides, b, args.new_tokens, args.repeats) for b in spec["batch_sizes"]}
        for w in sides.values():
            w.close()
        bounds = {b: floors(cfg, weights, b, spec["threads"]) for b in spec["batch_sizes"]}
    if args.compile:
        print("# ours + compile: first generate() with compilation "
              + ", ".join(f"{r['ours + compile']['warmup']:.0f} s at batch {b}" for b, r in results.items()))

    print("| batch | code | time to first token (ms) | decode tokens/s | end-to-end tokens/s | decode vs original "
          "| end-to-end vs original | greedy tokens = original |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, res in results.items():
        base = rates(res["original"], batch, args.new_tokens) if "original" in res else None
        for name, r in res.items():
            ttft, dec, e2e = rates(r, batch, args.new_tokens)
            vs = f"{dec / base[1]:.2f}x | {e2e / base[2]:.2f}x" if base else "- | -"
            same = "-" if name == "original" or base is None else \
                ("yes" if r["tokens"] == res["original"]["tokens"] else "NO")
            print(f"| {batch} | {name} | {ttft * 1000:.1f} | {dec:,.1f} | {e2e:,.1f} | {vs} | {same} |")
        for name, dec in bounds[batch].items():
            vs = f"{dec / base[1]:.2f}x | -" if base else "- | -"
            print(f"| {batch} | {name} | - | {dec:,.1f} | - | {vs} | - |")


if __name__ == "__main__":
    main()
