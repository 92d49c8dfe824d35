"""Thinking, the tool loop and weight reloads through the serving entry points (issue 33 items 2, 7 and 4's reload):
OutputParser starting inside an open think block (every split of a text), the prompts of both families' templates
with open_thinking, the server's open_thinking / chat_template_kwargs, the OpenAI tool loop driven with the openai
SDK (a scripted model emits the `<tool_call>`), the 400s for bad tool fields, POST /v1/reload and SGLang's
/update_weights_from_disk (key, bad paths, in-flight answers), and the --open_thinking flags of eval_llm.py and
chat_openai_api.py. Everything runs against a real uvicorn on 127.0.0.1."""
import asyncio
import functools
import io
import json
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from model.chat_format import OutputParser, build_prompt, opens_think, parse_output  # noqa: E402
from model.loading import FAMILY_TOKENIZER_DIR, load_native, load_tokenizer  # noqa: E402
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from model.weights import save_weights, weight_path  # noqa: E402
from scripts.serve_openai_api import create_app  # noqa: E402
from tests.test_serve import USER, ScriptedModel, client, greedy, serving  # noqa: E402

MM3 = FAMILY_TOKENIZER_DIR["minimind3"]
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "the current weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
CALL = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "北京"}}\n</tool_call>'
THOUGHT = "用户想知道天气。\n</think>\n\n"
OPEN, CLOSED = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@functools.lru_cache
def tokenizers():
    return {"minimind2": load_tokenizer(FAMILY_TOKENIZER_DIR["minimind2"]), "minimind3": load_tokenizer(MM3)}


def tiny_mm3(seed: int) -> MiniMindForCausalLM:
    """A tiny minimind-3 model that says something visible: at its own initialisation a random one repeats the
    prompt's last token ("\n") through the tied embeddings, so its matrices are redrawn larger."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["minimind2", "minimind3"])
def scripted(request):
    """(ScriptedModel, /v1 URL, tokenizer, family): a server whose 'model' writes model.text."""
    tokenizer = tokenizers()[request.param]
    model = ScriptedModel(tokenizer)
    with serving(create_app(model, tokenizer, prefix_cache=0, max_seq_len=2048)) as url:
        yield model, url, tokenizer, request.param


@pytest.fixture(scope="module")
def mm3_scripted():
    tokenizer = tokenizers()["minimind3"]
    model = ScriptedModel(tokenizer)
    with serving(create_app(model, tokenizer, prefix_cache=0, max_seq_len=2048)) as url:
        yield model, url


def split(events):
    return ("".join(t for k, t in events if k == "reasoning"), "".join(t for k, t in events if k == "content"),
            [t for k, t in events if k == "tool_call"])


# ---- OutputParser(thinking=True): the answer starts inside the think block the prompt opened ----
@pytest.mark.parametrize("text, tools, expected", [
    ("先想想。\n</think>\n\n答案。", False, ("先想想。", "答案。", [])),
    ("<think>\nR\n</think>\n\nA", False, ("R", "A", [])),                  # a <think> generated anyway is dropped
    ("\n\n还在想，没想完", False, ("还在想，没想完", "", [])),                  # no </think>: all reasoning
    ("\n</think>\n\n\n答案", False, ("", "答案", [])),                       # empty reasoning, newlines stripped
    ("<thinking aloud</think>x", False, ("<thinking aloud", "x", [])),      # looks like <think> for 6 characters
    ("R\n</think>\n<answer>\nA\n</answer>", False, ("R", "A", [])),
    (THOUGHT + CALL, True, ("用户想知道天气。", "", [{"name": "get_current_weather",
                                                  "arguments": {"location": "北京"}}])),
    (THOUGHT + CALL, False, ("用户想知道天气。", CALL, [])),
])
def test_starting_in_think_gives_the_same_split_for_every_split_of_the_text(text, tools, expected):
    assert tuple(parse_output(text, tools, thinking=True).values()) == expected
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    cuts += [[text[i:i + n] for i in range(0, len(text), n)] for n in (1, 2, 3, 5)]
    for pieces in cuts:
        parser, events = OutputParser(tools, thinking=True), []
        for piece in pieces:
            events += parser.feed(piece)
        assert split(events + parser.finish()) == expected, pieces


def test_without_thinking_the_parser_is_unchanged():
    text = "先想想。\n</think>\n\n答案。"
    assert tuple(parse_output(text).values()) == ("", text, [])
    assert tuple(parse_output("<think>R</think>A").values()) == ("R", "A", [])


def test_prompts_of_both_templates_with_open_thinking():
    """minimind-3: open_thinking opens the think block (else an empty closed one); MiniMind2's template (the
    original fa82707's) has no switch that opens one, so its prompt is the same either way."""
    mm2, mm3 = tokenizers()["minimind2"], tokenizers()["minimind3"]
    q = [{"role": "user", "content": "你好"}]
    on, off = build_prompt(mm3, q, open_thinking=True), build_prompt(mm3, q)
    assert on == "<|im_start|>user\n你好<|im_end|>\n" + OPEN and off == "<|im_start|>user\n你好<|im_end|>\n" + CLOSED
    assert on == mm3.apply_chat_template(q, tokenize=False, add_generation_prompt=True, open_thinking=True)
    assert opens_think(on) and not opens_think(off)
    assert build_prompt(mm2, q, open_thinking=True) == build_prompt(mm2, q) == mm2.apply_chat_template(
        q, tokenize=False, add_generation_prompt=True)
    assert build_prompt(mm2, q).endswith("<|im_start|>assistant\n") and not opens_think(build_prompt(mm2, q))


