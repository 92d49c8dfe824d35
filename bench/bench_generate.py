"""Greedy decoding speed of MiniMind on this machine (fp32, random weights).

    python bench/bench_generate.py                      # 512x8 dense, 32-token prompt, 256 new tokens
    python bench/bench_generate.py --hidden_size 64 --num_hidden_layers 2 --new_tokens 16   # quick
Prints a markdown table: batch size, time to first token, decode tokens/s (per sequence and total).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import os
import platform
import time

import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM


def measure(model, batch, prompt_len, new_tokens, repeats):
    torch.manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len))
    mask = torch.ones_like(prompt)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                  eos_token_id=None, attention_mask=mask)
    with torch.inference_mode():
        model.generate(prompt, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})   # warm-up
        ttft, total = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(prompt, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
            ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            total.append(time.perf_counter() - t0)
            assert out.shape == (batch, prompt_len + new_tokens)
    ttft, total = min(ttft), min(total)
    decode_tps = batch * (new_tokens - 1) / max(total - ttft, 1e-9)
    return ttft, batch * new_tokens / total, decode_tps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--batch_sizes", type=str, default="1,8")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                         use_moe=bool(args.use_moe))
    model = MiniMindForCausalLM(cfg).eval()
    print(f"# generate: {args.hidden_size}x{args.num_hidden_layers}{' MoE' if args.use_moe else ''}, fp32, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print("| batch | time to first token (ms) | end-to-end tokens/s (total) | decode tokens/s (total) | decode tokens/s per sequence |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ttft, e2e, dec = measure(model, batch, args.prompt_len, args.new_tokens, args.repeats)
        print(f"| {batch} | {ttft * 1000:.1f} | {e2e:.1f} | {dec:.1f} | {dec / batch:.1f} |")


if __name__ == "__main__":
    main()
