"""Inference plumbing shared by eval_llm.py, scripts/serve_openai_api.py and scripts/web_demo.py: the prompt,
streamed generation in a thread, and the parser that splits `<think>` / `<tool_call>` output.

Model loading (the flags, what --load_from is, weights, LoRA, tokenizer, errors) lives in model/loading.py;
the names serve_openai_api.py and its tests import from here are re-exported until they import it directly.
"""
import json
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.loading import LoadError, add_model_args, load_model, load_tokenizer  # noqa: E402,F401


# ---- prompt and generation ----
def build_prompt(tokenizer, messages: list, raw: bool = False, tools=None) -> str:
    """The chat template with the generation prompt; raw=True (pretrain weights) gives bos + the
    last user text without a template, as the original."""
    if raw:
        return tokenizer.bos_token + messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)


def sampling_kwargs(temperature: float, top_p: float, repetition_penalty: float = 1.0) -> dict:
    """generate() arguments; temperature 0 means greedy decoding."""
    if temperature <= 0:
        return dict(do_sample=False, repetition_penalty=repetition_penalty)
    return dict(do_sample=True, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)


class _Cancel:
    """A stopping criterion that ends generation once `event` is set (client gone, stop string seen)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _piece_streamer(tokenizer):
    """A TextIteratorStreamer that hands over text after every token (the stock one waits for a space
    or a CJK character), holding back only an incomplete UTF-8 character. Decoding restarts after
    each hand-over, which is exact for byte-level BPE and keeps long answers O(1) per token."""
    from transformers import TextIteratorStreamer

    class PieceStreamer(TextIteratorStreamer):
        def put(self, value):
            if value.dim() > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if not text.endswith("\ufffd"):
                self.token_cache, self.print_len = [], 0
                self.on_finalized_text(text)

    return PieceStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class TextStream:
    """Run model.generate in a background thread and iterate over the decoded text pieces as they come.

    - generation holds `lock` (when given) for its whole run, so concurrent streams never share the model;
    - an exception inside generate ends the iteration and is re-raised in the consumer (never a hang);
    - close() stops generation at the next token; after the iteration, `output_ids` holds the new tokens.
    """

    def __init__(self, model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, lock=None, seed=None,
                 **generate_kwargs):
        from transformers import StoppingCriteriaList
        self.streamer = _piece_streamer(tokenizer)
        self.prompt_len = input_ids.shape[1]
        self.output_ids = input_ids.new_zeros(0)
        self.error = None
        self._cancel = threading.Event()
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                      streamer=self.streamer, stopping_criteria=StoppingCriteriaList([_Cancel(self._cancel)]),
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
        self._thread = threading.Thread(target=self._run, args=(model, kwargs, lock, seed), daemon=True)
        self._thread.start()

    def _run(self, model, kwargs, lock, seed):
        try:
            with lock if lock is not None else nullcontext():
                if self._cancel.is_set():
                    raise _Cancelled()
                if seed is not None:
                    torch.manual_seed(seed)
                with torch.no_grad():
                    out = model.generate(**kwargs)
                self.output_ids = out[0, self.prompt_len:].cpu()
        except _Cancelled:
            self.streamer.end()
        except BaseException as err:  # handed to the consumer thread, which re-raises it
            self.error = err
            self.streamer.end()

    def __iter__(self):
        for piece in self.streamer:
            if piece:
                yield piece
        self._thread.join()
        if self.error is not None:
            raise self.error

    def close(self):
        self._cancel.set()


class _Cancelled(Exception):
    pass


# ---- output parsing ----
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"


def _tag_prefix_len(text: str, tags) -> int:
    """Length of the longest end of `text` that is the start of one of `tags` (a tag still being generated)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


class OutputParser:
    """Split streamed model text into events: ("reasoning", str), ("content", str), ("tool_call", dict).

    R1-style output `<think>\\nR\\n</think>\\n<answer>\\nA\\n</answer>` gives reasoning R and content A.
    With tools=True, each `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block becomes a
    tool_call event {"name", "arguments"} (a block that is not such JSON stays content). Text that may
    be the start of a tag, and trailing whitespace, wait for the next piece, so any split of the same
    text gives the same events once consecutive events of one kind are joined.
    """

    def __init__(self, tools: bool = False):
        self.tools = tools
        self.state = "start"  # start -> think -> after_think -> content <-> tool
        self.buf = ""
        self.in_answer = False
        self.strip_lead = True

    def feed(self, text: str) -> list:
        self.buf += text
        out = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list:
        out = []
        while self._step(out, final=True):
            pass
        return out

    def _emit(self, out, kind, text):
        if not text:
            return
        if out and out[-1][0] == kind and kind != "tool_call":
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    def _step(self, out, final: bool) -> bool:
        """Consume what can be decided from self.buf; True when the state changed (call again)."""
        if self.state in ("start", "after_think"):
            opener = THINK if self.state == "start" else ANSWER
            head = self.buf.lstrip()
            if head.startswith(opener):
                self.buf = head[len(opener):]
                self.state, self.in_answer = ("think", False) if opener == THINK else ("content", True)
                self.strip_lead = True
                return True
            if opener.startswith(head) and not final:
                return False  # maybe the opener, not complete yet
            self.state, self.strip_lead = "content", True
            return True
        if self.strip_lead:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.strip_lead = False
        kind = "reasoning" if self.state == "think" else "content"
        if self.state == "tool":
            end = self.buf.find(END_TOOL_CALL)
            if end < 0:
                if final:  # unterminated block: show it as it is
                    self._emit(out, "content", self.buf.rstrip())
                    self.buf, self.state = "", "content"
                return False
            call = _parse_tool_call(self.buf[len(TOOL_CALL):end])
            if call is None:
                self._emit(out, "content", self.buf[:end + len(END_TOOL_CALL)])
            else:
                self._emit(out, "tool_call", call)
            self.buf, self.state, self.strip_lead = self.buf[end + len(END_TOOL_CALL):], "content", call is not None
            return True
        if self.state == "think":
            tags = [END_THINK]
        else:
            tags = ([END_ANSWER] if self.in_answer else []) + ([TOOL_CALL] if self.tools else [])
        hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
        if hits:
            at, tag = min(hits)
            self._emit(out, kind, self.buf[:at].rstrip())
            if tag == TOOL_CALL:
                self.buf, self.state = self.buf[at:], "tool"
            else:
                self.buf, self.strip_lead = self.buf[at + len(tag):], True
                if tag == END_THINK:
                    self.state = "after_think"
                else:
                    self.in_answer = False
            return True
        if final:
            self._emit(out, kind, self.buf.rstrip())
            self.buf = ""
            return False
        keep = _tag_prefix_len(self.buf, tags)
        ready = self.buf[:len(self.buf) - keep].rstrip()
        self._emit(out, kind, ready)
        self.buf = self.buf[len(ready):]
        return False


def _parse_tool_call(text: str):
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return {"name": call["name"], "arguments": call.get("arguments", {})}


def parse_output(text: str, tools: bool = False) -> dict:
    """Whole-text form of OutputParser: {"reasoning": str, "content": str, "tool_calls": [dict]}."""
    parser = OutputParser(tools)
    events = parser.feed(text) + parser.finish()
    return {"reasoning": "".join(t for k, t in events if k == "reasoning"),
            "content": "".join(t for k, t in events if k == "content"),
            "tool_calls": [t for k, t in events if k == "tool_call"]}
