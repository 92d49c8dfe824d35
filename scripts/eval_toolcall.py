"""Tool-use evaluation: 8 fixed requests, each offered 2-3 tools; the model calls tools, the calls run
(dataset/tools.py: mock tools in a child process), the results go back as `tool` messages, and so on until an
answer without a call. Prints each transcript, a score per case and the total.

    python scripts/eval_toolcall.py                     # local: out/full_sft_768.pth (minimind-3) if present
    python scripts/eval_toolcall.py --weight agent --mode 0 --seed 1
    python scripts/eval_toolcall.py --backend api --api_base_url http://localhost:8998/v1 --api_model minimind
    python scripts/eval_toolcall.py --device cpu --save_dir /tmp/out --max_new_tokens 64 --mode 0

Backends: `local` loads a model with the usual flags (model/loading.py) and generates through the batching
engine (model/engine.py) with the model's own chat template, tools rendered into it and thinking off
(open_thinking False, as the original); tool calls are the `<tool_call>` JSON blocks of the text. `api` sends
the conversation to an OpenAI-compatible server with the openai SDK (tools as a request field, streamed or not),
reads its `tool_calls` (or `<tool_call>` blocks in the content when it sends none) and returns results as
`tool` messages with their `tool_call_id`. The original's flags and defaults are kept; the original picks
hidden size 768 by default, so here, with no size flag typed, `{weight}_768[_moe].pth` is used when it exists.
Added: --mode (0 = the fixed cases, 1 = typed requests with all 8 tools; default: ask on a terminal, 0 when
piped), --seed, --max_rounds (the original loops with no limit), --tool_timeout.

Score of a case (the original prints transcripts only; this is ours), between 0 and 1:
  * tools: the fraction of the case's expected tools (its "expect" list in TEST_CASES) called at least once,
    offered in the case, with arguments that pass the original's CHECK_ARGS;
  * answer: the fraction of the expected tools whose key result (ANSWER_VALUE of the tool's last successful
    observation, e.g. calculate_math's result, the weather's temperature) the final answer mentions, as a
    substring or the same number (dataset/tools.py validate_gt_in_text); no final answer (--max_rounds reached
    while still calling tools) scores 0;
  * score = (tools + answer) / 2; the total is the sum over the cases (out of 8) and its percentage.
Writes nothing. A bad flag or a weight that cannot be loaded is one error line, exit code 2.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import random
import time

from dataset.tools import (DEFAULT_TIMEOUT, TOOLS, ToolRunner, call_parts, check_args, get_tools, is_error,
                           parse_arguments, parse_tool_calls, validate_gt_in_text)
from model.chat_format import END_THINK, END_TOOL_CALL
from model.cli import add_model_args, cli, was_typed
from model.engine import HF_TOP_K, Engine, PromptTooLong, SamplingParams
from model.loading import find_weight, is_transformers_folder, load_model, resolve_path
from model.weights import NotFoundError

# the original's cases (prompt, offered tools), with the tools a right answer calls
TEST_CASES = [
    {"prompt": "帮我算一下 256 乘以 37 等于多少", "tools": ["calculate_math", "get_current_time"],
     "expect": ["calculate_math"]},
    {"prompt": "现在几点了？", "tools": ["get_current_time", "random_number"], "expect": ["get_current_time"]},
    {"prompt": "帮我把100公里换算成英里", "tools": ["unit_converter", "calculate_math"], "expect": ["unit_converter"]},
    {"prompt": "帮我生成一个1到1000的随机数，然后计算它的平方", "tools": ["random_number", "calculate_math", "text_length"],
     "expect": ["random_number", "calculate_math"]},
    {"prompt": "北京今天天气怎么样？", "tools": ["get_current_weather", "get_current_time"],
     "expect": ["get_current_weather"]},
    {"prompt": "查一下美元兑人民币汇率", "tools": ["get_exchange_rate", "get_current_time"], "expect": ["get_exchange_rate"]},
    {"prompt": "把'你好世界'翻译成英文", "tools": ["translate_text", "text_length"], "expect": ["translate_text"]},
    {"prompt": "What is the weather in Tokyo? Also convert 30 celsius to fahrenheit.",
     "tools": ["get_current_weather", "unit_converter", "get_current_time"],
     "expect": ["get_current_weather", "unit_converter"]},
]
# the value of a tool's result that an answer should mention
ANSWER_VALUE = {
    "calculate_math": lambda r: r["result"],
    "unit_converter": lambda r: r["result"],
    "get_current_weather": lambda r: str(r["temperature"]).split("°")[0],   # "28°C" -> 28 (or "28度" passes)
    "get_current_time": lambda r: str(r["datetime"])[11:16],               # "2025-03-07 14:30:00" -> 14:30
    "get_exchange_rate": lambda r: r["rate"],
    "translate_text": lambda r: r["translated_text"],
    "random_number": lambda r: r["result"],
    "text_length": lambda r: r["characters"],
}
MENU = "[0] 自动测试 / the fixed cases\n[1] 手动输入 / type your own (空行退出 / an empty line quits)\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind tool-call evaluation", allow_abbrev=False)
    p.add_argument("--backend", type=str, default="local", choices=["local", "api"],
                   help="local = a model loaded here; api = an OpenAI-compatible server")
    add_model_args(p)
    p.add_argument("--max_new_tokens", type=int, default=512, help="most tokens per model turn")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature; 0 = greedy (local)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling probability mass")
    p.add_argument("--show_speed", type=int, default=0, choices=[0, 1], help="1 = print tokens/s after each turn")
    p.add_argument("--api_base_url", type=str, default="http://localhost:11434/v1",
                   help="base URL of the OpenAI-compatible server (api backend)")
    p.add_argument("--api_key", type=str, default="sk-123", help="API key sent to the server (api backend)")
    p.add_argument("--api_model", type=str, default="jingyaogong/minimind-3:latest",
                   help="model name sent to the server (api backend)")
    p.add_argument("--stream", type=int, default=1, choices=[0, 1], help="1 = streamed API responses (api backend)")
    # added flags
    p.add_argument("--mode", type=int, default=None, choices=[0, 1],
                   help="0 = the 8 fixed cases, 1 = typed requests with all tools (default: ask on a terminal, "
                        "0 when stdin is not a terminal)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed of the local backend (case i, round j uses seed + 1000 i + j); default random")
    p.add_argument("--max_rounds", type=int, default=8,
                   help="most model turns per case (the original has no limit); reaching it scores no answer")
    p.add_argument("--tool_timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds of wall time per tool call")
    return p


# ---- backends: each is chat(messages, tools, seed) -> (content, tool calls [{"id", "name", "arguments"}]) ----
def prefer_original_size(args) -> None:
    """The original's default is hidden size 768 (minimind-3): with no size or family flag typed and native
    weights, `{weight}_768[_moe].pth` is used when it exists (else the usual search of model/loading.py)."""
    if any(was_typed(args, f) for f in ("hidden_size", "model_family")):
        return
    source = resolve_path(args.load_from)
    if source.is_file() or is_transformers_folder(source):
        return
    try:
        find_weight(resolve_path(args.save_dir), args.weight, 768, args.use_moe)
    except NotFoundError:
        return
    args.hidden_size, args.typed = 768, set(args.typed) | {"hidden_size"}


def render(tokenizer, messages: list, tools: list) -> str:
    """The model's own chat template with the tools and the generation prompt, thinking off as the original
    (minimind-3's template then pre-fills an empty think block; MiniMind2's ignores the flag)."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                         open_thinking=False)


