"""Model package: faithfulness to the original (goldens + an independent reference forward),
state-dict contract, KV cache, SDPA vs explicit mask, MoE, generation and transformers integration."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, precompute_freqs_cis
from tests.conftest import GOLDENS, tiny_config


# ---- an independent reference forward, written from the spec's formulas (UPSTREAM_SPEC 1.3-1.8) ----
def ref_rope_tables(cfg, length):
    d = cfg.hidden_size // cfg.num_attention_heads
    inv = [1.0 / (cfg.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    attn_factor = 1.0
    rs = cfg.rope_scaling
    if rs is not None and cfg.max_position_embeddings / rs["original_max_position_embeddings"] > 1:
        orig, base = rs["original_max_position_embeddings"], cfg.rope_theta
        inv_dim = lambda b: d * math.log(orig / (2 * math.pi * b)) / (2 * math.log(base))
        low = max(math.floor(inv_dim(rs["beta_fast"])), 0)
        high = min(math.ceil(inv_dim(rs["beta_slow"])), d // 2 - 1)
        ramp = [min(max((i - low) / max(high - low, 0.001), 0.0), 1.0) for i in range(d // 2)]
        inv = [f * ((1 - r) + r / rs["factor"]) for f, r in zip(inv, ramp)]
        attn_factor = rs["attention_factor"]
    inv = torch.tensor(inv, dtype=torch.float32)
    ang = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.cos()], -1) * attn_factor, torch.cat([ang.sin(), ang.sin()], -1) * attn_factor


def ref_forward(sd, cfg, ids, moe_train_aux=False):
    """Plain-tensor forward over a state dict. Returns logits (and the MoE aux loss if asked)."""
    H, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = H // nh
    B, T = ids.shape
    cos, sin = ref_rope_tables(cfg, T)

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x):  # x: B, T, heads, d ; rotate-half layout
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        rot = torch.cat([-x2, x1], -1)
        return x * cos[None, :, None, :] + rot * sin[None, :, None, :]

    def swiglu(x, p):
        return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T

    h = sd["model.embed_tokens.weight"][ids]
    aux_total = torch.tensor(0.0)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = rope((x @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, nh, d))
        k = rope((x @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, nkv, d))
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, nkv, d)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, H)
        h = h + att @ sd[p + "self_attn.o_proj.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        if not cfg.use_moe:
            h = h + swiglu(x, p + "mlp.")
            continue
        E, k_top = cfg.n_routed_experts, cfg.num_experts_per_tok
        scores_e = (x.reshape(-1, H) @ sd[p + "mlp.gate.weight"].T).softmax(-1)       # N, E
        w, idx = scores_e.topk(k_top, -1)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        flat = x.reshape(-1, H)
        y = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            for j in range(k_top):
                y[n] += w[n, j] * swiglu(flat[n], p + f"mlp.experts.{int(idx[n, j])}.")
        y = y.view(B, T, H)
        for s in range(cfg.n_shared_experts):
            y = y + swiglu(x, p + f"mlp.shared_experts.{s}.")
        h = h + y
        if moe_train_aux:  # seq_aux form: ce[b,e] = count / (T*k/E), aux = alpha * mean_b sum_e ce * mean_t score
            ce = torch.zeros(B, E)
            for b in range(B):
                for e in idx.view(B, T * k_top)[b].tolist():
                    ce[b, e] += 1
            ce = ce / (T * k_top / E)
            aux_total = aux_total + cfg.aux_loss_alpha * (ce * scores_e.view(B, T, E).mean(1)).sum(1).mean()
    h = rms(h, sd["model.norm.weight"])
    logits = h @ sd["lm_head.weight"].T
    return (logits, aux_total) if moe_train_aux else logits


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # make norms non-trivial so the reference would catch a misplaced weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


# ---- goldens written by the original code ----
@pytest.mark.parametrize("name", ["dense", "yarn", "moe"])
def test_goldens_strict_load_logits_and_greedy(name):
    g = torch.load(GOLDENS / f"model_{name}.pt")
    cfg = MiniMindConfig(**g["config"])
    model = MiniMindForCausalLM(cfg)
    assert list(g["state_dict"].keys()) == list(model.state_dict().keys())
    model.load_state_dict(g["state_dict"], strict=True)  # fp16 tensors, as the original saves them
    model.eval()
    keep = 8 if name == "yarn" else 0
    with torch.no_grad():
        logits = model(g["input_ids"], logits_to_keep=keep).logits
        assert (logits - g["logits"]).abs().max().item() <= 1e-5
        gen = model.generate(g["greedy_prompt"], max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert gen[0, g["greedy_prompt"].shape[1]:].tolist() == g["greedy_16"].view(-1).tolist()
    if name != "yarn":  # the independent reference agrees with the goldens too
        sd = {k: v.float() for k, v in g["state_dict"].items()}
        assert (ref_forward(sd, cfg, g["input_ids"]) - g["logits"]).abs().max().item() <= 1e-5
    if "train_logits" in g:
        model.train()
        out = model(g["input_ids"])
        assert (out.logits - g["train_logits"]).abs().max().item() <= 1e-5
        assert abs(out.aux_loss.item() - g["train_aux_loss"].item()) <= 1e-6


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"inference_rope_scaling": True, "max_position_embeddings": 4096}])
def test_matches_independent_reference(overrides):
    model = random_model(**overrides)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    sd = {k: v.float() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(ids).logits
        assert (ours - ref_forward(sd, cfg, ids)).abs().max().item() <= 1e-5
        # fp16 checkpoint (as the original writes it) loads strict and gives the reference's fp32 logits
        half = {k: v.half() for k, v in sd.items()}
        fresh = MiniMindForCausalLM(MiniMindConfig(**cfg.to_dict())).eval()
        fresh.load_state_dict(half, strict=True)
        ref = ref_forward({k: v.float() for k, v in half.items()}, cfg, ids)
        assert (fresh(ids).logits - ref).abs().max().item() <= 1e-5


def test_moe_train_mode_aux_loss_matches_reference():
    model = random_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    ids = torch.randint(0, 6400, (2, 10))
    sd = {k: v.float() for k, v in model.state_dict().items()}
    model.train()
    out = model(ids)
    ref_logits, ref_aux = ref_forward(sd, model.config, ids, moe_train_aux=True)
    assert (out.logits - ref_logits).abs().max().item() <= 1e-5
    assert abs(out.aux_loss.item() - ref_aux.item()) <= 1e-6


def test_moe_aux_loss_hand_computed():
    """Gate scores fixed by hand: 1 sequence, 2 tokens, 2 experts, top-1."""
    from model.model_minimind import MoEGate
    for seq_aux in (True, False):
        cfg = tiny_config(use_moe=True, n_routed_experts=2, num_experts_per_tok=1, seq_aux=seq_aux,
                          hidden_size=2, num_attention_heads=1, num_key_value_heads=1)
        gate = MoEGate(cfg).train()
        with torch.no_grad():
            gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        x = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])       # both tokens prefer expert 0
        p0 = [math.exp(2) / (math.exp(2) + 1), math.exp(1) / (math.exp(1) + 1)]
        P = [sum(p0) / 2, 1 - sum(p0) / 2]                  # mean routing probability per expert
        f = [2.0, 0.0]                                      # expert 0 got all 2 of 2 selections; E * share
        expected = 0.01 * (P[0] * f[0] + P[1] * f[1])       # both forms coincide for one sequence
        idx, w, aux = gate(x)
        assert idx.view(-1).tolist() == [0, 0]
        assert torch.allclose(w.view(-1), torch.tensor(p0), atol=1e-6)   # top-1: weights not renormalised
        assert abs(aux.item() - expected) < 1e-7


def test_moe_train_and_eval_dispatch_agree_and_empty_expert():
    model = random_model(use_moe=True)
    ids = torch.randint(0, 6400, (3, 12))
    with torch.no_grad():
        eval_logits = model.eval()(ids).logits
        train_logits = model.train()(ids).logits
    assert torch.allclose(eval_logits, train_logits, atol=1e-6)
    # starve expert 3 in every layer: routing never picks it, forward and backward still work
    for layer in model.model.layers:
        def never_three(x, gate=layer.mlp.gate, forward=layer.mlp.gate.forward):
            idx, w, aux = forward(x)
            return idx.masked_fill(idx == 3, 0), w, aux
        layer.mlp.gate.forward = never_three
    model.train()
    out = model(ids)
    (out.logits.float().mean() + out.aux_loss).backward()
    for layer in model.model.layers:
        g = layer.mlp.experts[3].up_proj.weight.grad
        assert g is not None and torch.count_nonzero(g) == 0   # in the graph (for DDP), zero gradient
        assert layer.mlp.experts[0].up_proj.weight.grad.abs().sum() > 0


def test_dense_aux_loss_is_a_tensor_zero(tiny_model):
    out = tiny_model(torch.randint(0, 6400, (1, 5)))
    assert torch.is_tensor(out.aux_loss) and out.aux_loss.item() == 0.0


# ---- contract: config, keys, counts ----
def test_config_fields_and_defaults():
    c = MiniMindConfig()
    expected = dict(dropout=0.0, bos_token_id=1, eos_token_id=2, hidden_act="silu", hidden_size=512,
                    intermediate_size=1408, max_position_embeddings=32768, num_attention_heads=8,
                    num_hidden_layers=8, num_key_value_heads=2, vocab_size=6400, rms_norm_eps=1e-5,
                    rope_theta=1e6, inference_rope_scaling=False, flash_attn=True, use_moe=False,
                    num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, scoring_func="softmax",
                    aux_loss_alpha=0.01, seq_aux=True, norm_topk_prob=True, rope_scaling=None,
                    tie_word_embeddings=True)
    for key, value in expected.items():
        assert getattr(c, key) == value, key
    assert c.model_type == "minimind"
    assert MiniMindConfig(hidden_size=640).intermediate_size == 1728
    assert MiniMindConfig(hidden_size=768).intermediate_size == 2048
    assert MiniMindConfig(inference_rope_scaling=True).rope_scaling == {
        "beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
        "attention_factor": 1.0, "type": "yarn"}
    d = MiniMindConfig(inference_rope_scaling=True).to_dict()
    assert d["rope_scaling"]["type"] == "yarn" and d["intermediate_size"] == 1408


def test_state_dict_keys_order_and_shapes():
    with torch.device("meta"):
        dense = MiniMindForCausalLM(MiniMindConfig(num_hidden_layers=2))
        moe = MiniMindForCausalLM(MiniMindConfig(num_hidden_layers=2, use_moe=True))
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "input_layernorm",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"]
    keys = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}.weight" for i in range(2) for n in layer]
    keys += ["model.norm.weight", "lm_head.weight"]
    sd = dense.state_dict()
    assert list(sd.keys()) == keys
    shapes = {"q_proj": (512, 512), "k_proj": (128, 512), "v_proj": (128, 512), "o_proj": (512, 512),
              "gate_proj": (1408, 512), "down_proj": (512, 1408), "up_proj": (1408, 512), "layernorm": (512,)}
    for k, v in sd.items():
        for frag, shape in shapes.items():
            if frag in k:
                assert tuple(v.shape) == shape, k
    assert tuple(sd["model.embed_tokens.weight"].shape) == (6400, 512)
    ffn = ["gate_proj", "down_proj", "up_proj"]
    moe_layer = layer[:6] + [f"mlp.experts.{e}.{n}" for e in range(4) for n in ffn] + ["mlp.gate"] + \
        [f"mlp.shared_experts.0.{n}" for n in ffn]
    moe_keys = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}.weight" for i in range(2) for n in moe_layer]
    moe_keys += ["model.norm.weight", "lm_head.weight"]
    assert list(moe.state_dict().keys()) == moe_keys and len(moe_keys) == 47
    assert tuple(moe.state_dict()["model.layers.0.mlp.gate.weight"].shape) == (4, 512)
    buffers = dict(dense.named_buffers())
    assert "model.freqs_cos" in buffers and "model.freqs_cos" not in sd


def test_parameter_counts():
    with torch.device("meta"):
        small = MiniMindForCausalLM(MiniMindConfig(hidden_size=512, num_hidden_layers=8))
        base = MiniMindForCausalLM(MiniMindConfig(hidden_size=768, num_hidden_layers=16))
        moe = MiniMindForCausalLM(MiniMindConfig(hidden_size=640, num_hidden_layers=8, use_moe=True))
    assert small.count_parameters() == (25_829_888, 25_829_888)
    assert base.count_parameters() == (104_030_976, 104_030_976)
    assert moe.count_parameters() == (145_029_760, 91_945_600)


def test_tied_embeddings(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    assert sum(p.numel() for p in tiny_model.parameters()) == tiny_model.count_parameters()[0]


# ---- numerics of the pieces ----
def test_rmsnorm_matches_formula():
    from model.model_minimind import RMSNorm
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5), atol=1e-6)
    xb = x.bfloat16()  # float32 inside, result promoted by the fp32 weight
    assert norm(xb).dtype == torch.float32


@pytest.mark.parametrize("head_dim,low,high", [(64, 5, 14), (80, 6, 17), (96, 8, 21)])
def test_yarn_ramp_bounds(head_dim, low, high):
    plain_cos, plain_sin = precompute_freqs_cis(head_dim, end=4096, rope_base=1e6)
    yarn = MiniMindConfig(inference_rope_scaling=True).rope_scaling
    yarn_cos, yarn_sin = precompute_freqs_cis(head_dim, end=4096, rope_base=1e6, rope_scaling=yarn)
    half = head_dim // 2   # angle at position 1 = the frequency of each dimension pair
    ratio = torch.atan2(yarn_sin[1, :half], yarn_cos[1, :half]).double() / \
        torch.atan2(plain_sin[1, :half], plain_cos[1, :half]).double()
    assert torch.allclose(ratio[: low + 1], torch.ones(low + 1, dtype=torch.double), atol=1e-4)
    assert torch.allclose(ratio[high:], torch.full_like(ratio[high:], 1 / 16), atol=1e-4)
    assert (ratio[low + 1: high] < 1).all() and (ratio[low + 1: high] > 1 / 16).all()
    ref_cos, ref_sin = ref_rope_tables(MiniMindConfig(hidden_size=head_dim * 8, inference_rope_scaling=True), 4096)
    assert torch.allclose(yarn_cos, ref_cos, atol=1e-4) and torch.allclose(yarn_sin, ref_sin, atol=1e-4)


def test_repeat_kv_is_repeat_interleave():
    from model.model_minimind import repeat_kv
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))


def test_logits_to_keep(tiny_model):
    ids = torch.randint(0, 6400, (2, 9))
    full = tiny_model(ids).logits
    assert full.shape == (2, 9, 6400)
    assert torch.allclose(tiny_model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    idx = torch.tensor([0, 4])
    assert torch.allclose(tiny_model(ids, logits_to_keep=idx).logits, full[:, idx], atol=1e-6)


def test_labels_loss(tiny_model):
    ids = torch.randint(0, 6400, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    out = tiny_model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref)


# ---- KV cache, SDPA vs explicit path, padding ----
@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"model_family": "minimind3"}, {"model_family": "minimind3", "use_moe": True}])
def test_incremental_decoding_equals_full_forward(overrides):
    model = random_model(**overrides)
    ids = torch.randint(0, 6400, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)                  # prefill 5
        steps = [out.logits]
        cache = out.past_key_values
        out = model(ids[:, 5:8], past_key_values=cache, use_cache=True)   # a 3-token chunk on top of the cache
        steps.append(out.logits)
        for t in range(8, 16):                                   # then one token at a time
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    assert out.past_key_values.get_seq_length() == 16


def test_duck_typed_cache_with_position_ids_and_mask():
    """A caller's own cache (anything with update(k, v, layer_idx) -> all keys/values, and get_seq_length()),
    with explicit position_ids and attention_mask, decodes exactly like the full forward."""
    class ConcatCache:
        def __init__(self):
            self.keys, self.values = {}, {}

        def get_seq_length(self, layer_idx=0):
            return self.keys[layer_idx].shape[2] if layer_idx in self.keys else 0

        def update(self, k, v, layer_idx):
            if layer_idx in self.keys:
                k, v = torch.cat([self.keys[layer_idx], k], 2), torch.cat([self.values[layer_idx], v], 2)
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v

    model = random_model(seed=4)
    ids = torch.randint(3, 6400, (2, 10))
    cache = ConcatCache()
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :6], position_ids=torch.arange(6).expand(2, 6), attention_mask=torch.ones(2, 6),
                       past_key_values=cache, use_cache=True).logits]
        for t in range(6, 10):
            steps.append(model(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), attention_mask=torch.ones(2, t + 1),
                               past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5 and cache.get_seq_length() == 10


def test_cache_grows_without_recopying():
    from model.model_minimind import MiniMindCache
    cache = MiniMindCache()
    k = torch.randn(1, 2, 1, 4)
    reallocations, last = 0, None
    for _ in range(300):
        cache.update(k, k, 0)
        if cache.keys[0].data_ptr() != last:
            reallocations, last = reallocations + 1, cache.keys[0].data_ptr()
    assert cache.get_seq_length() == 300 and reallocations <= 4   # geometric growth, not a copy per step


def test_legacy_cache_round_trip(tiny_model):
    ids = torch.randint(0, 6400, (1, 6))
    out = tiny_model(ids[:, :5], use_cache=True)
    legacy = out.past_key_values.to_legacy()
    assert legacy[0][0].shape == (1, 5, 2, 16)  # the original's (B, T, KV, D) layout
    a = tiny_model(ids[:, 5:], past_key_values=legacy, use_cache=True).logits
    b = tiny_model(ids).logits[:, -1:]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"model_family": "minimind3"}, {"model_family": "minimind3", "use_moe": True}])
def test_sdpa_equals_explicit_mask_path(overrides):
    model = random_model(**overrides)
    eager = MiniMindForCausalLM(MiniMindConfig(**{**model.config.to_dict(), "flash_attn": False})).eval()
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(3, 6400, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, eager(ids).logits, atol=1e-5)
        a, b = model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
        assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"model_family": "minimind3"}, {"model_family": "minimind3", "use_moe": True}])
def test_left_padded_batch_matches_single_prompts(overrides):
    model = random_model(seed=3, **overrides)
    prompts = [torch.randint(3, 6400, (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert together[i, width:].tolist() == alone[0, len(p):].tolist()


# ---- packed rows: position_ids restart at 0 at each sample (transformers' "position_ids packing") ----
PACK_CONFIGS = [{}, {"use_moe": True}, {"inference_rope_scaling": True, "max_position_embeddings": 4096},
                {"model_family": "minimind3"}, {"model_family": "minimind3", "use_moe": True}]
NO_YARN = PACK_CONFIGS[:2] + PACK_CONFIGS[3:]


def pack_rows(rows, width, seed=0):
    """rows: a list of sample-length lists. Returns ids (B, width), position_ids (B, width) and, per row,
    the (start, sample ids) of every sample; the rest of a row is padding, one more pseudo-sample from 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros_like(ids)
    spans = []
    for r, lengths in enumerate(rows):
        start, row_spans = 0, []
        for n in lengths:
            sample = torch.randint(3, 6400, (n,), generator=gen)
            ids[r, start:start + n], pos[r, start:start + n] = sample, torch.arange(n)
            row_spans.append((start, sample))
            start += n
        pos[r, start:] = torch.arange(width - start)
        spans.append(row_spans)
    return ids, pos, spans


