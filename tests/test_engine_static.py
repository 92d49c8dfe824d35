"""model/engine.py's static decode step (StaticDecode: fixed shapes, per-slot state on the device) and its CUDA
graphs (DecodeGraphs). On CPU the static step is switched on by hand (static_decode=True) and must give what the
dynamic step gives: greedy tokens equal model.generate alone, its logits equal the dynamic step's and a full
forward's within fp32 rounding, seeded sampling repeats; with rows joining and leaving (slot moves), padding rows,
chunked prefill beside them and the prefix cache. The graph tests check greedy equal to model.generate at batch 1
and 16 in fp32, equal to the uncaptured step in bf16, and graphs recaptured after weight moves and swap_model: on
CUDA with real captures (those items are marked `gpu` and skipped without CUDA; run them with
`python -m pytest -m gpu tests/test_engine_static.py`), and on CPU with a stand-in for torch.cuda.CUDAGraph."""
import random
import time

import pytest
import torch

import model.engine as engine_module
from model.engine import DecodeGraphs, Engine, SamplingParams, decode_modes
from model.model_minimind import MiniMindForCausalLM
from tests.conftest import tiny_config
from tests.test_engine import CONFIGS, alone, prompts, tiny, wait_for

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]  # as tests/test_gpu.py


def run(model, ps, params, **engine_args):
    """The finished requests of ps through an Engine (all queued before the loop admits any), and the engine."""
    with Engine(model, **{"eos_token_id": 2, **engine_args}) as engine:
        outs = engine.generate(ps, params)
    return outs, engine


def full_forward_logprobs(model, prompt, tokens):
    """log-softmax of the model's logits for each of `tokens` after `prompt`, from one forward without a cache."""
    ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1:]
    return logits.float().log_softmax(-1).cpu()


# ---- CPU: the static step equals the dynamic one ----
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_static_greedy_in_a_batch_equals_generate_alone(kind):
    """12 prompts of 1-40 tokens over 5 slots (row buckets 1, 2, 4, 5), leaving at different steps while waiting
    ones join; prompts over 16 tokens take chunked prefill; every third row has a repetition penalty (the
    per-request sampling path beside the greedy fast path)."""
    model = tiny(**CONFIGS[kind])
    ps = prompts(12)
    params = [SamplingParams(max_tokens=4 + 3 * (i % 5), repetition_penalty=1.1 if i % 3 == 0 else 1.0)
              for i in range(len(ps))]
    outs, engine = run(model, ps, params, max_batch=5, prefill_chunk=16, static_decode=True)
    assert engine.static is not None and engine.static.loads > 1
    for p, s, out in zip(ps, params, outs):
        assert out.token_ids == alone(model, p, s.max_tokens, s.repetition_penalty)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == 2 else "length")


def test_static_step_logits_equal_the_dynamic_step_and_a_full_forward():
    """Raw log-probs (logprobs=20: the log-softmax of each step's logits) of rows of different lengths, under the
    static step, the dynamic step and one forward over the whole sequence without a cache: equal within fp32
    rounding (the padded key width and the batch change only a kernel's summation order)."""
    model = tiny()
    ps = prompts(6, low=3, high=30, seed=5)
    params = [SamplingParams(max_tokens=6 + 4 * i, logprobs=20) for i in range(len(ps))]
    static, _ = run(model, ps, params, max_batch=4, prefill_chunk=16, static_decode=True)
    dynamic, _ = run(model, ps, params, max_batch=4, prefill_chunk=16, static_decode=False)
    for p, a, b in zip(ps, static, dynamic):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        ref = full_forward_logprobs(model, p, a.token_ids)
        torch.testing.assert_close(torch.tensor(a.logprobs), ref.gather(1, torch.tensor(a.token_ids)[:, None])[:, 0],
                                   atol=1e-5, rtol=0)
        for step, top in enumerate(a.top_logprobs):
            ids, values = zip(*top)
            torch.testing.assert_close(torch.tensor(values), ref[step, list(ids)], atol=1e-5, rtol=0)
            assert list(ids) == ref[step].topk(20).indices.tolist()


