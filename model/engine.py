"""A continuous-batching inference engine for MiniMind (and transformers Llama exports), the one generation path
of the project: the server, eval_llm.py, the web demo's local mode, dataset/scoring.py (eval_demo, the benches)
and the RL rollouts (trainer/core/rl.py) all generate through it.

    from model.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer, max_batch=16)
    outs = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=64))        # offline: waits for all
    req = engine.submit(ids, SamplingParams(temperature=0.7, seed=1, stop=("\\n\\n",)))
    for piece in req: print(piece, end="")                                       # streaming; req.cancel()
    engine.swap_model(new_model)                                                 # a weight reload (the server's)
    python -c "import model.engine"                                              # nothing to run on its own

How it works. A background thread owns the model and a fixed number of slots (`max_batch`). Each slot
has its own region of one preallocated KV cache, its own sampling settings (temperature, top_k, top_p,
repetition_penalty, a per-request torch.Generator, stop strings, max_tokens, EOS) and its own
position. Every step of the loop (1) drops requests that were cancelled or ran past their deadline,
(2) prefills waiting requests into free slots (several short prompts in one padded forward, a long
prompt in chunks of `prefill_chunk` tokens, one chunk per step), and (3) runs ONE model forward that
decodes the next token of every active slot. New requests therefore join the running batch at the
next step, and finished or cancelled ones leave it at once (their row is refilled by the last one).
The decode step comes in two forms. The dynamic one (the default on CPU, and for transformers models) builds its
inputs from the requests each step, over exactly the rows and key columns in use. The static one (StaticDecode: the
default on CUDA for MiniMind, `static_decode=True` elsewhere) keeps each slot's last token, position and cache row in
a device tensor, loaded when the decoding rows change and advanced in place otherwise, and runs a forward of fixed
shape: the rows padded up to a power of two (padding rows write into a spare cache row), the keys over a
power-of-two width of the cache, each new key written with one index_copy_ per layer, a (rows, 1, 1, width) bool
mask made on the device from the positions. Greedy rows take their argmax on the device, and the step's one host
sync is the .tolist() of the new tokens (a sampled row adds one for its CDF; logprobs one more). On CUDA each
(rows, width) forward is captured once as a CUDA graph and replayed (DecodeGraphs; not for MoE, whose expert
dispatch syncs with the host), captured anew when the weights or the cache buffers move; the KV cache is then kept
between requests instead of released when idle.
Prefix cache: the keys and values of recent prompts and finished conversations are kept (`prefix_cache`
tokens in all, least recently used out; forgotten when the weights change in place), and a new prompt
that begins like one of them (the chat template's system prompt, a conversation's earlier turns) gets
that beginning copied into its row and is prefilled from where they differ.

Exactness: the model sees, per row, exactly its own keys (below), and each request samples with its own
generator and its own logits processors, so what else is in the batch changes a request's logits only by
the float rounding of batched kernels (a matrix product's blocking, the attention's padded width: about
1e-6 in fp32, up to 1e-2 under bf16 autocast). What holds, and is tested: greedy tokens equal
model.generate() alone (a tie within rounding could still flip one); a seeded request repeats exactly when
run alone, with or without the prefix cache, and gives the same tokens alone and in any batch whenever its
logits are equal (tests/test_serve.py, with a model whose logits are exactly batch-invariant). With a real
model in a batch, a sampled token can change where a draw falls within that rounding of the boundary
between two tokens, after which the texts diverge: rare with a trained model, within tens of tokens for
random weights whose thousands of near-equal probabilities put boundaries everywhere. The model sees, per
row, exactly its own keys: slots have different lengths inside one buffer, so the dynamic decode step writes each
new key at the row's own column w (kept for later steps) and also at the shared last column, and the
2D attention mask hides the row's columns between w and that last column; the model's padded-mask
path (a query always sees its own column) then gives each row attention over exactly its w+1 keys,
with RoPE positions passed explicitly. The static step writes the key at column w only and its 4D mask keeps
columns 0..w of the row. Greedy output equals model.generate() alone, on either step (tests/test_engine.py,
tests/test_engine_static.py: the static step's logits equal the dynamic step's within fp32 rounding).
Writes nothing.
"""
import asyncio
import bisect
import collections
import itertools
import math
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model.openmp import release_thread_pool


class QueueFull(Exception):
    """The waiting queue holds max_queue requests; try again later."""


class PromptTooLong(ValueError):
    """The prompt leaves no room for a single new token within max_seq_len."""


# transformers' generate() samples from the 50 likeliest tokens unless told otherwise; the original's chat,
# web demo and RL rollouts called generate() without top_k, so our callers pass this to sample as they did
HF_TOP_K = 50


@dataclass
class SamplingParams:
    """Per-request generation settings. temperature 0 = greedy; top_k 0 and top_p 1 = off (the
    transformers processors, applied in their order: repetition penalty, temperature, top-k, top-p).
    seed None draws one from torch's global RNG, so torch.manual_seed before submit() repeats a run.
    timeout: seconds from submission (queue time included); None = no limit.
    logprobs: None = off; k >= 0 = record the log-prob of each sampled token (Request.logprobs) and the k likeliest
    tokens with theirs (Request.top_logprobs), under the model's raw distribution: the log-softmax of the logits
    before the repetition penalty, temperature, top-k and top-p (vLLM's default "raw_logprobs"), which is what a
    trainer's forward pass over the same tokens gives."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = None
    stop: tuple = ()
    timeout: float = None
    logprobs: int = None


# ---- text: incremental detokenisation and stop strings ----
class Detokenizer:
    """Token ids -> text pieces, a piece per token where possible. Decoding restarts after each piece,
    which is exact for byte-level BPE; only an incomplete UTF-8 character is held back."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(self.pending) < 16:  # bytes of one character still coming
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True) if self.pending else ""
        self.pending = []
        return text


