"""The agentic RL prompts of trainer/train_agent.py (the original's AgentRLDataset, spec 3.6): conversations that
offer tools, and the values a good final answer must contain.

    from dataset.agent_dataset import AgentRLDataset
    ds = AgentRLDataset("dataset/agent_rl.jsonl")    # ds[0] -> {"messages", "tools", "gt", "index", "where"}
    python dataset/demo_data.py                       # writes the offline demo file dataset/demo/agent_rl.jsonl

One line: {"conversations": [system, user, ..., last], "gt": [...]}. The system message carries the tools in
`tools`, a JSON string (the original's files) or a list, in the OpenAI function format
({"type": "function", "function": {"name": ..., ...}}); a conversation without them offers no tools. The last
message is the reference answer, dropped as the original drops it: the rollout starts after the message before it.
`gt` lists the values the final answer must state (strings or numbers); its length is also the number of valid
tool calls the reward expects (0: answer without tools).

Unlike the original (which json.loads the whole file and fails on the first bad line with a traceback), the
rows are read through the jsonl offset index of dataset/lm_dataset.py and all are checked when the dataset is
built (an agent RL file is small: no tokenizing, only parsing): a bad line is a ValueError naming its file and
line (the stage prints it as one `error:` line, exit 2), or with skip_bad_lines=True is dropped and counted.
Writes nothing.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from dataset.lm_dataset import JsonlIndex, _check_conversation, _json_field


def _check_tools(tools: Any, where: str) -> list | None:
    """The system message's tools as a list of OpenAI function schemas (each with a function name)."""
    tools = _json_field({"tools": tools}, "tools", 0, where)
    for k, tool in enumerate(tools or []):
        fn = tool.get("function")
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ValueError(f"{where}: message 0: tool {k} has no function name "
                             '(expected {"type": "function", "function": {"name": ..., "parameters": ...}})')
    return tools


def parse_agent_row(row: dict, where: str) -> dict:
    """A parsed line -> {"messages", "tools", "gt"}: the conversation without its last message (plain role/content
    dicts), the tools offered (None when none) and the expected values. ValueError("path:line: ...") if malformed."""
    conv, gt = row["conversations"], row["gt"]
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(m, dict) for m in conv):
        raise ValueError(f"{where}: conversations must list the prompt's messages and a last (reference) message")
    messages = conv[:-1]
    _check_conversation(messages, where)
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"{where}: the message before the last must be the user's (or a tool result), got "
                         f"{messages[-1]['role']!r}: the rollout answers it")
    tools = _check_tools(messages[0].get("tools"), where) if messages[0]["role"] == "system" else None
    if not isinstance(gt, list) or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in gt):
        raise ValueError(f"{where}: 'gt' must be a list of expected values (strings or numbers)")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "tools": tools or None,
            "gt": list(gt)}


class AgentRLDataset(Dataset):
    """{"conversations", "gt"} lines -> {"messages", "tools", "gt", "index", "where"}; `index` is the row's position
    in the dataset (the trainer seeds its per-sample choices with it), `where` its "path:line" for messages.
    `tokenizer` and `max_length` are accepted for the original's signature; neither is used (the trainer renders
    and bounds the prompts)."""

    required = ("conversations", "gt")

    def __init__(self, jsonl_path: str | Path, tokenizer=None, max_length: int = 1024, skip_bad_lines: bool = False):
        self.rows = JsonlIndex(jsonl_path)
        self.num_skipped = 0
        keep, first = np.ones(len(self.rows), dtype=bool), None
        for i in range(len(self.rows)):
            try:
                self._parse(i)
            except ValueError as err:
                if not skip_bad_lines:
                    raise
                keep[i], first = False, first or str(err)
        if not keep.all():
            self.num_skipped = int((~keep).sum())
            warnings.warn(f"{self.rows.path}: skipped {self.num_skipped} of {len(keep)} lines; first: {first}",
                          stacklevel=2)
            self.rows.select(keep)
        if len(self.rows) == 0:
            raise ValueError(f"{self.rows.path}: no usable lines")

    def _parse(self, i: int) -> dict:
        where = self.rows.where(i)
        return parse_agent_row(self.rows.read(i, self.required), where)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self._parse(int(i)), "index": int(i), "where": self.rows.where(int(i))}


def agent_collate(batch: list) -> dict:
    """A list of samples -> a dict of lists (the original's collate_fn)."""
    return {key: [sample[key] for sample in batch] for key in batch[0]}

