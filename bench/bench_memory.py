"""Per-GPU training memory of MiniMind sizes (published ones, ~300M, ~1B) under DDP and FSDP, from code.

    python bench/bench_memory.py                                    # batch 32 x seq 512 per GPU, N = 1, 2, 4, 8
    python bench/bench_memory.py --batch_size 4 --seq_len 2048 --validate   # + a measured check on CPU (seconds)

Parameters are counted on a MiniMindForCausalLM built on the meta device (no memory, no init).
Memory per GPU, in GiB, for mixed-precision training as trainer/ runs it (fp32 weights, bf16 autocast,
AdamW):
  weights      fp32 master weights, 4 B/param (FSDP: 1/N of them)
  grads        fp32 gradients, 4 B/param (FSDP: 1/N)
  adamw        exp_avg + exp_avg_sq, 8 B/param (FSDP: 1/N)
  copies       DDP: its gradient buckets (4 B/param, torch's default gradient_as_bucket_view=False)
               + autocast's bf16 copies of the weights (2 B/param, held from forward to backward);
               FSDP (bf16 MixedPrecisionPolicy): the unsharded bf16 root (embedding/LM head, norm) with
               its bf16 and fp32 gradients through the whole backward, 8 B/param, + two decoder layers
               in flight (one computing, one prefetched), 10 B/param
  activations  tensors saved for backward, per token (formula in activation_bytes_per_token, checked
               against a measurement with --validate), times batch x seq; the same under DDP and FSDP
               (every rank runs its own micro-batch)
Not counted: allocator fragmentation, the CUDA context (~0.5 GiB), transient buffers of the backward
pass (e.g. the fp32 logits gradient, 4-6 B x vocab per token, freed early), the data loader.
Prints markdown tables; writes nothing.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse

import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer.core.progress import cpu_description

GiB = 2 ** 30
CONFIGS = [  # (name, MiniMindConfig fields); heads of the bigger ones keep the published 4:1 GQA ratio
    ("MiniMind2-Small", dict(hidden_size=512, num_hidden_layers=8)),
    ("MiniMind2", dict(hidden_size=768, num_hidden_layers=16)),
    ("MiniMind2-MoE", dict(hidden_size=640, num_hidden_layers=8, use_moe=True)),
    ("~300M", dict(hidden_size=1024, num_hidden_layers=26, num_attention_heads=16, num_key_value_heads=4)),
    ("~1B", dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=4)),
]
VALIDATE = [  # small configs whose saved activations are measured on CPU
    ("128x2", dict(hidden_size=128, num_hidden_layers=2)),
    ("256x4 (16 heads, 4 kv)", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=16,
                                    num_key_value_heads=4)),
    ("128x2 MoE", dict(hidden_size=128, num_hidden_layers=2, use_moe=True)),
]


def build_meta(fields: dict) -> MiniMindForCausalLM:
    with torch.device("meta"):
        return MiniMindForCausalLM(MiniMindConfig(**fields))


def param_counts(model) -> dict:
    """total and active (MoE: per token) parameters, one decoder layer, and the root FSDP unit
    (everything outside the decoder layers: tied embedding / LM head, final norm)."""
    total, active = model.count_parameters()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"total": total, "active": active, "layer": layer, "root": total - layer * len(model.model.layers)}


def activation_bytes_per_token(cfg: MiniMindConfig) -> int:
    """Bytes saved for backward per token under bf16 autocast (SDPA attention, dropout 0), read off the
    model code op by op. Per decoder layer, with H = hidden, I = intermediate, Q = heads x head_dim,
    K = kv heads x head_dim:
      each RMSNorm keeps its fp32 input (its backward recomputes the rest)   2 x 4H
      the norm's bf16 output (under autocast), shared by the Linears it feeds   q,k,v: 2H   gate,up: 2H
      SDPA keeps q, k, v, its output (bf16; o_proj's input is a view    4Q + 4K + 4 x heads
      of it) and the fp32 logsumexp
      SwiGLU keeps gate (silu input), silu(gate), up and the product    8I
    MoE: the SwiGLU part and its bf16 input (2H + 8I) once per routed slot (top-k) and shared expert (the
    router reads the shared expert's input), the bf16 expert outputs before and after weighting (4H per
    slot), the router's scores (~4 x experts), and three int64 index vectors per slot (24 x top-k).
    Outside the layers: the final norm (4H), lm_head's bf16 input (2H), the fp32 log-softmax over
    the vocabulary in the loss (4V), token and target indices and the loss mask (17)."""
    h, inter, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, k = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    norm = 4 * h
    attention = norm + 2 * h + 4 * q + 4 * k + 4 * cfg.num_attention_heads
    swiglu = 2 * h + 8 * inter
    if cfg.use_moe:
        slots = cfg.num_experts_per_tok
        mlp = (slots + cfg.n_shared_experts) * swiglu + slots * 4 * h + 4 * cfg.n_routed_experts + 24 * slots
    else:
        mlp = swiglu
    return cfg.num_hidden_layers * (attention + norm + mlp) + norm + 2 * h + 4 * v + 17


def per_gpu(counts: dict, act_bytes: float, n: int, mode: str) -> dict:
    """GiB per GPU by component for N GPUs; mode 'ddp' (N = 1: a single GPU, no buckets) or 'fsdp'."""
    p = counts["total"]
    shard = 1 if mode == "ddp" else n
    if mode == "ddp":
        copies = (4 * p if n > 1 else 0) + 2 * p
    else:
        copies = 8 * counts["root"] + 10 * counts["layer"]
    parts = {"weights": 4 * p / shard, "grads": 4 * p / shard, "adamw": 8 * p / shard, "copies": copies,
             "activations": act_bytes}
    parts = {k: v / GiB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def measured_bytes_per_token(fields: dict, seq_len: int = 128) -> float:
    """Saved-for-backward bytes per token of a real CPU forward under bf16 autocast: every tensor the
    autograd graph saves (saved_tensors_hooks), unique storages, parameters excluded; the difference
    between batch 2 and batch 1 removes what does not grow with tokens (the bf16 weight copies). Attention
    runs as on a GPU, in bf16 (on CPU training upcasts it: model_minimind.cpu_attention_in_fp32)."""
    from unittest import mock

    import model.model_minimind as mm
    from trainer.core.stage import masked_cross_entropy
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**fields))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(batch: int) -> int:
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t
        tokens = torch.randint(3, model.config.vocab_size, (batch, seq_len + 1),
                               generator=torch.Generator().manual_seed(batch))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens[:, :-1])
            loss = masked_cross_entropy(out.logits, tokens[:, 1:], torch.ones(batch, seq_len)) + out.aux_loss
        del loss, out
        return sum(storages.values())
    with mock.patch.object(mm, "cpu_attention_in_fp32", lambda xq: False):
        return (saved_bytes(2) - saved_bytes(1)) / seq_len



def main(argv=None):
    p = argparse.ArgumentParser(description="Per-GPU training memory of MiniMind sizes under DDP and FSDP",
                                allow_abbrev=False)
    p.add_argument("--batch_size", type=int, default=32, help="samples per GPU micro-batch (pretrain's default)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sample")
    p.add_argument("--gpus", type=str, default="1,2,4,8", help="comma-separated GPU counts")
    p.add_argument("--validate", action="store_true", help="measure saved activations on CPU for small configs")
    args = p.parse_args(argv)
    gpus = [int(g) for g in args.gpus.split(",")]
    tokens = args.batch_size * args.seq_len

    print("| config | hidden x layers | heads / kv | intermediate | params | active |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, fields in CONFIGS:
        model = build_meta(fields)
        c, counts = model.config, param_counts(model)
        rows.append((name, c, counts, activation_bytes_per_token(c)))
        print(f"| {name} | {c.hidden_size}x{c.num_hidden_layers}{' MoE' if c.use_moe else ''} | "
              f"{c.num_attention_heads} / {c.num_key_value_heads} | {c.intermediate_size} | "
              f"{counts['total'] / 1e6:.1f}M | {counts['active'] / 1e6:.1f}M |")

    print(f"\nPer GPU, GiB, batch {args.batch_size} x seq {args.seq_len} per GPU, bf16 autocast, AdamW "
          "(weights / grads / adamw / copies / activations = total):\n")
    print("| config | act. KiB/token | " + " | ".join(f"DDP N={n}" if n > 1 else "1 GPU" for n in gpus) + " | "
          + " | ".join(f"FSDP N={n}" for n in gpus if n > 1) + " |")
    print("|---|---|" + "---|" * (len(gpus) + len([n for n in gpus if n > 1])))
    for name, c, counts, act in rows:
        cells = [per_gpu(counts, act * tokens, n, "ddp")["total"] for n in gpus]
        cells += [per_gpu(counts, act * tokens, n, "fsdp")["total"] for n in gpus if n > 1]
        print(f"| {name} | {act / 1024:.1f} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")

    print("\nBreakdown per GPU, GiB (DDP at the largest N, FSDP at the largest N):\n")
    print("| config | mode | weights | grads | adamw | copies | activations | total |")
    print("|---|---|---|---|---|---|---|---|")
    n = max(gpus)
    for name, c, counts, act in rows:
        for mode in ("ddp", "fsdp"):
            m = per_gpu(counts, act * tokens, n, mode)
            print(f"| {name} | {mode.upper()} N={n} | " + " | ".join(f"{m[k]:.2f}" for k in
                  ("weights", "grads", "adamw", "copies", "activations", "total")) + " |")

    if args.validate:
        print(f"\nActivation estimate vs measured saved tensors (CPU bf16 autocast, seq 128; {cpu_description()}):\n")
        print("| config | estimate B/token | measured B/token | measured / estimate |")
        print("|---|---|---|---|")
        for name, fields in VALIDATE:
            est = activation_bytes_per_token(MiniMindConfig(**fields))
            got = measured_bytes_per_token(fields)
            print(f"| {name} | {est:,} | {got:,.0f} | {got / est:.3f} |")


if __name__ == "__main__":
    main()