class StopMatcher:
    """Cut the generated text at the first stop string; text that may be a stop string's beginning waits."""

    def __init__(self, stops):
        self.stops, self.buf, self.stopped = [s for s in stops if s], "", False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.buf += text
        hits = [self.buf.find(s) for s in self.stops if s in self.buf]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out


# ---- one request ----
class Request:
    """A submitted generation: iterate it (or `async for` over astream()) for text pieces as they come;
    cancel() frees its slot at the next step. When done: token_ids (new tokens, EOS included when it
    ended the answer), text, finish_reason ("stop", "length", "cancelled", "timeout" or "error", with
    `error`), prompt_tokens, completion_tokens (without the EOS); with params.logprobs, `logprobs` (one float per
    token id) and `top_logprobs` (per token id, [(id, log-prob)] of the params.logprobs likeliest tokens)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list, params: SamplingParams, max_new: int, tokenizer, eos_ids):
        self.id = next(Request._ids)
        self.prompt_ids, self.params, self.max_new = prompt_ids, params, max_new
        self.token_ids, self.text, self.finish_reason, self.error = [], "", None, None
        self.logprobs, self.top_logprobs = [], []
        self.submitted = time.monotonic()
        self.deadline = None if params.timeout is None else self.submitted + params.timeout
        self.first_token_at = self.last_token_at = None
        self.cancelled = False
        seed = params.seed if params.seed is not None else int(torch.randint(2 ** 62, ()).item())
        self.generator = torch.Generator().manual_seed(seed % 2 ** 64)
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.stopper = StopMatcher(params.stop)
        self.eos_ids = eos_ids
        # engine-side slot state: tokens in the cache (= position of the next one), token to feed next
        self.w, self.next_input, self.seen = 0, None, None
        self.weights = None  # the engine's weights id when the request was admitted (its keys were computed with it)
        self._pieces, self._cond, self._waker, self._done = collections.deque(), threading.Condition(), None, False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) - int(bool(self.token_ids) and self.token_ids[-1] in self.eos_ids)

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self):
        self.cancelled = True

    def wait(self, timeout: float = None) -> "Request":
        with self._cond:
            self._cond.wait_for(lambda: self._done, timeout)
        return self

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pieces or self._done)
                if not self._pieces:
                    return
                piece = self._pieces.popleft()
            yield piece

    async def astream(self):
        """Text pieces for asyncio code (the server); never blocks the event loop."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self._waker = wake
        while True:
            ready.clear()
            with self._cond:
                pieces, done = list(self._pieces), self._done
                self._pieces.clear()
            for piece in pieces:
                yield piece
            if done:
                return
            if not pieces:
                await ready.wait()

    # called by the engine thread
    def _deliver(self, piece: str = "", done: bool = False):
        with self._cond:
            if piece:
                self.text += piece
                self._pieces.append(piece)
            self._done = self._done or done
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            waker()

    def _finish(self, reason: str, error: str = None):
        if self._done:
            return
        if self.detok is not None and reason in ("stop", "length") and not self.stopper.stopped:
            self._deliver(self.stopper.feed(self.detok.flush()) + self.stopper.finish())
        self.finish_reason, self.error = reason, error
        self._deliver(done=True)


# ---- the KV cache shared by the slots ----
class SlotCache:
    """Per layer, K and V buffers of shape (rows, KV, capacity, D); row r belongs to the slot at index
    r of the engine's slot list. Capacity starts at `min_capacity` columns (or what is needed), grows
    geometrically (up to max_len) and is released when idle."""

    def __init__(self, num_layers: int, rows: int, max_len: int, min_capacity: int = 64):
        self.num_layers, self.rows, self.max_len, self.min_capacity = num_layers, rows, max_len, min_capacity
        self.keys, self.values = [None] * num_layers, [None] * num_layers

    def buffers(self, layer: int, needed: int, like: torch.Tensor):
        k = self.keys[layer]
        if k is None or k.shape[2] < needed or k.dtype != like.dtype or k.device != like.device:
            cap = min(max(needed, self.min_capacity, 2 * (k.shape[2] if k is not None else 0)),
                      max(self.max_len, needed))
            new_k = like.new_zeros(self.rows, like.shape[1], cap, like.shape[3])
            new_v = like.new_zeros(self.rows, like.shape[1], cap, like.shape[3])
            if k is not None:
                old = min(k.shape[2], cap)
                new_k[:, :, :old] = k[:, :, :old]
                new_v[:, :, :old] = self.values[layer][:, :, :old]
            self.keys[layer], self.values[layer] = new_k, new_v
        return self.keys[layer], self.values[layer]

    def move_row(self, src: int, dst: int, length: int):
        for k, v in zip(self.keys, self.values):
            if k is not None and length:
                k[dst, :, :length] = k[src, :, :length]
                v[dst, :, :length] = v[src, :, :length]

    def release(self):
        self.keys, self.values = [None] * self.num_layers, [None] * self.num_layers


