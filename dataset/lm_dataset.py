"""Datasets for every training stage, read lazily from jsonl files, optionally through a token cache.

    from dataset.lm_dataset import PretrainDataset, SFTDataset, DPODataset, RLAIFDataset, pad_collate
    ds = SFTDataset("dataset/sft_mini_512.jsonl", tokenizer, max_length=512)
    loader = DataLoader(ds, batch_size=16, collate_fn=pad_collate)   # {"input_ids", "labels", "loss_mask", "tokens"}
    ds = SFTDataset("dataset/sft_mini_512.jsonl", tokenizer, max_length=512, cache_dir="cache")  # tokenize once
    python scripts/inspect_data.py --data_path dataset/demo/sft.jsonl --kind sft   # check a file first

Same samples as the original MiniMind (fa82707, spec section 4). With the minimind-3 tokenizer
(model/minimind3/, `is_minimind3_tokenizer`) they are upstream d65ef2c's instead: pretrain texts get BOS/EOS,
chat rows render through its template (a think block on every answer, from `reasoning_content` or empty),
rows may hold `tools` / `tool_calls` as JSON strings, and SFT draws none of upstream's random edits
(SFTDataset says why). Either way, four differences:
* Rows are not loaded into Python objects. `JsonlIndex` scans the file once for line offsets
  (numpy over chunked reads: 0.4 s and 8 bytes a line for 1 GiB, see bench/bench_data.py) and
  parses a line only when it is requested, so DataLoader workers and DDP ranks never copy the
  corpus (the original's lists of dicts take 1.6 GiB per process for that file).
* Samples come back unpadded, as (X, Y, loss_mask) of length min(len(ids), max_length) - 1, and
  `pad_collate` / `dpo_collate` pad each batch to its longest sample. `pad_to_max=True` pads to
  max_length instead and returns exactly the original tensors. `lengths()` gives the byte length
  of each line, a cheap proxy for its token count; `token_lengths()` gives the exact input lengths.
* With `cache_dir`, the constructor tokenizes the whole file once, in a process pool, into a token
  cache (dataset/token_cache.py) or loads the one built before, and samples are then slices of its
  memory-mapped ids plus a mask filled from its spans: training never calls the tokenizer. Without
  it every sample is tokenized when it is read, as the original does. Both give identical tensors.
* Bad input raises ValueError("path:line: reason") when the line is read (with a cache: while the
  cache is built, for the first bad line in the file), or with `skip_bad_lines=True` is dropped at
  construction (counted in `num_skipped`, one warning).
  Chat rows must be well formed: an optional system message first (the only place one may be),
  then user and assistant alternating, `tool` messages only after an assistant turn, non-empty
  string content, and no literal <|im_start|>/<|im_end|> inside a message (it would corrupt the
  loss mask). Pretrain `text` must be a non-empty string. A file with no usable line is an error.
  An SFT/DPO sample whose assistant tokens all lie past max_length raises `NothingToSupervise`
  when read; with a cache such samples are always dropped (the original trains on them with an
  all-zero mask), counted in `num_unsupervised` and reported in one line.
"""
from __future__ import annotations

import json
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.token_cache import TokenCache, log_main

# the DataLoader forks workers after the tokenizer has run; Rust's thread pool does not survive fork
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (X, Y, loss_mask), long tensors of one length
_BOM = b"\xef\xbb\xbf"
_TEXT = np.ones(256, dtype=bool)
_TEXT[[9, 10, 11, 12, 13, 32]] = False  # the bytes that bytes.strip() removes: a line of only these is blank


def is_minimind3_tokenizer(tokenizer) -> bool:
    """True for the minimind-3 tokenizer (model/minimind3/, or one trained with --model_family minimind3).
    Its chat template is the only one with the `open_thinking` switch, and the template is part of the
    token cache key, so a cache never mixes the two families' layouts."""
    return "open_thinking" in str(getattr(tokenizer, "chat_template", None) or "")


