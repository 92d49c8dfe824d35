"""minimind-3 (the original's newest model family) next to MiniMind2: goldens made by the original's newest
code (tests/goldens/model3_*.pt, tests/goldens/make_goldens_mm3_model.py), config detection, published sizes."""
import json

import pytest
import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from tests.conftest import GOLDENS


def golden_model(name):
    g = torch.load(GOLDENS / f"model3_{name}.pt")
    cfg = MiniMindConfig.from_dict(dict(g["config_json"]))    # the original's config.json, as it is
    model = MiniMindForCausalLM(cfg)
    assert list(g["state_dict"]) == list(model.state_dict())   # same keys, same order
    model.load_state_dict(g["state_dict"], strict=True)        # fp16, as the original's .pth
    return g, model.eval()


@pytest.mark.parametrize("name", ["dense", "moe", "yarn"])
def test_goldens_logits_greedy_and_parameter_count(name):
    g, model = golden_model(name)
    assert model.config.model_family == "minimind3"
    assert sum(p.numel() for p in model.parameters()) == g["n_params"]
    keep = 8 if name == "yarn" else 0
    with torch.no_grad():
        logits = model(g["input_ids"], logits_to_keep=keep).logits
        gen = model.generate(g["greedy_prompt"], max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert (logits - g["logits"]).abs().max().item() <= 1e-5
    assert gen[0, 8:].tolist() == g["greedy_16"].view(-1).tolist()
    if "logits_masked_last_row" in g:   # left padding (3 pads in the last row): the real positions agree
        with torch.no_grad():
            masked = model(g["input_ids"], attention_mask=g["attention_mask"]).logits[-1:]
        real = g["attention_mask"][-1].bool()
        assert (masked[0, real] - g["logits_masked_last_row"][0, real]).abs().max().item() <= 1e-5


def test_moe_golden_aux_loss():
    g, model = golden_model("moe")
    model.train()
    out = model(g["input_ids"])
    assert abs(out.aux_loss.item() - g["train_aux_loss"].item()) <= 1e-7
    assert (out.logits - g["logits"]).abs().max().item() <= 1e-5    # dropout 0: train routing = eval routing


def test_switch_aux_loss_by_hand():
    """aux = coef * E * sum_{slot,e} f_{slot,e} * P_e over all tokens (the original's newest MoE)."""
    torch.manual_seed(0)
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         use_moe=True, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1)
    gate = MiniMindForCausalLM(cfg).model.layers[0].mlp.gate.train()
    x = torch.randn(2, 5, 32)
    idx, weight, aux = gate(x)
    scores = torch.softmax(x.view(-1, 32) @ gate.weight.T, -1)
    top = scores.topk(2, -1).indices
    f = torch.stack([torch.stack([(top[:, s] == e).float().mean() for e in range(4)]) for s in range(2)])
    assert torch.allclose(aux, 0.1 * 4 * (f * scores.mean(0)).sum(), atol=1e-7)
    assert torch.allclose(weight.sum(-1), torch.ones(10), atol=1e-6)   # normalised top-k weights
    one = MiniMindConfig(model_family="minimind3", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         use_moe=True)   # top-1 with norm_topk_prob: the weight is p / (p + 1e-20) = 1
    _, w1, _ = MiniMindForCausalLM(one).model.layers[0].mlp.gate(x)
    assert torch.equal(w1, torch.ones_like(w1))


def test_published_sizes_and_config_defaults():
    counts = json.loads((GOLDENS / "model3_counts.json").read_text())
    for name, use_moe in (("dense", False), ("moe", True)):
        with torch.device("meta"):
            model = MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", num_hidden_layers=8, use_moe=use_moe))
        assert model.count_parameters() == (counts[name]["total"], counts[name]["active"])
        ours = model.config.to_dict()
        for key, value in counts[name]["config"].items():   # every field the original writes, same value
            if key not in ("transformers_version", "rope_parameters", "dtype"):
                assert ours[key] == value, key
    c = MiniMindConfig(model_family="minimind3")
    assert (c.hidden_size, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps) == (768, 4, 96, 2432, 1e-6)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.router_aux_loss_coef) == (4, 1, 2432, 5e-4)
    assert counts["dense"]["total"] == 63_912_192 and counts["moe"]["total"] == 198_416_640


def test_family_from_config_keys_and_round_trip():
    assert MiniMindConfig().model_family == "minimind2"
    assert MiniMindConfig(router_aux_loss_coef=1e-3).model_family == "minimind3"
    assert MiniMindConfig(head_dim=16, hidden_size=128).model_family == "minimind3"
    c = MiniMindConfig(model_family="minimind3", hidden_size=64, head_dim=16, num_attention_heads=8)
    d = c.to_dict()
    assert d["model_family"] == "minimind3" and "n_routed_experts" not in d and "aux_loss_alpha" not in d
    back = MiniMindConfig.from_dict(d)
    assert (back.model_family, back.head_dim) == ("minimind3", 16)
    old = MiniMindConfig().to_dict()   # MiniMind2's config.json is unchanged: no minimind-3 keys
    assert not {"model_family", "head_dim", "num_experts", "router_aux_loss_coef"} & set(old)
    with pytest.raises(ValueError, match="MiniMind2 fields"):
        MiniMindConfig(model_family="minimind3", aux_loss_alpha=0.1)
    with pytest.raises(ValueError, match="minimind-3 fields"):
        MiniMindConfig(n_routed_experts=4, router_aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="model_family"):
        MiniMindConfig(model_family="llama")


def test_explicit_head_dim_and_untied_embeddings():
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=1, head_dim=24,
                         tie_word_embeddings=False)
    model = MiniMindForCausalLM(cfg)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (8 * 24, 64) and attn.k_proj.weight.shape == (4 * 24, 64)
    assert attn.q_norm.weight.shape == (24,) and model.model.freqs_cos.shape[-1] == 24
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = torch.randint(0, 6400, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True).logits
    assert (torch.cat([first.logits, rest], 1) - full).abs().max().item() < 1e-5


def test_from_pretrained_reads_the_original_folder(tmp_path):
    """A folder the original's newest code saved (its config.json, both tied keys in the weights)."""
    from safetensors.torch import save_file
    g = torch.load(GOLDENS / "model3_dense.pt")
    (tmp_path / "config.json").write_text(json.dumps(g["config_json"]))
    save_file({k: v.contiguous() for k, v in g["state_dict"].items()}, str(tmp_path / "model.safetensors"))
    model = MiniMindForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(g["input_ids"]).logits - g["logits"]).abs().max().item() <= 1e-5


def test_bf16_autocast_forward_and_backward_run():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2,
                                               use_moe=True)).train()
    ids = torch.randint(0, 6400, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss) and model.model.layers[0].self_attn.q_norm.weight.grad is not None