class _CacheView:
    """What one forward sees as `past_key_values`: the cache interface of model_minimind (update,
    get_seq_length) plus the two size queries transformers' mask builder asks of a cache.

    prefill: rows [row0, row0+n) get the new keys at columns [past, past+T).
    decode (write_cols given): row i gets its key at column write_cols[i] and at the shared last
    column `past`; the attention mask built by the engine hides the columns in between."""

    def __init__(self, cache: SlotCache, row0: int, n: int, past: int, write_cols=None, uniform=True):
        self.cache, self.row0, self.n, self.past = cache, row0, n, past
        self.write_cols, self.uniform = write_cols, uniform
        self.rows = None if write_cols is None else torch.arange(n, device=write_cols.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.past

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        return self.past + (query_length if isinstance(query_length, int) else query_length.shape[0]), 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v: (n, KV, T, D) -> all keys and values of these rows, (n, KV, past+T, D)."""
        end = self.past + k.shape[2]
        buf_k, buf_v = self.cache.buffers(layer_idx, end, k)
        rows = slice(self.row0, self.row0 + self.n)
        if self.write_cols is None:
            buf_k[rows, :, self.past:end] = k
            buf_v[rows, :, self.past:end] = v
            if self.past == 0:
                return k, v
        else:
            if not self.uniform:
                buf_k[rows, :, self.past] = k[:, :, 0]
                buf_v[rows, :, self.past] = v[:, :, 0]
            buf_k[self.rows, :, self.write_cols] = k[:, :, 0]
            buf_v[self.rows, :, self.write_cols] = v[:, :, 0]
        return buf_k[rows, :, :end], buf_v[rows, :, :end]


# ---- the static decode step: fixed shapes, per-slot state on the device, CUDA graphs ----
# With CUDA graphs the KV cache starts this many columns wide (or max_seq_len if less): a graph holds the buffers'
# addresses, so each move (a growth) means capturing every shape again. It costs rows x 2 x KV x D x 1024 x dtype
# bytes per layer: 17 MB for MiniMind2-small (KV 2, D 64) at max_batch 16 in fp32
GRAPH_CACHE_COLUMNS = 1024


def static_decode_supported(model) -> bool:
    """The static step hands the model a ready 4D mask with explicit positions: MiniMind's forward takes that as is
    (model_minimind.py, since `run_layers`); transformers Llama exports and wrapped models keep the dynamic step."""
    return (getattr(model.config, "model_type", None) == "minimind"
            and hasattr(getattr(model, "model", None), "run_layers"))


def decode_modes(model, device: torch.device, static_decode: bool = None, cuda_graphs: bool = None) -> tuple:
    """(static step, CUDA graphs) for this model on this device. None = auto: the static step on CUDA for a
    MiniMind; graphs with it, except for MoE (the expert dispatch reads its block sizes on the host, which a
    capture cannot). True where that cannot run raises ValueError."""
    supported, cuda = static_decode_supported(model), device.type == "cuda"
    if static_decode and not supported:
        raise ValueError(f"static_decode needs a MiniMind model (model_type 'minimind' with run_layers), "
                         f"not {type(model).__name__}")
    static = supported and cuda if static_decode is None else bool(static_decode)
    moe = bool(getattr(model.config, "use_moe", False))
    if cuda_graphs and not (static and cuda and not moe):
        raise ValueError("cuda_graphs needs the static decode step of a dense model on a CUDA device")
    graphs = static and cuda and not moe if cuda_graphs is None else bool(cuda_graphs)
    return static, graphs


class _StaticView:
    """`past_key_values` of the static decode step: row i of the forward writes its key at column cols[i] of cache
    row write_rows[i] (one index_copy_ per layer, into the flattened buffer) and attends over columns [0, width) of
    cache row i, of which the step's mask keeps [0, cols[i]]: its own keys, exactly."""

    def __init__(self, cache: SlotCache, write_rows: torch.Tensor, cols: torch.Tensor, width: int):
        self.cache, self.write_rows, self.cols, self.width = cache, write_rows, cols, width
        self.index = {}  # buffer capacity -> flat row index of each (row, kv head)'s new key

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v: (rows, KV, 1, D) -> the keys and values of cache rows [0, rows), (rows, KV, width, D)."""
        buf_k, buf_v = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        _, heads, cap, dim = buf_k.shape
        if cap not in self.index:  # buffer (R, KV, cap, D) seen as (R*KV*cap, D): row (r*KV + h)*cap + col
            head = torch.arange(heads, device=k.device)
            self.index[cap] = ((self.write_rows[:, None] * heads + head) * cap + self.cols[:, None]).view(-1)
        buf_k.view(-1, dim).index_copy_(0, self.index[cap], k[:, :, 0].reshape(-1, dim))
        buf_v.view(-1, dim).index_copy_(0, self.index[cap], v[:, :, 0].reshape(-1, dim))
        rows = k.shape[0]
        return buf_k[:rows, :, :self.width], buf_v[:rows, :, :self.width]


class StaticDecode:
    """The decode step over fixed shapes, with the per-slot state kept on the device.

    `state` (3, max_batch) long: per row the token to feed, its position (= the cache column its key goes to) and
    the cache row it writes. It is loaded from the requests (one host-to-device copy) when the decoding rows
    change, and otherwise advanced in place after each step (new tokens in, positions + 1). One forward covers
    `rows` rows (the decoding ones padded up to a power of two, or max_batch) and `width` key columns (the longest
    row's, rounded up to a power of two from 64, capped at max_seq_len): padding rows feed token 0 at position 0
    and write into the cache's spare last row, so the slot in chunked prefill right after the decoding ones keeps
    its keys. Shapes repeat, so on CUDA each (rows, width) forward is captured once as a CUDA graph (DecodeGraphs)."""

    def __init__(self, model, cache: SlotCache, max_batch: int, device: torch.device, graphs: bool):
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.state = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self.loaded = None   # ids of the requests whose state `state` holds, in row order
        self.loads = 0
        self.buckets = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})
        self.graphs = DecodeGraphs() if graphs else None
        self.weights = None  # the parameters' addresses when last checked (a graph reads them by address)

    def check_weights(self):
        self.weights = tuple((p.data_ptr(), p.dtype) for p in self.model.parameters())

    def load(self, reqs: list):
        host = torch.zeros(3, self.max_batch, dtype=torch.long)
        host[2] = self.cache.rows - 1  # the spare row
        host[:, :len(reqs)] = torch.tensor([[r.next_input, r.w, i] for i, r in enumerate(reqs)]).T
        self.state.copy_(host.pin_memory() if self.state.is_cuda else host, non_blocking=True)
        self.loads += 1

    def run(self, reqs: list, max_len: int) -> torch.Tensor:
        """Logits (len(reqs), V) of every decoding row's next token; writes each row's key at its column."""
        n = len(reqs)
        rows = next(b for b in self.buckets if b >= n)
        need = max(r.w for r in reqs) + 1
        width = max(need, min(max(64, 1 << (need - 1).bit_length()), max_len))
        for layer in range(self.cache.num_layers):
            self.cache.buffers(layer, width, self.cache.keys[layer])
        ids = tuple(r.id for r in reqs)
        if ids != self.loaded:
            self.load(reqs)
            self.loaded = ids
        if self.graphs is not None:
            self.check_weights()  # a graph reads the weights by address: one moved (.to, assign) means capture again
            key = (id(self.model), self.weights,
                   tuple((b.data_ptr(), b.shape, b.dtype) for b in self.cache.keys + self.cache.values))
            logits = self.graphs.run(self.forward, rows, width, key)
            if logits is not None:
                return logits[:n]
            self.graphs = None  # the capture failed (said on stderr): eager from now on
        return self.forward(rows, width)[:n]

    def forward(self, rows: int, width: int) -> torch.Tensor:
        """The model on rows [0, rows) of the state: logits (rows, V). Reads and writes only tensors whose address
        and shape depend on (rows, width) and the cache buffers, so it can be captured and replayed."""
        tokens, cols, write_rows = self.state[0, :rows], self.state[1, :rows], self.state[2, :rows]
        mask = torch.arange(width, device=cols.device)[None, :] <= cols[:, None]   # (rows, width): own keys only
        out = self.model(tokens[:, None], position_ids=cols[:, None], attention_mask=mask[:, None, None, :],
                         past_key_values=_StaticView(self.cache, write_rows, cols, width), use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def advance(self, reqs: list, tokens: torch.Tensor):
        """After a step of `reqs` (rows in the order the step ran them): their new tokens in, positions + 1."""
        n = len(reqs)
        self.state[0, :n].copy_(tokens)
        self.state[1, :n] += 1
        self.loaded = tuple(r.id for r in reqs)


class DecodeGraphs:
    """CUDA only: the static decode forward of each (rows, width) captured once as a torch.cuda.CUDAGraph and then
    replayed. A graph reads the step's state, the KV cache buffers and the weights by address, so all of them are
    captured again when any of those moved (`key`: the model, its parameters' addresses, the buffers' addresses and
    shapes). The graphs share one memory pool: they are replayed one at a time, and each one's output is read
    before the next replay. Under autocast the casts are captured too (autocast's weight cache off), so in-place
    weight updates reach the graph."""

    def __init__(self):
        self.graphs, self.key, self.pool, self.captures = {}, None, None, 0

    def run(self, forward, rows: int, width: int, key) -> torch.Tensor:
        """forward(rows, width)'s output by replay; None when it cannot be captured."""
        if key != self.key:  # the old graphs go, and with them their pool
            self.graphs, self.key, self.pool = {}, key, None
        entry = self.graphs.get((rows, width))
        if entry is None:
            try:
                entry = self.graphs[(rows, width)] = self.capture(forward, rows, width)
            except Exception as err:  # an op a capture does not allow: run the step eagerly instead
                print(f"minimind engine: CUDA graph capture failed, decoding without graphs ({type(err).__name__}: "
                      f"{err})", file=sys.stderr)
                return None
        entry[0].replay()
        return entry[1]

    def capture(self, forward, rows: int, width: int):
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):  # warm-up: lazy initialisation (cuBLAS handles, workspaces) outside the capture
            forward(rows, width)       # (it writes the same keys the replay writes)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        dtype = torch.get_autocast_dtype("cuda")
        casts = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if torch.is_autocast_enabled("cuda") \
            else nullcontext()
        with casts, torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward(rows, width)
        self.pool = graph.pool()
        self.captures += 1
        return graph, out


class PrefixCache:
    """Keys and values of recent prompts and finished conversations, so that a new prompt that begins the
    same way (the chat template's system prompt, the earlier turns of a conversation) is prefilled from
    where they part instead of from token 0: automatic prefix caching, as in vLLM and llama.cpp's server.

    Entries: token ids (a tuple) -> per layer (K, V) of shape (KV, len, D), at most `capacity` tokens in
    all, least recently used first out. No entry is a prefix of another (the longer one replaces it), so
    the entry sharing the longest beginning with a prompt is a neighbour of the prompt in sorted order.
    Positions are absolute from 0, so a shared beginning has the same keys in every sequence."""

    def __init__(self, capacity: int):
        self.capacity, self.tokens = max(int(capacity), 0), 0
        self.entries = collections.OrderedDict()   # ids -> [(K, V) per layer], in use order
        self.keys = []                              # the same ids, sorted

    def clear(self):
        self.entries.clear()
        self.keys, self.tokens = [], 0

    @staticmethod
    def _common(a: tuple, b: tuple) -> int:
        """Length of the common beginning of a and b."""
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def lookup(self, ids: list):
        """(length of the longest cached beginning of ids, that entry's key) or (0, None)."""
        if not self.keys:
            return 0, None
        q = tuple(ids)
        i = bisect.bisect_left(self.keys, q)
        best = max(((self._common(self.keys[j], q), self.keys[j]) for j in (i - 1, i) if 0 <= j < len(self.keys)),
                   key=lambda t: t[0])
        return best if best[0] else (0, None)

    def copy_into(self, key: tuple, length: int, cache: "SlotCache", row: int):
        """The first `length` keys and values of entry `key` into row `row` of the slot cache."""
        self.entries.move_to_end(key)
        for layer, (k, v) in enumerate(self.entries[key]):
            buf_k, buf_v = cache.buffers(layer, length, k[None])
            buf_k[row, :, :length] = k[:, :length]
            buf_v[row, :, :length] = v[:, :length]

    def store(self, ids: list, cache: "SlotCache", row: int):
        """Remember row `row`'s keys and values for the sequence `ids` (its first len(ids) columns)."""
        key, n = tuple(ids), len(ids)
        if not n or n > self.capacity or cache.keys[0] is None:
            return
        i = bisect.bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i][:n] == key:  # already cached, maybe inside a longer entry
            self.entries.move_to_end(self.keys[i])
            return
        if i and key[:len(self.keys[i - 1])] == self.keys[i - 1]:  # a shorter entry this one extends
            self._drop(self.keys[i - 1])
            i -= 1
        self.entries[key] = [(k[row, :, :n].clone(), v[row, :, :n].clone())
                             for k, v in zip(cache.keys, cache.values)]
        self.keys.insert(i, key)
        self.tokens += n
        while self.tokens > self.capacity:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple):
        del self.entries[key]
        del self.keys[bisect.bisect_left(self.keys, key)]
        self.tokens -= len(key)


