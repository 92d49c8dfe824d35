"""An OpenAI-compatible chat server for MiniMind (FastAPI + uvicorn) on the continuous-batching engine
(model/engine.py), for Open-WebUI, FastGPT, the openai package, scripts/chat_openai_api.py and
scripts/web_demo.py.

    python scripts/serve_openai_api.py                            # out/full_sft_512.pth on 127.0.0.1:8998
    MINIMIND_API_KEY=sk-local python scripts/serve_openai_api.py --load_from ../MiniMind2 --host 0.0.0.0
    python scripts/serve_openai_api.py --save_dir out --weight full_sft --device cpu --max_batch 8   # tiny demo
    python scripts/serve_openai_api.py --load_from ../minimind-3    # the original's minimind-3 (a stock Qwen3 folder)

Endpoints: GET /v1/models, POST /v1/chat/completions (stream or not; messages, temperature, top_p,
max_tokens / max_completion_tokens, stop, seed, tools, tool_choice, stream_options.include_usage and
the extra fields repetition_penalty, top_k, and the original's open_thinking / chat_template_kwargs), POST
/v1/completions (OpenAI's completions API for raw prompts: `prompt` a string or, as vLLM, token ids, or a list of
either; n, stop, seed, stream, max_tokens (default 16), temperature (1), top_p (1), and logprobs: the log-prob of
each sampled token under the model's raw distribution (the log-softmax of its logits before temperature, top-k and
top-p, as vLLM's default; what a trainer's forward pass gives) with the k likeliest tokens'; vLLM's extensions
top_k, return_token_ids, return_tokens_as_token_ids and skip_special_tokens; the RL trainers' rollout engine,
trainer/core/rollout_engine.py, samples through it), GET /health (200 when the engine runs, else 503), GET
/metrics (Prometheus text) and POST /v1/reload (also SGLang's /update_weights_from_disk, {"model_path": ...}:
new weights from disk into the running server, behind the API key; without a key, for clients on this machine
only). Output of reasoning models goes to `reasoning_content`
(thinking on: the prompt opened the think block, so the text before `</think>` is reasoning); with `tools`,
`<tool_call>` blocks become `tool_calls` (finish_reason "tool_calls"), and the assistant's tool_calls and the
`tool` messages sent back render through the model's chat template (`<tool_call>`, `<tool_response>`).

Concurrent requests are decoded together, up to --max_batch at a time; up to --max_queue more wait
(a burst on an idle server fills the slots first), beyond that the answer is 429 with Retry-After. A prompt that begins like an earlier one (the system
prompt, the earlier turns of a conversation) is prefilled from where it differs (--prefix_cache). A
client that disconnects, or a request older than --request_timeout, frees its slot at the next decode
step. Every error is an OpenAI-shaped JSON body; bad requests get a 4xx, and no error leaves a keep-alive
connection unusable (Connection: close is sent when the request body was not read). Model flags are those
of eval_llm.py; the prompt is rendered with the model's own tokenizer and chat template (model/loading.py picks
them: minimind-3 has its own). Writes nothing.

HTTP limits (scripts/serve_http.py): a request's head must arrive within --header_timeout seconds of the
connection opening or of the previous answer on it, and its body within --body_timeout seconds of the head,
else 408 and the connection is closed (a connection that sends nothing is closed silently); a keep-alive
connection idle for --keep_alive_timeout seconds is closed. A malformed HTTP request (a bad Content-Length
or Host, both Transfer-Encoding and Content-Length, ...) gets a JSON 400 (414: a URL over 16 KiB, 431:
headers over 16 KiB) and the connection is closed. SIGTERM or SIGINT: no new connections; running answers
go on for --shutdown_timeout seconds, then end (a stream with an error event and [DONE], others with 503);
exit status 0.
"""
import argparse
import asyncio
import hmac
import ipaddress
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.chat_format import CONTROL_TOKENS, OutputParser, build_prompt, find_control_token, opens_think  # noqa: E402
from model.cli import add_model_args, cli, one_line  # noqa: E402
from model.engine import Engine, PromptTooLong, QueueFull, SamplingParams  # noqa: E402
from model.loading import family_of, is_transformers_folder, load_model, resolve_path  # noqa: E402
from model.openmp import release_thread_pool  # noqa: E402
from model.weights import LoadError  # noqa: E402

ROLES = ("system", "user", "assistant", "tool")
DEFAULTS = dict(temperature=0.7, top_p=0.92, top_k=50)  # the original's; top_k 50 is transformers' sampling default
OPTIONS = dict(max_batch=16, max_queue=64, request_timeout=300.0, default_max_tokens=2048, max_body_bytes=1 << 20,
               prefill_chunk=512, prefix_cache=8192, host="127.0.0.1", allow_any_host=False, loader=None)
RELOAD_MODEL_TYPES = ("minimind", "llama", "qwen3", "qwen3_moe")   # folders the reload endpoint reads (no remote code)
RELOAD_PATHS = ("/v1/reload", "/update_weights_from_disk")  # ours, and SGLang's (the original's rollout engine)
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
         *RELOAD_PATHS)  # counted by name in /metrics
