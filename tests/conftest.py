"""Shared fixtures: tiny model configs and the ground truth kept in tests/goldens (the original's outputs and tokenizer)."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"
UPSTREAM_TOKENIZER = GOLDENS / "upstream_tokenizer"

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(**overrides):
    from model.model_minimind import MiniMindConfig
    return MiniMindConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_model():
    """A seeded tiny dense model in eval mode."""
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    return MiniMindForCausalLM(tiny_config()).eval()


def tokenizer_dir() -> Path:
    """The shipped tokenizer."""
    return ROOT / "model"


def write_tiny_corpus(directory: Path, n: int = 96, seed: int = 0) -> dict:
    """Small pretrain and SFT jsonl files of varying lengths (deterministic)."""
    import json
    import random
    rng = random.Random(seed)
    words = ["MiniMind", "is", "a", "tiny", "model", "猫", "狗", "天空", "是", "蓝色", "的", "1+1=2", "hello", "world"]
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"pretrain": directory / "pretrain.jsonl", "sft": directory / "sft.jsonl"}
    with open(paths["pretrain"], "w", encoding="utf-8") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
            f.write(json.dumps({"text": f"<|im_start|>{text}<|im_end|>"}, ensure_ascii=False) + "\n")
    with open(paths["sft"], "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            conv = [{"role": "user", "content": f"{a}+{b}等于几？"}, {"role": "assistant", "content": f"{a}+{b}={a + b}。"}]
            f.write(json.dumps({"conversations": conv}, ensure_ascii=False) + "\n")
    return paths


def tiny_train_args(tmp: Path, data: Path, **extra) -> list:
    """Flags for a seconds-long CPU run of a training stage, writing only under tmp."""
    from trainer.core.stage import to_argv
    flags = {"device": "cpu", "hidden_size": 64, "num_hidden_layers": 2, "batch_size": 4, "max_seq_len": 64,
             "save_dir": tmp / "out", "checkpoint_dir": tmp / "ckpt", "tokenizer_path": tokenizer_dir(),
             "data_path": data, "num_workers": 0, "log_interval": 1, "save_interval": 1000, **extra}
    return to_argv(flags)


# ---- launching several processes (torchrun, deepspeed, two "machines") ----
def free_port() -> int:
    """A TCP port nobody listens on now (tests run beside other jobs: never a fixed port)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    """One thread per rank (2 ranks on 2 cores) and the repository importable from any launcher."""
    import os
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_launcher(command, timeout: int = 600):
    """Run a multi-process launch (`command(port)` -> argv, on a fresh free port) with launcher_env(). Once in a
    while a gloo rank aborts with GLOO_TEARDOWN_ABORT (a joinable C++ thread destroyed: upstream's gloo teardown
    race, seen under load; our runs barrier and destroy the process group at exit); such a launch is run once more.
    Safe for every check here: a fresh run starts over, a resumed run continues exactly from its last save."""
    import subprocess
    for attempt in range(2):
        res = subprocess.run(command(free_port()), capture_output=True, text=True, timeout=timeout, env=launcher_env())
        if res.returncode == 0 or GLOO_TEARDOWN_ABORT not in res.stderr:
            return res
        print(f"launch aborted by the gloo teardown race (attempt {attempt + 1}); running it again")
    return res


def dist_probe_argv(tmp: Path, data: Path, **extra) -> list:
    """tests/dist_probe.py running trainer/train_pretrain.py with tiny flags, all files under tmp."""
    return [str(ROOT / "tests" / "dist_probe.py"), str(tmp), str(ROOT / "trainer" / "train_pretrain.py"),
            *tiny_train_args(tmp, data, **extra)]


def check_two_ranks(tmp: Path, rows_per_rank: int = None, all_samples: int = None) -> None:
    """What every 2-process launch must give (from the rank{0,1}.json that dist_probe wrote): each rank
    trained on its own samples (`rows_per_rank` each; packed: together all `all_samples`, at most one row
    repeated to even the ranks out), both ended with identical weights, only rank 0 wrote files."""
    import json
    r0, r1 = (json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1))
    if rows_per_rank is not None:
        assert len(r0["rows"]) == len(r1["rows"]) == rows_per_rank
        assert not set(r0["rows"]) & set(r1["rows"])                        # different samples on each rank
    else:
        assert len(set(r0["rows"]) | set(r1["rows"])) == all_samples          # every sample trained
        assert len(set(r0["rows"]) & set(r1["rows"])) <= 12                   # no more than one repeated row
    assert r0["checksum"] == r1["checksum"] and r0["first"] == r1["first"]  # identical weights after all-reduce

    def outputs(r):
        return {Path(p).name for p in r["writes"] if Path(p).parent in (tmp / "out", tmp / "ckpt")}
    assert outputs(r1) == set()
    assert {"pretrain_64.pth", "pretrain_64.json", "pretrain_64_resume.pth"} <= outputs(r0)