# ---- jsonl reading ----
def _parse_line(raw: bytes, where: str, required: Sequence[str] = ()) -> dict:
    """The single place where a line becomes a row; every failure names its file and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: invalid UTF-8 at byte {e.start}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: bad JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit limit
        raise ValueError(f"{where}: bad JSON: {e}") from None
    if "\\ud" in text or "\\uD" in text:  # an escaped lone surrogate decodes to a str no tokenizer can encode
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: bad JSON: a \\ud800-\\udfff escape that is not part of a surrogate pair") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in required:
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    return row


def _scan_lines(path: str, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, blanks) of the non-blank lines: `start` byte offsets (uint32 for files under 4 GiB,
    else int64), `length` in bytes without the newline (uint32), and `blanks`, for each blank line, the index
    of the kept line it precedes (line numbers follow from it: usually empty).

    Reads fixed-size chunks and carries the unfinished last line into the next one, so memory is a
    few chunks plus 8 bytes a line whatever the file size; a line longer than a chunk grows it."""
    size = os.path.getsize(path)
    offset_type = np.uint32 if size < 2 ** 32 else np.int64
    starts, lengths, blanks = [], [], []
    buf, have, base, kept = bytearray(chunk_bytes), 0, 0, 0
    with open(path, "rb", buffering=0) as f:
        while True:
            if have == len(buf):
                buf = buf + bytearray(len(buf))
            got = f.readinto(memoryview(buf)[have:])
            eof, have = got == 0, have + got
            a = np.frombuffer(buf, dtype=np.uint8, count=have)
            end = np.flatnonzero(a == 10)
            if eof and have and (len(end) == 0 or end[-1] != have - 1):
                end = np.append(end, have)  # the last line has no trailing newline
            if len(end) == 0:
                if eof:
                    break
                continue
            cut = min(int(end[-1]) + 1, have)
            start = np.concatenate(([0], end[:-1] + 1))
            # blank = only whitespace; a line that starts with a non-space byte can't be, so only the
            # rare rest (empty, "\r", indented) is checked in Python: a full byte test costs 1 s/GB
            keep = (end > start) & _TEXT[a[start]]
            for k in np.flatnonzero(~keep & (end > start)):
                keep[k] = bool(a[start[k]:end[k]].tobytes().strip())
            starts.append((base + start[keep]).astype(offset_type))
            lengths.append((end[keep] - start[keep]).astype(np.uint32))
            before = np.cumsum(keep) - keep                  # kept lines before each line of the chunk
            blanks.append(kept + before[~keep])
            kept += int(keep.sum())
            del a  # release the buffer export before it is shifted
            buf[:have - cut] = buf[cut:have]
            base, have = base + cut, have - cut
            if eof:
                break
    cat = lambda parts, t: np.concatenate(parts).astype(t, copy=False) if parts else np.zeros(0, t)
    return cat(starts, offset_type), cat(lengths, np.uint32), cat(blanks, np.int64)


class JsonlIndex:
    """Random access to the rows of a jsonl file through an offset index; blank lines are skipped.

    The index is 8 bytes a line (offset and length); line numbers, needed only for messages, follow from
    the positions of the blank lines. The file is opened lazily once per process (reads are seek+read on
    that handle, so one reader thread per process), which makes the index picklable for spawned DataLoader
    workers and safe across fork: a forked worker opens its own handle instead of sharing the parent's offset."""

    def __init__(self, path: str | Path, chunk_bytes: int = 4 << 20):
        self.path = str(path)
        self.starts, self.lengths, self._blanks = _scan_lines(self.path, chunk_bytes)
        self._linenos = None           # explicit line numbers, once rows were dropped (select)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.starts)

    def lineno(self, i: int) -> int:
        """1-based line number of row i in the file (blank lines counted)."""
        if self._linenos is not None:
            return int(self._linenos[i])
        return int(i) + 1 + int(np.searchsorted(self._blanks, i, side="right"))

    @property
    def linenos(self) -> np.ndarray:
        if self._linenos is not None:
            return self._linenos
        index = np.arange(len(self), dtype=np.int64)
        return index + 1 + np.searchsorted(self._blanks, index, side="right")

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lineno(i)}"

    def raw(self, i: int) -> bytes:
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        start = int(self.starts[i])
        self._file.seek(start)
        raw = self._file.read(int(self.lengths[i]))
        return raw[len(_BOM):] if start == 0 and raw.startswith(_BOM) else raw  # Windows editors add one

    def read(self, i: int, required: Sequence[str] = ()) -> dict:
        return _parse_line(self.raw(i), self.where(i), required)

    def nbytes(self) -> np.ndarray:
        return self.lengths.astype(np.int64)

    def select(self, keep: np.ndarray) -> None:
        self._linenos = self.linenos[keep].astype(np.int64)
        self.starts, self.lengths = self.starts[keep], self.lengths[keep]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[dict]:
    """Yield the rows of a jsonl file in order (blank lines skipped), checking `required` fields.
    Raises ValueError(f"{path}:{lineno}: ...") on bad UTF-8, bad JSON, a non-object or a missing field."""
    index = JsonlIndex(path)
    for i in range(len(index)):
        yield index.read(i, required)


