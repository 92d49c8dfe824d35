"""LoRA: which modules get adapters and their key names (UPSTREAM_SPEC 2), parameter counts (1.11),
no-op at init, only adapters train, save/load round trip (DDP-prefixed files too), clear errors,
merge back into a plain model, and generate() with an adapter."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from model.model_lora import LoRA, apply_lora, freeze_non_lora, load_lora, lora_parameters, merge_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from tests.conftest import tiny_config

VARIANTS = {"dense": {}, "moe": {"use_moe": True}}


def build(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every B a nonzero value, so the adapters actually change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRA):
                m.B.weight.copy_(torch.randn(m.B.weight.shape, generator=g) * 0.1)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 6400, (2, 12), generator=torch.Generator().manual_seed(0))


class Wrapper(nn.Module):
    """Stands in for DDP (attribute `module`) or torch.compile (attribute `_orig_mod`)."""

    def __init__(self, inner: nn.Module, attr: str = "module"):
        super().__init__()
        setattr(self, attr, inner)

    def forward(self, *args, **kwargs):
        return next(self.children())(*args, **kwargs)


# ---- where adapters go ----
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapters_only_on_q_and_o_proj(variant):
    model = build(**VARIANTS[variant])
    base_keys = list(model.state_dict())
    apply_lora(model, rank=8)
    adapted = sorted(name for name, m in model.named_modules() if hasattr(m, "lora"))
    assert adapted == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj"))
    new_keys = [k for k in model.state_dict() if k not in base_keys]
    assert new_keys == [f"model.layers.{i}.self_attn.{p}.lora.{ab}.weight"
                        for i in range(2) for p in ("q_proj", "o_proj") for ab in "AB"]
    assert [n for n, _ in model.named_parameters() if "lora" in n] == new_keys
    h, r = 64, 8
    assert model.model.layers[0].self_attn.q_proj.lora.A.weight.shape == (r, h)
    assert model.model.layers[0].self_attn.q_proj.lora.B.weight.shape == (h, r)
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 2 * r * (h + h)  # layers * adapters * r(in+out)


@pytest.mark.parametrize("hidden, layers, moe, added, total", [
    (512, 8, False, 131_072, 25_960_960),
    (768, 16, False, 393_216, 104_030_976 + 393_216),
    (640, 8, True, 163_840, 145_029_760 + 163_840),
])
def test_parameter_counts_of_released_sizes(hidden, layers, moe, added, total):
    with torch.device("meta"):  # shapes only, no memory and no init cost
        model = MiniMindForCausalLM(MiniMindConfig(hidden_size=hidden, num_hidden_layers=layers, use_moe=moe))
    apply_lora(model, rank=8)
    assert sum(p.numel() for p in lora_parameters(model)) == added == layers * 2 * 8 * (hidden + hidden)
    assert model.count_parameters()[0] == total
    assert model.model.layers[0].self_attn.q_proj.lora.A.weight.device.type == "meta"


def test_init_and_dtype():
    torch.manual_seed(0)
    lora = LoRA(256, 256, rank=16)
    assert torch.equal(lora.B.weight, torch.zeros(256, 16))
    assert abs(lora.A.weight.std().item() - 0.02) < 0.002 and abs(lora.A.weight.mean().item()) < 0.002
    model = build().to(torch.bfloat16)
    apply_lora(model)
    assert all(p.dtype == torch.bfloat16 for p in lora_parameters(model))


def test_apply_twice_raises():
    model = build()
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    assert len(lora_parameters(model)) == 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_unchanged_at_init(variant):
    model = build(**VARIANTS[variant])
    before = logits(model, IDS)
    apply_lora(model)
    assert torch.equal(logits(model, IDS), before)  # B = 0 and no scaling: bit-identical
    randomize_lora(model)
    assert not torch.allclose(logits(model, IDS), before)  # the hook really is in the forward


# ---- training ----
@pytest.mark.parametrize("variant", VARIANTS)
def test_only_adapters_train(variant):
    model = build(**VARIANTS[variant]).train()
    apply_lora(model)
    freeze_non_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert [p for p in model.parameters() if p.requires_grad] == lora_parameters(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    lora_before = [p.clone() for p in lora_parameters(model)]
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    out = model(IDS, labels=IDS)
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    changed = [not torch.equal(a, p) for a, p in zip(lora_before, lora_parameters(model))]
    assert all(changed[1::2])  # every B moved (A's gradient is exactly 0 while B = 0)


def test_deepcopy_and_state_dict_keep_the_adapter():
    model = build()
    apply_lora(model)
    randomize_lora(model)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, IDS), logits(model, IDS))
    with torch.no_grad():  # the copy's hook must use the copy's adapter, not the original's
        twin.model.layers[0].self_attn.q_proj.lora.B.weight.zero_()
    assert not torch.equal(logits(twin, IDS), logits(model, IDS))
    fresh = build(seed=5)
    apply_lora(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)  # how a full LoRA resume checkpoint reloads
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


# ---- save / load ----
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(tmp_path, variant):
    model = build(**VARIANTS[variant])
    apply_lora(model)
    randomize_lora(model)
    path = tmp_path / "out" / "lora" / "lora_identity_64.pth"  # directories are created
    save_lora(model, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    state = torch.load(path, weights_only=True)
    assert list(state) == [k for k in model.state_dict() if "lora" in k]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())

    fresh = build(**VARIANTS[variant])  # same base weights, fresh (random A, zero B) adapter
    apply_lora(fresh)
    load_lora(fresh, path)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
def test_wrapped_model_saves_plain_keys(tmp_path, attr):
    model = build()
    apply_lora(model)
    randomize_lora(model)
    save_lora(Wrapper(Wrapper(model, attr)), tmp_path / "w.pth")  # e.g. DDP around torch.compile
    assert all(k.startswith("model.layers.") for k in torch.load(tmp_path / "w.pth", weights_only=True))
    fresh = build()
    apply_lora(fresh)
    load_lora(Wrapper(fresh), tmp_path / "w.pth")
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_loads_module_prefixed_file(tmp_path):
    """Files the original wrote from a DDP model carry `module.` in every key."""
    model = build()
    apply_lora(model)
    randomize_lora(model)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if "lora" in k}
    torch.save(state, tmp_path / "ddp.pth")
    fresh = build()
    apply_lora(fresh)
    load_lora(fresh, tmp_path / "ddp.pth")
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_real_ddp(tmp_path):
    """One-process gloo DDP: the hook runs inside DDP's forward, gradients reach B, keys are plain."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already in use")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build().train()
        apply_lora(model)
        freeze_non_lora(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(IDS, labels=IDS).loss.backward()
        assert all(p.grad is not None for p in lora_parameters(model)[1::2])
        save_lora(ddp, tmp_path / "ddp.pth")
        assert list(torch.load(tmp_path / "ddp.pth", weights_only=True)) == [
            k for k in model.state_dict() if "lora" in k]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank, overrides, problem", [
    (4, {}, r"\(8, 64\), the model expects \(4, 64\).*rank or hidden_size"),
    (8, {"hidden_size": 128}, r"\(8, 64\), the model expects \(8, 128\).*rank or hidden_size"),
    (8, {"num_hidden_layers": 3}, r"missing LoRA key 'model\.layers\.2\.self_attn\.q_proj\.lora\.A\.weight'"),
    (8, {"num_hidden_layers": 1}, r"no matching module"),
], ids=["rank", "hidden_size", "fewer_layers_in_file", "more_layers_in_file"])
def test_load_mismatch_names_file_and_key(tmp_path, rank, overrides, problem):
    model = build()
    apply_lora(model, rank=8)
    path = tmp_path / "lora_64.pth"
    save_lora(model, path)
    other = build(**overrides)
    apply_lora(other, rank=rank)
    with pytest.raises(ValueError, match=problem) as err:
        load_lora(other, path)
    assert str(path) in str(err.value)