def reference_varlen(signature: str, calls: list):
    """A CPU stand-in for a varlen flash kernel with the calling convention of `signature` ("window" = torch
    >= 2.11's varlen_attn, "is_causal" = torch 2.10's, "flash_attn" = flash-attn's flash_attn_varlen_func):
    causal SDPA on each cu_seqlens span of the flattened (N, H, D) tensors. Checks what a real kernel needs."""
    import torch.nn.functional as F

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, gqa):
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k and int(cu_q[-1]) == q.shape[0]
        assert (cu_q[1:] >= cu_q[:-1]).all() and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
        assert gqa or k.shape[1] == q.shape[1]
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if e > s:   # the empty samples that pad cu_seqlens to a fixed length
                out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                          v[s:e].transpose(0, 1), is_causal=True,
                                                          enable_gqa=gqa).transpose(0, 1)
        calls.append(len(cu_q) - 1)
        return out

    if signature == "window":
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
            assert tuple(window_size) == (-1, 0)
            return attend(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa)
        return "torch", varlen_attn
    if signature == "is_causal":
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, is_causal=False):
            assert is_causal
            return attend(q, k, v, cu_q, cu_k, max_q, max_k, False)
        return "torch", varlen_attn

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal
        return attend(q, k, v, cu_q, cu_k, max_q, max_k, True)
    return "flash_attn", flash_attn_varlen_func