# ---- loss mask and sample layout ----
def _find(ids: np.ndarray, pattern: Sequence[int]) -> np.ndarray:
    """Every index where `pattern` starts in `ids`, in order."""
    k = len(pattern)
    if k == 0 or len(ids) < k:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, k)
    return np.flatnonzero((windows == np.asarray(pattern)).all(axis=1))


def assistant_loss_mask(ids: np.ndarray, start_ids: Sequence[int], end_ids: Sequence[int]) -> np.ndarray:
    """1 on every token of each assistant turn: the original's `_generate_loss_mask` (spec 4.2).

    For each match of `start_ids` ('<|im_start|>assistant') not inside an earlier turn, mask
    [start + 1, end + len(end_ids) + 1) clipped to len(ids), where start is just after the match and
    end the first `end_ids` ('<|im_end|>') at or after start (len(ids) if none). Skipping the token at
    `start` leaves the "\\n" after "assistant" unsupervised; the +1 supervises the token after
    <|im_end|>. Pattern search is vectorised; the Python loop runs once per assistant turn."""
    n, mask = len(ids), np.zeros(len(ids), dtype=np.int64)
    ends, resume = _find(ids, end_ids), 0
    for match in _find(ids, start_ids):
        if match < resume:  # the original scan continues after the previous turn's end
            continue
        start = match + len(start_ids)
        k = np.searchsorted(ends, start)
        end = int(ends[k]) if k < len(ends) else n
        mask[start + 1:min(end + len(end_ids) + 1, n)] = 1
        resume = end + len(end_ids) if k < len(ends) else n
    return mask


def mask_spans(mask: np.ndarray) -> np.ndarray:
    """The (start, end) runs of nonzero values in `mask`, as int32 (k, 2): the loss mask, compressed."""
    framed = np.zeros(len(mask) + 2, dtype=bool)
    framed[1:-1] = mask
    return np.flatnonzero(framed[1:] != framed[:-1]).astype(np.int32).reshape(-1, 2)  # rises and falls alternate


def _fill(spans: np.ndarray, width: int, dtype=np.int64) -> np.ndarray:
    """The mask of `width` positions that `spans` describe (runs past `width` are cut)."""
    mask = np.zeros(width, dtype=dtype)
    for start, end in spans:
        mask[start:end] = 1
    return mask


def _pad_stack(seqs: Sequence[torch.Tensor], length: int, pad_id: int = 0) -> torch.Tensor:
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for row, seq in zip(out, seqs):
        row[:len(seq)] = seq
    return out


def pad_collate(batch: Sequence[Sample], pad_id: int = 0, length: int | None = None) -> dict[str, Any]:
    """Stack (X, Y, loss_mask) samples, right-padding to the batch's longest (or to `length`) with the pad
    id and mask 0: {"input_ids", "labels", "loss_mask"} (B, T) plus "tokens", the number of real positions.
    Right padding under causal attention leaves every real position's logits unchanged."""
    length = max([length or 0] + [len(x) for x, _, _ in batch])
    X, Y, mask = (_pad_stack([sample[k] for sample in batch], length, pad_id if k < 2 else 0) for k in range(3))
    return {"input_ids": X, "labels": Y, "loss_mask": mask, "tokens": sum(len(x) for x, _, _ in batch)}


def pack_collate(rows: Sequence[Sequence[Sample]], pad_id: int = 0, length: int | None = None) -> dict[str, Any]:
    """Packed batch: each row holds several whole samples end to end, right-padded as in pad_collate.
    "position_ids" restart at 0 at every sample (and once more for the padding), so the model attends
    within each sample only and gives every sample the logits it has alone (model_minimind.py). Each
    sample keeps its own shifted targets, so no loss crosses a sample boundary."""
    joined = [tuple(torch.cat([sample[k] for sample in row]) for k in range(3)) for row in rows]
    batch = pad_collate(joined, pad_id, length)
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.stack([
        torch.cat([torch.arange(len(sample[0])) for sample in row] + [torch.arange(width - len(x))])
        for row, (x, _, _) in zip(rows, joined)])
    return batch


