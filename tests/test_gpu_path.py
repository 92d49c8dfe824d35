"""The pieces of the GPU path (issue 31) that run on CPU too: packed rows through varlen / FlexAttention with
trainer-given cu_seqlens room (loss and gradients as sample-by-sample attention), RMSNorm leaving in the
autocast dtype (the same logits), the fixed-shape batches of --use_compile 1 (one graph, FlexAttention
inside it), and compile time kept out of tok/s. tests/test_gpu.py runs the CUDA side of each."""
import types

import pytest
import torch

import model.model_minimind as mm
from tests.conftest import tiny_config
from tests.test_model import pack_rows, random_model, reference_varlen


def packed_batch(seed=0):
    ids, pos, _ = pack_rows([[5, 11, 3, 7], [9, 13, 2]], width=32, seed=seed)
    targets = torch.randint(3, 6400, ids.shape, generator=torch.Generator().manual_seed(seed))
    return ids, pos, targets


def loss_and_grads(model, ids, pos, targets, packed, autocast=False):
    model.zero_grad(set_to_none=True)
    at = torch.arange(ids.numel())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, position_ids=pos, packed=packed, logits_at=at, loss_targets=targets.view(-1)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family, kernel", [("minimind2", "varlen-window"), ("minimind3", "varlen-window"),
                                            ("minimind2", "varlen-is_causal"), ("minimind2", "varlen-flash_attn")])
def test_fused_packed_kernels_train_like_sample_by_sample(kernel, family, monkeypatch):
    """Loss and every gradient of a packed batch through varlen attention (a reference kernel with each real
    calling convention) equal sample-by-sample attention's: fp32 to 1e-5, bf16 autocast to bf16 rounding. The
    collate's count (a power of two) pads cu_seqlens with empty samples. (FlexAttention has no backward on
    CPU: its gradients are checked in tests/test_gpu.py, its forward here and in tests/test_model.py.)"""
    calls = []
    model = random_model(seed=5, model_family=family).train()
    ids, pos, targets = packed_batch()
    for autocast, tol in ((False, 1e-5), (True, 3e-2)):
        monkeypatch.setattr(mm, "PACKED_ATTENTION", "spans")
        want_loss, want = loss_and_grads(model, ids, pos, targets, 16, autocast)
        monkeypatch.setattr(mm, "PACKED_ATTENTION", "varlen")
        monkeypatch.setattr(mm, "varlen_kernel", lambda: reference_varlen(kernel.split("-")[1], calls))
        loss, got = loss_and_grads(model, ids, pos, targets, 16, autocast)
        assert abs(loss.item() - want_loss.item()) <= tol * 0.1
        for name, g in got.items():
            scale = want[name].abs().max().item() + 1e-8
            assert (g - want[name]).abs().max().item() <= tol * scale, name
    assert set(calls) == {16}              # 9 samples (padding tails included) in room for 16


