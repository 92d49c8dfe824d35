"""Progress lines and metrics files for every stage (rank 0 only).

    Epoch:[1/2](300/1200) loss:2.3451 lr:0.00050000 tok/s:12,345 pad:4% mfu:31% eta:3.2min    # every --log_interval
    out/{stage}_{hidden}[_moe]_metrics.jsonl                                                   # the same numbers

tok/s counts useful (non-padding) tokens of all ranks; pad is the share of padding positions in the
batches; eta is the whole run's (all epochs, honouring --max_steps). MFU, model FLOPs utilisation, is
6 * active parameters * useful tokens/s over the device's peak: a table for common GPUs, and on CPU a short
matmul measured at start-up, the best rate seen cached (~/.cache/minimind, or $MINIMIND_CACHE). The
attention FLOPs (~4% of the total at 512 tokens for the 26M model) are left out, so MFU is slightly
underestimated. With --use_compile 1, a micro-batch that compiled a new shape is said on its own line with its
compile seconds and is left out of tok/s, MFU and the ETA (the steady rate).
"""
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.weights import weight_path


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def Logger(content) -> None:
    if is_main_process():
        print(content, flush=True)


# dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, and their fp32 (non-tensor-core) peaks
GPU_PEAK = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "H800": (989e12, 67e12), "A100": (312e12, 19.5e12),
            "A800": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "L40": (181e12, 90.5e12), "L4": (121e12, 30.3e12),
            "A10G": (70e12, 31.2e12), "A10": (125e12, 31.2e12), "RTX 4090": (165e12, 82.6e12),
            "RTX 3090": (71e12, 35.6e12), "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12)}


def device_peak_flops(run) -> float:
    """Peak FLOP/s of this device in the training dtype; 0 when unknown."""
    if run.device_type == "cuda":
        name = torch.cuda.get_device_name(run.device)
        for key, (half, single) in GPU_PEAK.items():
            if key in name:
                return half if run.dtype != torch.float32 else single
        return 0.0
    if run.device_type == "cpu":
        return cpu_peak_flops(run.dtype)
    return 0.0


_MEASURED = {}


def cpu_peak_flops(dtype=torch.float32) -> float:
    """A measured matmul rate of this CPU with the current thread count. Each start measures briefly and the
    cache (per CPU model) keeps the best rate seen: a measurement taken while the machine was busy is too low,
    and would make MFU read above 100% for every later run."""
    key = f"{_cpu_model()}|{dtype}|{torch.get_num_threads()}|{torch.__version__}"
    if key in _MEASURED:                                  # once per process (tests and benches run many stages)
        return _MEASURED[key]
    cache = Path(os.environ.get("MINIMIND_CACHE", Path.home() / ".cache" / "minimind")) / "cpu_peak.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    n, own = 1024, torch.Generator().manual_seed(0)      # never draw from the run's RNG (exact resume)
    a, b = torch.randn(n, n, dtype=dtype, generator=own), torch.randn(n, n, dtype=dtype, generator=own)
    a @ b
    t0, runs = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.2:
        a @ b
        runs += 1
    measured = 2 * n ** 3 * runs / (time.perf_counter() - t0)
    if measured > known.get(key, 0.0):
        known[key] = measured
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1))
        except OSError:
            pass
    _MEASURED[key] = known[key]
    return known[key]


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU model and its bf16 matrix-unit flags, as every benchmark names the machine it measured:
    e.g. 'AMD EPYC (no avx512_bf16/amx_bf16)'."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{_cpu_model()} ({', '.join(bf16) if bf16 else 'no avx512_bf16/amx_bf16'})"