def dpo_collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, Any]:
    """Stack DPO dicts; chosen and rejected share one length so the trainer can concatenate them.
    "tokens" counts the real positions of both sides."""
    length = max(len(sample[key]) for sample in batch for key in ("x_chosen", "x_rejected"))
    out = {key: _pad_stack([sample[key] for sample in batch], length, 0 if key.startswith("mask") else pad_id)
           for key in batch[0]}
    out["tokens"] = sum(len(sample["x_chosen"]) + len(sample["x_rejected"]) for sample in batch)
    return out


# ---- row validation ----
def _check_content(msg: dict, k: int, where: str) -> None:
    content = msg.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where}: message {k}: content must be a string, got {type(content).__name__}")
    # an assistant turn may be only tool calls, and a system turn only tool definitions (minimind-3 rows)
    if not content.strip() and not (msg.get("role") == "assistant" and msg.get("tool_calls")) \
            and not (msg.get("role") == "system" and (msg.get("tools") or msg.get("functions"))):
        raise ValueError(f"{where}: message {k}: empty content")
    if IM_START in content or IM_END in content:
        raise ValueError(f"{where}: message {k}: content contains a ChatML control token")
    reasoning = msg.get("reasoning_content")  # rendered into the think block by the minimind-3 template
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"{where}: message {k}: reasoning_content must be a string, got {type(reasoning).__name__}")
    if reasoning and (IM_START in reasoning or IM_END in reasoning):
        raise ValueError(f"{where}: message {k}: reasoning_content contains a ChatML control token")


def _json_field(msg: dict, key: str, k: int, where: str) -> Any:
    """msg[key] as a list of objects: minimind-3 rows store `tools` and `tool_calls` as JSON strings."""
    value = msg.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: message {k}: {key!r} is not valid JSON: {e.msg} (column {e.colno})") from None
    if value and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        raise ValueError(f"{where}: message {k}: {key!r} must be a list of objects")
    return value or None


_FOLLOWS = {"system": (None,), "user": (None, "system", "assistant"),
            "assistant": ("user", "tool"), "tool": ("assistant", "tool")}


def _check_conversation(conv: Any, where: str) -> None:
    """Reject what the chat template would render into a dialogue the model should not learn."""
    if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) for m in conv):
        raise ValueError(f"{where}: conversations must be a non-empty list of messages")
    prev = None
    for k, msg in enumerate(conv):
        role = msg.get("role")
        if role not in _FOLLOWS:
            raise ValueError(f"{where}: message {k}: unknown role {role!r}")
        if prev not in _FOLLOWS[role]:
            after = f"after {prev!r}" if prev else "first"
            raise ValueError(f"{where}: message {k}: role {role!r} cannot come {after}")
        _check_content(msg, k, where)
        prev = role


# ---- datasets ----
class NothingToSupervise(ValueError):
    """A well-formed chat sample whose assistant tokens all lie past max_length: nothing to train on.
    The original trains on it anyway (an all-zero mask); with a token cache it is dropped and counted."""


Part = tuple[np.ndarray, np.ndarray]  # (ids truncated to max_length, int64; loss-mask spans, int32 (k, 2))


