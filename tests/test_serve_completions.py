"""POST /v1/completions of scripts/serve_openai_api.py, run for real on 127.0.0.1: string and token-id prompts give
the same answer; the log-probs are the model's raw ones (a local forward pass's log-softmax at the sampled tokens,
fp32, within 1e-4) with its top-k; n choices and batched prompts in OpenAI's order, choice j seeded as seed + j;
stop strings, special tokens kept on request, streaming; bad fields are 400s naming the field; the API key."""
import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scripts.serve_openai_api import create_app  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_serve import OwnRowModel, ScriptedModel, metric_value, serving, tokenizer  # noqa: E402,F401


@pytest.fixture(scope="module")
def tiny_served(tokenizer):
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).eval()
    with serving(create_app(model, tokenizer, prefix_cache=0, max_seq_len=256)) as url:
        yield model, url


def post(url, body, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/completions", json=body, headers=headers, timeout=60, **kw)


def test_token_id_and_string_prompts_with_raw_logprobs(tiny_served, tokenizer):
    model, url = tiny_served
    prompt = tokenizer("你好，介绍一下你自己").input_ids
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.9, "top_k": 20, "seed": 11, "logprobs": 3,
            "return_tokens_as_token_ids": True, "return_token_ids": True}
    r = post(url, body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "text_completion" and reply["model"] == "minimind" and len(reply["choices"]) == 1
    choice = reply["choices"][0]
    ids = choice["token_ids"]
    assert choice["prompt_token_ids"] == prompt and len(ids) == 6 and choice["finish_reason"] == "length"
    assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids] and len(lp["token_logprobs"]) == len(lp["text_offset"]) == 6
    with torch.no_grad():   # the raw distribution: log-softmax of the logits, before temperature and top-k
        local = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float(), -1)
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), local.gather(1, torch.tensor(ids)[:, None])[:, 0],
                          atol=1e-4)
    for t, top in enumerate(lp["top_logprobs"]):
        values, indices = local[t].topk(3)
        assert {f"token_id:{i}" for i in indices.tolist()} <= set(top) and f"token_id:{ids[t]}" in top
        assert all(abs(top[f"token_id:{i}"] - v) < 1e-4 for i, v in zip(indices.tolist(), values.tolist()))
    # the same prompt as text: tokenized as it is, the same seeded answer; tokens spelled as text by default
    text = post(url, {**body, "prompt": "你好，介绍一下你自己", "return_tokens_as_token_ids": False}).json()["choices"][0]
    assert text["token_ids"] == ids and text["text"] == choice["text"]
    assert text["logprobs"]["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert text["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    # greedy: the argmax chain, each token the top-1 of its position
    greedy = post(url, {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1}).json()["choices"][0]
    assert all(max(top.values()) == v for top, v in zip(greedy["logprobs"]["top_logprobs"],
                                                        greedy["logprobs"]["token_logprobs"]))


def test_n_choices_and_batched_prompts_are_seeded_per_choice(tokenizer):
    """Choice i*n + j answers prompt i with seed + j: exactly what a single request with that seed samples (a model
    whose logits are batch-invariant, so batching cannot move a draw)."""
    with serving(create_app(OwnRowModel(tokenizer), tokenizer, prefix_cache=0)) as url:
        prompts = [tokenizer("天空").input_ids, "为什么是蓝色的"]
        reply = post(url, {"prompt": prompts, "n": 3, "seed": 5, "max_tokens": 8, "return_token_ids": True}).json()
        assert [c["index"] for c in reply["choices"]] == list(range(6))
        for i, prompt in enumerate(prompts):
            for j in range(3):
                alone = post(url, {"prompt": prompt, "seed": 5 + j, "max_tokens": 8, "return_token_ids": True})
                assert reply["choices"][i * 3 + j]["token_ids"] == alone.json()["choices"][0]["token_ids"]
        assert len({tuple(c["token_ids"]) for c in reply["choices"]}) == 6
        assert reply["usage"]["prompt_tokens"] == len(prompts[0]) + len(tokenizer(prompts[1]).input_ids)


def test_stop_special_tokens_and_stream(tokenizer):
    model = ScriptedModel(tokenizer, "好的<|im_start|>再见。结束")
    with serving(create_app(model, tokenizer, prefix_cache=0)) as url:
        body = {"prompt": "hi", "max_tokens": 50, "n": 2}
        whole = post(url, body).json()
        assert [c["text"] for c in whole["choices"]] == ["好的再见。结束"] * 2          # special tokens skipped
        assert [c["finish_reason"] for c in whole["choices"]] == ["stop"] * 2
        raw = post(url, {**body, "skip_special_tokens": False, "stop": ["。"], "return_token_ids": True}).json()
        choice = raw["choices"][0]
        assert choice["text"] == "好的<|im_start|>再见" and choice["finish_reason"] == "stop"
        eos = post(url, {**body, "return_token_ids": True}).json()["choices"][0]["token_ids"]
        assert eos[-1] == tokenizer.eos_token_id and eos[:-1] == tokenizer("好的<|im_start|>再见。结束").input_ids
        short = post(url, {"prompt": "hi", "max_tokens": 2}).json()["choices"][0]
        assert short["finish_reason"] == "length"
        with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, finished = ["", ""], [None, None]
    for c in chunks[:-1]:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["text"]
            finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert texts == ["好的再见。结束"] * 2 and finished == ["stop", "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


BAD = [({"max_tokens": 4}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [1, -1]}, "prompt"),
       ({"prompt": [1, 6400]}, "prompt"), ({"prompt": [1, True]}, "prompt"), ({"prompt": [[1], 2]}, "prompt"),
       ({"prompt": ""}, "prompt"), ({"prompt": "x" * 5000}, "prompt"), ({"prompt": [1] * 300}, "prompt"),
       ({"prompt": "hi", "max_tokens": 0}, "max_tokens"), ({"prompt": "hi", "max_tokens": 300}, "max_tokens"),
       ({"prompt": "hi", "temperature": -1}, "temperature"), ({"prompt": "hi", "top_p": 0}, "top_p"),
       ({"prompt": "hi", "top_k": -2}, "top_k"), ({"prompt": "hi", "n": 0}, "n"), ({"prompt": "hi", "n": 1.5}, "n"),
       ({"prompt": "hi", "n": 90}, "n"), ({"prompt": "hi", "best_of": 3}, "best_of"),
       ({"prompt": "hi", "logprobs": True}, "logprobs"), ({"prompt": "hi", "logprobs": 21}, "logprobs"),
       ({"prompt": "hi", "stream": True, "logprobs": 1}, "logprobs"), ({"prompt": "hi", "stop": [1]}, "stop"),
       ({"prompt": "hi", "seed": "1"}, "seed"), ({"prompt": "hi", "echo": True}, "echo"),
       ({"prompt": "hi", "suffix": "x"}, "suffix"), ({"prompt": "hi", "stream": "yes"}, "stream"),
       ({"prompt": "hi", "return_token_ids": 1}, "return_token_ids"), ({"prompt": "hi", "model": 3}, "model"),
       ({"prompt": "hi", "stream_options": []}, "stream_options"), ({"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias")]


def test_bad_fields_are_400s_naming_the_field_and_the_key_is_enforced(tokenizer):
    with serving(create_app(ScriptedModel(tokenizer, "ok"), tokenizer, prefix_cache=0, max_seq_len=256)) as url:
        for body, param in BAD:
            r = post(url, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        r = httpx.post(f"{url}/completions", content=b"[1, 2", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        metrics = httpx.get(f"{url[:-3]}/metrics").text
        assert metric_value(metrics, 'minimind_http_responses_total{path="/v1/completions",status="400"}') == len(BAD) + 1
    with serving(create_app(ScriptedModel(tokenizer, "ok"), tokenizer, prefix_cache=0, api_key="sk-test")) as url:
        for key in (None, "sk-wrong"):
            r = post(url, {"prompt": "hi"}, key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(url, {"prompt": "hi"}, "sk-test").json()["choices"][0]["text"] == "ok"
