"""model/engine.py: continuous batching gives every request exactly what it gets alone (greedy equals
model.generate, for dense, MoE, YaRN, the explicit-mask path and a transformers Llama), whatever else
is in the batch and whenever it joins, and whatever part of its prompt comes from the prefix cache; seeded sampling draws from each request's own generator (the same tokens alone and in a batch for this tiny model); the logits processors
equal transformers'; queue limit, oversized prompts, cancellation, timeouts, stop strings and model
errors behave as documented."""
import random
import threading
import time

import pytest
import torch

from model.engine import Engine, PrefixCache, PromptTooLong, QueueFull, SamplingParams, SlotCache, process_logits
from model.model_minimind import MiniMindCache, MiniMindForCausalLM
from tests.conftest import tiny_config, tokenizer_dir

CONFIGS = {"dense": {}, "moe": {"use_moe": True}, "yarn": {"inference_rope_scaling": True},
           "eager": {"flash_attn": False}}


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(**overrides)).eval()


def prompts(n, low=1, high=40, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 6400) for _ in range(rng.randint(low, high))] for _ in range(n)]


def alone(model, prompt, max_new, penalty=1.0):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         repetition_penalty=penalty, pad_token_id=0, eos_token_id=2)
    return out[0, len(prompt):].tolist()


class Slow(torch.nn.Module):
    """Wraps a model: sleeps before each forward, counts forwards, raises when `fail` is set."""

    def __init__(self, model, delay=0.0):
        super().__init__()
        self.inner, self.delay, self.calls, self.fail = model, delay, 0, None
        self.config = model.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError(self.fail)
        return self.inner(*args, **kwargs)


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_in_a_batch_equals_generate_alone(kind):
    """12 prompts of 1-40 tokens over 5 slots with different lengths to generate, so rows leave at
    different steps and waiting prompts join mid-flight; prompts over 16 tokens take chunked prefill."""
    model = tiny(**CONFIGS[kind])
    ps = prompts(12)
    params = [SamplingParams(max_tokens=4 + 3 * (i % 5), repetition_penalty=1.1 if i % 3 == 0 else 1.0)
              for i in range(len(ps))]
    with Engine(model, max_batch=5, prefill_chunk=16, eos_token_id=2) as engine:
        outs = engine.generate(ps, params)
    for p, s, out in zip(ps, params, outs):
        assert out.token_ids == alone(model, p, s.max_tokens, s.repetition_penalty)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == 2 else "length")
    assert {len(p) for p in ps} & set(range(17, 41)) and {len(p) for p in ps} & set(range(1, 17))


def test_requests_joining_while_others_decode_get_their_single_answer():
    model = Slow(tiny(), delay=0.002)
    ps = prompts(6, seed=1)
    with Engine(model, max_batch=4, eos_token_id=2) as engine:
        first = engine.submit(ps[0], SamplingParams(max_tokens=30))
        reqs = [first]
        for p in ps[1:]:  # each joins a batch that is already decoding, at a different step
            wait_for(lambda: len(reqs[-1].token_ids) >= 3 or reqs[-1].done)
            reqs.append(engine.submit(p, SamplingParams(max_tokens=12)))
        outs = [r.wait() for r in reqs]
    assert [o.token_ids for o in outs] == [alone(model.inner, p, o.max_new) for p, o in zip(ps, outs)]