def generate_local(engine: Engine, tokenizer, messages: list, tools: list, args, seed: int) -> str:
    """One model turn through the engine, streamed to stdout; the generated text."""
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=HF_TOP_K, seed=seed)
    try:
        req = engine.submit(tokenizer(render(tokenizer, messages, tools)).input_ids, params, bounded=False)
    except PromptTooLong as err:
        raise ValueError(f"{err}; lower --max_new_tokens or --max_rounds") from None
    start, pieces = time.monotonic(), []
    for piece in req:
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    if args.show_speed:
        print(f"[Speed]: {req.completion_tokens / max(time.monotonic() - start, 1e-9):.2f} tokens/s")
    if req.finish_reason == "error":
        raise ValueError(f"generation failed: {req.error}")
    return "".join(pieces)


def local_chat(engine: Engine, tokenizer, args):
    def chat(messages, tools, seed):
        content = generate_local(engine, tokenizer, messages, tools, args, seed)
        calls = []
        for i, call in enumerate(parse_tool_calls(content)):
            name, raw = call_parts(call)
            calls.append({"id": f"call_{i}", "name": name, "arguments": raw})
        return content, calls
    return chat


def calls_from_text(content: str) -> list:
    """Tool calls written as `<tool_call>` blocks in an API answer's content (a server that does not parse them)."""
    calls = []
    for i, call in enumerate(parse_tool_calls(content)):
        name, raw = call_parts(call)
        calls.append({"id": f"call_{i}", "name": name,
                      "arguments": raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)})
    return calls