COMPLETION_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16)  # the OpenAI completions API's (vLLM's)
MAX_LOGPROBS, MAX_N = 20, 128
MAX_JSON_DEPTH = 64
NOT_RENDERED = ("tool_call_id", "id")  # fields of a message or of its tool calls that the chat template ignores
NOT_RENDERED_AT = re.compile(r"messages\[\d+\](\.tool_calls\[\d+\])?")
API_KEY_ENV = "MINIMIND_API_KEY"
HTTP_LIMITS = dict(header_timeout=10.0, body_timeout=60.0, keep_alive_timeout=5.0, shutdown_timeout=10.0)
HOST_RE = re.compile(r"(?:\[([^\]]*)\]|([A-Za-z0-9._~!$&'()*+,;=%-]*))(?::[0-9]*)?")  # RFC 9110 7.2: host [":" port]
REFUSED = "minimind.refused"  # scope key: the status the HTTP layer (serve_http.py) answered a request with
CLIENT_LEFT = 499  # nginx's status for a client that closed the connection first: never sent, only counted


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param=None, code=None, type_="invalid_request_error",
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client disconnected before its request was read."""


# ---- request validation ----
def _number(body, name, low, high, default, low_open=False, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and not (value > low if low_open else value >= low):
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'} in {bound}, got {value!r}",
                       name, "invalid_value")
    return value


def _text(content, where: str, allow_none: bool):
    """Message content as a string: a string, or a list of {"type": "text"} parts (joined)."""
    if isinstance(content, str) or (content is None and allow_none):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where}.content must be a string or a list of text parts", where + ".content",
                   "invalid_type")


def _bad_type(name: str, what: str):
    return APIError(400, f"'{name}' must be {what}", name, "invalid_type")


def _tool_calls(calls, where: str):
    """An assistant message's tool_calls: [{"function": {"name": str, "arguments": str | object}}] (the
    function fields may also sit at the top level, as the chat template accepts). String arguments, as the
    OpenAI API sends them back, render raw into the prompt, so they must be a JSON object."""
    if calls is None:
        return None
    ok = isinstance(calls, list)
    for call in calls if ok else []:
        fn = call.get("function", call) if isinstance(call, dict) else None
        ok = ok and isinstance(fn, dict) and isinstance(fn.get("name"), str) and \
            isinstance(fn.get("arguments", ""), (str, dict)) and \
            isinstance(call.get("id") or "", str) and call.get("type") in (None, "function")
    if not ok:
        raise APIError(400, f"{where}.tool_calls must be a list of {{\"id\": string, \"type\": \"function\", "
                            "\"function\": {\"name\": string, \"arguments\": string or object}}",
                       where + ".tool_calls", "invalid_type")
    for j, call in enumerate(calls):
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except (ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict):
                name = f"{where}.tool_calls[{j}]{'.function' if 'function' in call else ''}.arguments"
                raise APIError(400, f"{name} must be a JSON object (as a string), got {args[:80]!r}", name,
                               "invalid_value")
    return calls or None


def _thinking(body) -> bool:
    """The original's rule: thinking is on when `open_thinking`, `chat_template_kwargs.open_thinking` or
    `chat_template_kwargs.enable_thinking` is true (other chat_template_kwargs are not read)."""
    flag, kwargs = body.get("open_thinking"), body.get("chat_template_kwargs")
    if flag is not None and not isinstance(flag, bool):
        raise _bad_type("open_thinking", "a boolean")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _bad_type("chat_template_kwargs", 'an object like {"open_thinking": true}')
    for key in ("open_thinking", "enable_thinking"):
        if (kwargs or {}).get(key) is not None and not isinstance(kwargs[key], bool):
            raise _bad_type(f"chat_template_kwargs.{key}", "a boolean")
    return bool(flag or (kwargs or {}).get("open_thinking") or (kwargs or {}).get("enable_thinking"))


def _tools(body):
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and isinstance(t["function"].get("description", ""), str)
            and isinstance(t["function"].get("parameters", {}), dict) for t in tools)):
        raise _bad_type("tools", 'a list of {"type": "function", "function": {"name": string, "description": '
                                 'string, "parameters": object}}')
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
        choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    if choice is not None and choice not in ("none", "auto", "required") and not named:
        raise _bad_type("tool_choice", '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    return None if choice == "none" or not tools else tools


def _unsupported(body):
    """Fields whose garbage used to pass: their type is checked; what this server cannot do is a 400."""
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad_type("model", "a string")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise _bad_type("response_format", 'an object like {"type": "text"}')
        if fmt["type"] != "text":
            raise APIError(400, f"response_format {fmt['type']!r} is not supported (only \"text\")",
                           "response_format", "unsupported_value")
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise _bad_type("logprobs", "a boolean")
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported", "logprobs", "unsupported_value")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
        raise _bad_type("top_logprobs", "an integer in [0, 20]")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False),
                                                                             (bool, type(None)))):
        raise _bad_type("stream_options", 'an object like {"include_usage": true}')


def _stop(body) -> tuple:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")
    return tuple(s for s in stop or [] if s)


def _seed(body):
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -2 ** 63 <= seed < 2 ** 64):
        raise APIError(400, f"'seed' must be an integer in [-2**63, 2**64), got {seed!r}", "seed", "invalid_value")
    return seed


def _flag(body, name: str, default: bool) -> bool:
    value = body.get(name)  # null = absent, as for every optional field
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean", name, "invalid_type")
    return default if value is None else value


def parse_request(body, context: int) -> dict:
    """Validate a chat completion request; returns the generation settings or raises APIError (400)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
    clean = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{where} must be an object", where, "invalid_type")
        role = "system" if msg.get("role") == "developer" else msg.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {msg.get('role')!r}",
                           where + ".role", "invalid_value")
        tool_calls = _tool_calls(msg.get("tool_calls"), where) if role == "assistant" else None
        content = _text(msg.get("content"), where, allow_none=role == "assistant")
        extra = {"tool_calls": tool_calls} if tool_calls else {}
        if role == "assistant" and msg.get("reasoning_content") is not None:  # minimind-3's template renders it
            if not isinstance(msg["reasoning_content"], str):
                raise APIError(400, f"{where}.reasoning_content must be a string", where + ".reasoning_content",
                               "invalid_type")
            extra["reasoning_content"] = msg["reasoning_content"]
        if role == "tool" and msg.get("tool_call_id") is not None and not isinstance(msg["tool_call_id"], str):
            raise APIError(400, f"{where}.tool_call_id must be a string", where + ".tool_call_id", "invalid_type")
        clean.append({"role": role, "content": content or ""} | extra)
    tools = _tools(body)
    _unsupported(body)
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n = 1 is supported", "n", "invalid_value")
    stream = body.get("stream") or False  # null = absent, as for every optional field
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return dict(
        messages=clean, tools=tools, open_thinking=_thinking(body), stop=_stop(body), stream=stream, seed=_seed(body),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        temperature=_number(body, "temperature", 0, 2, DEFAULTS["temperature"]),
        top_p=_number(body, "top_p", 0, 1, DEFAULTS["top_p"], low_open=True),
        top_k=_number(body, "top_k", 0, None, DEFAULTS["top_k"], integer=True),
        repetition_penalty=_number(body, "repetition_penalty", 0, 2, 1.0, low_open=True),
        max_tokens=_number(body, max_name, 1, context, None, integer=True))