# ---- sampling ----
def process_logits(logits: torch.Tensor, params: list, seen: list) -> torch.Tensor:
    """transformers' logits processors, per row with that row's settings: the repetition penalty over
    prompt + generated tokens (`seen`, a bool (V,) tensor or None per row), then for sampled rows
    temperature, top-k (drop scores below the k-th largest) and top-p (drop the low tail that holds
    1 - top_p of the mass). Greedy rows (temperature 0) only get the penalty."""
    logits = logits.float().clone()
    dev = logits.device
    pen = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if pen:
        idx = torch.tensor(pen, device=dev)
        sub = logits[idx]
        mask = torch.stack([seen[i] for i in pen]).to(dev)
        p = torch.tensor([params[i].repetition_penalty for i in pen], device=dev)[:, None]
        logits[idx] = torch.where(mask, torch.where(sub < 0, sub * p, sub / p), sub)
    samp = [i for i, p in enumerate(params) if p.temperature > 0]
    if not samp:
        return logits
    vocab, sp = logits.shape[-1], [params[i] for i in samp]
    scores = logits[samp] / torch.tensor([p.temperature for p in sp], device=dev)[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in sp]
    if any(ks):
        kth = scores.topk(max(ks), dim=-1).values.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=dev))
        kth[torch.tensor([k == 0 for k in ks], device=dev)] = -math.inf
        scores = scores.masked_fill(scores < kth, -math.inf)
    if any(p.top_p < 1.0 for p in sp):
        sorted_scores, order = scores.sort(dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        limit = torch.tensor([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in sp], device=dev)
        remove = cum <= limit[:, None]
        remove[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
    logits[samp] = scores
    return logits


def sample_next(logits: torch.Tensor, reqs: list) -> torch.Tensor:
    """Next token for each row of logits (B, V), a (B,) long tensor on their device: argmax for greedy rows; for
    sampled rows one uniform draw from the request's own generator through the inverse CDF, so a seeded request
    draws the same numbers whatever else is in the batch."""
    params = [r.params for r in reqs]
    if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(-1)  # no processor changes the order: no fp32 copy, no host sync here
    scores = process_logits(logits, params, [r.seen for r in reqs])
    out = scores.argmax(-1)
    samp = [i for i, p in enumerate(params) if p.temperature > 0]
    if samp:
        cdf = scores[samp].softmax(dim=-1).cpu().cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=reqs[i].generator) for i in samp])
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
        out[samp] = picked[:, 0].to(out.device)
    return out


