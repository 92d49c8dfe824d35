"""An OpenAI-compatible chat server for MiniMind (FastAPI + uvicorn), for Open-WebUI, FastGPT,
the openai package, scripts/chat_openai_api.py and scripts/web_demo.py.

    python scripts/serve_openai_api.py                            # out/full_sft_512.pth on 127.0.0.1:8998
    python scripts/serve_openai_api.py --load_from ../MiniMind2 --host 0.0.0.0 --api_key sk-local
    python scripts/serve_openai_api.py --save_dir out --weight full_sft --device cpu   # tiny demo weights

Endpoints: GET /v1/models and POST /v1/chat/completions (stream or not; messages, temperature,
top_p, max_tokens / max_completion_tokens, stop, seed, tools, stream_options.include_usage and the
extra field repetition_penalty). Output of reasoning models goes to `reasoning_content`; with
`tools`, `<tool_call>` blocks become `tool_calls` (finish_reason "tool_calls"). Every error is an
OpenAI-shaped JSON body with a 4xx code. One model serves one request at a time (a lock around
generate), so concurrent requests queue and never mix. Model flags are those of eval_llm.py.
"""
import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.chat_format import OutputParser, build_prompt  # noqa: E402
from model.engine import StopMatcher, TextStream, sampling_kwargs  # noqa: E402
from scripts.inference_utils import LoadError, add_model_args, load_model  # noqa: E402

ROLES = ("system", "user", "assistant", "tool")
DEFAULTS = dict(temperature=0.7, top_p=0.92, max_tokens=8192)  # the original server's defaults


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
        tool_calls = msg.get("tool_calls") if role == "assistant" else None
        if tool_calls is not None and not (isinstance(tool_calls, list) and all(
                isinstance(c, dict) and isinstance((c.get("function") or c).get("name"), str) for c in tool_calls)):
            raise APIError(400, f"{where}.tool_calls must be a list of function calls", where + ".tool_calls",
                           "invalid_type")
        content = _text(msg.get("content"), where, allow_none=role == "assistant")
        clean.append({"role": role, "content": content or ""} | ({"tool_calls": tool_calls} if tool_calls else {}))
    tools = body.get("tools") or None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise APIError(400, "'tools' must be a list of objects", "tools", "invalid_type")
    if body.get("tool_choice") == "none":
        tools = None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n = 1 is supported", "n", "invalid_value")
    stream = body.get("stream") or False  # null = absent, as for every optional field
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise APIError(400, "'seed' must be an integer", "seed", "invalid_type")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options = body.get("stream_options") or {}
    return dict(
        messages=clean, tools=tools, stop=[s for s in stop or [] if s], stream=stream, seed=seed,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        temperature=_number(body, "temperature", 0, 2, DEFAULTS["temperature"]),
        top_p=_number(body, "top_p", 0, 1, DEFAULTS["top_p"], low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 0, 2, 1.0, low_open=True),
        max_tokens=_number(body, max_name, 1, context, min(DEFAULTS["max_tokens"], context), integer=True))


# ---- output ----
def tool_call_json(call: dict) -> dict:
    args = call["arguments"]
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