PACKED_KERNELS = ["spans", "mask", "flex", "varlen-window"]
# every kernel on every config, and the other varlen calling conventions on the default config
PACKED_CASES = [(c, k) for c in PACK_CONFIGS for k in PACKED_KERNELS] + \
    [({}, "varlen-is_causal"), ({}, "varlen-flash_attn")]


@pytest.mark.filterwarnings("ignore::UserWarning")     # eager FlexAttention on CPU says it is a reference loop
@pytest.mark.parametrize("overrides, kernel", PACKED_CASES)
def test_packed_rows_give_each_sample_its_logits_alone(overrides, kernel, monkeypatch):
    """Every packed path gives each sample the logits it has alone: sample-by-sample attention (CPU), the dense
    block-diagonal mask (CPU under compile; attention dropout), FlexAttention's document mask (CUDA, any
    dtype) and varlen flash attention (CUDA, bf16/fp16) in each calling convention it has, here through a
    reference kernel that checks the cu_seqlens it is given."""
    import model.model_minimind as mm
    calls = []
    monkeypatch.setattr(mm, "PACKED_ATTENTION", kernel.split("-")[0])
    if kernel.startswith("varlen"):
        monkeypatch.setattr(mm, "varlen_kernel", lambda: reference_varlen(kernel.split("-")[1], calls))
    real_spans = mm.packed_spans
    monkeypatch.setattr(mm, "packed_spans", lambda *a: calls.append(1) or real_spans(*a))
    model = random_model(seed=7, **overrides)
    ids, pos, spans = pack_rows([[5, 11, 3, 7], [9, 13, 2]], width=32)
    with torch.no_grad():
        together = model(ids, position_ids=pos).logits               # two rows, packed differently
        first_row = model(ids[:1], position_ids=pos[:1]).logits      # the first row alone (batch 1)
        for r, row_spans in enumerate(spans):
            for start, sample in row_spans:
                alone = model(sample[None]).logits[0]
                assert (together[r, start:start + len(sample)] - alone).abs().max().item() <= 1e-5
                if r == 0:
                    assert (first_row[0, start:start + len(sample)] - alone).abs().max().item() <= 1e-5
        assert torch.isfinite(together).all()                         # padding rows too
    assert bool(calls) == (kernel != "mask" and kernel != "flex")     # the path the case names was taken
    if kernel.startswith("varlen"):   # 4 + 3 samples and 2 padding tails: 9 per layer and forward, counted here
        assert calls[0] == 9


