"""Plumbing shared by every training stage, written once: flags, device/precision/DDP set-up, model
loading and resume. The loop itself is trainer/core/loop.py; resume files are trainer/core/resume.py, the
batch order trainer/core/batch_plan.py, progress lines trainer/core/progress.py, experiment tracking trainer/core/tracking.py.
What serving shares lives in model/: weight files (model/weights.py), ROOT and the tokenizer (model/loading.py),
the one-line error wrapper cli (model/cli.py).

A stage script (train_pretrain.py, train_full_sft.py, ...) shows only what differs: its defaults, its
data, what it trains and its loss, in the numbered steps of the original:
    1. init_run  2. init_config  3. init_tracker  4. init_model  5. data, optimizer  6. restore
    7. wrap_model  8. train_loop
"""
import argparse
import atexit
import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.cli import FAMILY_HIDDEN, Typed, add_family_arg, family_hidden_size, was_typed
from model.loading import FAMILY_TOKENIZER_DIR, ROOT, TOKENIZER_DIR, load_tokenizer, load_weights, state_family
from model.weights import LoadError, weight_path
from trainer.core.resume import lm_checkpoint
from trainer.core.loop import CUDA_GRAPH_MODES, ResumePoint, set_rng_state
from trainer.core.progress import Logger, is_main_process

DATA = ROOT / "dataset"
OUT = ROOT / "out"
CKPT = ROOT / "checkpoints"


