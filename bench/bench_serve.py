"""Serving throughput and latency of scripts/serve_openai_api.py under concurrent streaming clients.

    python bench/bench_serve.py                                   # 512x8 random weights, CPU, 1/4/16/32 streams
    python bench/bench_serve.py --baseline_dir /work/main         # also today's server (one request at a time)
    python bench/bench_serve.py --hidden_size 64 --num_hidden_layers 2 --levels 1,4 --new_tokens 16   # quick
    python bench/bench_serve.py --batch_sweep 1,4,8,16,32       # the engine alone at several --max_batch
    python bench/bench_serve.py --no_prefix_cache_levels ""     # without the --prefix_cache 0 rows
    python bench/bench_serve.py --arrival 16 --new_tokens 64      # TTFT: 16 streams at once, two client patterns

Starts the real server in a subprocess (the weight: --weight_file, else a model with random weights saved to a
temp dir), once with --max_batch N, once with --max_batch 1, once with --max_batch N --prefix_cache 0 at
--no_prefix_cache_levels (and, with --baseline_dir, that checkout's server), and drives each with the `openai`
package: C concurrent streaming clients, each with a different prompt, temperature 0 and max_tokens
--new_tokens. Per server and C it prints total completion tokens/s (all streams, wall clock from the first
request to the last [DONE]), p50/p95 time to first token (request handed to the network by httpx -> first
content chunk; the clients' own request building in this process is not counted, the last column counts it)
and p50/p95 inter-token latency (gaps between content chunks of a stream), then the ratios the serving issue
targets. Then a burst table: an idle server at --max_batch N --max_queue --burst_queue gets N + Q non-streaming
requests at once (every one must be answered, none refused with 429), then 2 (N + Q). --batch_sweep measures the engine without HTTP instead (B requests at once at --max_batch B). Writes
only a temp dir.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import asyncio
import os
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack

import torch

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["天空为什么是蓝色的", "推荐一些中国的美食", "解释什么是机器学习", "写一首关于春天的诗", "猫和狗哪个更适合当宠物",
          "如何学习编程", "介绍一下长城", "什么是光合作用"]


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_weight(directory: Path, hidden_size: int, num_hidden_layers: int) -> Path:
    """A model with random weights, except that the (tied) embedding rows of special tokens, whitespace-only
    tokens and tokens that decode to part of a UTF-8 character are zero: their logits are 0 while the best
    of the others is far above, so greedy output is visible text, one token per content chunk, and never
    EOS (every stream runs the full --new_tokens)."""
    from transformers import AutoTokenizer

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from model.weights import save_weights, weight_path
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    hidden = [i for i in range(len(tokenizer)) if i in tokenizer.all_special_ids
              or "\ufffd" in tokenizer.decode([i]) or not tokenizer.decode([i]).strip()]
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    model = MiniMindForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[hidden] = 0
    return save_weights(model, weight_path(directory, "full_sft", cfg), cfg)


class Server:
    """`serve_openai_api.py` of `root` in a subprocess on a free port, until the context ends."""

    def __init__(self, root: Path, weight: Path, flags: list):
        self.port = free_port()
        self.cmd = [sys.executable, str(root / "scripts" / "serve_openai_api.py"), "--load_from", str(weight),
                    "--tokenizer_path", str(ROOT / "model"), "--device", "cpu", "--port", str(self.port), *flags]

    def __enter__(self):
        import httpx
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"bench_serve.py: the server did not start: {' '.join(self.cmd)}\n"
                                 f"{self.proc.stderr.read() if self.proc.poll() is not None else ''}")
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)


def batch_sweep(weight: Path, sizes: list, new_tokens: int):
    """The engine alone (no HTTP): B requests at once with --max_batch B, for each B in sizes."""
    from transformers import AutoTokenizer

    from model.engine import Engine, SamplingParams
    from model.loading import load_native
    model = load_native(weight)
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "model"))
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": f"{TOPICS[i % len(TOPICS)]}？（第{i}问）"}],
                                                       tokenize=False, add_generation_prompt=True)).input_ids
               for i in range(max(sizes) + 2)]
    print("| --max_batch (= concurrent requests) | total tokens/s | tokens/s per request | TTFT p50 (ms) |")
    print("|---|---|---|---|")
    for size in sizes:
        with Engine(model, tokenizer, max_batch=size) as engine:
            engine.generate(prompts[-2:], SamplingParams(max_tokens=4))  # warm-up (other prompts, as on a server)
            start = time.perf_counter()
            outs = engine.generate(prompts[:size], SamplingParams(max_tokens=new_tokens))
            wall = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        ttft = percentile([o.first_token_at - o.submitted for o in outs], 0.5)
        print(f"| {size} | {tokens / wall:.1f} | {tokens / wall / size:.1f} | {ttft * 1e3:.0f} |", flush=True)


async def one_stream(client, prompt: str, new_tokens: int, sent: dict) -> dict:
    start, key = time.perf_counter(), f"{id(prompt)}-{time.perf_counter_ns()}"
    stamps, tokens = [], 0
    stream = await client.chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": prompt}], stream=True, temperature=0,
        max_tokens=new_tokens, stream_options={"include_usage": True}, extra_headers={"X-Bench-Request": key})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content or (delta.model_extra or {}).get("reasoning_content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - sent.get(key, start) if stamps else float("nan"),
            "ttft_call": stamps[0] - start if stamps else float("nan"),
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens, "end": time.perf_counter()}


async def drive(url: str, streams: int, new_tokens: int, offset: int) -> dict:
    """C concurrent streams. Time to first token starts when httpx hands a request to the network (its
    `request` event hook): building C requests in this one client process on the same cores is the client's
    work, not the server's latency."""
    import httpx
    from openai import AsyncOpenAI
    sent = {}

    async def on_request(request):
        if "X-Bench-Request" in request.headers:
            sent[request.headers["X-Bench-Request"]] = time.perf_counter()

    async with httpx.AsyncClient(event_hooks={"request": [on_request]}, timeout=3600,
                                 limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)) as http, \
            AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600, http_client=http) as client:
        prompts = [f"{TOPICS[(offset + i) % len(TOPICS)]}？（第{offset + i}问）" for i in range(streams)]
        start = time.perf_counter()
        runs = await asyncio.gather(*[one_stream(client, p, new_tokens, sent) for p in prompts])
    wall = max(r["end"] for r in runs) - start
    gaps = [g for r in runs for g in r["gaps"]]
    ttfts = [r["ttft"] for r in runs]
    return {"tps": sum(r["tokens"] for r in runs) / wall, "tokens": sum(r["tokens"] for r in runs),
            "ttft50": percentile(ttfts, 0.5), "ttft95": percentile(ttfts, 0.95),
            "call95": percentile([r["ttft_call"] for r in runs], 0.95),
            "itl50": percentile(gaps, 0.5), "itl95": percentile(gaps, 0.95)}