@pytest.mark.parametrize("overrides", NO_YARN)
def test_packed_sdpa_equals_explicit_mask_path(overrides):
    model = random_model(seed=8, **overrides)
    eager = MiniMindForCausalLM(MiniMindConfig(**{**model.config.to_dict(), "flash_attn": False})).eval()
    eager.load_state_dict(model.state_dict())
    ids, pos, _ = pack_rows([[6, 10, 4], [3, 3, 12, 1]], width=24, seed=1)
    with torch.no_grad():
        assert (model(ids, position_ids=pos).logits - eager(ids, position_ids=pos).logits).abs().max() <= 1e-5


def test_packed_spans_are_the_samples_of_each_row(tiny_model, monkeypatch):
    import model.model_minimind as mm
    ids, pos, spans = pack_rows([[5, 11, 3, 7], [9, 13, 2]], width=32)
    expected = [[(start, start + len(sample)) for start, sample in row] for row in spans]
    expected = [row + [(row[-1][1], 32)] for row in expected]        # the padding tail: one more pseudo-sample
    assert [list(row) for row in mm.packed_spans(pos, 2)] == expected
    assert [list(row) for row in mm.packed_spans(pos[:1], 2)] == [expected[0]] * 2   # (1, T) positions broadcast
    seen = []
    monkeypatch.setattr(mm, "packed_spans", lambda *a: seen.append(1) or mm.PackedSpans(expected))
    with torch.no_grad():
        tiny_model(ids, position_ids=pos)
    assert seen == [1]                                                # the CPU forward takes the span path