# ---- small helpers ----
def setup_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean of the cross-entropy over supervised positions (loss_mask > 0).

    Only the supervised rows are gathered before the (fp32) log-softmax, so padding and prompt
    positions cost nothing; an all-zero mask gives 0 instead of a division by zero."""
    mask = loss_mask.reshape(-1) > 0
    rows = logits.reshape(-1, logits.shape[-1])[mask]
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(rows.float(), targets.reshape(-1)[mask])


def batch_stats(batch: dict) -> dict:
    """What the loop logs about a supervised batch: useful tokens and all positions (padding included), counted by
    the collate on the host."""
    return {"tokens": batch["tokens"], "positions": batch["input_ids"].numel()}


# ---- flags ----
def to_argv(flags: dict) -> list[str]:
    """{"epochs": 2, ...} -> ["--epochs", "2", ...]: how benches and tests call a stage's main(argv)."""
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def build_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """Every common flag of the original, with this stage's defaults (keyword arguments). `packing=1` adds
    --packing (stages that train on single sequences)."""
    d = dict(save_dir=OUT, save_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4, num_workers=1,
             accumulation_steps=8, grad_clip=1.0, log_interval=100, save_interval=100, hidden_size=512,
             num_hidden_layers=8, max_seq_len=512, use_moe=0, data_path=DATA / "pretrain_hq.jsonl",
             from_weight="none", wandb_project="MiniMind-Pretrain", demo_data="pretrain.jsonl", from_dir=None,
             packing=None, dtype="auto")
    unknown = set(defaults) - set(d)
    if unknown:
        raise TypeError(f"build_parser: unknown stage defaults {sorted(unknown)}")
    d.update(defaults)
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--save_dir", type=str, default=str(d["save_dir"]), help="where weights are written")
    p.add_argument("--save_weight", type=str, default=d["save_weight"], help="prefix of the saved weight file")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch_size", type=int, default=d["batch_size"],
                   help="samples per micro-batch and process, as the original (see --batch_unit)")
    p.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="peak LR (cosine to LR/10)")
    p.add_argument("--device", type=str, default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=str, default=d["dtype"], choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast precision; auto = bf16 on CUDA with bf16 (else fp16 + GradScaler), on CPUs with bf16 "
                        "matrix units (AMX, AVX512-BF16) and on MPS; fp32 otherwise")
    p.add_argument("--num_workers", type=int, default=d["num_workers"], help="DataLoader worker processes")
    p.add_argument("--accumulation_steps", type=int, default=d["accumulation_steps"],
                   help="micro-batches per optimizer step")
    p.add_argument("--grad_clip", type=float, default=d["grad_clip"], help="max gradient norm (0 = no clipping)")
    p.add_argument("--log_interval", type=int, default=d["log_interval"], help="micro-batches between log lines")
    p.add_argument("--save_interval", type=int, default=d["save_interval"], help="micro-batches between saves")
    p.add_argument("--hidden_size", type=int, default=d["hidden_size"], action=Typed,
                   help=f"model width (default {d['hidden_size']}; 768 with --model_family minimind3); names the "
                        "weight files {weight}_{hidden}[_moe].pth")
    p.add_argument("--num_hidden_layers", type=int, default=d["num_hidden_layers"])
    p.add_argument("--max_seq_len", type=int, default=d["max_seq_len"], help="tokens per sample (truncation) and per packed row")
    p.add_argument("--use_moe", type=int, default=d["use_moe"], choices=[0, 1])
    p.add_argument("--data_path", type=str, default=str(d["data_path"]), action=Typed,
                   help="training jsonl; when the default file is absent the demo corpus is used")
    p.add_argument("--from_weight", type=str, default=d["from_weight"],
                   help="weight prefix to start from, none = random. When --model_family is not typed, this file's "
                        ".json (or its keys) gives the family, so a chain started with --model_family minimind3 "
                        "needs the flag only once (also at --hidden_size 768 when --hidden_size is not typed)")
    p.add_argument("--from_resume", type=int, default=0, choices=[0, 1], help="1 = continue from the resume file")
    p.add_argument("--use_wandb", action="store_true", help="log to swanlab (or wandb, see --tracker)")
    p.add_argument("--wandb_project", type=str, default=d["wandb_project"])
    p.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="1 = torch.compile the model for training")
    p.add_argument("--fsdp", type=int, default=0, choices=[0, 1],
                   help="1 = with several processes, shard parameters, gradients and optimizer state (FSDP2) "
                        "instead of replicating them (DDP); for models that outgrow one GPU")
    # added flags; their defaults keep the original's behaviour
    add_family_arg(p)      # minimind2 (default) or minimind3; not typed: the --from_weight file decides
    if d["packing"] is not None:
        p.add_argument("--packing", type=int, default=d["packing"], choices=[0, 1],
                       help="1 = pack each micro-batch's samples into rows of max_seq_len (each attends only to "
                            "itself): the same samples, far fewer padded positions; 0 = one sample per row, as the "
                            "original")
        p.add_argument("--batch_unit", type=str, default="samples", choices=["samples", "rows"],
                       help="what --batch_size counts: samples (the original's meaning) or, with --packing 1, "
                            "packed rows of max_seq_len (2-3x more samples per step, 2-3x fewer steps per "
                            "epoch: raise --learning_rate to match)")
    p.add_argument("--tracker", type=str, default="swanlab", choices=["swanlab", "wandb"],
                   help="experiment tracker used by --use_wandb (the original imports swanlab)")
    p.add_argument("--tokenizer_path", type=str, default=str(TOKENIZER_DIR), action=Typed,
                   help="tokenizer directory (default: the family's, model/ or model/minimind3/)")
    p.add_argument("--checkpoint_dir", type=str, default=str(CKPT), help="where resume files are written")
    p.add_argument("--from_dir", type=str, default=str(d["from_dir"] or ""),
                   help="where --from_weight is read (default: --save_dir)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many micro-batches (0 = all)")
    p.add_argument("--compile_mode", type=str, default="default", choices=["default", "reduce-overhead",
                                                                          "max-autotune"],
                   help="torch.compile mode with --use_compile 1: reduce-overhead replays each step's kernels as "
                        "CUDA graphs (the shapes are fixed under --use_compile 1; needs --accumulation_steps 1), "
                        "max-autotune also tunes matmuls")
    p.add_argument("--pad_to_max", type=int, default=0, choices=[0, 1],
                   help="1 = pad every row to max_seq_len like the original (0 = to the batch's longest)")
    p.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1 = check every line first and drop (and count) the bad ones; 0 = stop at the first, "
                        "naming its file and line")
    p.add_argument("--group_by_length", type=int, default=0, choices=[0, 1],
                   help="1 = batch samples of similar length together when not packing (less padding)")
    p.add_argument("--seed", type=int, default=42, help="base seed (each rank uses seed + rank)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    p.set_defaults(demo_data=d["demo_data"], typed=set())
    return p


def resolve_data(args) -> str:
    """The stage's data file. When the user did not name one and the default (the original's file
    name under dataset/) is absent, fall back to the built-in demo corpus, generating it if needed."""
    path = Path(args.data_path)
    if was_typed(args, "data_path") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"--data_path {path} does not exist")
        return str(path)
    demo = DATA / "demo" / args.demo_data
    if not demo.exists():
        if is_main_process():
            from dataset.demo_data import write_demo_data
            write_demo_data(demo.parent)
        if dist.is_initialized():
            dist.barrier()
    Logger(f"{path} not found: using the built-in demo corpus {demo} "
           f"(put the real MiniMind data at {path} to train on it)")
    return str(demo)


