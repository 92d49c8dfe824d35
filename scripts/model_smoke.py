"""A short smoke run of the model package: build a tiny MiniMind, check the KV cache, generate.

    python scripts/model_smoke.py
Prints the parameter counts of the published sizes and a few greedy tokens; writes nothing.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM


def main():
    for name, kw in [("MiniMind2-Small", dict(hidden_size=512, num_hidden_layers=8)),
                     ("MiniMind2", dict(hidden_size=768, num_hidden_layers=16)),
                     ("MiniMind2-MoE", dict(hidden_size=640, num_hidden_layers=8, use_moe=True))]:
        with torch.device("meta"):
            total, active = MiniMindForCausalLM(MiniMindConfig(**kw)).count_parameters()
        print(f"{name:16s} params {total:,} (active {active:,})")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()
    prompt = torch.randint(3, 6400, (1, 8))
    with torch.no_grad():
        full = model(prompt).logits
        out = model(prompt[:, :-1], use_cache=True)
        step = model(prompt[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
        print(f"KV-cache step vs full forward max |diff|: {(step[:, -1] - full[:, -1]).abs().max().item():.2e}")
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("greedy tokens:", gen[0, 8:].tolist())


if __name__ == "__main__":
    main()