# ---- the server: open_thinking and chat_template_kwargs ----
def ask(url, stream, **kw):
    """(reasoning, content, tool_calls [(name, arguments dict)], finish_reason, the message) of one answer."""
    r = client(url).chat.completions.create(model="minimind", stream=stream, **kw)
    if not stream:
        m = r.choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in m.message.tool_calls or []]
        return (m.message.model_extra.get("reasoning_content") or "", m.message.content or "", calls,
                m.finish_reason, m.message)
    chunks = list(r)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    first = next((i for i, d in enumerate(deltas) if d.content), len(deltas))
    assert not any((d.model_extra or {}).get("reasoning_content") for d in deltas[first:])  # reasoning, then content
    calls = [(t.function.name, json.loads(t.function.arguments)) for d in deltas for t in d.tool_calls or []]
    return reasoning, content, calls, chunks[-1].choices[0].finish_reason, None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("switch, on", [
    ({"open_thinking": True}, True),
    ({"chat_template_kwargs": {"open_thinking": True}}, True),            # the original's chat_api.py
    ({"chat_template_kwargs": {"enable_thinking": True}}, True),          # Qwen3-style clients
    ({"open_thinking": False, "chat_template_kwargs": {"enable_thinking": False}}, False),
    ({}, False),
])
def test_open_thinking_renders_the_switch_and_splits_reasoning(mm3_scripted, stream, switch, on):
    model, url = mm3_scripted
    model.text, model.fail_after = "先想一想。\n</think>\n\n天空是蓝色的。", None
    reasoning, content, _, finish, _ = ask(url, stream, messages=[{"role": "user", "content": "天空"}],
                                           extra_body=switch)
    assert model.prompts[-1].endswith(OPEN if on else CLOSED), model.prompts[-1][-40:]
    if on:
        assert (reasoning, content, finish) == ("先想一想。", "天空是蓝色的。", "stop")
    else:  # the prompt closed the think block: everything the model writes is content, as the original's server
        assert (reasoning, content) == ("", "先想一想。\n</think>\n\n天空是蓝色的。")


def test_open_thinking_with_a_real_minimind3_model_equals_greedy_split():
    tokenizer, model = tokenizers()["minimind3"], tiny_mm3(0)
    messages = [{"role": "user", "content": "为什么天空是蓝色的"}]
    ids = tokenizer(build_prompt(tokenizer, messages, open_thinking=True), return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    expected = parse_output(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), thinking=True)
    assert expected["reasoning"] and not expected["content"]  # no </think> in 12 random tokens: all reasoning
    with serving(create_app(model, tokenizer)) as url:
        for stream in (False, True):
            reasoning, content, *_ = ask(url, stream, messages=messages, temperature=0, max_tokens=12,
                                         extra_body={"chat_template_kwargs": {"open_thinking": True}})
            assert (reasoning, content) == (expected["reasoning"], expected["content"])