def test_packed_arange_positions_keep_the_plain_causal_path(tiny_model):
    ids = torch.randint(3, 6400, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids, position_ids=pos).logits, tiny_model(ids).logits)


@pytest.mark.parametrize("overrides", NO_YARN)
def test_packed_loss_of_one_sample_has_no_gradient_from_the_others(overrides):
    model = random_model(seed=9, **overrides).train()
    ids, pos, spans = pack_rows([[7, 9, 5]], width=24, seed=2)
    captured = {}

    def keep(module, args, out):   # the token embeddings that feed the first layer
        out.retain_grad()
        captured["emb"] = out
    handle = model.model.embed_tokens.register_forward_hook(keep)
    logits = model(ids, position_ids=pos).logits
    handle.remove()
    start, sample = spans[0][1]                                        # the middle sample
    span = slice(start, start + len(sample))
    F.cross_entropy(logits[0, span][:-1], ids[0, span][1:]).backward()
    grad = captured["emb"].grad[0].abs().sum(-1)                       # (T,)
    assert grad[start:start + len(sample) - 1].min() > 0              # its last token predicts nothing here
    assert grad[:start].max() == 0 and grad[start + len(sample):].max() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", NO_YARN)
def test_packed_rows_on_cuda_match_cpu(overrides):
    model = random_model(seed=7, **overrides)
    ids, pos, spans = pack_rows([[5, 11, 3, 7], [9, 13, 2]], width=32)
    with torch.no_grad():
        cpu = model(ids, position_ids=pos).logits
        cuda = model.cuda()(ids.cuda(), position_ids=pos.cuda()).logits.cpu()
        start, sample = spans[1][1]
        alone = model(sample[None].cuda()).logits[0].cpu()
    assert (cuda - cpu).abs().max().item() <= 1e-4
    assert (cuda[1, start:start + len(sample)] - alone).abs().max().item() <= 1e-4