def data_kwargs(args) -> dict:
    """Dataset options every stage takes from its flags. The samples are tokenized once, into a cache under
    --checkpoint_dir/tokens/ (dataset/token_cache.py): training then only slices token ids."""
    return dict(max_length=args.max_seq_len, pad_to_max=bool(args.pad_to_max), skip_bad_lines=bool(args.skip_bad_lines),
                cache_dir=Path(args.checkpoint_dir) / "tokens")


# ---- 1. run context: distributed, device, precision ----
@dataclass
class RunContext:
    device: str
    device_type: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False
    autocast_ctx: object = None
    scaler: object = None
    dtype: torch.dtype = torch.float32
    adamw: dict = field(default_factory=dict)   # AdamW options: fused on CUDA, foreach elsewhere


def init_distributed_mode(device: str = "cuda") -> tuple:
    """(rank, local_rank, world_size) from the torchrun/deepspeed environment; (0, 0, 1) when not launched so.
    nccl when the processes train on GPUs, gloo on CPUs."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() and "cpu" not in device else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    atexit.register(_shutdown_distributed)
    return rank, local_rank, world


def _shutdown_distributed():
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def cpu_has_bf16_units() -> bool:
    """True when the CPU advertises native bf16 matrix instructions (Intel AMX-BF16 or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_dtype(requested: str, device_type: str) -> tuple[torch.dtype, str]:
    """(autocast dtype, why) for --dtype on this device."""
    if requested != "auto":
        dtype = getattr(torch, requested)
        if device_type == "cpu" and dtype == torch.float16:
            raise ValueError("--dtype float16 needs a GPU; use bfloat16 or float32 on CPU")
        return dtype, "--dtype " + requested
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bf16"
        return torch.float16, "auto: this GPU has no bf16, fp16 with a GradScaler"
    if device_type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and hasattr(mps, "is_macos_or_newer") and mps.is_macos_or_newer(14, 0):
            return torch.bfloat16, "auto: MPS on macOS 14+ supports bf16"
        return torch.float32, "auto: bf16 on MPS needs macOS 14"
    if device_type == "cpu" and cpu_has_bf16_units():
        return torch.bfloat16, "auto: this CPU has bf16 matrix units (amx_bf16/avx512_bf16)"
    return torch.float32, "auto: this CPU has no bf16 matrix units (no amx_bf16/avx512_bf16 flag)"


def init_run(args) -> RunContext:
    """1. distributed + seed + device, and the precision: autocast context and GradScaler (CUDA fp16 only)."""
    rank, local_rank, world = init_distributed_mode(args.device)
    if world > 1:        # one device per process: cuda:<local rank>, unless --device cpu was asked for
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() and "cpu" not in args.device else "cpu"
    setup_seed(args.seed + rank)
    device_type = "cuda" if "cuda" in args.device else ("mps" if "mps" in args.device else "cpu")
    dtype, why = choose_dtype(args.dtype, device_type)
    Logger(f"device {args.device}, precision {str(dtype).removeprefix('torch.')} ({why})"
           + (f", {world} processes" if world > 1 else ""))
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16 and device_type == "cuda"))
    # AdamW: the fused kernel on CUDA (one pass over the parameters; FSDP's sharded ones keep the default), the
    # multi-tensor one elsewhere (on CPU it takes the single-tensor AdamW's steps bit for bit, the fused kernel
    # differs from it in the last bit: tests/test_output_loss.py)
    fused = device_type == "cuda" and not (world > 1 and getattr(args, "fsdp", 0))
    return RunContext(args.device, device_type, rank, local_rank, world, world > 1, autocast, scaler, dtype,
                      {"fused": True} if fused else {"foreach": True})