# ---- the tool loop ----
@pytest.mark.parametrize("stream", [False, True])
def test_tool_loop_with_the_openai_sdk(scripted, stream):
    """tools -> tool_calls (finish_reason tool_calls, ids, string arguments) -> the assistant message and a tool
    message sent back -> the final answer; the second prompt renders the call raw and the result as <tool_response>."""
    model, url, tokenizer, family = scripted
    model.text, model.fail_after = CALL, None
    messages = [{"role": "user", "content": "北京天气怎么样？"}]
    r = client(url).chat.completions.create(model="minimind", messages=messages, tools=[WEATHER], stream=stream)
    if stream:
        chunks = list(r)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [t for d in deltas for t in d.tool_calls or []]
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and [t.index for t in calls] == [0]
        content = "".join(d.content or "" for d in deltas)
    else:
        choice = r.choices[0]
        calls, content = choice.message.tool_calls, choice.message.content
        assert choice.finish_reason == "tool_calls"
    assert not content and "# Tools" in model.prompts[-1] and '"name": "get_current_weather"' in model.prompts[-1]
    call = calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_current_weather"
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {"location": "北京"}
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]}
    result = json.dumps({"location": "北京", "weather": "晴", "temperature": "22°C"}, ensure_ascii=False)
    follow = messages + [assistant, {"role": "tool", "tool_call_id": call.id, "content": result}]
    model.text = "北京今天晴，22°C。"
    reasoning, content, calls2, finish, _ = ask(url, stream, messages=follow, tools=[WEATHER])
    assert (content, calls2, finish) == ("北京今天晴，22°C。", [], "stop")
    prompt = model.prompts[-1]
    rendered_call = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "北京"}}\n</tool_call>'
    response = f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n"
    assert rendered_call + "<|im_end|>\n" + response in prompt, prompt
    assert prompt.endswith(response + (CLOSED if family == "minimind3" else "<|im_start|>assistant\n"))
    expected = build_prompt(tokenizer, follow, tools=[WEATHER])
    assert prompt == expected


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_then_a_tool_call(mm3_scripted, stream):
    model, url = mm3_scripted
    model.text, model.fail_after = THOUGHT + CALL, None
    reasoning, content, calls, finish, message = ask(url, stream, messages=[{"role": "user", "content": "北京天气"}],
                                                     tools=[WEATHER], extra_body={"open_thinking": True})
    assert (reasoning, content, finish) == ("用户想知道天气。", "", "tool_calls")
    assert calls == [("get_current_weather", {"location": "北京"})]
    if message is not None:  # sent back as the SDK gives it: minimind-3's template renders its reasoning
        follow = [{"role": "user", "content": "北京天气"}, message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "晴"}]
        model.text = "晴。"
        assert ask(url, False, messages=follow, tools=[WEATHER])[1] == "晴。"
        assert "<|im_start|>assistant\n<think>\n用户想知道天气。\n</think>\n\n<tool_call>" in model.prompts[-1]


BAD = [
    ({"tools": [{"type": "function", "function": {"name": 7}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": {"function": {"name": "f"}}}]}, "messages[1].tool_calls"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"id": 5, "function": {"name": "f"}}]}]},
     "messages[1].tool_calls"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}]},
     "messages[1].tool_calls"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "c1", "content": None}]}, "messages[1].content"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "c1", "content": {"temp": 22}}]}, "messages[1].content"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": 42, "content": "晴"}]}, "messages[1].tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "content": "A", "reasoning_content": 3}]},
     "messages[1].reasoning_content"),
    ({"open_thinking": "yes"}, "open_thinking"),
    ({"chat_template_kwargs": "open_thinking"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"enable_thinking": "false"}}, "chat_template_kwargs.enable_thinking"),
]


def test_bad_tool_and_thinking_fields_are_400s_naming_the_field(mm3_scripted):
    model, url = mm3_scripted
    model.text, model.fail_after = "好的", None
    with httpx.Client(base_url=url, timeout=30) as http:
        for body, param in BAD:
            for stream in (False, True):
                r = http.post("/chat/completions", json={"messages": USER, "stream": stream} | body)
                assert r.status_code == 400, (body, r.text)
                error = r.json()["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
        ok = http.post("/chat/completions", json={"messages": USER + [
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "1"}]})  # object arguments and a tool message without an id render too
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "好的"


# ---- POST /v1/reload and /update_weights_from_disk ----
def until(check, timeout=10.0):
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def answer(url, key, messages=USER):
    return client(url, key).chat.completions.create(model="minimind", messages=messages, temperature=0,
                                                    max_tokens=8).choices[0].message.content


def test_reload_ends_the_loading_threads_openmp_pool(monkeypatch):
    """The reload loads in a worker thread that lives on: its OpenMP pool would sit beside the engine's (two pools
    made libgomp treat 2 cores as oversubscribed: model/openmp.py), so that thread ends it after loading."""
    import scripts.serve_openai_api as server
    tokenizer = tokenizers()["minimind3"]
    events = []
    monkeypatch.setattr(server, "release_thread_pool", lambda: events.append(("release", threading.get_ident())))

    def loader(path):
        events.append(("load", threading.get_ident()))
        return tiny_mm3(1), tokenizer, "tiny"
    with serving(create_app(tiny_mm3(0), tokenizer, loader=loader)) as url:
        r = httpx.post(url.removesuffix("/v1") + "/v1/reload", json={"model_path": "x.pth"}, timeout=60)
    assert r.status_code == 200, r.text
    loads = [e for e in events if e[0] == "load"]
    assert len(loads) == 1 and ("release", loads[0][1]) in events[events.index(loads[0]):]