def test_padding_rows_leave_the_slot_in_chunked_prefill_alone():
    """Three rows decode (padded to a bucket of 4) while a 40-token prompt is prefilled 8 tokens a step in row 3,
    the padding row: padding rows write into the cache's spare row, so its keys stay. Its context (max_seq_len 56)
    also caps the key width below the next power of two."""
    model = tiny()
    short = prompts(3, low=2, high=2, seed=6)
    long = prompts(1, low=40, high=40, seed=7)[0]
    params = [SamplingParams(max_tokens=n) for n in (12, 20, 30)] + [SamplingParams(max_tokens=100)]
    outs, engine = run(model, short + [long], params, max_batch=4, prefill_chunk=8, max_seq_len=56,
                       eos_token_id=-1, static_decode=True)
    assert engine.static.buckets == [1, 2, 4] and engine.cache.rows == 5
    assert [len(o.token_ids) for o in outs] == [12, 20, 30, 16]      # the long one stops at the context
    for p, s, out in zip(short + [long], params, outs):
        assert out.token_ids == alone(model, p, len(out.token_ids))


def test_state_on_the_device_is_loaded_only_when_the_rows_change():
    """Three requests prefilled together leave after 3, 5 and 8 tokens: the device state is loaded before the
    first decode step and after each departure that leaves rows behind (3 loads), advanced in place otherwise."""
    model = tiny()
    ps = prompts(3, low=5, high=9, seed=8)
    params = [SamplingParams(max_tokens=n) for n in (3, 5, 8)]
    with Engine(model, max_batch=4, eos_token_id=-1, static_decode=True) as engine:
        outs = engine.generate(ps, params)
    # after close (a request is done before its last step's state is advanced): the last row's token and position
    assert engine.static.loads == 3 and engine.static.loaded == (outs[2].id,)
    assert engine.static.state[:, 0].tolist() == [outs[2].token_ids[-1], len(ps[2]) + 7, 0]
    assert [o.token_ids for o in outs] == [alone(model, p, s.max_tokens) for p, s in zip(ps, params)]


def test_static_step_with_the_prefix_cache_and_requests_joining_mid_run():
    """Prompts sharing a system prompt take it from the prefix cache while others decode; newcomers arrive at
    different steps (a slowed forward): each gets its single answer."""
    model = tiny()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.002))
    rng = random.Random(2)
    system = [rng.randrange(3, 6400) for _ in range(20)]
    ps = [system + t for t in prompts(5, low=1, high=12, seed=9)]
    with Engine(model, max_batch=3, prefill_chunk=16, eos_token_id=-1, static_decode=True) as engine:
        reqs = [engine.submit(ps[0], SamplingParams(max_tokens=30))]
        for p in ps[1:]:  # each joins a batch that is already decoding
            wait_for(lambda: len(reqs[-1].token_ids) >= 3 or reqs[-1].done)
            reqs.append(engine.submit(p, SamplingParams(max_tokens=10)))
        outs = [r.wait() for r in reqs]
        assert engine.prompt_tokens_cached_total >= 4 * len(system)
    assert [o.token_ids for o in outs] == [alone(model, p, len(o.token_ids)) for p, o in zip(ps, outs)]