class Progress:
    """Accumulates what the step functions report and prints one line per --log_interval micro-batches,
    appending the same numbers as JSON to `{save_dir}/{weight}_metrics.jsonl`."""

    def __init__(self, args, lm_config, run, tracker, iters: list, end: int, done: int):
        self.args, self.run, self.tracker, self.iters, self.end = args, run, tracker, iters, end
        self.done0, self.done = done, done
        self.t0 = self.window_t = time.time()
        self.losses, self.extra, self.tokens, self.positions, self.total_tokens = [], {}, 0, 0, 0
        self.skipped = 0
        self.compile_s = self.window_compile_s = 0.0    # steps that compiled a new shape: timed apart
        self.window_compile_tokens, self.shapes = 0, 0
        total, active = lm_config_params(lm_config)
        self.flops_per_token = 6 * active
        self.peak = device_peak_flops(run) if is_main_process() else 0.0
        name = weight_path(args.save_dir, args.save_weight, lm_config).stem
        self.metrics_path = Path(args.save_dir) / f"{name}_metrics.jsonl"
        if done == 0 and not args.from_resume and is_main_process():
            self.metrics_path.unlink(missing_ok=True)      # a fresh run starts a fresh file; a resumed one appends

    def add(self, loss: torch.Tensor, stats: dict):
        """One micro-batch: its loss and its step function's stats (floats, or 0-dim tensors: read only when
        logging, so a step never waits for the device)."""
        stats = dict(stats)
        tokens = int(stats.pop("tokens", 0))
        self.tokens += tokens
        self.total_tokens += tokens
        self.positions += int(stats.pop("positions", tokens))
        self.losses.append(loss.detach().clone())    # a copy: a CUDA graph's output is overwritten by its next replay
        for k, v in stats.items():
            self.extra.setdefault(k, []).append(v.detach().clone() if torch.is_tensor(v) else v)
        self.done += 1

    def compiled(self, seconds: float, tokens: int, shape: tuple):
        """A micro-batch whose forward compiled a new graph (torch.compile): its time and tokens stay out of tok/s,
        MFU and the ETA, and the compile time is said once."""
        self.compile_s += seconds
        self.window_compile_s += seconds
        self.window_compile_tokens += tokens
        self.shapes += 1
        Logger(f"torch.compile: a new batch shape {' x '.join(map(str, shape))} compiled in {seconds:.1f} s "
               f"({self.shapes} so far, {self.compile_s:.1f} s in all; not counted in tok/s)")

    def log(self, epoch: int, step: int, lr: float) -> float:
        """Print and record the window since the last line; returns its mean loss."""
        now = time.time()
        loss = torch.stack(self.losses).float().mean().item() if self.losses else float("nan")
        world = self.run.world_size
        steady = now - self.window_t - self.window_compile_s
        compiling_only = self.window_compile_s > 0 and self.tokens == self.window_compile_tokens
        tok_s = (self.tokens - self.window_compile_tokens) * world / steady if steady > 1e-6 else 0.0
        pad = 1 - self.tokens / self.positions if self.positions else 0.0
        mfu = self.flops_per_token * tok_s / world / self.peak if self.peak else None
        eta_min = (now - self.t0 - self.compile_s) / max(self.done - self.done0, 1) * (self.end - self.done) / 60
        extra = {k: sum(float(x) for x in v) / len(v) for k, v in self.extra.items()}
        self.losses, self.extra, self.tokens, self.positions, self.window_t = [], {}, 0, 0, now
        self.window_compile_s, self.window_compile_tokens = 0.0, 0
        extras = "".join(f" {k}:{v:.4f}" for k, v in extra.items())
        mfu_text = f" mfu:{100 * mfu:.1f}%" if mfu is not None else ""
        shown_total = min(self.iters[epoch], self.end - sum(self.iters[:epoch]))    # honours --max_steps
        rate = "-" if compiling_only else f"{tok_s:,.0f}"     # a window of compiling steps only has no rate
        if compiling_only:
            mfu_text = ""
        Logger(f"Epoch:[{epoch + 1}/{self.args.epochs}]({step}/{shown_total}) loss:{loss:.4f}{extras} "
               f"lr:{lr:.8f} tok/s:{rate} pad:{100 * pad:.0f}%{mfu_text} eta:{eta_min:.1f}min")
        record = {"epoch": epoch + 1, "step": step, "iters": self.iters[epoch], "global_step": self.done,
                  "loss": loss, "lr": lr, "tok_s": tok_s, "pad": pad, "mfu": mfu, "eta_min": eta_min,
                  "tokens": self.total_tokens * world, "time": now, **extra}
        self.tracker.log({"loss": loss, "lr": lr, "tok_s": tok_s, "pad": pad, **({"mfu": mfu} if mfu else {}), **extra},
                         step=self.done)    # the global step: a resumed run continues the same x axis
        if is_main_process():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return loss

    def summary(self) -> str:
        minutes = (time.time() - self.t0) / 60
        skipped = f", {self.skipped} non-finite steps skipped" if self.skipped else ""
        compiled = f" ({self.compile_s:.1f} s of it compiling {self.shapes} shapes)" if self.shapes else ""
        return f"{self.done - self.done0} steps in {minutes:.1f} min{compiled}{skipped}"


def lm_config_params(cfg) -> tuple[int, int]:
    """(total, active) parameters of a MiniMind config (either family), computed without building the model:
    attention with its own head_dim (minimind-3's may differ from hidden / heads) and minimind-3's per-head q/k
    norms; the tied embedding counted once (a minimind-3 LM head left untied adds its own matrix); MoE counts the
    routed experts a token uses (moe_intermediate_size wide), the shared experts (MiniMind2 only) and the router
    as active."""
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    attn = 2 * h * q + 2 * h * kv                        # q_proj, o_proj; k_proj, v_proj
    if getattr(cfg, "model_family", "minimind2") == "minimind3":
        attn += 2 * head_dim                             # q_norm, k_norm
    norms = 2 * h
    if getattr(cfg, "use_moe", False):
        routed = 3 * h * getattr(cfg, "moe_intermediate_size", cfg.intermediate_size)
        shared = cfg.n_shared_experts * 3 * h * cfg.intermediate_size
        router = cfg.n_routed_experts * h
        per_layer = attn + cfg.n_routed_experts * routed + shared + router + norms
        active_layer = attn + cfg.num_experts_per_tok * routed + shared + router + norms
    else:
        per_layer = active_layer = attn + 3 * h * cfg.intermediate_size + norms
    untied = getattr(cfg, "model_family", "minimind2") == "minimind3" and not getattr(cfg, "tie_word_embeddings", True)
    base = vocab * h * (2 if untied else 1) + h          # MiniMind2 always ties
    return base + layers * per_layer, base + layers * active_layer