def test_reload_swaps_the_weights_behind_the_key_and_bad_paths_keep_the_old_model(tmp_path):
    tokenizer = tokenizers()["minimind3"]
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2)
    a = save_weights(tiny_mm3(0), weight_path(tmp_path / "a", "full_sft", cfg), cfg)
    b = save_weights(tiny_mm3(1), weight_path(tmp_path / "b", "full_sft", cfg), cfg)
    folder = tmp_path / "c"
    tiny_mm3(2).save_pretrained(folder)   # a transformers folder, as the original's rollout engine writes for SGLang
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b.read_bytes()[:-200])
    mm2 = tmp_path / "mm2.pth"
    torch.manual_seed(0)
    mm2_cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2)
    save_weights(MiniMindForCausalLM(mm2_cfg), mm2, mm2_cfg)
    with serving(create_app(load_native(a), tokenizer, api_key="sk-test")) as url:
        base = url.removesuffix("/v1")
        first = answer(url, "sk-test")
        assert first

        def reload(path, key="sk-test", route="/v1/reload", **extra):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.post(base + route, json={"model_path": str(path)} | extra, headers=headers, timeout=60)

        for key in (None, "sk-wrong"):
            r = reload(b, key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for path, says in ((tmp_path / "missing.pth", "no such file"), (corrupt, "corrupt"),
                           (tmp_path, "not a .pth weight file"), (mm2, "minimind")):
            r = reload(path)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model_path", r.text
            message = r.json()["error"]["message"]
            assert "\n" not in message and says in message and "not reloaded" in message, message
        for body in ({}, {"model_path": 3}, {"model_path": str(b), "abort_all_requests": "no"}):
            r = httpx.post(base + "/v1/reload", json=body, headers={"Authorization": "Bearer sk-test"})
            assert r.status_code == 400, r.text
        assert answer(url, "sk-test") == first  # still model A
        r = reload(b, route="/update_weights_from_disk")  # SGLang's name, as the original's rollout engine calls it
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        second = answer(url, "sk-test")
        assert reload(folder).status_code == 200
        third = answer(url, "sk-test")
        r = reload(a)
        assert r.status_code == 200 and answer(url, "sk-test") == first
        metrics = httpx.get(base + "/metrics", headers={"Authorization": "Bearer sk-test"}).text
    expected = [greedy(load_native(path), tokenizer, USER, 8)[0] for path in (a, b)] + [
        greedy(tiny_mm3(2), tokenizer, USER, 8)[0]]
    assert [first, second, third] == expected and len(set(expected)) == 3
    assert 'path="/v1/reload",status="401"' in metrics and 'path="/update_weights_from_disk",status="200"' in metrics


def test_reload_lets_running_answers_finish_or_aborts_them():
    """Running answers finish with the old weights before the swap (the reload returns after them); a request that
    arrives meanwhile waits and gets the new weights; abort_all_requests ends running answers at once."""
    tokenizer = tokenizers()["minimind2"]
    old, new = ScriptedModel(tokenizer, "旧" * 30), ScriptedModel(tokenizer, "新的回答")
    old.delay = 0.03
    guard = create_app(old, tokenizer, prefix_cache=0, loader=lambda path: (new, tokenizer, f"scripted {path}"))
    with serving(guard) as url:
        base = url.removesuffix("/v1")

        def stream_text(out):
            with httpx.stream("POST", f"{url}/chat/completions", json={"messages": USER, "stream": True},
                              timeout=30) as r:
                lines = [line for line in r.iter_lines() if line]
            out["done_at"], out["events"] = time.time(), lines

        out = {}
        streamer = threading.Thread(target=stream_text, args=(out,))
        streamer.start()
        until(lambda: guard.engine.active)
        reply = {}
        reloader = threading.Thread(target=lambda: reply.update(r=httpx.post(
            base + "/v1/reload", json={"model_path": "new"}, timeout=30), at=time.time()))
        reloader.start()
        until(lambda: guard.engine.paused)
        waiting = httpx.post(f"{url}/chat/completions", json={"messages": USER}, timeout=30)  # queued until the swap
        streamer.join()
        reloader.join()
        assert reply["r"].status_code == 200 and reply["r"].json()["message"].startswith("reloaded scripted new")
        events = [json.loads(e[6:]) for e in out["events"] if e != "data: [DONE]"]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "旧" * 30
        assert events[-1]["choices"][0]["finish_reason"] == "stop" and out["done_at"] <= reply["at"]
        assert waiting.json()["choices"][0]["message"]["content"] == "新的回答"
        # abort_all_requests: the running stream ends with an error event and [DONE]
        new.text, new.delay = "慢" * 200, 0.03
        out = {}
        streamer = threading.Thread(target=stream_text, args=(out,))
        streamer.start()
        until(lambda: guard.engine.active)
        start = time.time()
        r = httpx.post(base + "/update_weights_from_disk", json={"model_path": "again", "abort_all_requests": True},
                       timeout=30)
        streamer.join()
        assert r.status_code == 200 and time.time() - start < 3  # not the 6 s the answer would take
        assert json.loads(out["events"][-2][6:])["error"]["type"] == "server_error"
        assert out["events"][-1] == "data: [DONE]"


def test_swap_model_refits_waiting_requests_to_the_new_context():
    """Requests that waited through a swap run on the new model; one whose prompt no longer fits its context ends as
    "error" (the server answers it with a 500 naming the reload), the others get at most the room left."""
    from model.engine import Engine, SamplingParams
    tokenizer = tokenizers()["minimind2"]
    old, new = ScriptedModel(tokenizer, "旧"), ScriptedModel(tokenizer, "新" * 40)
    new.config.max_position_embeddings = 24
    with Engine(old, tokenizer, prefix_cache=0) as engine:
        engine.paused = True  # as during a drain: nobody is admitted
        long = engine.submit(list(range(10, 40)), SamplingParams(max_tokens=8))
        short = engine.submit(list(range(10, 20)), SamplingParams(max_tokens=50, temperature=0))
        engine.swap_model(new)
        assert long.wait(10).finish_reason == "error" and "reloaded model's context is 24" in long.error
        assert short.wait(10).finish_reason == "length" and len(short.token_ids) == 14 and engine.max_seq_len == 24
        assert not engine.paused and new.prompts and not old.prompts


def test_reload_without_a_key_is_for_clients_on_this_machine_only():
    tokenizer = tokenizers()["minimind2"]
    new = ScriptedModel(tokenizer, "新")
    guard = create_app(ScriptedModel(tokenizer, "旧"), tokenizer, prefix_cache=0,
                       loader=lambda path: (new, tokenizer, path))

    async def post(client_ip):
        transport = httpx.ASGITransport(app=guard, client=(client_ip, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8998") as http:
            return await http.post("/v1/reload", json={"model_path": "x"})

    r = asyncio.run(post("192.168.1.20"))
    assert r.status_code == 403 and "--api_key" in r.json()["error"]["message"]
    assert asyncio.run(post("127.0.0.1")).status_code == 200
    guard.engine.close()


# ---- the clients' flags ----
def test_chat_client_open_thinking_sends_chat_template_kwargs(mm3_scripted, monkeypatch, capsys):
    from scripts import chat_openai_api
    model, url = mm3_scripted
    model.text, model.fail_after = "先想想。\n</think>\n\n你好！", None
    for flag, prompt_end, line in (("1", OPEN, "[think] 先想想。 [/think] 你好！"),
                                   ("0", CLOSED, "先想想。\\n</think>\\n\\n你好！")):
        monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
        chat_openai_api.main(["--base_url", url, "--open_thinking", flag, "--temperature", "0"])
        assert capsys.readouterr().out.splitlines() == [line] and model.prompts[-1].endswith(prompt_end)
    assert chat_openai_api.build_parser().parse_args([]).open_thinking == 0


def test_eval_llm_open_thinking_flag(monkeypatch, capsys):
    import eval_llm
    from model import engine
    tokenizer = tokenizers()["minimind3"]
    model = ScriptedModel(tokenizer, "先想想。\n</think>\n\n你好！")
    monkeypatch.setattr(eval_llm, "load_model", lambda args: (model, tokenizer, "scripted"))
    monkeypatch.setattr(eval_llm, "Engine", functools.partial(engine.Engine, prefix_cache=0))  # see ScriptedModel
    assert eval_llm.build_parser().parse_args([]).open_thinking == 0  # the original's default
    for flag, prompt_end, line in (("1", OPEN, "[think] 先想想。 [/think] 你好！"),
                                   ("0", CLOSED, "先想想。\\n</think>\\n\\n你好！")):
        monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
        eval_llm.main(["--open_thinking", flag, "--temperature", "0", "--device", "cpu"])
        assert capsys.readouterr().out.splitlines() == [line] and model.prompts[-1].endswith(prompt_end)