def test_seeded_sampling_is_the_same_under_the_static_step():
    """Sampled rows keep their own generators: a seeded request repeats exactly, and draws what it draws under
    the dynamic step (this tiny model's logits agree closely enough for the same draws)."""
    model = tiny()
    ps = prompts(4, seed=10)
    params = [SamplingParams(max_tokens=16, temperature=1.2, top_p=0.9, top_k=40, repetition_penalty=1.05, seed=7),
              SamplingParams(max_tokens=12, temperature=0.8, seed=3), SamplingParams(max_tokens=9),
              SamplingParams(max_tokens=14, temperature=1.0, seed=5)]
    first, _ = run(model, ps, params, max_batch=4, static_decode=True)
    again, _ = run(model, ps, params, max_batch=4, static_decode=True)
    dynamic, _ = run(model, ps, params, max_batch=4, static_decode=False)
    assert [o.token_ids for o in first] == [o.token_ids for o in again] == [o.token_ids for o in dynamic]
    assert first[0].token_ids != alone(model, ps[0], 16)  # it really sampled
    assert first[2].token_ids == alone(model, ps[2], 9)


def test_swap_model_gives_the_static_step_the_new_weights():
    old, new = tiny(seed=0), tiny(seed=1)
    ps = prompts(3, seed=11)
    with Engine(old, max_batch=2, eos_token_id=-1, static_decode=True) as engine:
        before = engine.generate(ps, SamplingParams(max_tokens=6))
        engine.swap_model(new)
        assert engine.static.model is new and engine.static.loaded is None
        after = engine.generate(ps, SamplingParams(max_tokens=6))
    assert [o.token_ids for o in before] == [alone(old, p, 6) for p in ps]
    assert [o.token_ids for o in after] == [alone(new, p, 6) for p in ps]


def test_decode_modes_auto_and_refusals():
    from transformers import LlamaConfig, LlamaForCausalLM
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    dense, moe = tiny(), tiny(use_moe=True)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert decode_modes(dense, cpu) == (False, False)                  # CPU: the dynamic step unless asked
    assert decode_modes(dense, cpu, static_decode=True) == (True, False)
    assert decode_modes(dense, cuda) == (True, True) and decode_modes(moe, cuda) == (True, False)
    assert decode_modes(llama, cuda) == (False, False)                 # transformers models keep the dynamic step
    assert decode_modes(dense, cuda, cuda_graphs=False) == (True, False)
    with pytest.raises(ValueError, match="static_decode needs a MiniMind"):
        decode_modes(llama, cpu, static_decode=True)
    for model, device in ((dense, cpu), (moe, cuda), (llama, cuda)):
        with pytest.raises(ValueError, match="cuda_graphs needs"):
            decode_modes(model, device, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs"):
        Engine(dense, cuda_graphs=True)
    with Engine(dense, eos_token_id=-1) as engine:
        assert engine.static is None and engine.cache.rows == engine.max_batch


# ---- the CUDA graphs (on CPU through a stand-in for torch.cuda.CUDAGraph) ----
class StandInGraph:
    """What DecodeGraphs uses of a captured graph, on CPU: the output tensor of the capture, and replay(), which runs
    the forward again into it (as a CUDA graph replays its kernels into its static output)."""

    def __init__(self, forward, rows, width):
        self.forward, self.rows, self.width = forward, rows, width
        self.out = forward(rows, width).clone()

    def replay(self):
        self.out.copy_(self.forward(self.rows, self.width))


def stand_in_capture(graphs, forward, rows, width):
    graph = StandInGraph(forward, rows, width)
    graphs.captures += 1
    return graph, graph.out


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=GPU)])
def device(request, monkeypatch):
    """cuda: the engine's defaults there (static step, CUDA graphs). cpu: the same modes with StandInGraph for the
    capture, so DecodeGraphs' bookkeeping (capture per shape, recapture when the weights or the cache move) and
    these tests themselves also run without a GPU."""
    if request.param == "cpu":
        monkeypatch.setattr(engine_module, "decode_modes", lambda model, device, static_decode=None,
                            cuda_graphs=None: (True, cuda_graphs is not False))
        monkeypatch.setattr(DecodeGraphs, "capture", stand_in_capture)
    return request.param


def model_on(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config()).eval().to(device, dtype)