# ---- 2. config and resume state ----
FAMILY_NAMES = {"minimind2": "MiniMind2", "minimind3": "minimind-3"}


def weight_family(path) -> str | None:
    """The model family of native weight `path`: its .json's, else its keys' (q_norm: minimind3); None when there
    is neither file (or neither can be read)."""
    from model.model_minimind import MiniMindConfig
    path = Path(path)
    try:
        return MiniMindConfig.from_dict(json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))).model_family
    except (OSError, ValueError, TypeError, KeyError):
        pass
    try:      # no .json (e.g. a published weight): the keys, memory-mapped, so no tensor is read
        keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
    except Exception:   # torch raises many types for a missing or foreign file; loading it reports that later
        return None
    return state_family(keys)


def resolve_family(args, from_weight: str = None) -> None:
    """Set args.model_family, args.hidden_size and args.tokenizer_path from what was typed and from the weight the
    stage starts from (`from_weight`, default --from_weight):
      * --model_family typed: that family; --hidden_size not typed: the family's published size (768 for minimind3);
      * not typed: the family of `{from_dir}/{from_weight}_{hidden}[_moe].pth` (its .json, else its keys); with
        --hidden_size not typed and no such file at 512, a minimind-3 weight at 768 is used, as
        `--model_family minimind3` alone wrote it. Otherwise (random init, no file) minimind2;
      * --tokenizer_path not typed: the family's tokenizer (model/ or model/minimind3/)."""
    from_weight = from_weight or args.from_weight
    if not was_typed(args, "model_family"):
        family = "minimind2"
        if from_weight and from_weight != "none":
            folder = args.from_dir or args.save_dir
            sizes = [args.hidden_size] + ([] if was_typed(args, "hidden_size") else [FAMILY_HIDDEN["minimind3"]])
            for hidden in sizes:
                path = weight_path(folder, from_weight, argparse.Namespace(hidden_size=hidden, use_moe=args.use_moe))
                found = weight_family(path)
                if found == "minimind3" or (found and hidden == args.hidden_size):
                    family, args.hidden_size = found, hidden
                    if found != "minimind2":
                        Logger(f"--model_family {found}: the family of {path}")
                    break
        args.model_family = family
    else:
        args.hidden_size = family_hidden_size(args)
    if not was_typed(args, "tokenizer_path"):
        args.tokenizer_path = str(FAMILY_TOKENIZER_DIR[args.model_family])