class _JsonlDataset(Dataset):
    """Offset-indexed rows plus what every dataset shares: tokenizer ids, the token cache, lengths,
    bad-line skipping. A subclass says how a row becomes texts (`_texts`, one per part) and how ids
    are masked (`_mask`, `_check`); every sample is built from `_parts`, cached or freshly tokenized.
    `cache_dir`: build or load the token cache there (None: tokenize each sample when read);
    `workers`: processes for building it (0: min(cpu count, 8))."""
    required: tuple[str, ...] = ()
    part_names: tuple[str, ...] = ("sample",)  # one (ids, mask) per name: DPO has chosen and rejected

    def __init__(self, path: str | Path, tokenizer, max_length: int, pad_to_max: bool, skip_bad_lines: bool,
                 cache_dir: str | Path | None = None, workers: int = 0):
        self.rows = JsonlIndex(path)
        self.tokenizer, self.max_length, self.pad_to_max = tokenizer, max_length, pad_to_max
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.num_skipped = self.num_unsupervised = 0
        self.cache = None
        if cache_dir is not None and len(self.rows):
            self._attach_cache(cache_dir, skip_bad_lines, workers)
        elif skip_bad_lines:
            self._drop_bad_lines()
        if len(self.rows) == 0:  # an empty epoch would "train" without a word
            raise ValueError(f"{self.rows.path}: no usable lines")

    @property
    def parts(self) -> int:
        return len(self.part_names)

    # token patterns of the assistant header and the turn end, from the tokenizer (spec 4.2); computed
    # on first use, so a dataset read from its token cache never calls the tokenizer
    @cached_property
    def start_ids(self) -> list[int]:
        return self.tokenizer(IM_START + "assistant", add_special_tokens=False).input_ids

    @cached_property
    def end_ids(self) -> list[int]:
        return self.tokenizer(IM_END, add_special_tokens=False).input_ids

    def _attach_cache(self, cache_dir: str | Path, skip_bad_lines: bool, workers: int) -> None:
        """Build or load the token cache, then keep only the rows it kept (dataset indices stay contiguous)."""
        lines = len(self.rows)
        self.cache = TokenCache.open(self, cache_dir, skip_bad_lines, workers)
        if self.cache.num_samples != lines:
            self.rows.select(self.cache.rows())
        self.num_skipped, self.num_unsupervised = self.cache.num_skipped, self.cache.num_unsupervised
        if self.num_skipped:
            warnings.warn(f"{self.rows.path}: skipped {self.num_skipped} of {lines} lines; first: "
                          f"{self.cache.first_skipped}", stacklevel=4)
        if self.num_unsupervised:
            log_main(f"{self.rows.path}: skipped {self.num_unsupervised:,} of {lines:,} samples: no answer within "
                     f"max_seq_len {self.max_length}")

    def _drop_bad_lines(self) -> None:
        """Build every sample once (tokenizing the whole file) and drop the lines that fail."""
        keep, first = np.ones(len(self.rows), dtype=bool), None
        for i in range(len(self.rows)):
            try:
                self[i]
            except ValueError as e:
                keep[i], first = False, first or str(e)
        self.num_skipped = int((~keep).sum())
        if self.num_skipped:
            warnings.warn(f"{self.rows.path}: skipped {self.num_skipped} of {len(keep)} lines; first: {first}",
                          stacklevel=4)
            self.rows.select(keep)

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        """Byte length of each sample's line: a cheap, roughly proportional stand-in for its token
        count (for length-grouped sampling; no tokenizing). Aligned with dataset indices."""
        return self.rows.nbytes()

    def token_lengths(self) -> np.ndarray:
        """Input length (len of X, unpadded) of every sample, int32; DPO: the longer of its two parts.
        Read from the token cache when there is one; otherwise every sample is tokenized once."""
        if self.cache is not None:
            counts = self.cache.entry_lengths()
        else:
            counts = np.array([len(ids) for i in range(len(self)) for ids, _ in self._parts(i)], dtype=np.int64)
        return (np.maximum(counts, 2) - 1).reshape(-1, self.parts).max(axis=1).astype(np.int32)

    # ---- from a row to token ids and mask ----
    def _row(self, i: int) -> tuple[dict, str]:
        return self.rows.read(int(i), self.required), self.rows.where(int(i))

    def _texts(self, i: int) -> list[str]:
        """The text each part of row i is tokenized from; ValueError("path:line: ...") for a bad row."""
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: one batched tokenizer call (the same ids as one call per text)."""
        if not texts:
            return []
        return self.tokenizer(texts, return_attention_mask=False, return_token_type_ids=False).input_ids

    def _mask(self, arr: np.ndarray) -> np.ndarray:
        """The loss mask of a (padded) id array, before the shift."""
        raise NotImplementedError

    def _check(self, mask: np.ndarray, length: int, ids: np.ndarray, where: str, what: str, pad_to_max: bool) -> None:
        """Raise if a part would train nothing (chat data); pretrain accepts any sample."""

    def _layout(self, ids: Sequence[int], where: str, what: str, pad_to_max: bool) -> Part:
        """Truncate one part's ids (keeping the head) and compute its mask on the ids padded to
        max_length, so the spans also give every padded sample exactly its mask. `pad_to_max` picks the
        width the supervision check looks at (the cache checks the unpadded sample)."""
        full = np.asarray(ids, dtype=np.int64)
        cut = full[:self.max_length]
        arr = np.full(max(self.max_length, 2), self.pad_id, dtype=np.int64)
        arr[:len(cut)] = cut
        mask = self._mask(arr)
        self._check(mask, len(cut), full, where, what, pad_to_max)
        return cut, mask_spans(mask)

    def _parts(self, i: int) -> list[Part]:
        """(ids, spans) of every part of sample i: from the cache, else tokenized now."""
        if self.cache is not None:
            return [self.cache.entry(int(i) * self.parts + p) for p in range(self.parts)]
        where = self.rows.where(int(i))
        ids = self._encode_texts(self._texts(i))
        return [self._layout(x, where, what, self.pad_to_max) for x, what in zip(ids, self.part_names)]

    def _encode_range(self, start: int, stop: int) -> tuple[list, list, list]:
        """Rows [start, stop) with one batched tokenizer call, for the token cache's build:
        ([(row, parts)] of the usable rows, [(row, message)] of the bad ones, [(row, message)] of those
        with nothing to supervise), each in file order. A row's errors come in the order reading it
        would raise them, so the first bad message is the one `ds[i]` gives."""
        good, texts, bad, unsupervised, samples = [], [], [], [], []
        for i in range(start, stop):
            try:
                texts += self._texts(i)
                good.append(i)
            except ValueError as e:
                bad.append((i, str(e)))
        ids, P = self._encode_texts(texts), self.parts
        for k, i in enumerate(good):
            where = self.rows.where(i)
            try:
                samples.append((i, [self._layout(ids[k * P + p], where, self.part_names[p], False) for p in range(P)]))
            except NothingToSupervise as e:
                unsupervised.append((i, str(e)))
            except ValueError as e:
                bad.append((i, str(e)))
        return samples, sorted(bad), unsupervised

    def tokens(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, mask uint8) of each part of sample i (1 part; DPO: chosen, rejected): truncated to
        max_length, unshifted and unpadded. From the cache when attached (no tokenizer call)."""
        return [(ids, _fill(spans, len(ids), np.uint8)) for ids, spans in self._parts(i)]

    def _sample(self, part: Part) -> Sample:
        """(X, Y, loss_mask) of one part, padded to max_length or to its own length (at least 2 tokens,
        so X is never empty), shifted for next-token loss: the original's tensors, exactly."""
        ids, spans = part
        width = self.max_length if self.pad_to_max else max(len(ids), 2)
        arr = np.full(width, self.pad_id, dtype=np.int64)
        arr[:len(ids)] = ids
        mask = _fill(spans, width)
        return torch.from_numpy(arr[:-1].copy()), torch.from_numpy(arr[1:].copy()), torch.from_numpy(mask[1:].copy())

    def encode(self, i: int) -> list[int] | tuple[list[int], ...]:
        """Token ids of sample i before truncation (DPO: a (chosen, rejected) pair)."""
        ids = self._encode_texts(self._texts(i))
        return ids[0] if self.parts == 1 else tuple(ids)

    def __getitem__(self, i: int) -> Sample:
        return self._sample(self._parts(i)[0])