def generate_alone(model, prompt, max_new):
    """model.generate's greedy tokens and its logits at each step (float32, (max_new, V))."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.scores).float().cpu()


def batch_of(size, seed):
    """`size` prompts of different lengths, with different answer lengths (the rows leave one bucket for the next)."""
    ps = prompts(size, low=2, high=60, seed=seed)
    return ps, [SamplingParams(max_tokens=24 + 5 * (i % 4)) for i in range(size)]


def check_graphs_used(engine):
    assert engine.static is not None and engine.static.graphs is not None and engine.static.graphs.captures >= 1


@pytest.mark.parametrize("size", [1, 16])
def test_graphs_greedy_equals_generate_alone_fp32(device, size):
    model = model_on(device)
    ps, params = batch_of(size, seed=size)
    outs, engine = run(model, ps, params, max_batch=16, prefill_chunk=32, eos_token_id=-1)
    check_graphs_used(engine)
    for p, s, out in zip(ps, params, outs):
        assert out.token_ids == generate_alone(model, p, s.max_tokens)[0]


@pytest.mark.parametrize("size", [1, 16])
@pytest.mark.parametrize("how", ["bf16 weights", "autocast"])
def test_graphs_bf16_equal_the_uncaptured_step_and_generate_within_rounding(device, size, how):
    """bf16: a replay runs the kernels the uncaptured static step runs, so the tokens are the same; against
    model.generate (other kernels: an unpadded key width, no mask) the raw log-probs agree within bf16 rounding
    and the tokens up to a step where generate's two likeliest tokens lie within that rounding of each other."""
    model = model_on(device, torch.bfloat16 if how == "bf16 weights" else torch.float32)
    args = dict(max_batch=16, prefill_chunk=32, eos_token_id=-1, **({"autocast_dtype": torch.bfloat16}
                                                                     if how == "autocast" else {}))
    ps, params = batch_of(size, seed=20 + size)
    params = [SamplingParams(max_tokens=s.max_tokens, logprobs=0) for s in params]
    graphed, engine = run(model, ps, params, **args)
    check_graphs_used(engine)
    eager, engine = run(model, ps, params, cuda_graphs=False, **args)
    assert engine.static.graphs is None
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=how == "autocast"):
        refs = [generate_alone(model, p, s.max_tokens) for p, s in zip(ps, params)]
    for out, (tokens, scores) in zip(graphed, refs):
        same = next((i for i, (a, b) in enumerate(zip(out.token_ids, tokens)) if a != b), len(tokens))
        ref_logprobs = scores.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:same, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs[:same]), ref_logprobs, atol=0.1, rtol=0)
        if same < len(tokens):  # on CPU: margins 0.0 and 0.008 where it happens (bf16 logits of this model ~ +-2)
            top2 = scores[same].topk(2).values
            assert top2[0] - top2[1] < 0.05, (same, top2)


def test_graphs_follow_in_place_weight_changes_and_swap_model(device):
    """A graph reads the weights by address: an in-place change (an optimizer step) reaches the next replay of the
    same graphs; a cast to another dtype (new storage) and swap_model capture anew."""
    model = model_on(device)
    ps, params = batch_of(4, seed=30)
    expected = lambda m: [generate_alone(m, p, s.max_tokens)[0] for p, s in zip(ps, params)]  # noqa: E731
    with Engine(model, max_batch=4, eos_token_id=-1) as engine:
        assert [o.token_ids for o in engine.generate(ps, params)] == expected(model)
        captures = engine.static.graphs.captures
        with torch.no_grad():
            for w in model.parameters():
                w.mul_(1.5)
        assert [o.token_ids for o in engine.generate(ps, params)] == expected(model)
        assert engine.static.graphs.captures == captures   # same addresses and shapes: the same graphs
        model.double()
        assert [o.token_ids for o in engine.generate(ps, params)] == expected(model)
        assert engine.static.graphs.captures > captures
        other = model_on(device, seed=1)
        engine.swap_model(other)
        assert [o.token_ids for o in engine.generate(ps, params)] == expected(other)
        check_graphs_used(engine)