def init_config(args, from_weight: str = None, **extra):
    """2. the model config from the flags, plus the resume state (None when not resuming). The model family comes
    from --model_family or the start weight (resolve_family; `from_weight` when it is not --from_weight).

    --from_resume 1 with no resume file starts fresh only when that cannot overwrite trained weights:
    if the stage's output weight already exists, it is an error naming both paths. A resume file of the other
    family is an error."""
    from model.model_minimind import MiniMindConfig
    resolve_family(args, from_weight)
    lm_config = MiniMindConfig(model_family=args.model_family, hidden_size=args.hidden_size,
                               num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe), **extra)
    os.makedirs(args.save_dir, exist_ok=True)
    if not args.from_resume:
        return lm_config, None
    ckp = lm_checkpoint(lm_config, args.save_weight, save_dir=args.checkpoint_dir)
    if dist.is_initialized():   # on several machines each one reads its own --checkpoint_dir: all must find the file
        found = torch.tensor([float(ckp is not None)], device=args.device)
        dist.all_reduce(found)
        if 0 < found.item() < dist.get_world_size():
            looked = weight_path(args.checkpoint_dir, args.save_weight, lm_config, suffix="_resume.pth")
            raise FileNotFoundError(f"--from_resume 1: {int(found.item())} of {dist.get_world_size()} processes found "
                                    f"{looked}, the others did not; share --checkpoint_dir between the machines "
                                    "or copy the resume file to each")
    if ckp is None:
        looked = weight_path(args.checkpoint_dir, args.save_weight, lm_config, suffix="_resume.pth")
        out = weight_path(args.save_dir, args.save_weight, lm_config)
        if out.exists():
            raise FileNotFoundError(f"--from_resume 1: no resume file at {looked}, and starting over would overwrite "
                                    f"{out}. Point --checkpoint_dir at the run's resume files, or drop --from_resume "
                                    "(or move the weight) to start a new run")
        Logger(f"--from_resume 1: no resume file at {looked} and no {out.name} yet: starting a new run")
        return lm_config, None
    saved = ckp.get("model_family", "minimind2")     # files written before minimind-3 existed are MiniMind2 runs
    if saved != lm_config.model_family:
        looked = weight_path(args.checkpoint_dir, args.save_weight, lm_config, suffix="_resume.pth")
        raise ValueError(f"{looked} was written by a {FAMILY_NAMES[saved]} run and this run builds "
                         f"{FAMILY_NAMES[lm_config.model_family]}: resume with --model_family {saved}")
    if getattr(args, "packing", 0):
        unit = ckp.get("batch_unit")   # steps count micro-batches: resuming under another unit would skip other samples
        if unit is None:
            Logger("the resume file does not say what its --batch_size counted (written before --batch_unit existed, "
                   "when a packed run's micro-batch was --batch_size rows): add --batch_unit rows to continue it exactly")
        elif unit != args.batch_unit:
            raise ValueError(f"the resume file was written with --batch_unit {unit}; its steps count those micro-batches: "
                             f"resume with --batch_unit {unit}")
    return lm_config, ckp


# ---- 4. model ----
def init_model(lm_config, args, device: str = "cpu", from_weight: str = None, stage: str = "model"):
    """Build MiniMind, load `{--from_dir or --save_dir}/{from_weight}_{hidden}[_moe].pth` (default --from_weight;
    'none' = random init) and the tokenizer. Loading is strict: a missing or mismatched weight is an error naming
    the file. `stage` names the model in the log line ("policy", "teacher", ...)."""
    from model.model_minimind import MiniMindForCausalLM
    from_weight = from_weight or args.from_weight
    tokenizer = load_tokenizer(args.tokenizer_path)
    model = MiniMindForCausalLM(lm_config)
    source = "random init"
    if from_weight != "none":
        path = weight_path(args.from_dir or args.save_dir, from_weight, lm_config)
        check_family(path, lm_config)
        load_weights(model, path)
        source = str(path)
    total, active = model.count_parameters()
    family = f"{FAMILY_NAMES[lm_config.model_family]} " if lm_config.model_family != "minimind2" else ""
    Logger(f"{stage}: {family}{lm_config.hidden_size}x{lm_config.num_hidden_layers}{' MoE' if lm_config.use_moe else ''}, "
           f"{total / 1e6:.3f}M params" + (f" (active {active / 1e6:.3f}M)" if active != total else "")
           + f", from {source}")
    return model.to(device), tokenizer


def check_family(path, lm_config) -> None:
    """A start weight of the other model family is one line saying which flag fits it (loading is strict anyway,
    but its message would list the q_norm/k_norm keys)."""
    found = weight_family(path) if Path(path).is_file() else None
    if found is not None and found != lm_config.model_family:
        raise LoadError(f"{path} holds a {FAMILY_NAMES[found]} model and this run builds "
                        f"{FAMILY_NAMES[lm_config.model_family]}: "
                        + ("add --model_family minimind3" if found == "minimind3" else
                           "drop --model_family minimind3 (or pass --model_family minimind2)"))


# ---- 6. resume ----
def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this run's kernel choice (fused / foreach, run.adamw): a saved param
    group carries the flags of the run that wrote it (a CUDA file's fused=True would run the CPU fused kernel)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for flag in ("fused", "foreach"):
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]