class _ChatDataset(_JsonlDataset):
    """Rows rendered through the chat template, supervising the assistant turns only (spec 4.2)."""

    def _render(self, conv: list, where: str, tools: Any = None) -> str:
        _check_conversation(conv, where)
        try:
            return self.tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=False,
                                                      tools=tools)
        except Exception as e:  # a template error would otherwise not say which line caused it
            raise ValueError(f"{where}: chat template failed: {e}") from e

    def _mask(self, arr: np.ndarray) -> np.ndarray:
        return assistant_loss_mask(arr, self.start_ids, self.end_ids)

    def _check(self, mask: np.ndarray, length: int, ids: np.ndarray, where: str, what: str, pad_to_max: bool) -> None:
        width = self.max_length if pad_to_max else max(length, 2)
        if not mask[1:width].any():  # the shifted mask of the sample as trained
            if not self._mask(ids).any():
                raise ValueError(f"{where}: {what} has no assistant token to supervise")
            raise NothingToSupervise(f"{where}: {what} has no assistant token to supervise after truncation to "
                                     f"max_length={self.max_length} (raise --max_seq_len, or drop such samples "
                                     "with --skip_bad_lines 1)")


class PretrainDataset(_JsonlDataset):
    """{"text": ...} rows -> (X, Y, loss_mask). MiniMind2 (fa82707): no BOS/EOS added (its texts carry their
    own). minimind-3 (upstream d65ef2c, plain texts): [bos] + text[:max_length - 2] + [eos], so a text cut
    at max_length still ends with EOS."""
    required = ("text",)

    def __init__(self, data_path, tokenizer, max_length: int = 512, pad_to_max: bool = False,
                 skip_bad_lines: bool = False, cache_dir: str | Path | None = None, workers: int = 0):
        self.bos_eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if is_minimind3_tokenizer(tokenizer) else None
        super().__init__(data_path, tokenizer, max_length, pad_to_max, skip_bad_lines, cache_dir, workers)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        ids = super()._encode_texts(texts)
        if self.bos_eos is None:
            return ids
        bos, eos = self.bos_eos
        return [[bos, *x, eos] for x in ids]

    def _layout(self, ids: Sequence[int], where: str, what: str, pad_to_max: bool) -> Part:
        if self.bos_eos is not None and len(ids) > self.max_length:  # keep the EOS: upstream cuts the text
            ids = [*ids[:max(self.max_length - 1, 1)], self.bos_eos[1]]
        return super()._layout(ids, where, what, pad_to_max)

    def _texts(self, i: int) -> list[str]:
        row, where = self._row(i)
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return [text]

    def _mask(self, arr: np.ndarray) -> np.ndarray:
        return arr != self.pad_id