def test_varlen_cu_seqlens_mark_every_sample_start_in_the_flattened_rows():
    """cu_seqlens: each sample's first token in the flattened B x T positions (a row's padding tail is a sample;
    a row that begins inside a sample starts one too), then B x T, padded with empty samples to the room."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [3, 4, 0, 1, 2, 3, 0, 1]])
    mask = mm.DocumentMask("varlen", pos, 2, 8)
    assert mask.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 14, 16, 16, 16]
    assert mask.cu_seqlens.dtype == torch.int32 and mask.max_seqlen == 8
    assert mm.packed_segments(pos, 2, True) == 6 and mm.packed_segments(pos, 2, 8) == 8


def test_packed_kernel_choice_by_device_dtype_and_dropout(monkeypatch):
    """CPU: sample by sample (the dense mask under compile); CUDA: varlen for bf16/fp16 where a varlen kernel
    exists and the GPU runs flash attention (sm80+), FlexAttention otherwise, the dense mask only with attention
    dropout; other accelerators: the mask."""
    cpu = torch.zeros(1)
    cuda = types.SimpleNamespace(device=torch.device("cuda"))
    assert mm.packed_kernel(cpu, torch.bfloat16, 0.0) == "spans"
    monkeypatch.setattr(mm, "varlen_kernel", lambda: ("torch", None))
    monkeypatch.setattr(mm, "flash_capable", lambda index: False)      # a T4 or V100: fp16, no flash kernel
    assert mm.packed_kernel(cuda, torch.float16, 0.0) == "flex"
    monkeypatch.setattr(mm, "flash_capable", lambda index: True)
    assert mm.packed_kernel(cuda, torch.bfloat16, 0.0, head_dim=36) == "flex"      # flash: head_dim % 8 == 0
    assert mm.packed_kernel(cuda, torch.bfloat16, 0.0) == "varlen"
    assert mm.packed_kernel(cuda, torch.float16, 0.0) == "varlen"
    assert mm.packed_kernel(cuda, torch.float32, 0.0) == "flex"
    assert mm.packed_kernel(cuda, torch.bfloat16, 0.1) == "mask"
    assert mm.packed_kernel(types.SimpleNamespace(device=torch.device("mps")), torch.bfloat16, 0.0) == "mask"
    monkeypatch.setattr(mm, "varlen_kernel", lambda: None)
    assert mm.packed_kernel(cuda, torch.bfloat16, 0.0) == "flex"
    monkeypatch.setattr(mm, "flex_kernel", lambda: None)
    assert mm.packed_kernel(cuda, torch.bfloat16, 0.0) == "mask"


@pytest.mark.parametrize("family", ["minimind2", "minimind3"])
def test_rms_norm_leaves_in_the_autocast_dtype_with_the_same_logits(family, monkeypatch):
    """Under bf16 autocast the norms hand their consumers bf16 (no float32 copy, no cast per projection): the
    logits are bit for bit those of float32 norm outputs cast by autocast, and the gradients agree to bf16
    rounding (the projections' input gradients now add up in bf16)."""
    model = random_model(seed=2, model_family=family).train()
    ids = torch.randint(3, 6400, (2, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run()
    def float32_out(x, weight, eps, scale_in_float32):     # the norm as the original: no cast at the end
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight * normed).type_as(x) if scale_in_float32 else weight * normed.type_as(x)

    monkeypatch.setattr(mm, "rms_norm", float32_out)
    want_logits, want_grads = run()
    assert seen == [torch.bfloat16, torch.float32]
    assert torch.equal(logits, want_logits)
    for name, g in grads.items():
        scale = want_grads[name].abs().max().item() + 1e-12
        assert (g - want_grads[name]).abs().max().item() <= 2e-2 * scale, name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_packed_step_with_flex_is_one_graph_and_equals_eager(monkeypatch):
    """What --use_compile 1 runs on a GPU in fp32, here on CPU without gradients (FlexAttention has none on CPU):
    the packed forward with FlexAttention's document mask built inside it and the loss over every position
    (labels -100 where none is taken) compiles as one graph (fullgraph) and gives eager sample-by-sample
    attention's loss. (slow: ~20 s of inductor on 2 cores)"""
    dynamo = pytest.importorskip("torch._dynamo")
    model = random_model(seed=4).train()
    ids, pos, targets = packed_batch(seed=2)
    targets[:, ::3] = -100
    at = torch.arange(ids.numel())
    monkeypatch.setattr(mm, "PACKED_ATTENTION", "spans")
    with torch.no_grad():                     # FlexAttention has no backward on CPU
        want = model(ids, position_ids=pos, packed=16, logits_at=at, loss_targets=targets.view(-1)).loss
        monkeypatch.setattr(mm, "PACKED_ATTENTION", "flex")
        try:
            dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, dynamic=False)
            got = compiled(ids, position_ids=pos, packed=16, logits_at=at, loss_targets=targets.view(-1)).loss
        finally:
            dynamo.reset()
    assert abs(got.item() - want.item()) <= 1e-5
    # the varlen path's cu_seqlens (nonzero_static: a fixed shape, no host sync) trace as one graph too
    build = torch.compile(lambda p: mm.DocumentMask("varlen", p, 2, 16).cu_seqlens, fullgraph=True, dynamic=False)
    try:
        assert torch.equal(build(pos), mm.DocumentMask("varlen", pos, 2, 16).cu_seqlens)
    finally:
        dynamo.reset()


def test_compile_steps_are_timed_apart_from_tok_s(tmp_path, capsys):
    """A micro-batch that compiled a new shape: its seconds and tokens leave tok/s, MFU and the ETA, and are
    said on their own line; a window of only compiling steps shows no rate."""
    import time
    from trainer.core.progress import Progress
    args = types.SimpleNamespace(save_dir=str(tmp_path), save_weight="pretrain", from_resume=0, epochs=1)
    run = types.SimpleNamespace(world_size=1, device_type="meta", dtype=torch.float32)   # no peak: no MFU
    progress = Progress(args, tiny_config(), run, types.SimpleNamespace(log=lambda *a, **k: None), [10], 10, 0)
    progress.t0 = progress.window_t = time.time() - 10.0       # a 10 s window, 9 s of it compiling
    progress.add(torch.tensor(2.0), {"tokens": 500})
    progress.compiled(9.0, 500, (4, 127))
    progress.add(torch.tensor(2.0), {"tokens": 1000})
    progress.log(0, 2, 1e-3)
    out = capsys.readouterr().out
    assert "a new batch shape 4 x 127 compiled in 9.0 s (1 so far, 9.0 s in all; not counted in tok/s)" in out
    rate = int(out.split("tok/s:")[1].split()[0].replace(",", ""))
    assert 900 <= rate <= 1000                                 # 1,000 tokens in the ~1 s that did not compile
    import json
    record = json.loads((tmp_path / "pretrain_64_metrics.jsonl").read_text().splitlines()[-1])
    assert 3.0 <= record["eta_min"] * 60 <= 6.0                 # 8 steps left at ~0.5 s each (4 s), not at 5 s (40 s)
    progress.add(torch.tensor(2.0), {"tokens": 300})
    progress.compiled(5.0, 300, (8, 127))
    progress.log(0, 3, 1e-3)
    assert "tok/s:- " in capsys.readouterr().out
    assert "14.0 s of it compiling 2 shapes" in progress.summary()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_compile_modes_refuse_gradient_accumulation(mode):
    """A CUDA-graph replay overwrites the gradients accumulated so far (torch issue 169545): those modes need
    --accumulation_steps 1 on CUDA, said in one line before anything is compiled; mode default takes any."""
    from trainer.core.stage import wrap_model
    run = types.SimpleNamespace(ddp=False, device_type="cuda")
    args = types.SimpleNamespace(use_compile=1, compile_mode=mode, accumulation_steps=4, fsdp=0)
    with pytest.raises(ValueError, match=f"--compile_mode {mode} replays CUDA graphs.*--accumulation_steps 1"):
        wrap_model(torch.nn.Linear(2, 2), run, args)
    args.accumulation_steps = 1
    assert hasattr(wrap_model(torch.nn.Linear(2, 2), run, args), "_orig_mod")   # compiled lazily: nothing ran
    args.compile_mode, args.accumulation_steps = "default", 4
    assert hasattr(wrap_model(torch.nn.Linear(2, 2), run, args), "_orig_mod")


def test_packed_rows_with_a_kv_cache_keep_the_cache_on_every_kernel(monkeypatch):
    """A packed prefill that fills a KV cache (use_cache) never takes a fused kernel that skips the cache: the
    dense mask then, with the cache filled as for the sample-by-sample path."""
    model = random_model(seed=1)
    ids, pos, _ = pack_rows([[5, 7], [4, 8]], width=12)
    calls = []
    monkeypatch.setattr(mm, "varlen_kernel", lambda: reference_varlen("window", calls))
    with torch.no_grad():
        monkeypatch.setattr(mm, "PACKED_ATTENTION", "spans")
        want = model(ids, position_ids=pos, use_cache=True)
        monkeypatch.setattr(mm, "PACKED_ATTENTION", "varlen")
        got = model(ids, position_ids=pos, use_cache=True)
    assert not calls and got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length() == 12
    assert torch.allclose(got.logits, want.logits, atol=1e-5)


def test_dpo_pads_every_pair_to_max_seq_len_under_compile(tmp_path):
    """DPO's pairs are padded to each batch's longest; under --use_compile 1 (static shapes) to max_seq_len."""
    import json
    from tests.conftest import tiny_train_args
    from trainer import train_dpo
    data = tmp_path / "dpo.jsonl"  # its own file: the demo corpus is generated, absent from a clean clone
    with open(data, "w", encoding="utf-8") as f:
        for a in range(8):
            q = {"role": "user", "content": f"{a}+{a}等于几？"}
            f.write(json.dumps({"chosen": [q, {"role": "assistant", "content": f"{2 * a}。"}],
                                "rejected": [q, {"role": "assistant", "content": "不知道。"}]}, ensure_ascii=False) + "\n")
    seen = []
    real = train_dpo.DPODataset

    def spy(*a, **k):
        seen.append(k["pad_to_max"])
        return real(*a, **k)

    import unittest.mock
    with unittest.mock.patch.object(train_dpo, "DPODataset", spy), \
            unittest.mock.patch.object(train_dpo, "train_loop", lambda *a, **k: (None, 0.0)), \
            unittest.mock.patch.object(train_dpo, "wrap_model", lambda model, *a, **k: model):
        for compile_flag in (0, 1):
            train_dpo.main(tiny_train_args(tmp_path / str(compile_flag), data,
                                           from_weight="none",
                                           use_compile=compile_flag))
    assert seen == [False, True]
