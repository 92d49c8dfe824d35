"""The cost of running tool calls (dataset/tools.py ToolRunner, used by trainer/train_agent.py and
scripts/eval_toolcall.py) against a fresh Python process per call, and what a failing tool costs.

    python bench/bench_tools.py              # ~20 s on 2 cores
    python bench/bench_tools.py --calls 200

Rows (median over --calls calls unless said): the runner's first call (it starts its child process), a warm
call of each kind (arithmetic, a table lookup), a call rejected before the child (unknown tool, bad arguments),
a call that loops until the --timeout kill (and the next call, which starts a new child), and, as the baseline, one
`python -c` process per call that imports the tools and runs the same lookup (what a runner without a persistent
child would pay). The CPU is named in the header.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import platform
import statistics
import subprocess
import time

from dataset.tools import ToolRunner
from trainer.core.progress import cpu_description

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--calls", type=int, default=50, help="calls per row (the process baseline: a fifth of them)")
    p.add_argument("--timeout", type=float, default=0.5, help="the runner's per-call limit for the looping tool")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    rows = []
    with ToolRunner(timeout=args.timeout) as runner:
        start = time.perf_counter()
        runner.run("calculate_math", {"expression": "256*37"})
        rows.append(("first call (starts the child process)", 1, time.perf_counter() - start, ""))
        for label, name, arguments in (("calculate_math 256*37", "calculate_math", {"expression": "256*37"}),
                                       ("get_current_weather 北京", "get_current_weather", {"location": "北京"})):
            t, out = timed(lambda: runner.run(name, arguments), args.calls)
            rows.append((f"warm call: {label}", args.calls, t, out[:48]))
        t, out = timed(lambda: runner.run("no_such_tool", {}), args.calls)
        rows.append(("unknown tool (answered before the child)", args.calls, t, out[:48]))
        t, out = timed(lambda: runner.run("get_current_weather", "{not json"), args.calls)
        rows.append(("arguments not JSON (answered before the child)", args.calls, t, out[:48]))
        runner.register("loops", "tool_helpers:loops")
        start = time.perf_counter()
        out = runner.run("loops", {})
        rows.append((f"a tool that loops (killed at {args.timeout} s)", 1, time.perf_counter() - start, out[:48]))
        start = time.perf_counter()
        runner.run("calculate_math", {"expression": "1+1"})
        rows.append(("the next call (a new child)", 1, time.perf_counter() - start, ""))
    code = ("import sys; sys.path.insert(0, %r); from dataset.tools import get_current_weather; "
            "print(get_current_weather({'location': '北京'}))" % str(ROOT))
    n = max(args.calls // 5, 3)
    t, _ = timed(lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, check=True), n)
    rows.append(("baseline: one `python -c` process per call", n, t, ""))
    print(f"CPU: {cpu_description()}, Python {platform.python_version()}")
    print("\n| call | calls | median (ms) | observation |\n|---|---:|---:|---|")
    for label, count, seconds, out in rows:
        print(f"| {label} | {count} | {seconds * 1e3:.3f} | {out.replace('|', '/')} |")


if __name__ == "__main__":
    main()