def test_llama_export_through_transformers_is_batched_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6400, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    ps = prompts(6, seed=2)
    ps += [ps[5][:12] + p for p in prompts(3, seed=4)]  # begin like the 40-token one: that start comes from the cache
    with Engine(model, max_batch=3, prefill_chunk=16, eos_token_id=2) as engine:
        outs = engine.generate(ps[:6], SamplingParams(max_tokens=8))
        outs += engine.generate(ps[6:], SamplingParams(max_tokens=8))
        assert engine.prompt_tokens_cached_total >= 3 * 12
    assert [o.token_ids for o in outs] == [alone(model, p, 8) for p in ps]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    model = tiny()
    ps = prompts(6, seed=3)
    sampled = SamplingParams(max_tokens=16, temperature=1.2, top_p=0.9, top_k=40, repetition_penalty=1.05, seed=7)
    with Engine(model, max_batch=4, eos_token_id=2) as engine:
        solo = engine.generate([ps[0]], sampled)[0].token_ids
        others = [SamplingParams(max_tokens=5 + i, temperature=0.8 * (i % 2), seed=i) for i in range(5)]
        mixed = engine.generate(ps[1:3] + [ps[0]] + ps[3:], others[:2] + [sampled] + others[2:])
        unseeded = engine.generate([ps[0]] * 2, SamplingParams(max_tokens=16, temperature=1.2))
    assert mixed[2].token_ids == solo
    assert solo != alone(model, ps[0], 16)  # it really sampled
    assert unseeded[0].token_ids != unseeded[1].token_ids  # no seed: each request draws its own


def test_global_seed_fixes_unseeded_requests():
    model = tiny()
    runs = []
    with Engine(model, eos_token_id=2) as engine:
        for _ in range(2):
            torch.manual_seed(11)
            runs.append([o.token_ids for o in engine.generate(prompts(3), SamplingParams(max_tokens=8, temperature=1.0))])
    assert runs[0] == runs[1]