def _prompts(prompt, vocab_size: int) -> list:
    """The completions API's `prompt`: a string, a list of token ids, or a list of either (a batch) -> a list of
    strings and id lists."""
    ids_ok = lambda x: isinstance(x, list) and bool(x) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in x)
    if isinstance(prompt, str) or ids_ok(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
        return prompt
    raise APIError(400, f"'prompt' must be a string, a non-empty list of token ids (integers in [0, {vocab_size})), "
                        "or a non-empty list of those", "prompt", "invalid_type")


def parse_completion_request(body, context: int, vocab_size: int) -> dict:
    """Validate a /v1/completions request (OpenAI's completions API, with vLLM's token-id prompts and extensions
    top_k, repetition_penalty, return_token_ids, return_tokens_as_token_ids, skip_special_tokens); returns the
    generation settings or raises APIError (400)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    prompts = _prompts(body.get("prompt"), vocab_size)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad_type("model", "a string")
    if _flag(body, "echo", False):
        raise APIError(400, "echo is not supported", "echo", "unsupported_value")
    if body.get("suffix") is not None:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported_value")
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported_value")
    n = _number(body, "n", 1, MAX_N, 1, integer=True)
    if body.get("best_of") not in (None, n):
        raise APIError(400, "best_of must equal n (no choices are generated beyond those returned)", "best_of",
                       "unsupported_value")
    req = dict(prompts=prompts, n=n, stop=_stop(body), seed=_seed(body), stream=_flag(body, "stream", False),
               logprobs=_number(body, "logprobs", 0, MAX_LOGPROBS, None, integer=True),
               return_token_ids=_flag(body, "return_token_ids", False),
               as_token_ids=_flag(body, "return_tokens_as_token_ids", False),
               skip_special_tokens=_flag(body, "skip_special_tokens", True),
               temperature=_number(body, "temperature", 0, 2, COMPLETION_DEFAULTS["temperature"]),
               top_p=_number(body, "top_p", 0, 1, COMPLETION_DEFAULTS["top_p"], low_open=True),
               top_k=max(0, _number(body, "top_k", -1, None, COMPLETION_DEFAULTS["top_k"], integer=True)),  # -1: off
               repetition_penalty=_number(body, "repetition_penalty", 0, 2, 1.0, low_open=True),
               max_tokens=_number(body, "max_tokens", 1, context, COMPLETION_DEFAULTS["max_tokens"], integer=True))
    if req["stream"]:
        for name, on in (("logprobs", req["logprobs"] is not None), ("return_token_ids", req["return_token_ids"]),
                         ("skip_special_tokens", not req["skip_special_tokens"])):
            if on:
                raise APIError(400, f"{name} is not supported with stream: send stream false", name,
                               "unsupported_value")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False),
                                                                             (bool, type(None)))):
        raise _bad_type("stream_options", 'an object like {"include_usage": true}')
    req["include_usage"] = bool((options or {}).get("include_usage"))
    return req


def scan_strings(body, control_tokens) -> int:
    """Walk the parsed body once (no recursion): refuse nesting deeper than MAX_JSON_DEPTH, a lone
    UTF-16 surrogate anywhere (it cannot be encoded), and a ChatML control token in a value inside
    `messages` or `tools`, keys included (it would become a real special token, e.g. a forged system turn). Returns
    the UTF-8 size of the values the chat template renders (messages and tools)."""
    size, stack = 0, [(body, "", 0, False)]
    while stack:
        value, path, depth, rendered = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", None, "invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path, depth + 1, rendered))  # tool definitions and arguments render their keys
                inside = (rendered or (depth == 0 and key in ("messages", "tools"))) and not (
                    key in NOT_RENDERED and NOT_RENDERED_AT.fullmatch(path))
                stack.append((item, f"{path}.{key}" if path else key, depth + 1, inside))
        elif isinstance(value, list):
            stack += [(item, f"{path}[{i}]", depth + 1, rendered) for i, item in enumerate(value)]
        elif isinstance(value, str):
            try:
                encoded = value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{path or 'a key'} holds a lone UTF-16 surrogate, which is not text",
                               path or None, "invalid_value") from None
            token = find_control_token(value, control_tokens) if rendered else None
            if token:
                raise APIError(400, f"{path} contains the ChatML control token {token}, which may not appear in "
                                    "message text", path, "invalid_value")
            size += len(encoded) if rendered else 0
    return size


TEMPLATE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "function", "name", "arguments", "type")


def _neutral(value):
    """`value` with every non-empty string replaced by "x" and every key a chat template does not look up
    renamed: the same template branches, no user text (tool definitions and arguments render their keys)."""
    if isinstance(value, str):
        return "x" if value else ""
    if isinstance(value, dict):
        return {(k if k in TEMPLATE_KEYS else f"k{i}"): _neutral(v) if k not in ("role", "type") else v
                for i, (k, v) in enumerate(value.items())}
    if isinstance(value, list):
        return [_neutral(v) for v in value]
    return value


def check_rendered_prompt(tokenizer, messages: list, tools, prompt: str, control_tokens, open_thinking=False):
    """Refuse (400) a request whose texts form a ChatML control token only once joined or templated (text
    parts split inside a token, or a template that writes two texts side by side): the rendered prompt may
    hold no more control tokens than the same request with its texts neutralised."""
    for i, msg in enumerate(messages):  # the joined text parts, named precisely where possible
        token = find_control_token(msg["content"], control_tokens)
        if token:
            raise APIError(400, f"messages[{i}].content contains the ChatML control token {token} once its text "
                                "parts are joined; it may not appear in message text", f"messages[{i}].content",
                           "invalid_value")
    skeleton = build_prompt(tokenizer, _neutral(messages), tools=_neutral(tools), open_thinking=open_thinking)
    for token in control_tokens:
        if prompt.count(token) > skeleton.count(token):
            raise APIError(400, f"the messages form the ChatML control token {token} once rendered with the chat "
                                "template; it may not appear in message text", "messages", "invalid_value")


# ---- one answer ----
def tool_call_json(call: dict) -> dict:
    args = call["arguments"]
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def failure(handle):
    """The APIError of an engine request that did not finish normally, else None."""
    reason = handle.finish_reason
    if reason == "error":
        return APIError(500, f"generation failed: {handle.error}", type_="server_error")
    if reason == "timeout":
        return APIError(504, f"the request took longer than the server's --request_timeout "
                             f"({handle.params.timeout:g} s)", code="request_timeout", type_="timeout_error")
    if reason == "cancelled":
        return APIError(503, "the request was cancelled (the client left, the server is shutting down, or its "
                             "weights were reloaded with abort_all_requests)", type_="server_error")
    return None


def completion_choice(index: int, handle, req: dict, tokenizer, eos_ids) -> dict:
    """One /v1/completions choice of a finished engine request: the text (cut before a stop string; special tokens
    kept with skip_special_tokens false), finish_reason, the raw log-probs of the sampled tokens (logprobs k: with
    the k likeliest tokens' at each position; tokens spelled "token_id:<id>" with return_tokens_as_token_ids) and,
    with return_token_ids, the sampled ids (the EOS included when it ended the completion) and the prompt's."""
    ids = list(handle.token_ids)
    text = handle.text
    if not req["skip_special_tokens"]:
        ended = handle.finish_reason == "stop" and ids and ids[-1] in eos_ids
        text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
        hits = [text.find(stop) for stop in req["stop"] if stop in text]
        text = text[:min(hits)] if hits else text
    choice = {"index": index, "text": text, "logprobs": None,
              "finish_reason": "length" if handle.finish_reason == "length" else "stop"}
    if req["logprobs"] is not None:
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        name = (lambda i: f"token_id:{i}") if req["as_token_ids"] else (
            lambda i: tokenizer.decode([i], skip_special_tokens=False))
        offsets = list(itertools.accumulate(map(len, pieces), initial=0))[:-1]
        choice["logprobs"] = {
            "tokens": [name(i) for i in ids], "token_logprobs": list(handle.logprobs),
            "top_logprobs": [{name(i): lp for i, lp in top} | {name(tok): lp_tok}
                             for tok, lp_tok, top in zip(ids, handle.logprobs, handle.top_logprobs)],
            "text_offset": offsets}
    if req["return_token_ids"]:
        choice["token_ids"], choice["prompt_token_ids"] = ids, list(handle.prompt_ids)
    return choice


class Job:
    """One request's answer: turns the engine's text pieces into output events, then knows
    finish_reason and usage."""

    def __init__(self, req: dict, handle, thinking: bool = False):
        self.req, self.handle = req, handle
        self.parser = OutputParser(tools=bool(req["tools"]), thinking=thinking)
        self.tool_calls = []

    def feed(self, piece: str) -> list:
        return self._parsed(self.parser.feed(piece))

    def finish(self) -> list:
        return self._parsed(self.parser.finish())

    def _parsed(self, events) -> list:
        out = []
        for kind, value in events:
            if kind == "tool_call":
                value = tool_call_json(value)
                self.tool_calls.append(value)
            out.append((kind, value))
        return out

    def failure(self):
        """The APIError of an answer that did not finish normally, else None."""
        return failure(self.handle)

    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        return "length" if self.handle.finish_reason == "length" else "stop"

    def usage(self) -> dict:
        p, n = self.handle.prompt_tokens, self.handle.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


# ---- metrics ----
def histogram_lines(name: str, help_text: str, hist) -> list:
    """An engine Histogram in Prometheus text format: cumulative buckets, sum and count."""
    out, total = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"], 0
    for bound, n in zip(hist.buckets + [math.inf], hist.counts):
        total += n
        out.append(f'{name}_bucket{{le="{"+Inf" if bound == math.inf else bound}"}} {total}')
    return out + [f"{name}_sum {hist.sum}", f"{name}_count {hist.count}"]


def metrics_text(engine: Engine, responses: Counter, prefix: str = "minimind") -> str:
    """GET /metrics: the engine's counters and latencies, and the HTTP responses by (path, status)."""
    out = []

    def metric(name, kind, help_text, samples):
        out.extend([f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} {kind}"])
        out.extend(f"{prefix}_{name}{labels} {value}" for labels, value in samples)

    metric("queue_length", "gauge", "Requests waiting for a slot.", [("", engine.queue_length)])
    metric("active_slots", "gauge", "Requests being prefilled or decoded.", [("", engine.active)])
    metric("max_batch", "gauge", "Slots (requests decoded together).", [("", engine.max_batch)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of requests that began to generate.",
           [("", engine.prompt_tokens_total)])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens taken from the prefix cache, not computed.",
           [("", engine.prompt_tokens_cached_total)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", engine.generation_tokens_total)])
    metric("requests_finished_total", "counter", "Requests ended, by finish reason.",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(engine.finished.items())])
    out += histogram_lines(f"{prefix}_time_to_first_token_seconds", "Submission to first generated token.", engine.ttft)
    out += histogram_lines(f"{prefix}_inter_token_latency_seconds", "Time between two tokens of a request.", engine.itl)
    metric("http_responses_total", "counter", "HTTP responses by path and status.",
           [(f'{{path="{p}",status="{st}"}}', n) for (p, st), n in sorted(responses.items())])
    return "\n".join(out) + "\n"


# ---- app ----
def weight_loader(device, model_family: str = None, tokenizer_path: str = None, rope_scaling: bool = False):
    """load(path) -> (model, tokenizer, description) for the reload endpoint: model/loading.load_model on a .pth
    file or a transformers folder, with the server's device, family, tokenizer and RoPE flags (no LoRA); a
    LoadError (one line) for anything else."""
    def load(path: str):
        source = resolve_path(path)
        if not (source.is_file() or is_transformers_folder(source)):
            raise LoadError(f"{path}: " + ("no such file or folder" if not source.exists() else
                                           "not a .pth weight file or a transformers folder (with config.json)"))
        if source.is_dir():   # a request must never run a folder's own code (trust_remote_code)
            try:
                model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError) as err:
                raise LoadError(f"{path}/config.json: not a readable config ({type(err).__name__})") from None
            if model_type not in RELOAD_MODEL_TYPES:
                raise LoadError(f"{path}: model_type {model_type!r}: the reload endpoint loads only "
                                f"{', '.join(RELOAD_MODEL_TYPES)} folders and .pth weights (it never runs a folder's code)")
        argv = ["--load_from", str(source), "--device", str(device)]
        argv += ["--model_family", model_family] if model_family else []
        argv += ["--tokenizer_path", str(tokenizer_path)] if tokenizer_path else []
        argv += ["--inference_rope_scaling"] if rope_scaling else []
        try:
            return load_model(add_model_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args(argv))
        except (LoadError, ValueError, OSError):
            raise
        except Exception as err:   # a malformed file or config: a 400 naming it, never a 500
            raise LoadError(f"{path}: could not be loaded ({type(err).__name__}: {str(err)[:200]})") from None
    return load


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def json_response(status: int, body: dict, headers=None):
    """(start, body) ASGI messages of a JSON response."""
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": head},
            {"type": "http.response.body", "body": raw})


def host_name(host: str):
    """The lower-case name or address of a Host header ("[::1]:8998" -> "::1"), or None when it is malformed
    (an unclosed bracket, a bad port, a character no host name has, an address that is not IPv6 in brackets)."""
    match = HOST_RE.fullmatch(host)
    if match is None:
        return None
    if match.group(1) is not None:
        try:
            ipaddress.IPv6Address(match.group(1))
        except ValueError:
            return None
        return match.group(1).lower()
    return match.group(2).lower()


class Guard:
    """The outermost ASGI layer: Host, content type and API key checks before anything is read; a count
    of responses by path and status for /metrics; and no exception ever reaches uvicorn, which would
    drop the keep-alive connection without saying so."""

    def __init__(self, app, api_key: str, host: str, allow_any_host: bool, engine=None):
        self.app, self.api_key, self.engine = app, api_key, engine  # engine: cancelled when a shutdown's drain ends
        self.bound_host, self.check_host = host.lower(), not api_key and not allow_any_host
        self.responses = Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def tracked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.refuse(scope)
            if refused is not None:
                for message in json_response(refused.status, refused.body(), refused.headers | {"Connection": "close"}):
                    await tracked(message)
            else:
                await self.app(scope, receive, tracked)
        except Exception as err:
            if status is None:  # nothing sent yet: answer here
                body = APIError(500, f"{type(err).__name__}: {err}", type_="server_error").body()
                for message in json_response(500, body, {"Connection": "close"}):
                    await tracked(message)
            else:  # a stream broke after its headers: the event loop goes on; the bug shows in the log
                traceback.print_exc(file=sys.stderr)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            # the HTTP layer's own answer (a body timeout, a shutdown) wins over the app's, which was dropped
            self.responses[(path, scope.get(REFUSED) or status or CLIENT_LEFT)] += 1

    def refuse(self, scope):
        """An APIError for a request refused on its headers alone, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        name = host_name(headers.get("host", ""))
        if name is None:
            return APIError(400, f"malformed Host header {headers['host']!r}", None, "invalid_host")
        if self.check_host and not self.host_ok(name):
            return APIError(403, f"Host {headers.get('host', '')!r} is not this server's address; a web page may be "
                                 "driving it (DNS rebinding). Start the server with --allow_any_host or --api_key "
                                 "to accept it.", code="invalid_host", type_="permission_error")
        if self.api_key and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer <key>')",
                                code="invalid_api_key", type_="authentication_error")
        if not self.api_key and scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, f"Content-Type must be application/json, got {media or 'none'!r}",
                                code="unsupported_media_type")
        return None

    def host_ok(self, name: str) -> bool:
        if name in ("localhost", self.bound_host):
            return True
        try:
            ipaddress.ip_address(name)
            return True  # an address, not a name an attacker's DNS could point here
        except ValueError:
            return False


def create_app(model, tokenizer, model_id: str = "minimind", api_key: str = None, max_seq_len: int = 8192,
               **options):
    """The ASGI app serving `model` (tests build it around a tiny in-memory model). options: OPTIONS."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.background import BackgroundTask
    from starlette.requests import ClientDisconnect

    opt = OPTIONS | options
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"create_app: unknown options {sorted(unknown)}")
    context = min(max_seq_len, model.config.max_position_embeddings)
    engine = Engine(model, tokenizer, max_batch=opt["max_batch"], max_queue=opt["max_queue"], max_seq_len=context,
                    prefill_chunk=opt["prefill_chunk"], prefix_cache=opt["prefix_cache"])
    control_tokens = tuple(tokenizer.all_special_tokens) or CONTROL_TOKENS
    # no token covers more UTF-8 bytes than this, so a text of B bytes needs at least B / this many tokens
    bytes_per_token = max(len(tokenizer.decode([i]).encode("utf-8")) for i in range(len(tokenizer)))
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="MiniMind OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    def error(err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error(APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def server_error(request, err):
        return error(APIError(500, f"{type(err).__name__}: {err}", type_="server_error"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "minimind"}]}

    @app.get("/health")
    async def health():
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": model_id, "active": engine.active,
                             "queue": engine.queue_length, "max_batch": engine.max_batch}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine, guard.responses), media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        """The body, refused (413, connection closed) as soon as it is known to exceed --max_body_bytes."""
        limit, declared = opt["max_body_bytes"], request.headers.get("content-length")
        too_big = APIError(413, f"the request body exceeds {limit} bytes (--max_body_bytes)", None,
                           "request_too_large", headers={"Connection": "close"})
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_big if declared.isdigit() else APIError(400, "invalid Content-Length", headers={"Connection": "close"})
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
        except ClientDisconnect:
            if request.scope.get(REFUSED):  # the HTTP layer answered (408, 503) and said why
                raise ClientGone() from None
            client = request.client
            print(f"serve_openai_api.py: {client.host if client else 'a client'} disconnected during the upload "
                  f"({size} of {declared or '?'} bytes read)", file=sys.stderr, flush=True)
            raise ClientGone() from None
        return b"".join(chunks)

    async def read_json(request: Request):
        """The body parsed as JSON (a 400 naming why it is not); ClientGone when the client left during the upload."""
        raw = await read_body(request)
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise APIError(400, f"the request body is not valid UTF-8 JSON: {why}", None, "invalid_json") from None

    def prepare(req: dict, text_bytes: int) -> tuple:
        """(prompt token ids, whether the prompt opened a think block); the context is checked before the whole
        prompt is tokenized."""
        if text_bytes // bytes_per_token >= context:
            raise APIError(400, f"the messages hold at least {text_bytes // bytes_per_token} tokens "
                                f"({text_bytes} bytes); this model's context is {context} tokens (prompt + "
                                "completion). Shorten the messages.", "messages", "context_length_exceeded")
        try:
            prompt = build_prompt(tokenizer, req["messages"], tools=req["tools"], open_thinking=req["open_thinking"])
        except Exception as err:  # a template error is the request's fault (e.g. a message it cannot render)
            raise APIError(400, f"the messages cannot be rendered with the chat template: {err}", "messages") from None
        check_rendered_prompt(tokenizer, req["messages"], req["tools"], prompt, control_tokens, req["open_thinking"])
        ids = tokenizer(prompt).input_ids
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {context} tokens "
                                "(prompt + completion). Shorten the messages.", "messages", "context_length_exceeded")
        return ids, opens_think(prompt)

    loader = opt["loader"] or weight_loader(engine.device, family_of(model))
    reload_lock = asyncio.Lock()

    def load_and_release(path: str):
        """loader(path) in a worker thread that lives on: its OpenMP pool ends with the load (model/openmp.py)."""
        try:
            return loader(path)
        finally:
            release_thread_pool()

    async def reload(request: Request):
        """POST /v1/reload (also SGLang's /update_weights_from_disk) {"model_path": a .pth file or a transformers
        folder, "abort_all_requests": false}: load those weights while the old ones serve, then swap them into the
        engine (model/engine.py swap_model: running answers finish first, or end now with abort_all_requests;
        waiting ones start with the new weights). Any failure before the swap leaves the old model serving."""
        nonlocal context
        client_host = request.client.host if request.client else ""
        if not api_key and not is_loopback(client_host):
            raise APIError(403, f"reloading weights from {client_host or 'another machine'} needs the server to run "
                                "with --api_key (without one only clients on this machine may)",
                           code="permission_denied", type_="permission_error")
        try:
            body = await read_json(request)
        except ClientGone:
            return Response(status_code=CLIENT_LEFT)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        path, abort = body.get("model_path"), body.get("abort_all_requests") or False
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise _bad_type("model_path", "the path of a .pth weight file or a transformers folder")
        if not isinstance(abort, bool):
            raise _bad_type("abort_all_requests", "a boolean")
        async with reload_lock:  # one reload at a time
            start = time.time()
            try:
                new_model, new_tokenizer, description = await run_in_threadpool(load_and_release, path)
            except (LoadError, ValueError, OSError) as err:
                raise APIError(400, f"the weights were not reloaded: {one_line(err)}", "model_path",
                               "invalid_model_path") from None
            if new_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise APIError(400, f"the weights were not reloaded: {path} comes with a different tokenizer than the "
                                    "one this server runs, so its token ids would not match; start a new server for "
                                    "it", "model_path", "tokenizer_mismatch")
            new_context = min(max_seq_len, new_model.config.max_position_embeddings)
            try:
                await run_in_threadpool(engine.swap_model, new_model, new_context, abort)
            except ValueError as err:  # another device
                raise APIError(400, f"the weights were not reloaded: {err}", "model_path",
                               "invalid_model_path") from None
            except RuntimeError as err:  # the engine is closed: the server is shutting down
                raise APIError(503, f"the weights were not reloaded: {err}", type_="server_error") from None
            context = new_context
        print(f"serve_openai_api.py: reloaded {description}", file=sys.stderr, flush=True)
        return {"success": True, "message": f"reloaded {description} in {time.time() - start:.1f} s",
                "model_path": path}

    for route in RELOAD_PATHS:
        app.post(route)(reload)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await read_json(request)
        except ClientGone:
            return Response(status_code=CLIENT_LEFT)  # nobody reads it; /metrics counts it apart from errors
        text_bytes = scan_strings(body, control_tokens)
        req = parse_request(body, context)
        if engine.full:
            raise busy()
        ids, thinking = await run_in_threadpool(prepare, req, text_bytes)
        max_tokens = req["max_tokens"] or opt["default_max_tokens"]
        params = SamplingParams(max_tokens=max_tokens, temperature=req["temperature"], top_p=req["top_p"],
                                top_k=req["top_k"], repetition_penalty=req["repetition_penalty"], seed=req["seed"],
                                stop=req["stop"], timeout=opt["request_timeout"] or None)
        try:
            handle = engine.submit(ids, params)
        except QueueFull:
            raise busy() from None
        except PromptTooLong as err:
            raise APIError(400, str(err), "messages", "context_length_exceeded") from None
        job = Job(req, handle, thinking)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req["stream"]:
            # the background task also frees the slot when the client leaves before the stream starts
            return StreamingResponse(sse(job, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(handle.cancel))
        return await whole(job, head, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI's completions API on the same engine as chat: n choices per prompt, each its own engine request
        (choice j of a request with `seed` samples as a request with seed + j); prompts are raw text (tokenized as
        is, no chat template) or token ids, as vLLM takes them."""
        try:
            body = await read_json(request)
        except ClientGone:
            return Response(status_code=CLIENT_LEFT)
        scan_strings(body, control_tokens)  # depth and lone surrogates (a raw prompt may hold control tokens)
        req = parse_completion_request(body, context, engine.vocab_size)
        total = len(req["prompts"]) * req["n"]
        if total > engine.max_batch + engine.max_queue:
            raise APIError(400, f"{total} choices (prompts x n) exceed what this server can run and queue at once "
                                f"({engine.max_batch + engine.max_queue}); send fewer", "n", "invalid_value")
        prompt_ids = await run_in_threadpool(completion_prompts, req["prompts"])
        if engine.full:
            raise busy()
        handles = []
        try:
            for ids in prompt_ids:
                for j in range(req["n"]):
                    seed = None if req["seed"] is None else (req["seed"] + j) % 2 ** 64
                    handles.append(engine.submit(ids, SamplingParams(
                        max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                        top_k=req["top_k"], repetition_penalty=req["repetition_penalty"], seed=seed, stop=req["stop"],
                        timeout=opt["request_timeout"] or None, logprobs=req["logprobs"])))
        except QueueFull:
            for handle in handles:
                handle.cancel()
            raise busy() from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if req["stream"]:
            return StreamingResponse(completion_sse(handles, head, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(lambda: [h.cancel() for h in handles]))
        if await wait_all(handles, request):
            return Response(status_code=CLIENT_LEFT)
        for handle in handles:
            if failure(handle) is not None:
                raise failure(handle)
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        completion_tokens = sum(h.completion_tokens for h in handles)
        return head | {"system_fingerprint": None, "choices": [
            completion_choice(i, h, req, tokenizer, engine.eos_ids) for i, h in enumerate(handles)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}

    def completion_prompts(prompts: list) -> list:
        """Token ids of each completions prompt (strings tokenized as they are); 400 when one is empty or leaves no
        room for a token in the context. The size of a string is checked before it is tokenized."""
        out = []
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                size = len(prompt.encode("utf-8"))
                if size // bytes_per_token >= context:
                    raise APIError(400, f"{where} holds at least {size // bytes_per_token} tokens ({size} bytes); "
                                        f"this model's context is {context} tokens (prompt + completion)", where,
                                   "context_length_exceeded")
                prompt = tokenizer(prompt).input_ids
            if not prompt:
                raise APIError(400, f"{where} is empty", where, "invalid_value")
            if len(prompt) >= context:
                raise APIError(400, f"{where} has {len(prompt)} tokens; this model's context is {context} tokens "
                                    "(prompt + completion)", where, "context_length_exceeded")
            out.append(prompt)
        return out

    def watch_disconnect(request: Request, handles: list, left: list):
        """A task that, once the client leaves (the body is read: the next message is the disconnect), marks
        left[0] and cancels the handles; the caller cancels the task when it is done."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            left[0] = True
            for handle in handles:
                handle.cancel()
        return asyncio.ensure_future(watch())

    async def wait_all(handles: list, request: Request) -> bool:
        """Wait until every handle is done; True when the client left first (then they are cancelled)."""
        left = [False]
        watcher = watch_disconnect(request, handles, left)
        try:
            for handle in handles:
                async for _ in handle.astream():
                    pass
        finally:
            watcher.cancel()
            for handle in handles:
                handle.cancel()
        return left[0]

    async def completion_sse(handles: list, head: dict, req: dict):
        """The choices' text as it comes (chunks of every choice interleaved, each with its index), then a chunk
        with each choice's finish_reason, the usage chunk when asked, and [DONE]."""
        def chunk(choices, **extra):
            return f"data: {json.dumps(head | {'choices': choices} | extra, ensure_ascii=False)}\n\n"

        queue = asyncio.Queue()

        async def pump(index, handle):
            try:
                async for piece in handle.astream():
                    await queue.put((index, piece))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        try:  # the client leaving cancels this generator: finally frees the slots
            running = len(handles)
            while running:
                index, piece = await queue.get()
                if piece is not None:
                    yield chunk([{"index": index, "text": piece, "logprobs": None, "finish_reason": None}])
                    continue
                running -= 1
                handle = handles[index]
                if failure(handle) is not None:  # headers are sent: the error travels as an event, then the end
                    yield f"data: {json.dumps(failure(handle).body(), ensure_ascii=False)}\n\n"
                    break
                yield chunk([{"index": index, "text": "", "logprobs": None,
                              "finish_reason": "length" if handle.finish_reason == "length" else "stop"}])
            else:
                if req["include_usage"]:
                    p = sum(h.prompt_tokens for h in handles[::req["n"]])
                    c = sum(h.completion_tokens for h in handles)
                    yield chunk([], usage={"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
        finally:
            for task in tasks:
                task.cancel()
            for handle in handles:
                handle.cancel()
        yield "data: [DONE]\n\n"

    def busy():
        return APIError(429, f"the server is busy: {engine.load()}; retry later", code="queue_full",
                        type_="rate_limit_error", headers={"Retry-After": "1"})

    async def whole(job: Job, head: dict, request: Request):
        left = [False]
        watcher = watch_disconnect(request, [job.handle], left)
        parts = {"reasoning": [], "content": []}
        try:
            async for piece in job.handle.astream():
                for kind, value in job.feed(piece):
                    if kind != "tool_call":
                        parts[kind].append(value)
        finally:
            watcher.cancel()
            job.handle.cancel()
        if left[0]:
            return Response(status_code=CLIENT_LEFT)
        failure = job.failure()
        if failure is not None:
            raise failure
        for kind, value in job.finish():
            if kind != "tool_call":
                parts[kind].append(value)
        message = {"role": "assistant", "content": "".join(parts["content"]) or (None if job.tool_calls else "")}
        if parts["reasoning"]:
            message["reasoning_content"] = "".join(parts["reasoning"])
        if job.tool_calls:
            message["tool_calls"] = job.tool_calls
        return head | {"object": "chat.completion", "system_fingerprint": None, "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": job.finish_reason()}],
            "usage": job.usage()}

    async def sse(job: Job, head: dict):
        def chunk(delta=None, finish_reason=None, **extra):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
            data = head | {"object": "chat.completion.chunk", "system_fingerprint": None, "choices": choices} | extra
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events(items):
            for kind, value in items:
                if kind == "tool_call":
                    yield chunk({"tool_calls": [{"index": len(job.tool_calls) - 1} | value]})
                else:
                    yield chunk({"reasoning_content" if kind == "reasoning" else "content": value})

        yield chunk({"role": "assistant", "content": ""})
        try:  # the client leaving cancels this generator: finally frees the slot
            async for piece in job.handle.astream():
                for text in events(job.feed(piece)):
                    yield text
        finally:
            job.handle.cancel()
        failure = job.failure()
        if failure is not None:  # headers are sent: the error travels as an event, then the stream ends
            yield f"data: {json.dumps(failure.body(), ensure_ascii=False)}\n\n"
        else:
            for text in events(job.finish()):
                yield text
            yield chunk({}, job.finish_reason())
            if job.req["include_usage"]:
                yield chunk(None, usage=job.usage())
        yield "data: [DONE]\n\n"

    guard = Guard(app, api_key, opt["host"], opt["allow_any_host"], engine)
    return guard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind OpenAI-compatible API server", allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--max_seq_len", type=int, default=8192,
                   help="context accepted per request in tokens (prompt + completion; capped by the model's "
                        "max_position_embeddings)")
    p.add_argument("--host", type=str, default=OPTIONS["host"], help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--api_key", type=str, default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: the {API_KEY_ENV} environment variable, "
                        "which keeps the key out of `ps`; unset = open)")
    p.add_argument("--model_id", type=str, default="minimind", help="the model id listed by /v1/models")
    p.add_argument("--max_batch", type=int, default=OPTIONS["max_batch"],
                   help="requests decoded together (KV-cache slots); 1 = one at a time")
    p.add_argument("--max_queue", type=int, default=OPTIONS["max_queue"],
                   help="requests that may wait for a slot; more get 429 with Retry-After")
    p.add_argument("--request_timeout", type=float, default=OPTIONS["request_timeout"],
                   help="seconds a request may take from arrival to its last token (queue included); 0 = no limit")
    p.add_argument("--default_max_tokens", type=int, default=OPTIONS["default_max_tokens"],
                   help="completion tokens when a request sets no max_tokens")
    p.add_argument("--max_body_bytes", type=int, default=OPTIONS["max_body_bytes"],
                   help="largest request body accepted, in bytes (413 beyond)")
    p.add_argument("--prefill_chunk", type=int, default=OPTIONS["prefill_chunk"],
                   help="prompt tokens prefilled per step (longer prompts are split, so running streams keep going)")
    p.add_argument("--prefix_cache", type=int, default=OPTIONS["prefix_cache"],
                   help="prompt tokens whose keys and values are kept, so a prompt that begins like an earlier one "
                        "(the system prompt, a conversation's earlier turns) is prefilled from where they differ; "
                        "0 = off")
    p.add_argument("--allow_any_host", action="store_true",
                   help="without an API key, accept any Host header (by default only addresses, localhost and "
                        "--host, against DNS rebinding)")
    p.add_argument("--header_timeout", type=float, default=HTTP_LIMITS["header_timeout"],
                   help="seconds a client has to send a request's head (request line and headers), from when it "
                        "connects or from the end of the previous answer on the connection: then 408 and the "
                        "connection is closed (closed without an answer if nothing came)")
    p.add_argument("--body_timeout", type=float, default=HTTP_LIMITS["body_timeout"],
                   help="seconds a client has to send a request's whole body, from the end of its head: then 408 "
                        "and the connection is closed")
    p.add_argument("--keep_alive_timeout", type=float, default=HTTP_LIMITS["keep_alive_timeout"],
                   help="seconds an idle connection is kept open after an answer (at most --header_timeout)")
    p.add_argument("--shutdown_timeout", type=float, default=HTTP_LIMITS["shutdown_timeout"],
                   help="on SIGTERM/SIGINT the server stops accepting and lets running answers finish for this many "
                        "seconds, then ends them (a stream with an error event and [DONE], others with 503) and "
                        "exits with status 0")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("max_batch", "max_queue", "max_body_bytes", "prefill_chunk", "default_max_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1")
    if args.prefix_cache < 0:
        raise ValueError("--prefix_cache must be >= 0")
    for flag in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag} must be > 0")
    if not args.shutdown_timeout >= 0:
        raise ValueError("--shutdown_timeout must be >= 0")
    try:
        from scripts.serve_http import make_server  # uvicorn, with this server's HTTP limits
    except ImportError:
        sys.exit("serve_openai_api.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    model, tokenizer, _ = load_model(args)  # a LoadError is one line from cli()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(model, tokenizer, args.model_id, api_key, args.max_seq_len, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout=args.request_timeout, host=args.host,
                     default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes,
                     prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache,
                     allow_any_host=args.allow_any_host,
                     loader=weight_loader(args.device, family_of(model), args.tokenizer_path,
                                          args.inference_rope_scaling))
    print(f"serving {args.model_id} at http://{args.host}:{args.port}/v1 (max_batch {args.max_batch})",
          file=sys.stderr, flush=True)
    make_server(app, args.host, args.port, header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                keep_alive_timeout=args.keep_alive_timeout, shutdown_timeout=args.shutdown_timeout).run()


if __name__ == "__main__":
    cli(main)