class SFTDataset(_ChatDataset):
    """{"conversations": [...]} rows -> (X, Y, loss_mask) supervising assistant turns only.
    Also the reasoning (R1) data: the <think>/<answer> tags are ordinary assistant content.
    Tool definitions come from the system turn: `functions` (MiniMind2 rows) or `tools` (minimind-3 rows,
    a JSON string or a list); `tool_calls` may be a JSON string too (minimind-3).

    minimind-3: upstream's SFTDataset draws two coins on every read: a random system prompt (p=0.2) and,
    after rendering, deleting every empty think block (p=0.8). We draw nothing: the row is rendered as the
    template renders it (no system prompt added; the empty `<think>\n\n</think>\n\n` kept, and
    supervised as upstream supervises it), because a sample must be the same on every read for the token
    cache. That is upstream's "kept" branch token for token (tests/goldens/mm3_sft_loss_masks.json), and
    the layout the template gives every history turn and pre-fills for the reply when thinking is off. What
    is lost: upstream's model also learns to answer straight after `assistant\n` (80% of its plain samples)."""
    required = ("conversations",)

    def __init__(self, jsonl_path, tokenizer, max_length: int = 1024, pad_to_max: bool = False,
                 skip_bad_lines: bool = False, cache_dir: str | Path | None = None, workers: int = 0):
        super().__init__(jsonl_path, tokenizer, max_length, pad_to_max, skip_bad_lines, cache_dir, workers)

    def _texts(self, i: int) -> list[str]:
        row, where = self._row(i)
        conv = row["conversations"]
        first = conv[0] if isinstance(conv, list) and conv and isinstance(conv[0], dict) else {}
        tools = first.get("functions") if first.get("role") == "system" else None
        if tools and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"{where}: 'functions' must be a list of tool definitions (objects)")
        if first.get("role") == "system" and first.get("tools"):  # minimind-3 rows: a JSON string (or a list)
            tools = _json_field(first, "tools", 0, where)
        if isinstance(conv, list):  # minimind-3 rows: tool_calls as a JSON string
            conv = [{**m, "tool_calls": _json_field(m, "tool_calls", k, where)}
                    if isinstance(m, dict) and isinstance(m.get("tool_calls"), str) and m["tool_calls"].strip() else m
                    for k, m in enumerate(conv)]
        return [self._render(conv, where, tools or None)]


