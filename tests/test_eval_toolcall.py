"""scripts/eval_toolcall.py: the local backend end to end with a tiny random minimind-3 model, the tool loop with a
scripted model (the tool runs, its observation goes back into the prompt, the case is scored), and the api backend
against a fake OpenAI-compatible server on 127.0.0.1, streamed and not."""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from model.cli import cli
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.weights import save_weights, weight_path
from scripts import eval_toolcall

TOOL_CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256*37"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    """A random minimind-3 model (hidden 64, 2 layers) saved as out/full_sft_64.pth with its .json."""
    out = tmp_path_factory.mktemp("toolcall") / "out"
    torch.manual_seed(0)
    cfg = MiniMindConfig(model_family="minimind3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    save_weights(MiniMindForCausalLM(cfg), weight_path(out, "full_sft", cfg), cfg)
    return out


def local_flags(out, *extra):
    return ["--device", "cpu", "--save_dir", str(out), "--mode", "0", "--seed", "1", *extra]


def test_local_backend_runs_every_case(tiny_out, capsys):
    result = eval_toolcall.main(local_flags(tiny_out, "--max_new_tokens", "6", "--max_rounds", "2"))
    out = capsys.readouterr().out
    assert result["count"] == 8 and len(result["cases"]) == 8
    assert [c["prompt"] for c in result["cases"]] == [c["prompt"] for c in eval_toolcall.TEST_CASES]
    assert all(0 <= c["score"] <= 1 for c in result["cases"])
    assert out.count("[score] ") == 8 and out.count("💬: ") == 8 and "📦 可用工具: ['calculate_math', 'get_current_time']" in out
    assert f"total: {result['total']:.2f}/8" in out and "| 8 | What is the weather in Tokyo?" in out


def test_scripted_model_calls_a_tool_and_is_scored(tiny_out, monkeypatch, capsys):
    """generate_local replaced by a script: a tool call first, then an answer that uses the observation."""
    prompts = []

    def scripted(engine, tokenizer, messages, tools, args, seed):
        prompts.append(eval_toolcall.render(tokenizer, messages, tools))
        if messages[-1]["role"] == "user":
            return TOOL_CALL
        observation = json.loads(messages[-1]["content"])
        return f"256 乘以 37 等于 {observation.get('result', '?')}。"

    monkeypatch.setattr(eval_toolcall, "generate_local", scripted)
    result = eval_toolcall.main(local_flags(tiny_out))
    out = capsys.readouterr().out
    first = result["cases"][0]
    assert first["calls"][0]["name"] == "calculate_math" and first["calls"][0]["observation"] == '{"result": "9472"}'
    assert first["final"] == "256 乘以 37 等于 9472。"
    assert (first["tools"], first["answer"], first["score"]) == (1.0, 1.0, 1.0)
    # the observation went back through the template, after the call, as minimind-3's <tool_response>
    assert TOOL_CALL in prompts[1] and '<tool_response>\n{"result": "9472"}\n</tool_response>' in prompts[1]
    assert prompts[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")   # open_thinking False
    assert "📞 [Tool Calling]: calculate_math" in out and '✅ [Tool Called]: {"result": "9472"}' in out
    # case 2 offers no calculate_math: the call is an error observation, nothing is credited
    second = result["cases"][1]
    assert second["calls"][0]["observation"] == '{"error": "tool not found: calculate_math"}'
    assert second["score"] == 0.0
    # case 4 expects random_number and calculate_math: half its tools called, half its values in the answer
    assert result["cases"][3]["score"] == 0.5 and result["total"] == pytest.approx(1.0 + 0.5)


def test_a_model_that_never_stops_calling_is_cut_at_max_rounds(tiny_out, monkeypatch, capsys):
    monkeypatch.setattr(eval_toolcall, "generate_local", lambda *a: TOOL_CALL)
    result = eval_toolcall.main(local_flags(tiny_out, "--max_rounds", "3"))
    first = result["cases"][0]
    assert len(first["calls"]) == 3 and first["final"] is None
    assert (first["tools"], first["answer"]) == (1.0, 0.0)


def test_bad_input_is_one_line(tiny_out, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        eval_toolcall.main(["--backend", "nope"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="--max_rounds"):
        eval_toolcall.main(local_flags(tiny_out, "--max_rounds", "0"))
    monkeypatch.chdir(tmp_path)   # the script's entry point, in this process: cli(main) with its own argv
    monkeypatch.setattr(sys, "argv", ["eval_toolcall.py", "--device", "cpu", "--save_dir", str(tmp_path / "empty"),
                                      "--mode", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(eval_toolcall.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines()[-1].startswith("error: weight file ")
    assert "Traceback" not in err


def test_the_originals_768_weight_comes_first(tmp_path):
    """No size flag typed: {weight}_768.pth (the original's default size) wins over another size."""
    for name in ("full_sft_64.pth", "full_sft_768.pth"):
        (tmp_path / name).write_bytes(b"")
    args = eval_toolcall.build_parser().parse_args(["--save_dir", str(tmp_path)])
    eval_toolcall.prefer_original_size(args)
    assert args.hidden_size == 768 and "hidden_size" in args.typed
    typed = eval_toolcall.build_parser().parse_args(["--save_dir", str(tmp_path), "--hidden_size", "64"])
    eval_toolcall.prefer_original_size(typed)
    assert typed.hidden_size == 64
    (tmp_path / "full_sft_768.pth").unlink()
    alone = eval_toolcall.build_parser().parse_args(["--save_dir", str(tmp_path)])
    eval_toolcall.prefer_original_size(alone)
    assert "hidden_size" not in alone.typed   # model/loading.py then finds the one full_sft_*.pth


# ---- the api backend ----
class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/chat/completions: a calculate_math call when the last message is the user's (and the tool is offered),
    else an answer quoting the last tool result; streamed as SSE chunks when asked, the call split in pieces."""
    requests = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append(body)
        last = body["messages"][-1]
        offered = [t["function"]["name"] for t in body.get("tools") or []]
        call = last["role"] == "user" and "calculate_math" in offered
        content = None if call else f"答案是 {json.loads(last['content']).get('result')}" if last["role"] == "tool" else "不知道"
        if not body.get("stream"):
            message = {"role": "assistant", "content": content}
            if call:
                message["tool_calls"] = [{"id": "call_x", "type": "function", "function": {
                    "name": "calculate_math", "arguments": '{"expression": "256*37"}'}}]
            self.reply("application/json", json.dumps({
                "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop"}]}))
            return
        deltas = ([{"role": "assistant", "tool_calls": [{"index": 0, "id": "call_x", "type": "function",
                                                          "function": {"name": "calculate_math", "arguments": ""}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": '{"expression": '}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": '"256*37"}'}}]}]
                  if call else [{"role": "assistant", "content": content[:3]}, {"content": content[3:]}])
        chunks = [{"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        self.reply("text/event-stream", "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")

    def reply(self, kind: str, text: str):
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def fake_server():
    pytest.importorskip("openai")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("stream", ["1", "0"])
def test_api_backend(fake_server, stream, monkeypatch, capsys):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    FakeOpenAI.requests.clear()
    result = eval_toolcall.main(["--backend", "api", "--api_base_url", fake_server, "--mode", "0", "--stream", stream])
    out = capsys.readouterr().out
    first = result["cases"][0]
    assert first["calls"] == [{"name": "calculate_math", "args": {"expression": "256*37"},
                               "observation": '{"result": "9472"}'}]
    assert first["final"] == "答案是 9472" and first["score"] == 1.0
    assert "答案是 9472" in out and f"total: {result['total']:.2f}/8" in out
    # the second request carried the call and its result, tied by the call id; the original's request fields
    second = FakeOpenAI.requests[1]
    assert second["messages"][1]["tool_calls"][0]["function"] == {"name": "calculate_math",
                                                                  "arguments": '{"expression": "256*37"}'}
    assert second["messages"][2] == {"role": "tool", "content": '{"result": "9472"}', "tool_call_id": "call_x"}
    assert second["model"] == "jingyaogong/minimind-3:latest" and second["max_tokens"] == 512   # --max_new_tokens (the original sends 8192)
    assert second["stream"] is (stream == "1") and [t["function"]["name"] for t in second["tools"]] == \
        ["calculate_math", "get_current_time"]


@pytest.mark.parametrize("stream", [0, 1])
def test_api_backend_against_this_projects_server(monkeypatch, capsys, stream):
    """--backend api through the openai SDK against our own server (the tool loop of scripts/serve_openai_api.py),
    with a scripted model: it calls the weather tool, then answers with what the tool returned."""
    from model.loading import FAMILY_TOKENIZER_DIR, load_tokenizer
    from scripts.serve_openai_api import create_app
    from tests.test_serve import ScriptedModel, serving

    class ToolUser(ScriptedModel):   # served with one prefill chunk per prompt: its script counts from there
        def script(self):
            answered = "<tool_response>" in (self.prompts[-1] if self.prompts else "")
            self.text = ("北京今天晴，28°C，湿度65%。" if answered else
                         '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "北京"}}\n</tool_call>')
            return super().script()

    tokenizer = load_tokenizer(FAMILY_TOKENIZER_DIR["minimind3"])
    weather = [c for c in eval_toolcall.TEST_CASES if c["expect"] == ["get_current_weather"]][:1]
    monkeypatch.setattr(eval_toolcall, "TEST_CASES", weather)
    with serving(create_app(ToolUser(tokenizer), tokenizer, prefix_cache=0, prefill_chunk=2048, max_seq_len=2048)) as url:
        result = eval_toolcall.main(["--backend", "api", "--api_base_url", url, "--api_model", "minimind",
                                     "--stream", str(stream), "--mode", "0", "--seed", "1"])
    assert result["count"] == 1 and result["cases"][0]["calls"][0]["name"] == "get_current_weather"
    assert result["cases"][0]["score"] == 1.0 and result["total"] == 1.0, result
