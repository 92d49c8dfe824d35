"""The chat format around MiniMind's generation: the prompt (ChatML template), the guard against
ChatML control tokens inside message text, and the parser that splits `<think>` / `<tool_call>`
output into reasoning, content and tool calls. Shared by eval_llm.py, the server and the web demo.

    python -c "from model.chat_format import parse_output; print(parse_output('<think>a</think>b'))"
Writes nothing.
"""
import json

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # the shipped tokenizer's special tokens


def build_prompt(tokenizer, messages: list, raw: bool = False, tools=None, open_thinking: bool = False) -> str:
    """The chat template with the generation prompt; raw=True (pretrain weights) gives bos + the
    last user text without a template, as the original.

    open_thinking is passed to the template as the original's minimind-3 switch: its template then ends the prompt
    with an open `<think>\n` (the model writes its reasoning, then `</think>`), else with an empty, closed think
    block. MiniMind2's template (the original fa82707's) has no switch that opens a think block -- its only one,
    `enable_thinking=False`, pre-fills an empty block, which no MiniMind2 stage trained on -- so for MiniMind2 the
    prompt is the same either way and a reasoning model opens `<think>` itself. opens_think(prompt) tells which."""
    if raw:
        return tokenizer.bos_token + messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True,
                                         open_thinking=bool(open_thinking))


def opens_think(prompt: str) -> bool:
    """Does the prompt end inside an open think block (minimind-3 with open_thinking)? Then the model's output
    starts with reasoning, without a `<think>` of its own: parse it with OutputParser(thinking=True)."""
    return prompt.rstrip().endswith(THINK)


def find_control_token(text: str, tokens=CONTROL_TOKENS):
    """The first ChatML control token written inside `text`, or None. Rendered into a prompt, such text
    would become a real special token (e.g. a forged system turn); the training datasets reject it too."""
    hits = [(text.find(t), t) for t in tokens if t in text]
    return min(hits)[1] if hits else None


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

    thinking=True: the prompt already opened the think block (opens_think), so the text up to `</think>` is
    reasoning although no `<think>` was generated (one that is generated first anyway is dropped); as the
    original's server, the content after `</think>` starts past its leading newlines. Text without `</think>`
    is all reasoning.
    """

    def __init__(self, tools: bool = False, thinking: bool = False):
        self.tools, self.thinking = tools, thinking
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
            self.state = "think" if self.state == "start" and self.thinking else "content"
            self.strip_lead = True
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
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return {"name": call["name"], "arguments": call.get("arguments", {})}


def parse_output(text: str, tools: bool = False, thinking: bool = False) -> dict:
    """Whole-text form of OutputParser: {"reasoning": str, "content": str, "tool_calls": [dict]}."""
    parser = OutputParser(tools, thinking)
    events = parser.feed(text) + parser.finish()
    return {"reasoning": "".join(t for k, t in events if k == "reasoning"),
            "content": "".join(t for k, t in events if k == "content"),
            "tool_calls": [t for k, t in events if k == "tool_call"]}