def test_processors_equal_transformers():
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(0)
    logits, history = torch.randn(4, 6400) * 3, torch.randint(0, 6400, (4, 30))
    settings = [(1.0, 0.0, 0, 1.0), (1.3, 0.7, 50, 0.9), (1.1, 1.5, 0, 0.5), (0.9, 0.6, 7, 1.0)]
    params, seen = [], []
    for penalty, temperature, top_k, top_p in settings:
        params.append(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty))
        mask = torch.zeros(6400, dtype=torch.bool)
        mask[history[len(seen)]] = True
        seen.append(mask)
    ours = process_logits(logits, params, seen)
    for i, (penalty, temperature, top_k, top_p) in enumerate(settings):
        procs = [RepetitionPenaltyLogitsProcessor(penalty)]
        if temperature > 0:
            procs += [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
                     ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        theirs = LogitsProcessorList(procs)(history[i:i + 1], logits[i:i + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(theirs))
        assert torch.allclose(ours[i][~torch.isinf(theirs)], theirs[~torch.isinf(theirs)])
    assert torch.isinf(ours[1]).sum() >= 6400 - 50 and not torch.isinf(ours[0]).any()


def test_text_pieces_join_to_the_decoded_tokens_and_stop_strings_cut():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    model = tiny()
    prompt = tokenizer("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n").input_ids
    with Engine(model, tokenizer, eos_token_id=2) as engine:
        req = engine.submit(prompt, SamplingParams(max_tokens=24))
        pieces = list(req)
        text = tokenizer.decode(req.token_ids, skip_special_tokens=True)
        assert "".join(pieces) == req.text == text and len(pieces) > 1
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = engine.submit(prompt, SamplingParams(max_tokens=24, stop=("never", stop))).wait()
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(req.token_ids)  # generation stopped, not only the text


def test_queue_limit_and_oversized_prompt_are_refused_before_taking_a_place():
    model = Slow(tiny(), delay=0.01)
    with Engine(model, max_batch=1, max_queue=1, max_seq_len=64, eos_token_id=-1) as engine:
        with pytest.raises(PromptTooLong, match="64 tokens"):
            engine.submit([5] * 64)
        running = engine.submit([5] * 8, SamplingParams(max_tokens=50))
        wait_for(lambda: running.token_ids)
        queued = engine.submit([6] * 8, SamplingParams(max_tokens=2))
        with pytest.raises(QueueFull):
            engine.submit([7] * 8)
        assert engine.queue_length == 1 and engine.active == 1
        running.cancel()
        assert queued.wait(30).finish_reason == "length" and running.finish_reason == "cancelled"
        # the context caps max_tokens: 60 prompt tokens leave room for 4
        assert len(engine.submit([5] * 60, SamplingParams(max_tokens=100)).wait().token_ids) == 4


def test_cancel_frees_the_slot_within_one_step():
    model = Slow(tiny(), delay=0.005)
    with Engine(model, max_batch=1, eos_token_id=-1) as engine:
        long = engine.submit([5] * 8, SamplingParams(max_tokens=10_000))
        nxt = engine.submit([6] * 8, SamplingParams(max_tokens=3))
        wait_for(lambda: len(long.token_ids) >= 5)
        calls, produced = model.calls, len(long.token_ids)
        long.cancel()
        nxt.wait(30)
        assert long.finish_reason == "cancelled" and len(long.token_ids) <= produced + 1
        # the forward in flight when cancel() came, then the newcomer's prefill and its 2 decode steps
        assert model.calls - calls <= 4
        waiting = engine.submit([7] * 4, SamplingParams(max_tokens=3))
        waiting.cancel()
        assert waiting.wait(30).finish_reason == "cancelled"


def test_timeout_ends_a_request_and_the_next_one_runs():
    model = Slow(tiny(), delay=0.01)
    with Engine(model, max_batch=1, eos_token_id=-1) as engine:
        slow = engine.submit([5] * 8, SamplingParams(max_tokens=10_000, timeout=0.2))
        queued = engine.submit([6] * 8, SamplingParams(max_tokens=2, timeout=0.05))  # expires in the queue
        later = engine.submit([7] * 8, SamplingParams(max_tokens=2))
        assert slow.wait(30).finish_reason == "timeout" and queued.wait(30).finish_reason == "timeout"
        assert later.wait(30).finish_reason == "length" and not queued.token_ids


def test_a_failing_forward_ends_its_requests_and_the_engine_keeps_serving():
    model = Slow(tiny())
    with Engine(model, eos_token_id=-1) as engine:
        model.fail = "boom"
        bad = engine.submit([5] * 8, SamplingParams(max_tokens=4)).wait(30)
        model.fail = None
        good = engine.submit([5] * 8, SamplingParams(max_tokens=4)).wait(30)
    assert (bad.finish_reason, bad.error) == ("error", "RuntimeError: boom")
    assert good.finish_reason == "length" and len(good.token_ids) == 4


def test_streaming_from_several_threads_never_mixes():
    model = tiny()
    ps = prompts(8, seed=4)
    with Engine(model, max_batch=8, eos_token_id=-1) as engine:
        expected = [o.token_ids for o in engine.generate(ps, SamplingParams(max_tokens=10))]
        got = {}

        def consume(i):
            req = engine.submit(ps[i], SamplingParams(max_tokens=10))
            req.wait()
            got[i] = req.token_ids

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [got[i] for i in range(len(ps))] == expected


def test_metrics_count_tokens_and_latencies():
    with Engine(tiny(), eos_token_id=-1) as engine:
        engine.generate(prompts(3, low=5, high=5), SamplingParams(max_tokens=4))
    assert engine.prompt_tokens_total == 15 and engine.generation_tokens_total == 12
    assert engine.finished == {"length": 3}
    assert engine.ttft.count == sum(engine.ttft.counts) == 3 and engine.itl.count == sum(engine.itl.counts) == 9


def test_offline_generate_raises_what_the_model_raised():
    model = Slow(tiny())
    model.fail = "boom"
    with Engine(model, eos_token_id=-1) as engine:
        with pytest.raises(RuntimeError, match="generation failed: RuntimeError: boom"):
            engine.generate([[5] * 4, [6] * 4], SamplingParams(max_tokens=2))


def test_offline_generate_queues_every_prompt_before_the_loop_admits_one():
    """How generate()'s prompts are batched, and what of them comes from the prefix cache, must not depend on
    thread timing: under bf16 those paths round differently, so seeded RL rollouts (and a resumed run's)
    would sample other tokens. A slow submit loop gives the engine thread every chance to start early."""
    model = Slow(tiny())
    with Engine(model, max_batch=4, eos_token_id=-1) as engine:
        submit = engine.submit
        engine.submit = lambda *a, **k: (submit(*a, **k), time.sleep(0.05))[0]
        reqs = engine.generate([[5, 6, 7, 8]] * 4, SamplingParams(max_tokens=1))
    assert model.calls == 1 and engine.prompt_tokens_cached_total == 0          # one prefill of all four
    assert all(r.finish_reason == "length" for r in reqs)


def test_autocast_dtype_reaches_the_engine_thread():
    """autocast is per thread: the caller's context does not reach the engine's forwards, autocast_dtype does."""
    model, seen = tiny(), []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    with torch.autocast("cpu", dtype=torch.bfloat16), Engine(model, eos_token_id=-1) as engine:
        engine.generate([[5, 6]], SamplingParams(max_tokens=2))
    with Engine(model, eos_token_id=-1, autocast_dtype=torch.bfloat16) as engine:
        engine.generate([[5, 6]], SamplingParams(max_tokens=2))
    assert seen == [None, None, torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("kind", ["dense", "moe", "yarn"])
def test_prompts_that_begin_alike_reuse_cached_keys_and_get_their_single_answer(kind):
    """Chat requests share the template's system part, and a conversation's next turn begins with the last
    prompt and its answer: those tokens come from the prefix cache (counted), the tokens do not change.
    A tail longer than prefill_chunk takes chunked prefill from the cached part on."""
    model = tiny(**CONFIGS[kind])
    rng = random.Random(1)
    system = [rng.randrange(3, 6400) for _ in range(20)]
    tails = prompts(7, low=1, high=12, seed=3) + [[rng.randrange(3, 6400) for _ in range(30)]]
    ps = [system + t for t in tails]
    with Engine(model, max_batch=4, prefill_chunk=16, eos_token_id=2) as engine:
        first = engine.generate(ps[:1], SamplingParams(max_tokens=6))[0]
        assert engine.prompt_tokens_cached_total == 0
        outs = engine.generate(ps[1:], SamplingParams(max_tokens=6))  # several at once, joining mid-flight
        assert engine.prompt_tokens_cached_total >= 7 * len(system)
        before = engine.prompt_tokens_cached_total
        follow = ps[0] + first.token_ids + tails[5]   # the next turn: first prompt, its answer, a new question
        outs += engine.generate([follow], SamplingParams(max_tokens=6))
        assert engine.prompt_tokens_cached_total - before == len(ps[0]) + len(first.token_ids) - 1
        outs += engine.generate([ps[2]], SamplingParams(max_tokens=6))  # asked again: all but its last token
        assert engine.prompt_tokens_cached_total - before == len(ps[0]) + len(first.token_ids) - 1 + len(ps[2]) - 1
        entries = dict(engine.prefix.entries)
    for p, out in zip(ps[1:] + [follow, ps[2]], outs):
        assert out.token_ids == alone(model, p, 6)
    assert len(entries) >= 8
    for ids, layers in entries.items():  # every cached entry holds the keys of exactly its tokens
        for (k, v), (k_ref, v_ref) in zip(layers, keys_alone(model, ids)):
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)


def keys_alone(model, ids):
    """[(K, V) per layer] of the token sequence ids computed alone, each (KV, len, D)."""
    cache = MiniMindCache()
    with torch.inference_mode():
        model(torch.tensor([list(ids)]), past_key_values=cache, use_cache=True)
    return [(k[0, :, :len(ids)], v[0, :, :len(ids)]) for k, v in zip(cache.keys, cache.values)]


def change_weights(model, how):
    with torch.no_grad():
        if how == "in place":          # what an optimizer step does
            for w in model.parameters():
                w.mul_(1.5)
        elif how == "load_state_dict":
            model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
        else:                          # another dtype: new storage
            model.double()


@pytest.mark.parametrize("how", ["in place", "load_state_dict", "dtype"])
def test_prefix_cache_is_forgotten_when_the_weights_change(how):
    """An optimizer step, a reloaded state dict or a cast changes the weights: cached keys are stale."""
    model, p = tiny(), prompts(1, low=30, high=30)[0]
    with Engine(model, eos_token_id=2) as engine:
        engine.generate([p], SamplingParams(max_tokens=4))
        change_weights(model, how)
        out = engine.generate([p], SamplingParams(max_tokens=4))[0]
        assert engine.prompt_tokens_cached_total == 0
    assert out.token_ids == alone(model, p, 4)


def test_keys_computed_before_a_weight_change_are_not_cached_later():
    """A request that was running when the weights changed ends after a newer one cleared the cache: its
    keys (partly old weights) must not be stored for the next prompt that begins like it."""
    model = tiny()
    slow = Slow(model, delay=0.01)
    first = prompts(1, low=30, high=30, seed=5)[0]
    with Engine(slow, eos_token_id=2) as engine:
        running = engine.submit(first, SamplingParams(max_tokens=40))
        wait_for(lambda: len(running.token_ids) >= 2)
        change_weights(model, "in place")
        engine.generate(prompts(1, low=5, high=5, seed=6), SamplingParams(max_tokens=2))  # admitted after it
        running.wait()
        follow = first + running.token_ids[:10]
        before = engine.prompt_tokens_cached_total
        out = engine.generate([follow], SamplingParams(max_tokens=4))[0]
        assert engine.prompt_tokens_cached_total == before
    assert out.token_ids == alone(model, follow, 4)


def test_a_model_made_under_inference_mode_is_served_without_the_prefix_cache():
    """Inference tensors have no version counter, so changes to them cannot be seen: no prefix cache."""
    with torch.inference_mode():
        model = tiny()
    p = prompts(1, low=20, high=20)[0]
    with Engine(model, eos_token_id=-1) as engine:
        reqs = [engine.submit(p, SamplingParams(max_tokens=3)) for _ in range(2)]
        assert all(r.wait(30).done and r.finish_reason == "length" for r in reqs)
        assert reqs[0].token_ids == reqs[1].token_ids and engine.prompt_tokens_cached_total == 0


def test_a_newcomer_that_would_waste_the_cached_beginnings_waits_for_the_next_forward():
    """Prompts with a long cached beginning are not prefilled in one forward with a prompt that has none
    (the batch would recompute every beginning); prompts whose hits differ a little still go together."""
    model = tiny()
    slow = Slow(model)
    rng = random.Random(7)
    shared = [rng.randrange(3, 6400) for _ in range(50)]
    hits = [shared + t for t in prompts(5, low=5, high=8, seed=8)]
    miss = prompts(1, low=12, high=12, seed=9)[0]
    with Engine(slow, max_batch=8, eos_token_id=-1) as engine:
        engine.generate([shared + [5]], SamplingParams(max_tokens=1))
        with engine.cv:  # queue them all before the engine thread looks
            reqs = [engine.submit(p, SamplingParams(max_tokens=1)) for p in hits + [miss]]
        for r in reqs:
            r.wait()
        assert engine.prompt_tokens_cached_total == 5 * 50
    assert [r.token_ids for r in reqs] == [alone(model, p, 1) for p in hits + [miss]]


def test_prefix_cache_keeps_the_longest_entries_within_its_capacity():
    cache = SlotCache(num_layers=1, rows=2, max_len=64)
    keys, values = cache.buffers(0, 64, torch.zeros(1, 1, 1, 2))
    keys.copy_(torch.randn(keys.shape))
    values.copy_(torch.randn(values.shape))
    pc = PrefixCache(capacity=10)
    pc.store([1, 2, 3], cache, 0)
    pc.store([1, 2, 3, 4, 5], cache, 0)   # extends the first: replaces it
    pc.store([1, 2], cache, 0)            # already inside an entry: nothing new
    assert list(pc.entries) == [(1, 2, 3, 4, 5)] and pc.tokens == 5
    assert pc.lookup([1, 2, 3, 9]) == (3, (1, 2, 3, 4, 5)) and pc.lookup([7, 1]) == (0, None)
    pc.store([1, 2, 7, 7], cache, 1)
    assert pc.lookup([1, 2, 7, 1]) == (3, (1, 2, 7, 7)) and pc.lookup([1, 2]) == (2, (1, 2, 3, 4, 5))
    pc.store([9, 9, 9], cache, 0)         # 12 tokens > 10: the least recently used entry goes
    assert list(pc.entries) == [(1, 2, 7, 7), (9, 9, 9)] and pc.keys == sorted(pc.entries) and pc.tokens == 7
    assert torch.equal(pc.entries[(1, 2, 7, 7)][0][0], keys[1, :, :4])
    pc.copy_into((1, 2, 7, 7), 3, cache, 0)
    assert torch.equal(keys[0, :, :3], keys[1, :, :3]) and torch.equal(values[0, :, :3], values[1, :, :3])
    assert list(pc.entries)[-1] == (1, 2, 7, 7)   # used last


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_every_cached_entry_holds_the_keys_of_exactly_its_tokens(kind):
    """Prompts prefilled together in one padded forward (on top of a cached beginning), a fifth request that
    begins with one of them and starts while it still runs (from the entry stored at its prefill), answers
    stored as slots free up in another order: each entry equals the keys of its tokens computed alone."""
    model = tiny(**CONFIGS[kind])
    rng = random.Random(3)
    system = [rng.randrange(3, 6400) for _ in range(10)]
    ps = [system + t for t in prompts(4, low=2, high=9, seed=11)]
    follow = ps[3] + [9, 9]
    with Engine(model, max_batch=4, eos_token_id=-1) as engine:
        engine.generate([system + [7]], SamplingParams(max_tokens=1))
        with engine.cv:  # all queued before the engine thread looks: the first four in one prefill forward
            reqs = [engine.submit(p, SamplingParams(max_tokens=2 + 5 * i)) for i, p in enumerate(ps)]
            reqs.append(engine.submit(follow, SamplingParams(max_tokens=3)))
        for r in reqs:
            r.wait()
        assert engine.prompt_tokens_cached_total == 4 * len(system) + len(ps[3])
        entries = dict(engine.prefix.entries)
    assert tuple(follow + reqs[4].token_ids[:2]) in entries and len(entries) == 6
    for ids, layers in entries.items():
        for (k, v), (k_ref, v_ref) in zip(layers, keys_alone(model, ids)):
            torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)


class Gated(torch.nn.Module):
    """Wraps a model: records each forward's input shape; the first forward waits until `release` is set
    (after setting `entered`), so requests can arrive while a prefill is in progress."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.shapes = model, model.config, []
        self.entered, self.release = threading.Event(), threading.Event()

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, **kwargs):
        self.shapes.append(tuple(input_ids.shape))
        if len(self.shapes) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self.inner(input_ids, **kwargs)


@pytest.mark.parametrize("shared", [0, 12], ids=["distinct", "shared-beginning"])
def test_requests_arriving_during_a_prefill_are_all_prefilled_in_the_next_forward(shared):
    """14 requests submitted while the first one's prefill runs join the next forward together (one padded
    prefill of all 14, not one per step), also when their beginning comes from the prefix cache (a chat
    template's system prompt), and each still gets its single answer."""
    model = tiny()
    head = prompts(1, shared, shared, seed=3)[0] if shared else []
    first, *rest = [head + p for p in prompts(15, 3, 8, seed=4)]
    gated = Gated(model)
    with Engine(gated, max_batch=16) as engine:
        req0 = engine.submit(first, SamplingParams(max_tokens=6))
        assert gated.entered.wait(30)
        reqs = [engine.submit(p, SamplingParams(max_tokens=6)) for p in rest]
        gated.release.set()
        for r in [req0] + reqs:
            r.wait(60)
    assert gated.shapes[1][0] == len(rest), gated.shapes[:4]  # forward 2, before any decode: every newcomer
    assert all(shape[1] == 1 for shape in gated.shapes[2:]), gated.shapes  # then only decode steps
    for p, r in zip([first] + rest, [req0] + reqs):
        assert r.token_ids == alone(model, p, 6)