def restore(ckp, model, optimizer, scaler=None, **extra) -> ResumePoint:
    """6. load model/optimizer/scaler (and any extra state_dict holders) from a resume dict."""
    if ckp is None:
        return ResumePoint()
    try:
        model.load_state_dict(ckp["model"])
        load_optimizer_state(optimizer, ckp["optimizer"])
        for key, holder in extra.items():
            if ckp.get(key) is not None and isinstance(holder, torch.optim.Optimizer):
                load_optimizer_state(holder, ckp[key])
            elif ckp.get(key) is not None:
                holder.load_state_dict(ckp[key])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"the resume file does not fit this run ({first[:200]}); was it written with other "
                         "--hidden_size / --num_hidden_layers / --use_moe / --model_family / stage flags?") from None
    if scaler is not None and ckp.get("scaler") is not None:
        scaler.load_state_dict(ckp["scaler"])
    ranks = ckp.get("rng_ranks")   # every rank's generators (several processes); else rank 0's for all
    if ranks and dist.is_initialized() and len(ranks) == dist.get_world_size():
        set_rng_state(ranks[dist.get_rank()])
    elif ckp.get("rng") is not None:
        set_rng_state(ckp["rng"])
    Logger(f"resuming from epoch {ckp['epoch'] + 1}, step {ckp['step']}")
    return ResumePoint(ckp["epoch"], ckp["step"])


# ---- 7. wrapping ----
def wrap_model(model, run: RunContext, args, optimizers=(), rollouts: bool = False):
    """7. With several processes: FSDP2 (--fsdp 1: parameters, gradients and AdamW state sharded per decoder
    layer; `optimizers` are re-pointed at the shards) or DistributedDataParallel. The only buffers are the RoPE
    tables, which every rank computes itself: DDP ignores them and syncs no buffers (forward_sync_buffers=False,
    torch 2.13's replacement of broadcast_buffers). Then torch.compile with --use_compile 1. rollouts=True (the
    RL stages, which generate with the raw model) uses neither FSDP nor compile, and says so."""
    if rollouts and (getattr(args, "use_compile", 0) or getattr(args, "fsdp", 0)):
        Logger("--use_compile/--fsdp are not used by the RL stages: rollouts generate with the whole raw model and "
               "change shapes on every step")
    if run.ddp and getattr(args, "fsdp", 0) and not rollouts:
        from trainer.core.fsdp import wrap_fsdp
        Logger(f"FSDP2: parameters, gradients and optimizer state sharded over {run.world_size} processes")
        model = wrap_fsdp(model, run, optimizers)
    elif run.ddp:
        from torch.nn.parallel import DistributedDataParallel
        model._ddp_params_and_buffers_to_ignore = {name for name, _ in model.named_buffers()}
        device_ids = [run.local_rank] if run.device_type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    if getattr(args, "use_compile", 0) and not rollouts:
        mode = getattr(args, "compile_mode", "default")
        if mode in CUDA_GRAPH_MODES and run.device_type == "cuda" and args.accumulation_steps > 1:
            raise ValueError(f"--compile_mode {mode} replays CUDA graphs, whose next replay overwrites the gradients "
                             f"that --accumulation_steps {args.accumulation_steps} adds up: use --accumulation_steps 1 "
                             "(with a larger --batch_size) or --compile_mode default")
        Logger(f"torch.compile (mode {mode}, static shapes): each new batch shape compiles once (at most a few: "
               "rows of max_seq_len - 1, their count in quarters of --batch_size), timed apart from tok/s")
        if run.device_type == "cpu":   # no atomic adds in the generated kernels: reruns and resumes stay bit-exact
            import torch._inductor.config as inductor_config
            torch.use_deterministic_algorithms(True, warn_only=True)
            inductor_config.deterministic = True
        import torch._dynamo.config as dynamo_config
        # the shapes: 4 row counts x a power-of-two sample count or two, and an epoch's shorter last batch
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
        model = torch.compile(model, dynamic=False, mode=None if mode == "default" else mode)
    return model