def api_chat(client, args):
    from openai import OpenAIError

    def chat(messages, tools, seed):
        try:
            return api_turn(client, args, messages, tools)
        except OpenAIError as err:   # unreachable server, HTTP error, bad response: one line from cli()
            raise ValueError(f"--api_base_url {args.api_base_url}: {type(err).__name__}: {err}") from None
    return chat


def api_turn(client, args, messages: list, tools: list) -> tuple:
    """One model turn from the server, printed as it comes: (content, tool calls)."""
    response = client.chat.completions.create(model=args.api_model, messages=messages, tools=tools,
                                              stream=bool(args.stream), temperature=args.temperature,
                                              max_tokens=args.max_new_tokens, top_p=args.top_p)
    if not args.stream:
        message = response.choices[0].message
        content = message.content or ""
        print(content)
        calls = [{"id": tc.id or f"call_{i}", "name": tc.function.name or "",
                  "arguments": tc.function.arguments or "{}"} for i, tc in enumerate(message.tool_calls or [])]
        return content, calls or calls_from_text(content)
    content, calls = "", []
    for chunk in response:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            print(delta.content, end="", flush=True)
            content += delta.content
        for tc in delta.tool_calls or []:   # pieces of call `index`: id and name first, arguments in parts
            index = tc.index if tc.index is not None else len(calls)
            while len(calls) <= index:
                calls.append({"id": "", "name": "", "arguments": ""})
            calls[index]["id"] = tc.id or calls[index]["id"]   # some servers repeat the id in every piece
            if tc.function:
                calls[index]["name"] += tc.function.name or ""
                calls[index]["arguments"] += tc.function.arguments or ""
    print()
    for i, call in enumerate(calls):
        call["id"] = call["id"] or f"call_{i}"
    return content, calls or calls_from_text(content)


# ---- the tool loop and its score ----
def run_case(prompt: str, tool_names: list, chat, runner: ToolRunner, max_rounds: int, api: bool,
             seed: int = 0) -> dict:
    """Model turn, tool calls, `tool` messages, ... until a turn without a call (or max_rounds turns).
    Returns {"messages", "calls": [{"name", "args", "observation"}], "final" (None when unfinished)}."""
    tools = get_tools(tool_names)
    messages, calls, final = [{"role": "user", "content": prompt}], [], None
    for round_ in range(max_rounds):
        print("🧠: ", end="", flush=True)
        content, tool_calls = chat(messages, tools, seed + round_)
        if not tool_calls:
            final = content
            break
        if api:
            messages.append({"role": "assistant", "content": content, "tool_calls": [
                {"id": tc["id"], "type": "function", "function": {"name": tc["name"], "arguments": tc["arguments"]}}
                for tc in tool_calls]})
        else:   # the text holds the <tool_call> blocks, which the template renders as they are
            messages.append({"role": "assistant", "content": content})
        for tc in tool_calls:
            raw = tc["arguments"]
            shown = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
            print(f"📞 [Tool Calling]: {tc['name']} | args={shown}")
            observation = runner.run(tc["name"], raw, allowed=tool_names)
            print(f"✅ [Tool Called]: {observation}")
            calls.append({"name": tc["name"], "args": parse_arguments(raw), "observation": observation})
            messages.append({"role": "tool", "content": observation, **({"tool_call_id": tc["id"]} if api else {})})
    return {"messages": messages, "calls": calls, "final": final}


