"""model/openmp.py: one OpenMP pool at a time when the engine decodes on its own thread (CPU, GNU OpenMP)."""
import subprocess
import sys

import pytest

from model import openmp
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(openmp._pause_function() is None,
                                reason="torch here does not run on GNU OpenMP (libgomp)")

# In a fresh interpreter (this process has threads of other tests): the number of OS threads tells which
# OpenMP pools exist. torch on 2 threads: a thread's pool is 1 worker thread.
PROBE = r"""
import os, sys, threading, time
import torch
sys.path.insert(0, sys.argv[1])
from model import openmp
torch.set_num_threads(2)
def threads():
    return len(os.listdir("/proc/self/task"))
def parallel_work():
    torch.ones(1 << 22).mul_(2).sum()      # above ATen's grain size: an OpenMP parallel region
base = threads()
parallel_work()
pooled = threads()
assert openmp.release_thread_pool()
released = threads()
parallel_work()                            # the pool comes back at the next region
again = threads()
print(base, pooled, released, again)
if sys.argv[2] == "engine":              # the engine's part
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from model.engine import Engine, SamplingParams
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2)).eval()
    parallel_work()
    before = threads()                     # this (the caller's) thread has its pool
    engine = Engine(model, max_batch=2, eos_token_id=-1)
    seen = []
    def hold(ids):                         # runs in the engine's thread, at each forward
        parallel_work()                    # (the tiny model's own ops are too small to start a pool)
        seen.append(threads())
        return ids
    real = model.model.embed_tokens.forward
    model.model.embed_tokens.forward = lambda ids: real(hold(ids))
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
    deadline = time.time() + 10
    while threads() != before and time.time() < deadline:   # idle again: the engine's pool ends too
        time.sleep(0.01)
    # during decoding: the caller's worker gone, the engine's thread and its own worker there
    print(before, seen[-1], threads())
    engine.close()
"""


@pytest.fixture(scope="module")
def probe() -> list:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), "engine"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [list(map(int, line.split())) for line in out.stdout.strip().splitlines()]


def test_release_ends_the_calling_threads_pool_until_its_next_parallel_region(probe):
    base, pooled, released, again = probe[0]
    assert pooled == base + 1 and released == base and again == base + 1


def test_the_engine_decodes_with_the_only_pool_and_gives_it_back_when_idle(probe):
    """The caller's pool ends when it submits; the engine thread's pool ends when it has nothing to do: never two
    pools at once, which made libgomp treat 2 cores as oversubscribed (workers sleeping between regions)."""
    (before, during, idle), = probe[1:]
    assert during == before + 1          # - the caller's worker + the engine's thread + its worker
    assert idle == before                # - the engine's worker (its thread lives until close())