def record_logprobs(logits: torch.Tensor, reqs: list, tokens: list):
    """Append, for each request that asks (params.logprobs not None), the raw log-prob of its sampled token and
    of its params.logprobs likeliest tokens: the log-softmax of the model's logits (fp32) before any processor."""
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if not rows:
        return
    logp = logits[rows].float().log_softmax(dim=-1).cpu()
    k = max(reqs[i].params.logprobs for i in rows)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1) if k else None
    for j, i in enumerate(rows):
        r = reqs[i]
        r.logprobs.append(float(logp[j, tokens[i]]))
        n = r.params.logprobs
        r.top_logprobs.append(list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist())) if n else [])


# ---- metrics ----
class Histogram:
    """Latency counts: counts[i] holds the values in (buckets[i-1], buckets[i]], the last one those above every
    bound; plus sum and count. Plain data: the server writes the Prometheus text (scripts/serve_openai_api.py)."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = list(buckets), [0] * (len(buckets) + 1), 0.0, 0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


# ---- the engine ----
class Engine:
    """Continuous batching over `max_batch` slots in a background thread (started by the first submit).

    submit() raises QueueFull when `max_batch + max_queue` requests already run or wait, PromptTooLong when the prompt
    leaves no room in `max_seq_len`; both before the request takes a queue place or a slot.
    tokenizer None: no text (token_ids only, no stop strings), for callers that decode themselves.
    autocast_dtype: run the forwards under torch.autocast with this dtype (autocast is per thread, so a
    caller's own autocast context does not reach the engine's thread); None = the model's dtype.
    static_decode: decode through StaticDecode (fixed shapes, state on the device); cuda_graphs: replay its
    forwards as CUDA graphs. None = auto (decode_modes: both on CUDA for a MiniMind, graphs not for MoE)."""

    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_queue: int = 64, max_seq_len: int = None,
                 prefill_chunk: int = 512, eos_token_id=None, autocast_dtype: torch.dtype = None,
                 prefix_cache: int = 8192, static_decode: bool = None, cuda_graphs: bool = None):
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, max(prefill_chunk, 1)
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        eos = eos if eos is not None else getattr(cfg, "eos_token_id", None)
        self.eos_ids = frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.vocab_size = cfg.vocab_size
        self.device = model.device if hasattr(model, "device") else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.static_decode, self.cuda_graphs = static_decode, cuda_graphs
        self._setup_decode(decode_modes(model, self.device, static_decode, cuda_graphs))
        self.prefix = PrefixCache(prefix_cache)
        self.weights_version = None  # the weights the prefix cache's keys were computed with (_weights_id)
        self.slots = []          # row order: decoding slots [0, n_decode), then at most one in chunked prefill
        self.n_decode = 0
        self.waiting = collections.deque()
        self.cv = threading.Condition()
        self.thread, self.closed = None, False
        self.paused = False      # swap_model: nobody new is admitted while the running requests drain
        self.prompt_tokens_total = self.generation_tokens_total = self.prompt_tokens_cached_total = 0
        self.finished = collections.Counter()
        self.ttft, self.itl = Histogram(LATENCY_BUCKETS), Histogram(LATENCY_BUCKETS)

    # ---- API ----
    def submit(self, prompt_ids, params: SamplingParams = None, bounded: bool = True) -> Request:
        params = params or SamplingParams()
        ids = [int(t) for t in (prompt_ids.view(-1).tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the context is {self.max_seq_len} tokens "
                                "(prompt + completion)")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if self.device.type == "cpu":   # the decode thread's OpenMP pool alone (see model/openmp.py)
            release_thread_pool()
        with self.cv:
            if self.closed:
                raise RuntimeError("the engine is closed")
            if bounded and self.full:
                raise QueueFull(self.load())
            req = Request(ids, params, min(params.max_tokens, room), self.tokenizer, self.eos_ids)
            self.waiting.append(req)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="minimind-engine", daemon=True)
                self.thread.start()
            self.cv.notify()
        return req

    def generate(self, prompts: list, params=None) -> list:
        """Offline batch use: every prompt (token ids) through the engine, the finished Requests in order.
        params: one SamplingParams for all, or one per prompt. The waiting queue limit does not apply here.
        Raises RuntimeError when the model failed on a request (an offline caller has nobody to tell).
        All prompts are queued before the loop admits any (cv is re-entrant), so which prompts share a prefill
        and which take their beginning from the prefix cache does not depend on thread timing: under bf16 those
        paths round differently, and a seeded caller (the RL rollouts, resumed runs) must sample the same tokens."""
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        with self.cv:
            reqs = [self.submit(p, s, bounded=False) for p, s in zip(prompts, params)]
        for req in reqs:
            if req.wait().finish_reason == "error":
                raise RuntimeError(f"generation failed: {req.error}")
        return reqs

    def close(self):
        """Stop the loop; requests still waiting or running end as "cancelled"."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def cancel_all(self):
        """Cancel every request waiting or running (each ends as "cancelled" at the next step): a server's
        shutdown when its drain time is over."""
        with self.cv:
            for req in list(self.waiting) + list(self.slots):
                req.cancel()

    def swap_model(self, model, max_seq_len: int = None, abort: bool = False, poll: float = 0.02):
        """Serve `model` from now on, with the same tokenizer (a weight reload). Nobody new is admitted while
        the requests already running finish with the old weights (abort=True ends them now, as "cancelled");
        then the model, the KV cache and the context (max_seq_len, capped by the model's positions) are
        replaced, the prefix cache is forgotten, and the requests that waited meanwhile start with the new
        weights (one whose prompt no longer fits the new context ends as "error"). Blocks until done."""
        device = model.device if hasattr(model, "device") else next(model.parameters()).device
        if device != self.device:
            raise ValueError(f"the new model is on {device}, the engine runs on {self.device}")
        modes = decode_modes(model, device, self.static_decode, self.cuda_graphs)
        with self.cv:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.paused = True
            if abort:
                for req in self.slots:
                    req.cancel()
            self.cv.notify()
        try:
            with self.cv:
                while self.slots and self.alive:  # the loop frees them (notified or not: poll)
                    self.cv.wait(poll)
                cfg = model.config
                self.model, self.vocab_size = model, cfg.vocab_size
                self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
                self.cache.release()
                self._setup_decode(modes)
                self.prefix.clear()
                self.weights_version = None
                too_long = [r for r in self.waiting if len(r.prompt_ids) >= self.max_seq_len]
                for req in too_long:
                    self.waiting.remove(req)
                for req in self.waiting:
                    req.max_new = min(req.max_new, self.max_seq_len - len(req.prompt_ids))
        finally:
            with self.cv:
                self.paused = False
                self.cv.notify()
        for req in too_long:
            self._end(req, "error", f"the prompt has {len(req.prompt_ids)} tokens; the reloaded model's context "
                                    f"is {self.max_seq_len} tokens")

    def _setup_decode(self, modes: tuple):
        """A new KV cache for self.model, and the static step's state where it runs (a spare cache row for its
        padding rows); graphs are captured anew."""
        static, graphs = modes
        cfg = self.model.config
        self.cache = SlotCache(cfg.num_hidden_layers, self.max_batch + int(static), self.max_seq_len,
                               GRAPH_CACHE_COLUMNS if graphs else 64)
        self.static = StaticDecode(self.model, self.cache, self.max_batch, self.device, graphs) if static else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        return not self.closed and (self.thread is None or self.thread.is_alive())

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def full(self) -> bool:
        """max_batch running + max_queue waiting: a burst on an idle engine fills every slot before the queue
        counts (requests wait in `waiting` until the loop's next step moves them into free slots)."""
        with self.cv:  # re-entrant; a request moves from waiting to slots under it, so it is never counted twice
            return len(self.waiting) + len(self.slots) >= self.max_batch + self.max_queue

    def load(self) -> str:
        with self.cv:
            running, waiting = len(self.slots), len(self.waiting)
        return (f"{running} request{'s are' if running != 1 else ' is'} running and {waiting} waiting "
                f"(--max_batch {self.max_batch}, --max_queue {self.max_queue})")

    @property
    def active(self) -> int:
        return len(self.slots)

    # ---- the loop ----
    def _run(self):
        autocast = nullcontext() if self.autocast_dtype is None else torch.autocast(self.device.type,
                                                                                   dtype=self.autocast_dtype)
        if self.device.type == "cuda":  # this thread's streams (a graph's capture and replay) on the model's GPU
            torch.cuda.set_device(self.device)

        def busy():
            return self.closed or self.slots or (self.waiting and not self.paused)
        with torch.inference_mode(), autocast:
            while True:
                # idle on CPU: end this thread's OpenMP pool, so that the threads waiting for answers compute alone
                # (model/openmp.py; read without the lock: a stale answer only costs a pool rebuilt)
                if self.device.type == "cpu" and not busy():
                    release_thread_pool()
                with self.cv:
                    self.cv.wait_for(busy)
                    if self.closed:
                        break
                try:
                    self.step()
                except Exception:  # a bug, not a request's fault: end what runs, keep serving
                    traceback.print_exc(file=sys.stderr)
                    for req in list(self.slots):
                        self._remove(req, "error", "internal engine error")
        with self.cv:
            leftover, self.waiting = list(self.waiting), collections.deque()
        for req in leftover + list(self.slots):
            self._remove(req, "cancelled")

    def step(self):
        """One iteration: drop cancelled/expired requests, prefill newcomers, decode every active slot."""
        now = time.monotonic()
        for req in [r for r in self.slots if r.cancelled or (r.deadline is not None and now > r.deadline)]:
            self._remove(req, "cancelled" if req.cancelled else "timeout")
        with self.cv:
            expired = [r for r in self.waiting if r.cancelled or (r.deadline is not None and now > r.deadline)]
            for req in expired:
                self.waiting.remove(req)
        for req in expired:
            self._end(req, "cancelled" if req.cancelled else "timeout")
        self._admit()
        if self.waiting and len(self.slots) == self.n_decode:
            # requests that arrived during that prefill are prefilled now, before the decode forward, not one
            # step later (once per step, so a steady stream of arrivals cannot hold the decode back)
            self._admit()
        if self.n_decode:
            self._decode()
        if not self.slots and self.static is None:  # the static step keeps its buffers (its graphs use them)
            with self.cv:
                if not self.waiting:
                    self.cache.release()

    def _admit(self):
        if len(self.slots) > self.n_decode:  # a long prompt in chunked prefill goes first
            self._prefill_chunk(self.slots[self.n_decode])
            return
        with self.cv:
            if self.paused or not self.waiting or len(self.slots) >= self.max_batch:
                return
            self._check_weights()
            batch, hits = [self.waiting.popleft()], []
            hits.append(self._hit(batch[0]))
            past = hits[0][0]
            if len(batch[0].prompt_ids) - past <= self.prefill_chunk:
                # as many short prompts as fit in one padded (N x T) forward of prefill_chunk tokens; the rows
                # start after the shortest cached beginning among them, so a newcomer does not join when the
                # cached tokens it makes the batch recompute outnumber both its own and the batch's
                width = len(batch[0].prompt_ids) - past
                while self.waiting and len(self.slots) + len(batch) < self.max_batch:
                    nxt = self.waiting[0]
                    hit = self._hit(nxt)
                    past2 = min(past, hit[0])
                    width2 = max(len(r.prompt_ids) for r in batch + [nxt]) - past2
                    recomputed = len(batch) * (past - past2) + hit[0] - past2
                    if (width2 * (len(batch) + 1) > self.prefill_chunk
                            or recomputed > max(len(nxt.prompt_ids) - hit[0], len(batch) * width)):
                        break
                    past, width = past2, width2
                    batch.append(self.waiting.popleft())
                    hits.append(hit)
            for r in batch:
                r.weights = self.weights_version
            self.slots += batch
        for i, (r, (_, key)) in enumerate(zip(batch, hits)):
            if past:
                self.prefix.copy_into(key, past, self.cache, self.n_decode + i)
        self.prompt_tokens_cached_total += past * len(batch)
        if len(batch[0].prompt_ids) - past > self.prefill_chunk:
            batch[0].w = past
            self._prefill_chunk(batch[0])
        else:
            self._prefill(batch, past)

    def _hit(self, req: Request):
        """(tokens of req's prompt the prefix cache holds, at most all but the last; the entry's key)."""
        if self.weights_version is None:
            return 0, None
        length, key = self.prefix.lookup(req.prompt_ids)
        return min(length, len(req.prompt_ids) - 1), key

    def _weights_id(self):
        """What identifies the current weights: each parameter's version counter (bumped by optimizer steps,
        load_state_dict, in-place ops under no_grad), storage and dtype; None when that cannot be known
        (parameters made under inference_mode have no version counter), which turns the prefix cache off.
        Changes made through `.data` in place are not seen: reload the model or use a new Engine after those."""
        try:
            return tuple((p._version, p.data_ptr(), p.dtype) for p in self.model.parameters())
        except RuntimeError:
            return None

    def _check_weights(self):
        """Forget cached keys when the weights are not those they were computed with."""
        if not self.prefix.capacity:
            return
        current = self._weights_id()
        if current is None or current != self.weights_version:
            self.prefix.clear()
        self.weights_version = current

    def _store(self, req: Request, ids: list, row: int):
        """Cache row `row`'s keys for `ids` when they were computed with the current weights from the start."""
        if (self.prefix.capacity and req.weights is not None and req.weights == self.weights_version
                and req.weights == self._weights_id()):
            self.prefix.store(ids, self.cache, row)

    def _prefill(self, batch: list, past: int = 0):
        """Prompts of one or more new requests in one forward (right-padded), first token sampled; the first
        `past` tokens of every prompt are already in the rows (from the prefix cache)."""
        lengths = [len(r.prompt_ids) - past for r in batch]
        width, n = max(lengths), len(batch)
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :lengths[i]] = torch.tensor(r.prompt_ids[past:])
        same = len(set(lengths)) == 1
        mask = None if same else torch.arange(past + width)[None, :] < past + torch.tensor(lengths)[:, None]
        keep = 1 if same else torch.tensor(sorted(set(n - 1 for n in lengths)))
        view = _CacheView(self.cache, self.n_decode, n, past)
        logits = self._forward(batch, ids, torch.arange(past, past + width).expand(n, width), mask, view, keep)
        if logits is None:
            return
        if same:
            logits = logits[:, -1]
        else:  # each row's last prompt position among the kept ones
            at = torch.searchsorted(keep, torch.tensor(lengths) - 1).to(logits.device)
            logits = logits[torch.arange(n, device=logits.device), at]
        for i, r in enumerate(batch):
            r.w = len(r.prompt_ids)
            self._store(r, r.prompt_ids, self.n_decode + i)
        self.n_decode += n
        self._accept(batch, logits)

    def _prefill_chunk(self, req: Request):
        """The next prefill_chunk tokens of a long prompt (the slot right after the decoding ones)."""
        start = req.w
        chunk = req.prompt_ids[start:start + self.prefill_chunk]
        view = _CacheView(self.cache, self.n_decode, 1, start)
        positions = torch.arange(start, start + len(chunk))[None]
        logits = self._forward([req], torch.tensor([chunk]), positions, None, view, 1)
        if logits is None:
            return
        req.w = start + len(chunk)
        if req.w == len(req.prompt_ids):
            self._store(req, req.prompt_ids, self.n_decode)
            self.n_decode += 1
            self._accept([req], logits[:, -1])

    def _decode(self):
        """One forward for every decoding slot; each gets its next token."""
        reqs = self.slots[:self.n_decode]
        if self.static is not None:
            logits = self._guard(reqs, lambda: self.static.run(reqs, self.max_seq_len))
            if logits is not None:
                for r in reqs:
                    r.w += 1
                self.static.advance(reqs, self._accept(reqs, logits))
            return
        cols = torch.tensor([r.w for r in reqs], device=self.device)
        past, low = max(r.w for r in reqs), min(r.w for r in reqs)
        mask = None
        if low != past:  # rows of different lengths: hide each row's columns w..past-1
            span = torch.arange(past + 1, device=self.device)
            mask = (span[None, :] < cols[:, None]) | (span[None, :] == past)
        view = _CacheView(self.cache, 0, len(reqs), past, cols, uniform=low == past)
        ids = torch.tensor([[r.next_input] for r in reqs], device=self.device)
        logits = self._forward(reqs, ids, cols[:, None], mask, view, 1)
        if logits is None:
            return
        for r in reqs:
            r.w += 1
        self._accept(reqs, logits[:, -1])

    def _forward(self, reqs: list, ids, positions, mask, view, keep):
        """model(...) logits, or None after ending `reqs` with the error (the loop keeps serving)."""
        return self._guard(reqs, lambda: self.model(
            ids.to(self.device), position_ids=positions.to(self.device),
            attention_mask=None if mask is None else mask.to(self.device), past_key_values=view, use_cache=True,
            logits_to_keep=keep if isinstance(keep, int) else keep.to(self.device)).logits)

    def _guard(self, reqs: list, forward):
        """forward(), or None after ending `reqs` with the error it raised (the loop keeps serving)."""
        try:
            return forward()
        except Exception as err:
            for req in reqs:
                self._remove(req, "error", f"{type(err).__name__}: {err}")
            return None

    def _accept(self, reqs: list, logits: torch.Tensor) -> torch.Tensor:
        """Sample, record and stream the next token of each request; end the ones that are done. Returns the tokens
        as sampled on the device, (len(reqs),) long."""
        for r in reqs:
            if r.params.repetition_penalty != 1.0 and r.seen is None:
                r.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
                r.seen[torch.tensor(r.prompt_ids)] = True
        picked = sample_next(logits, reqs)
        tokens = picked.tolist()  # the step's host sync (sampled rows add one for their CDF, logprobs one more)
        record_logprobs(logits, reqs, tokens)
        now = time.monotonic()
        done = []
        for r, tok in zip(reqs, tokens):
            if r.first_token_at is None:
                r.first_token_at = now
                self.ttft.observe(now - r.submitted)
                self.prompt_tokens_total += len(r.prompt_ids)
            else:
                self.itl.observe(now - r.last_token_at)
            r.last_token_at, r.next_input = now, tok
            r.token_ids.append(tok)
            self.generation_tokens_total += 1
            if r.seen is not None:
                r.seen[tok] = True
            reason = None
            if tok in self.eos_ids:
                reason = "stop"
            elif r.detok is not None:
                r._deliver(r.stopper.feed(r.detok.push(tok)))
                reason = "stop" if r.stopper.stopped else None
            if reason is None and (len(r.token_ids) >= r.max_new or r.w >= self.max_seq_len):
                reason = "length"
            if reason:
                done.append((r, reason))
        for r, reason in done:
            self._remove(r, reason)
        return picked

    def _remove(self, req: Request, reason: str, error: str = None):
        """End `req` and give its slot back: the last decoding row moves into its row (and the slot in
        chunked prefill, if any, moves down one), so active rows stay contiguous from 0."""
        if req in self.slots:
            j = self.slots.index(req)
            if reason != "error":  # its keys so far serve a later prompt that begins the same way
                self._store(req, (req.prompt_ids + req.token_ids)[:req.w], j)
            if j < self.n_decode:
                last = self.n_decode - 1
                if j != last:
                    self.cache.move_row(last, j, self.slots[last].w)
                    self.slots[j] = self.slots[last]
                self.slots.pop(last)
                self.n_decode -= 1
                if len(self.slots) > self.n_decode:  # the prefilling slot sits right after the decoding ones
                    self.cache.move_row(self.n_decode + 1, self.n_decode, self.slots[self.n_decode].w)
            else:
                self.slots.pop(j)
        self._end(req, reason, error)

    def _end(self, req: Request, reason: str, error: str = None):
        self.finished[reason] += 1
        req._finish(reason, error)