# ---- generation through transformers ----
def test_generate_sampling_options(tiny_model):
    prompt = torch.randint(3, 6400, (2, 5))
    torch.manual_seed(1)
    a = tiny_model.generate(prompt, do_sample=True, temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=6,
                            pad_token_id=0, repetition_penalty=1.3)
    torch.manual_seed(1)
    b = tiny_model.generate(prompt, do_sample=True, temperature=0.9, top_p=0.8, top_k=20, max_new_tokens=6,
                            pad_token_id=0, repetition_penalty=1.3)
    assert torch.equal(a, b) and a.shape[0] == 2 and torch.equal(a[:, :5], prompt)
    n = tiny_model.generate(prompt, do_sample=True, num_return_sequences=3, max_new_tokens=4, pad_token_id=0)
    assert n.shape[0] == 6
    assert all(torch.equal(n[i, :5], prompt[i // 3]) for i in range(6))   # grouped contiguously per prompt
    # repetition_penalty changes greedy output when the model loops on a token
    plain = tiny_model.generate(prompt[:1], do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    pen = tiny_model.generate(prompt[:1], do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None,
                              repetition_penalty=5.0)
    new = pen[0, 5:].tolist()
    assert len(set(new)) >= len(set(plain[0, 5:].tolist()))


def test_generate_streamer(tiny_model):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    prompt = torch.randint(3, 6400, (1, 4))
    streamer = Collect()
    out = tiny_model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
                              streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == prompt[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 4:].tolist()


def test_generate_stops_at_eos_and_pads():
    model = random_model(seed=5)
    prompt = torch.randint(3, 6400, (2, 4))
    free = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, 5])   # make row 0's second generated token the EOS
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
    row = out[0, 4:].tolist()
    first = row.index(eos)
    assert all(t == 0 for t in row[first + 1:])


# ---- transformers integration ----
@pytest.mark.parametrize("overrides", [{}, {"use_moe": True}, {"model_family": "minimind3"}, {"model_family": "minimind3", "use_moe": True}])
def test_save_pretrained_round_trip(tmp_path, overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = random_model(**overrides)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "minimind"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MiniMindForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.freqs_cos, model.model.freqs_cos)   # RoPE tables rebuilt after meta init
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ids = torch.randint(0, 6400, (2, 10))
    with torch.no_grad():
        # bit-identical weights; logits may differ in the last bit because safetensors memory-maps the
        # weights at other alignments, which changes the BLAS kernel's summation order
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_rope_tables_are_computed_once_per_config_and_never_shared():
    """Models of one config share one computation of the cos/sin tables but each owns a copy (an in-place change
    to one model's buffer must not reach another); a model built on the meta device gets meta tables."""
    from model.model_minimind import MiniMindForCausalLM, precompute_freqs_cis
    a, b = MiniMindForCausalLM(tiny_config()), MiniMindForCausalLM(tiny_config())
    c = a.config
    cos, sin = precompute_freqs_cis(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
    assert torch.equal(a.model.freqs_cos, cos) and torch.equal(a.model.freqs_sin, sin)
    assert a.model.freqs_cos.data_ptr() != b.model.freqs_cos.data_ptr()
    a.model.freqs_cos.zero_()
    assert torch.equal(b.model.freqs_cos, cos)
    with torch.device("meta"):
        assert MiniMindForCausalLM(tiny_config()).model.freqs_cos.is_meta
    assert not MiniMindForCausalLM(tiny_config()).model.freqs_cos.is_meta



@pytest.mark.parametrize("family", ["minimind2", pytest.param("minimind3", marks=pytest.mark.slow)])
def test_dense_training_forward_compiles_as_one_graph(family):
    """--use_compile 1 (issue 31): the training forward as the pretrain/SFT losses call it -- a plain batch
    (no position_ids, packed=False) and packed rows with the collate's host-side `packed=True` -- has no graph
    break (torch._dynamo.explain), and compiles with fullgraph=True to logits equal to eager's (fp32; the packed
    case, which holds the plain one's graph plus the block mask: ~3 s of inductor on 2 cores). The MoE dispatch
    keeps one break per layer (expert sizes are data); without the flag, packed rows cost one more (.any())."""
    dynamo = pytest.importorskip("torch._dynamo")
    model = random_model(seed=3, model_family=family).train()         # dropout 0: train mode is deterministic
    ids, pos, _ = pack_rows([[5, 9, 3], [7, 6]], width=24)
    plain = dict(position_ids=None, packed=False, logits_at=torch.arange(ids.numel() - 5))
    packed = dict(position_ids=pos, packed=True, logits_at=torch.arange(0, ids.numel(), 2))
    try:
        for inputs in (plain, packed):
            dynamo.reset()
            assert dynamo.explain(model)(ids, **inputs).graph_break_count == 0
        got = torch.compile(model, fullgraph=True, dynamic=False)(ids, **packed).logits
        assert torch.allclose(got, model(ids, **packed).logits, rtol=1e-4, atol=1e-5)
    finally:
        dynamo.reset()