def test_load_without_apply_lora_raises(tmp_path):
    model = build()
    apply_lora(model)
    save_lora(model, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="call apply_lora"):
        load_lora(build(), tmp_path / "a.pth")


# ---- merge and generate ----
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_unmerged_and_restores_plain_model(variant):
    model = build(**VARIANTS[variant])
    plain_keys = list(model.state_dict())
    apply_lora(model)
    randomize_lora(model)
    with torch.no_grad():  # a nontrivial A too, so B @ A is a real rank-8 matrix
        for p in lora_parameters(model)[0::2]:
            p.mul_(10)
    before = logits(model, IDS)
    merge_lora(model)
    assert torch.allclose(logits(model, IDS), before, atol=1e-5)
    assert list(model.state_dict()) == plain_keys
    assert not any(isinstance(m, LoRA) for m in model.modules())
    fresh = MiniMindForCausalLM(tiny_config(**VARIANTS[variant])).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    apply_lora(model)  # the hook is gone: a new adapter starts as a no-op again
    assert torch.equal(logits(model, IDS), logits(fresh, IDS))


def test_generate_with_adapter():
    model = build()
    prompt = IDS[:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
        apply_lora(model)
        assert torch.equal(model.generate(prompt, **kwargs), plain)
        randomize_lora(model, seed=3)
        adapted = model.generate(prompt, **kwargs)
        assert not torch.equal(adapted, plain)
        # greedy decoding with the KV cache agrees with step-by-step full forwards of the adapted model
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(adapted, seq)
        merge_lora(model)
        assert torch.equal(model.generate(prompt, **kwargs), adapted)
