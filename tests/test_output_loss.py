"""The CPU training fast paths against the plain computation: linear_cross_entropy (the output layer's loss chunk
by chunk, gradients computed in its forward) equals F.cross_entropy of the logits, in float32 and under bf16
autocast, for any chunking, loss scale and frozen weight; the model's `loss_targets` gives that loss with the
gradients of the logits path; half-precision attention that will be differentiated on CPU runs in float32;
RMSNorm's closed-form backward equals autograd's; the stages' AdamW options keep the default AdamW's steps."""
import pytest
import torch
import torch.nn.functional as F

from model.model_minimind import Attention, MiniMindForCausalLM, cpu_attention_in_fp32, linear_cross_entropy
from tests.conftest import tiny_config


def plain_and_fused(n, width, vocab, bf16, scale, chunk, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(n, width, generator=g)
    w0 = torch.randn(vocab, width, generator=g) * 0.3
    t = torch.randint(0, vocab, (n,), generator=g)
    out = []
    for fused in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(weight_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = linear_cross_entropy(h, w, t, chunk=chunk) if fused else F.cross_entropy(F.linear(h, w).float(), t)
        (loss * scale).backward()
        out.append((loss.detach(), h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize("scale", [1.0, 0.125, 1 / 3])
def test_linear_cross_entropy_equals_the_plain_loss_in_float32(chunk, scale):
    (loss, gh, gw), (floss, fgh, fgw) = plain_and_fused(150, 16, 97, bf16=False, scale=scale, chunk=chunk)
    assert floss.dtype == torch.float32 and fgh.dtype == fgw.dtype == torch.float32
    assert torch.allclose(floss, loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fgh, gh, rtol=1e-5, atol=1e-8) and torch.allclose(fgw, gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_logits(scale):
    """Same bf16 matmuls and float32 softmax as autocast's logits path: the loss equal to float32 rounding, the
    gradients to bf16 rounding; both are float32 (the inputs' dtype), as autocast's casts give back."""
    (loss, gh, gw), (floss, fgh, fgw) = plain_and_fused(300, 32, 211, bf16=True, scale=scale, chunk=64)
    assert fgh.dtype == fgw.dtype == torch.float32
    assert torch.allclose(floss, loss, rtol=1e-5, atol=1e-5)
    for got, want in ((fgh, gh), (fgw, gw)):
        assert (got - want).norm() <= 0.01 * want.norm()


def test_linear_cross_entropy_with_a_frozen_weight_and_without_gradients():
    (loss, gh, gw), (floss, fgh, fgw) = plain_and_fused(40, 8, 31, bf16=False, scale=1.0, chunk=16, weight_grad=False)
    assert gw is None and fgw is None and torch.allclose(fgh, gh, rtol=1e-5, atol=1e-9)
    h, w, t = torch.randn(5, 8), torch.randn(31, 8), torch.randint(0, 31, (5,))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.t(), t), atol=1e-6)
    assert linear_cross_entropy(h[:0].requires_grad_(), w, t[:0]).isnan()          # as F.cross_entropy of nothing


@pytest.mark.parametrize("bf16", [False, True])
def test_model_loss_targets_equal_the_loss_of_its_logits(bf16):
    """model(..., logits_at=at, loss_targets=y).loss (the stage scripts' path) == CE of model(..., logits_at=at)
    logits; every parameter's gradient equal (float32) or within bf16 rounding; logits are not returned."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    pos = torch.cat([torch.arange(25), torch.arange(15)]).expand(2, -1)        # two samples per row
    at = torch.arange(0, 80, 3)
    targets = torch.randint(0, model.config.vocab_size, (len(at),))
    grads = []
    for fused in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids, position_ids=pos, packed=True, logits_at=at, loss_targets=targets if fused else None)
            loss = out.loss if fused else F.cross_entropy(out.logits.float(), targets)
        assert (out.logits is None) == fused
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, want), (floss, got) = grads
    assert torch.allclose(floss, loss, atol=1e-5 if bf16 else 1e-6)
    for name in want:
        if bf16:
            assert (got[name] - want[name]).norm() <= 0.01 * want[name].norm() + 1e-7, name
        else:
            assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-7), name


def test_half_precision_attention_runs_in_float32_only_when_differentiated_on_cpu(monkeypatch):
    q = torch.randn(1, 2, 3, 4)
    assert not cpu_attention_in_fp32(q)                                        # float32: nothing to do
    assert cpu_attention_in_fp32(q.bfloat16()) and cpu_attention_in_fp32(q.half())
    with torch.no_grad():
        assert not cpu_attention_in_fp32(q.bfloat16())                         # inference keeps its dtype
    seen = []
    real = Attention.attend
    monkeypatch.setattr(Attention, "attend", lambda self, xq, *a: seen.append(xq.dtype) or real(self, xq, *a))
    model = MiniMindForCausalLM(tiny_config()).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
        with torch.no_grad():
            model(ids)
    assert out.logits.dtype == torch.bfloat16                                   # the rest stays under autocast
    n = model.config.num_hidden_layers
    assert seen == [torch.float32] * n + [torch.bfloat16] * n


@pytest.mark.parametrize("scale_in_float32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_backward_equals_autograds(scale_in_float32, dtype):
    """RMSNorm's closed-form backward (used whenever a gradient is needed) against autograd through the same
    forward ops: MiniMind2's and minimind-3's scaling, float32 and bf16 inputs; the forward is the same ops."""
    from model.model_minimind import RMSNorm, rms_norm
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(3, 7, 32, generator=g) * 3).to(dtype)
    norm = RMSNorm(32, eps=1e-6, scale_in_float32=scale_in_float32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g))
    grad = torch.randn(3, 7, 32, generator=g).to(dtype)
    results = []
    for closed_form in (True, False):
        x = x0.clone().requires_grad_()
        norm.weight.grad = None
        out = norm(x) if closed_form else rms_norm(x, norm.weight, norm.eps, scale_in_float32)
        out.backward(grad)
        results.append((out.detach(), x.grad, norm.weight.grad))
    (out, gx, gw), (want_out, want_gx, want_gw) = results
    assert torch.equal(out, want_out) and gx.dtype == x0.dtype and gw.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(gx.float(), want_gx.float(), **tol) and torch.allclose(gw, want_gw, **tol)


def test_stage_adamw_options_take_the_default_adamws_steps_on_cpu():
    """The stages build AdamW with run.adamw: fused=True on CUDA, foreach=True elsewhere. On CPU the multi-tensor
    AdamW gives exactly the single-tensor one's weights (the fused kernel differs in the last bit, which is why
    CPU keeps foreach), so resume files and runs from before stay comparable."""
    from types import SimpleNamespace

    from trainer.core.stage import init_run
    run = init_run(SimpleNamespace(device="cpu", dtype="float32", seed=42, fsdp=0))
    assert run.adamw == {"foreach": True}
    torch.manual_seed(0)
    base = [torch.randn(33, 17), torch.randn(5)]
    weights = []
    for options in ({"foreach": False}, run.adamw):
        params = [p.clone().requires_grad_() for p in base]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **options)
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        weights.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_a_resumed_optimizer_keeps_this_runs_adamw_kernel():
    """A resume file's param groups carry the flags of the run that wrote it (e.g. fused=True from CUDA);
    restore keeps this run's choice (run.adamw), so a CPU run resumed from a CUDA file stays on foreach."""
    from trainer.core.stage import load_optimizer_state
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4)
    written = torch.optim.AdamW([param], lr=0.1, fused=True)
    written.step()
    state = written.state_dict()
    assert state["param_groups"][0]["fused"] is True
    resumed = torch.optim.AdamW([param], lr=0.1, foreach=True)
    load_optimizer_state(resumed, state)
    group = resumed.param_groups[0]
    assert group["foreach"] is True and not group["fused"] and int(resumed.state[param]["step"]) == 1


def test_bench_cpu_step_times_every_variant(capsys):
    """bench/bench_cpu_step.py: one row per variant; only the rows layout computes padding positions."""
    from bench import bench_cpu_step
    bench_cpu_step.main(["--hidden_size", "64", "--num_hidden_layers", "2", "--steps", "2", "--exit", "0"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r[0].strip("| ") for r in rows] == ["all paths (default)", "attention in the autocast dtype",
                                               "logits + F.cross_entropy", "autograd RMSNorm backward",
                                               "RMSNorm out in float32", "rows of max_seq_len - 1"]
    assert [r[3] for r in rows][:5] == ["1.00"] * 5 and float(rows[5][3]) > 1.0 and rows[0][4] == "1.00x |"