async def drive_plain(url: str, streams: int, new_tokens: int) -> dict:
    """C streams from ONE `AsyncOpenAI` client with its default settings (how an application writes it: short
    prompts, asyncio.gather), each timed from its own create() call to its first content chunk."""
    from openai import AsyncOpenAI

    async def one(client, prompt):
        start = time.perf_counter()
        stream = await client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": prompt}],
                                                      stream=True, temperature=0, max_tokens=new_tokens)
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        return first if first is not None else float("nan")

    async with AsyncOpenAI(base_url=url, api_key="none") as client:
        ttfts = await asyncio.gather(*[one(client, f"{'hello' if i % 2 == 0 else '你好'} {i}") for i in range(streams)])
    return {"ttft50": percentile(ttfts, 0.5), "ttft95": percentile(ttfts, 0.95), "ttftmax": max(ttfts),
            "ttfts": list(ttfts)}


def arrival_table(weight: Path, max_batch: int, streams: int, new_tokens: int):
    """Time to first token of C streams that arrive together, from two client patterns on one batching server:
    this bench's clients (long prompts, TTFT from when httpx sends) and one default AsyncOpenAI client (short
    prompts, TTFT from each create() call, so the client's own work on these cores counts)."""
    print("| client pattern | streams | TTFT p50 (ms) | TTFT p95 (ms) | TTFT max (ms) |")
    print("|---|---|---|---|---|")
    with Server(ROOT, weight, ["--max_batch", str(max_batch)]) as server:
        asyncio.run(drive(server.url, 2, 8, 100))  # warm-up
        r = asyncio.run(drive(server.url, streams, new_tokens, streams))
        print(f"| bench clients (custom httpx, from the send) | {streams} | {r['ttft50'] * 1e3:.0f} | "
              f"{r['ttft95'] * 1e3:.0f} | - |", flush=True)
        r = asyncio.run(drive_plain(server.url, streams, new_tokens))
        print(f"| one AsyncOpenAI, asyncio.gather (from create()) | {streams} | {r['ttft50'] * 1e3:.0f} | "
              f"{r['ttft95'] * 1e3:.0f} | {r['ttftmax'] * 1e3:.0f} |", flush=True)
        return r


