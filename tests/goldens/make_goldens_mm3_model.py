"""Model goldens of the original's newest code (jingyaogong/minimind HEAD d65ef2c, "minimind-3").

Not run by the tests: it needs an extracted upstream tree (and writes tests/goldens/model3_*.pt, which the
tests read). Reproduce:
    git --git-dir <mirror of jingyaogong/minimind> archive d65ef2c model | tar -x -C /tmp/mm3
    python tests/goldens/make_goldens_mm3_model.py /tmp/mm3 tests/goldens
Upstream's own classes, fp32 on CPU (torch 2.13.0, transformers 5.23). The weights are random, with every
RMSNorm weight (q_norm and k_norm included) drawn around 1, so that a norm applied in the wrong place shows.
"""
import json
import sys

import torch

SRC, OUT = sys.argv[1], sys.argv[2]
sys.path.insert(0, SRC)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402  (upstream's)

torch.set_num_threads(1)


def build(seed, **config):
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:  # larger than the 0.02 init, so that logits and routing are far from uniform
                p.copy_(0.08 * torch.randn_like(p))
    # the weights as a .pth holds them (fp16), and the model runs on exactly those values
    state = {k: v.half() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), state


def greedy(model, prompt, n):
    # upstream's hand-written generate; eos_token_id=None: never stops early
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, top_k=0, top_p=1.0,
                         temperature=1.0)
    return out[:, prompt.shape[1]:].clone()


def make(name, seed, config, seq_len, keep=None):
    model, state = build(seed, **config)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, 6400, (2 if seq_len < 100 else 1, seq_len), generator=g)
    with torch.no_grad():
        logits = model(ids, logits_to_keep=keep or 0).logits.clone()
        mask = torch.ones_like(ids)
        mask[-1, :3] = 0                                 # left padding in the last row (slow attention path)
        masked = model(ids, attention_mask=mask).logits[-1:].clone() if keep is None else None
    out = {"config": config, "state_dict": state, "input_ids": ids, "logits": logits,
           "logits_positions": "all" if keep is None else f"last {keep}",
           "greedy_prompt": ids[:1, :8].clone(), "greedy_16": greedy(model, ids[:1, :8], 16),
           "n_params": sum(p.numel() for p in model.parameters()),
           # what upstream's save_pretrained writes as config.json (minus label maps)
           "config_json": {k: v for k, v in model.config.to_dict().items() if k not in ("id2label", "label2id")}}
    if masked is not None:
        out.update(attention_mask=mask, logits_masked_last_row=masked)
    if config.get("use_moe"):
        model.train()
        train = model(ids)
        out.update(train_aux_loss=train.aux_loss.detach().clone())   # train logits = eval logits (dropout 0)
    torch.save(out, f"{OUT}/model3_{name}.pt")
    print(name, {k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)})


tiny = dict(hidden_size=64, num_hidden_layers=2)
make("dense", 1, tiny, 20)
make("moe", 2, dict(tiny, use_moe=True), 20)
make("yarn", 3, dict(tiny, inference_rope_scaling=True), 2600, keep=8)

# parameter counts of the published sizes (768x8, dense and MoE), built on the meta device
counts = {}
for use_moe in (False, True):
    with torch.device("meta"):
        m = MiniMindForCausalLM(MiniMindConfig(hidden_size=768, num_hidden_layers=8, use_moe=use_moe))
    total = sum(p.numel() for p in m.parameters())
    per_expert = sum(p.numel() for p in m.model.layers[0].mlp.experts[0].parameters()) if use_moe else 0
    active = total - 8 * (m.config.num_experts - m.config.num_experts_per_tok) * per_expert
    counts["moe" if use_moe else "dense"] = {"total": total, "active": active,
                                             "config": {k: v for k, v in m.config.to_dict().items()
                                                        if k not in ("id2label", "label2id")}}
json.dump(counts, open(f"{OUT}/model3_counts.json", "w"), indent=1)
print(json.dumps({k: (v["total"], v["active"]) for k, v in counts.items()}))