def final_answer(text) -> str:
    """The answer part of a last turn: after `</think>` and after the last `</tool_call>`; "" for none."""
    if text is None:
        return ""
    return text.split(END_THINK)[-1].split(END_TOOL_CALL)[-1].strip()


def score_case(case: dict, result: dict) -> dict:
    """{"tools", "answer", "score"} of a fixed case's result (see the module docstring)."""
    expect = case["expect"]
    called = {c["name"] for c in result["calls"] if c["name"] in case["tools"] and check_args(c["name"], c["args"])}
    answer, found = final_answer(result["final"]), 0
    for name in expect:
        values = []
        for c in result["calls"]:
            if c["name"] == name and not is_error(c["observation"]):
                try:
                    values = [ANSWER_VALUE[name](json.loads(c["observation"]))]
                except (ValueError, KeyError, TypeError, IndexError):
                    pass
        found += bool(answer and values and validate_gt_in_text(answer, values))
    tools_part, answer_part = len(called & set(expect)) / len(expect), found / len(expect)
    return {"tools": tools_part, "answer": answer_part, "score": (tools_part + answer_part) / 2}


def cases(args):
    """The fixed cases, or typed requests (all tools, no score) until an empty line."""
    mode = args.mode
    if mode is None:
        mode = (0 if input(MENU).strip() == "0" else 1) if sys.stdin.isatty() else 0
    if mode == 0:
        yield from TEST_CASES
        return
    while True:
        try:
            prompt = input("💬: ").strip()
        except EOFError:
            return
        if not prompt:
            return
        yield {"prompt": prompt, "tools": [t["function"]["name"] for t in TOOLS], "expect": None, "typed": True}


def main(argv=None) -> dict:
    """Runs the cases; returns {"cases": [{"prompt", "score", ...}], "total", "count"}."""
    args = build_parser().parse_args(argv)
    if args.max_rounds < 1:
        raise ValueError("--max_rounds must be at least 1")
    engine = None
    if args.backend == "local":
        prefer_original_size(args)
        model, tokenizer, _ = load_model(args)
        engine = Engine(model, tokenizer, max_batch=1)
        chat = local_chat(engine, tokenizer, args)
    else:
        try:
            from openai import OpenAI
        except ImportError:
            raise ValueError("--backend api needs the openai package: pip install openai") from None
        chat = api_chat(OpenAI(api_key=args.api_key, base_url=args.api_base_url), args)
    seed = args.seed if args.seed is not None else random.randrange(2 ** 31)
    if args.backend == "local":
        print(f"seed {seed}", file=sys.stderr, flush=True)
    rows = []
    try:
        with ToolRunner(timeout=args.tool_timeout) as runner:
            for i, case in enumerate(cases(args)):
                if not case.get("typed"):
                    print(f"📦 可用工具: {case['tools']}\n")
                    print(f"💬: {case['prompt']}")
                result = run_case(case["prompt"], case["tools"], chat, runner, args.max_rounds,
                                  api=args.backend == "api", seed=seed + 1000 * i)
                if case["expect"]:
                    s = score_case(case, result)
                    rows.append({"prompt": case["prompt"], **s, "calls": result["calls"], "final": result["final"]})
                    print(f"[score] {s['score']:.2f} (tools {s['tools']:.2f}, answer {s['answer']:.2f})")
                print("\n" + "-" * 50 + "\n")
    finally:
        if engine is not None:
            engine.close()
    total = sum(r["score"] for r in rows)
    if rows:
        print("| # | case | tools | answer | score |\n|---|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            print(f"| {i} | {r['prompt']} | {r['tools']:.2f} | {r['answer']:.2f} | {r['score']:.2f} |")
        print(f"total: {total:.2f}/{len(rows)} = {total / len(rows):.1%}")
    return {"cases": rows, "total": total, "count": len(rows)}


if __name__ == "__main__":
    cli(main)
