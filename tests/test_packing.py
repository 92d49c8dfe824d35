"""Packing end to end at the loss: the same micro-batch of samples packed into rows and padded one per row
give the same token-level loss and the same gradients (dense and MoE), so packing changes only the layout of
a step, never what a sample contributes; and the --batch_unit rows plan covers every sample exactly once."""
import pytest
import torch

from dataset.lm_dataset import SFTDataset
from tests.conftest import tiny_config, tokenizer_dir, write_tiny_corpus
from trainer.core.batch_plan import PackRows, PadRows
from trainer.train_full_sft import sft_loss


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from transformers import AutoTokenizer
    data = write_tiny_corpus(tmp_path_factory.mktemp("pack"), n=24)
    ds = SFTDataset(data["sft"], AutoTokenizer.from_pretrained(str(tokenizer_dir())), max_length=128)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("moe,one_row,bf16", [(False, False, False), (True, False, False), (False, True, False),
                                             (True, True, False), (False, True, True)])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(samples, moe, one_row, bf16):
    """Rows of max_seq_len - 1 and, as on CPU, the whole micro-batch in one row without padding; under bf16
    autocast too (CPU attention then runs in float32, the output layer's loss chunk by chunk: both layouts agree
    to bf16 rounding)."""
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(use_moe=moe, aux_loss_alpha=0.0)).train()   # aux loss: a row-level regulariser
    packed = PackRows(capacity=127, batch_size=len(samples), one_row=one_row)(samples)   # one micro-batch, two layouts
    padded = PadRows()(samples)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] and packed["tokens"] == padded["tokens"]
    assert packed["packed"] and not padded["packed"] and packed["samples"] == padded["samples"] == len(samples)
    assert packed["loss_tokens"] == padded["loss_tokens"] == sum(int(s[2].sum()) for s in samples)
    if one_row:
        assert packed["input_ids"].shape == (1, packed["tokens"])           # no padding at all
    results = []
    for batch in (packed, padded):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, stats = sft_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=2e-3 if bf16 else 1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        if bf16:   # bf16 matmuls round differently with other shapes: relative error of the whole gradient
            assert (grads_a[name] - grads_b[name]).norm() <= 0.03 * grads_b[name].norm() + 1e-6, name
        else:
            assert torch.allclose(grads_a[name], grads_b[name], atol=2e-6), name


def test_a_packed_epoch_trains_every_sample_once(samples):
    from trainer.core.batch_plan import packed_batches
    lengths = [len(s[0]) for s in samples]
    plan = packed_batches(lengths, capacity=127, batch_size=2, epoch=3)
    seen = sorted(i for batch in plan for row in batch for i in row)
    assert seen == list(range(len(samples)))
    assert all(sum(lengths[i] for i in row) <= 127 for batch in plan for row in batch)


def test_bench_packing_times_both_packed_attention_paths(capsys):
    from bench import bench_packing
    import model.model_minimind as mm
    real_spans, span_calls = mm.packed_spans, []
    mm.packed_spans = lambda *a: span_calls.append(1) or real_spans(*a)
    try:
        with torch.random.fork_rng():                                 # the bench seeds torch's generator
            bench_packing.main(["--hidden_size", "64", "--num_hidden_layers", "2", "--rows", "2", "--max_seq_len",
                                "64", "--median_len", "16", "--repeats", "1"])
    finally:
        mm.packed_spans = real_spans
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["unpacked, padded", "packed, sample by sample", "packed, block mask", "packed, plain causal"]
    assert len(span_calls) == 2              # warm-up + 1 timed pass of the sample-by-sample row only, not the mask row
    assert mm.PACKED_ATTENTION is None                                # the bench restores the model's own choice