class Completion:
    """One request's generation: yields output events, then knows finish_reason and usage."""

    def __init__(self, model, tokenizer, lock, req: dict, context: int):
        self.tokenizer, self.req = tokenizer, req
        try:
            prompt = build_prompt(tokenizer, req["messages"], tools=req["tools"])
        except Exception as err:  # a template error is the request's fault (e.g. a message it cannot render)
            raise APIError(400, f"the messages cannot be rendered with the chat template: {err}", "messages") from None
        self.input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        self.prompt_tokens = self.input_ids.shape[1]
        if self.prompt_tokens >= context:
            raise APIError(400, f"the prompt has {self.prompt_tokens} tokens; this model's context is {context} "
                                "tokens (prompt + completion). Shorten the messages.", "messages",
                           "context_length_exceeded")
        self.max_new = min(req["max_tokens"], context - self.prompt_tokens)
        self.model, self.lock, self.stream = model, lock, None
        self.stop = StopMatcher(req["stop"])
        self.parser = OutputParser(tools=bool(req["tools"]))
        self.tool_calls = []

    def events(self):
        self.stream = TextStream(self.model, self.tokenizer, self.input_ids.to(self.model.device), self.max_new,
                                 lock=self.lock, seed=self.req["seed"],
                                 **sampling_kwargs(self.req["temperature"], self.req["top_p"],
                                                   self.req["repetition_penalty"]))
        try:
            for piece in self.stream:
                yield from self._parsed(self.parser.feed(self.stop.feed(piece)))
                if self.stop.stopped:
                    break
            yield from self._parsed(self.parser.feed(self.stop.finish()) + self.parser.finish())
        finally:
            self.stream.close()

    def close(self):
        if self.stream is not None:
            self.stream.close()

    def _parsed(self, events):
        for kind, value in events:
            if kind == "tool_call":
                value = tool_call_json(value)
                self.tool_calls.append(value)
            yield kind, value

    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        ids = self.stream.output_ids
        if not self.stop.stopped and len(ids) >= self.max_new and ids[-1].item() != self.tokenizer.eos_token_id:
            return "length"
        return "stop"

    def usage(self) -> dict:
        ids = self.stream.output_ids
        n = len(ids) - int(len(ids) > 0 and ids[-1].item() == self.tokenizer.eos_token_id)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}


# ---- app ----
def create_app(model, tokenizer, model_id: str = "minimind", api_key: str = None, max_seq_len: int = 8192):
    """The FastAPI app serving `model` (tests build it around a tiny in-memory model)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    def check_key(request: Request):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    app = FastAPI(title="MiniMind OpenAI-compatible API", dependencies=[Depends(check_key)])
    lock = threading.Lock()
    context = min(max_seq_len, model.config.max_position_embeddings)
    created = int(time.time())

    def error(err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", None, "invalid_json") from None
        req = parse_request(body, context)
        job = await run_in_threadpool(Completion, model, tokenizer, lock, req, context)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req["stream"]:
            return StreamingResponse(sse(job, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run_in_threadpool(whole, job, head)

    def whole(job: Completion, head: dict) -> dict:
        parts = {"reasoning": [], "content": []}
        for kind, value in job.events():
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

    async def sse(job: Completion, head: dict):
        def chunk(delta=None, finish_reason=None, **extra):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
            data = head | {"object": "chat.completion.chunk", "system_fingerprint": None, "choices": choices} | extra
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for kind, value in iterate_in_threadpool(job.events()):
                if kind == "tool_call":
                    yield chunk({"tool_calls": [{"index": len(job.tool_calls) - 1} | value]})
                else:
                    yield chunk({"reasoning_content" if kind == "reasoning" else "content": value})
            yield chunk({}, job.finish_reason())
            if job.req["include_usage"]:
                yield chunk(None, usage=job.usage())
        except Exception as err:  # headers are sent: the error travels as an event, then the stream ends
            yield f"data: {json.dumps(APIError(500, f'{type(err).__name__}: {err}', type_='server_error').body())}\n\n"
        finally:  # also when the client went away: stop generating for it
            job.close()
        yield "data: [DONE]\n\n"

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MiniMind OpenAI-compatible API server", allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--max_seq_len", type=int, default=8192,
                   help="context accepted per request in tokens (prompt + completion; capped by the model's "
                        "max_position_embeddings)")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--api_key", type=str, default=None, help="require 'Authorization: Bearer KEY' (default: open)")
    p.add_argument("--model_id", type=str, default="minimind", help="the model id listed by /v1/models")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        sys.exit("serve_openai_api.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    try:
        model, tokenizer, _ = load_model(args)
    except LoadError as err:
        sys.exit(f"serve_openai_api.py: {err}")
    app = create_app(model, tokenizer, args.model_id, args.api_key, args.max_seq_len)
    print(f"serving {args.model_id} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