async def burst(url: str, n: int, new_tokens: int) -> dict:
    """n non-streaming requests released at once on an idle server: how many got 200, 429 or anything else."""
    import httpx
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=1000)) as http:
        health = (await http.get(url.removesuffix("/v1") + "/health")).json()
        assert health["active"] == 0 and health["queue"] == 0, health

        async def one(i):
            body = {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": new_tokens, "temperature": 0}
            return (await http.post(f"{url}/chat/completions", json=body)).status_code

        start = time.perf_counter()
        statuses = await asyncio.gather(*[one(i) for i in range(n)])
    return {"ok": statuses.count(200), "busy": statuses.count(429), "other": n - statuses.count(200) -
            statuses.count(429), "wall": time.perf_counter() - start}


def burst_table(weight: Path, max_batch: int, max_queue: int, new_tokens: int):
    """The batching server at --max_batch B --max_queue Q, idle, hit by B + Q requests at once (all must be
    answered: the documented capacity), then by 2 (B + Q) (the excess, and only it, gets 429)."""
    print("| server (idle, then a burst) | requests at once | 200 | 429 | other | wall (s) |")
    print("|---|---|---|---|---|---|")
    name = f"engine, --max_batch {max_batch} --max_queue {max_queue}"
    with Server(ROOT, weight, ["--max_batch", str(max_batch), "--max_queue", str(max_queue)]) as server:
        asyncio.run(drive(server.url, 2, 8, 100))  # warm-up
        for n in (max_batch + max_queue, 2 * (max_batch + max_queue)):
            r = asyncio.run(burst(server.url, n, new_tokens))
            print(f"| {name} | {n} | {r['ok']} | {r['busy']} | {r['other']} | {r['wall']:.1f} |", flush=True)


def prompt_counters(url: str) -> tuple:
    """(prompt tokens, of them taken from the prefix cache) so far, from the server's /metrics."""
    import httpx
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    values = dict(line.split()[:2] for line in text.splitlines() if line and not line.startswith("#"))
    return (float(values.get("minimind_prompt_tokens_total", 0)),
            float(values.get("minimind_prompt_tokens_cached_total", 0)))


def machine_line(weight: Path, new_tokens: int) -> str:
    from trainer.core.progress import cpu_description
    return (f"# serve: {weight.name}, fp32 CPU, {new_tokens} new tokens per request, temperature 0; {os.cpu_count()} "
            f"CPUs ({cpu_description()}), load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--weight_file", type=str, default=None, help="a native .pth to serve (default: random weights)")
    p.add_argument("--hidden_size", type=int, default=512, help="size of the random-weight model")
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--max_batch", type=int, default=16, help="the batching server's --max_batch")
    p.add_argument("--levels", type=str, default="1,4,16,32", help="concurrent streams, comma-separated")
    p.add_argument("--new_tokens", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--no_prefix_cache_levels", type=str, default="1,16",
                   help="stream counts for the batching server with --prefix_cache 0 too (empty: not measured)")
    p.add_argument("--baseline_dir", type=str, default=None,
                   help="a checkout whose scripts/serve_openai_api.py is measured too (e.g. main before the engine)")
    p.add_argument("--baseline_levels", type=str, default="1", help="stream counts for the baseline server")
    p.add_argument("--burst_queue", type=int, default=16,
                   help="the burst table's server runs with this --max_queue (and --max_batch); 0 = no burst table")
    p.add_argument("--burst_tokens", type=int, default=16, help="max_tokens of each burst request")
    p.add_argument("--arrival", type=int, default=0,
                   help="instead: time to first token of this many streams arriving together, from two client patterns "
                        "(this bench's and one default AsyncOpenAI client timed from create())")
    p.add_argument("--batch_sweep", type=str, default=None,
                   help="instead: the engine alone, no server, at these --max_batch values (e.g. 1,4,8,16,32)")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        weight = Path(args.weight_file) if args.weight_file else random_weight(Path(tmp), args.hidden_size,
                                                                               args.num_hidden_layers)
        print(machine_line(weight, args.new_tokens))
        if args.arrival:
            return arrival_table(weight, args.max_batch, args.arrival, args.new_tokens)
        if args.batch_sweep:
            return batch_sweep(weight, [int(x) for x in args.batch_sweep.split(",")], args.new_tokens)
        setups = [(f"engine, --max_batch {args.max_batch}", ROOT, ["--max_batch", str(args.max_batch)], levels),
                  ("engine, --max_batch 1", ROOT, ["--max_batch", "1"], levels)]
        if args.no_prefix_cache_levels:
            setups.append((f"engine, --max_batch {args.max_batch} --prefix_cache 0", ROOT,
                           ["--max_batch", str(args.max_batch), "--prefix_cache", "0"],
                           [int(x) for x in args.no_prefix_cache_levels.split(",")]))
        if args.baseline_dir:
            setups.append((f"baseline {args.baseline_dir}", Path(args.baseline_dir).resolve(), [],
                           [int(x) for x in args.baseline_levels.split(",")]))
        print("| server | streams | total tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | inter-token p50 (ms) | "
              "inter-token p95 (ms) | TTFT p95 from the create() call (ms) | prompt tokens from the prefix cache |")
        print("|---|---|---|---|---|---|---|---|---|")
        results = {}
        with ExitStack() as stack:  # every server up at once (idle ones cost nothing): each level runs on each
            servers = [stack.enter_context(Server(root, weight, extra)) for _, root, extra, _ in setups]
            for server in servers:  # in turn, so load drift on a shared machine hits them alike
                asyncio.run(drive(server.url, 2, 8, 100))  # warm-up
            for streams in levels:
                for (name, _, _, counts), server in zip(setups, servers):
                    if streams not in counts:
                        continue
                    before = prompt_counters(server.url)
                    r = results[(name, streams)] = asyncio.run(drive(server.url, streams, args.new_tokens, streams))
                    after = prompt_counters(server.url)
                    cached = f"{after[1] - before[1]:.0f} of {after[0] - before[0]:.0f}"
                    print(f"| {name} | {streams} | {r['tps']:.1f} | {r['ttft50'] * 1e3:.0f} | {r['ttft95'] * 1e3:.0f} | "
                          f"{r['itl50'] * 1e3:.1f} | {r['itl95'] * 1e3:.1f} | {r['call95'] * 1e3:.0f} | {cached} |",
                          flush=True)
        if args.burst_queue:
            burst_table(weight, args.max_batch, args.burst_queue, args.burst_tokens)
    batched, single = setups[0][0], setups[1][0]
    for streams in levels:
        if streams > 1:
            print(f"{streams} streams: {results[(batched, streams)]['tps'] / results[(single, streams)]['tps']:.2f}x "
                  f"the total tokens/s of --max_batch 1")
    base = [name for name, root, _, _ in setups if root != ROOT]
    if base and (base[0], 1) in results and 1 in levels:
        new, old = results[(batched, 1)], results[(base[0], 1)]
        print(f"1 stream vs baseline: TTFT p50 {new['ttft50'] * 1e3:.0f} vs {old['ttft50'] * 1e3:.0f} ms, "
              f"inter-token p50 {new['itl50'] * 1e3:.1f} vs {old['itl50'] * 1e3:.1f} ms, "
              f"tokens/s {new['tps']:.1f} vs {old['tps']:.1f}")


if __name__ == "__main__":
    main()