class DPODataset(_ChatDataset):
    """{"chosen": [...], "rejected": [...]} rows -> dict of x/y/mask for each side (no tools, as the original)."""
    required = ("chosen", "rejected")
    part_names = ("chosen", "rejected")

    def __init__(self, file_path, tokenizer, max_length: int = 4096, pad_to_max: bool = False,
                 skip_bad_lines: bool = False, cache_dir: str | Path | None = None, workers: int = 0):
        super().__init__(file_path, tokenizer, max_length, pad_to_max, skip_bad_lines, cache_dir, workers)

    def _texts(self, i: int) -> list[str]:
        row, where = self._row(i)
        return [self._render(row[key], f"{where}: {key}") for key in self.part_names]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for key, part in zip(self.part_names, self._parts(i)):
            out[f"x_{key}"], out[f"y_{key}"], out[f"mask_{key}"] = self._sample(part)
        return out


class RLAIFDataset(_JsonlDataset):
    """Prompts for online RL -> {"prompt", "answer", "reference", "messages"}.

    MiniMind2 (fa82707): roles go by position (even = user, odd = assistant) and the last turn is the
    placeholder answer; a `role` field that disagrees with its position is an error rather than
    silently rewritten. minimind-3 (upstream d65ef2c): roles are taken from the file (an optional system
    turn first, then user and assistant alternating; the last turn, the placeholder, must be an assistant
    turn), and a `thinking_ratio` share of the prompts is rendered with `open_thinking=True`, so that the
    generation prompt opens a think block ("<think>\n") instead of pre-filling an empty one. Upstream draws
    random() < thinking_ratio on every read; here the draw is a hash of (row index, `seed`), so a prompt is
    the same on every read and a resumed run sees exactly the prompts of the uninterrupted one (the cost: a
    prompt keeps its choice in every epoch). Upstream's random system prompt (p = 0.2) is not added, as in
    SFTDataset. MiniMind2's template has no such switch: `thinking_ratio` has no effect there.
    `reference` is the row's top-level "answer" field ("" if absent, JSON text if not a string), the target
    for verifiable rewards; `messages` are the turns before the answer, as {"role", "content"} dicts (what a
    reward model scores). max_length is unused, as in the original."""
    required = ("conversations",)

    def __init__(self, jsonl_path, tokenizer, max_length: int = 1024, skip_bad_lines: bool = False,
                 thinking_ratio: float = 0.5, seed: int = 42):
        self.thinking_ratio, self.seed = thinking_ratio, seed       # upstream's constructor default is 0.5
        self.minimind3 = is_minimind3_tokenizer(tokenizer)
        super().__init__(jsonl_path, tokenizer, max_length, False, skip_bad_lines)

    def open_thinking(self, i: int) -> bool:
        """Whether prompt i opens a think block: a uniform draw in [0, 1) from sha256(seed, index) < thinking_ratio."""
        import hashlib
        digest = hashlib.sha256(f"{self.seed}:{int(i)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64 < self.thinking_ratio

    def __getitem__(self, i: int) -> dict[str, str]:
        row, where = self._row(i)
        conv = row["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"{where}: conversations must list at least a prompt and an answer turn")
        if self.minimind3:
            _check_conversation(conv[:-1], where)
            if conv[-1].get("role") != "assistant":
                raise ValueError(f"{where}: message {len(conv) - 1}: the last turn must be the assistant's "
                                 f"(the placeholder answer), got role {conv[-1].get('role')!r}")
            messages = [{"role": m["role"], "content": m.get("content")} for m in conv]
        else:
            messages = []
            for k, msg in enumerate(conv):
                role = "user" if k % 2 == 0 else "assistant"
                if msg.get("role", role) != role:
                    raise ValueError(f"{where}: message {k}: role {msg['role']!r}, but position {k} is {role!r}")
                if k < len(conv) - 1:
                    _check_content(msg, k, where)
                messages.append({"role": role, "content": msg.get("content")})
        if not isinstance(messages[-1]["content"], str):
            raise ValueError(f"{where}: message {len(conv) - 1}: content must be a string")
        reference = row.get("answer", "")
        if not isinstance(reference, str):
            reference = json.dumps(reference, ensure_ascii=False)
        switch = {"open_thinking": self.open_thinking(i)} if self.minimind3 else {}
        prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **switch)
        return {"prompt": prompt, "answer": messages[-1]["content"], "reference": reference,
                "messages": messages[:-1]}
