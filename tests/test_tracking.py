"""trainer/core/tracking.py with the real swanlab and wandb packages, fully offline: a tiny pretraining run
logs loss, lr and tok/s into the tracker's own run files (read back here with the tracker's record
format), --from_resume 1 continues the same run id and step axis; a missing package or an unreachable
server is one warning and training goes on."""
import functools
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_train_args, write_tiny_corpus
from trainer import train_pretrain
from trainer.core.loop import get_lr
from trainer.core.stage import build_parser
from trainer.core.tracking import NoTracker, init_tracker


def swanlab_runs(log_dir: Path) -> list:
    """[(run id, {key: {step: value}})] for each run directory under swanlab's log_dir, oldest first,
    decoded with swanlab's own reader of its .swanlab record files."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    runs = []
    for path in sorted(log_dir.glob("run-*/run-*.swanlab")):
        reader, run_id, scalars = DataStoreReader(), None, {}
        reader.open(path)
        for data in reader:
            record = Record()
            record.ParseFromString(data)
            if record.HasField("start"):
                run_id = record.start.id
            elif record.HasField("scalar"):
                scalars.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
        reader.close()
        runs.append((run_id, scalars))
    return runs


def leveldb_log_records(path: Path) -> list:
    """The records of a LevelDB-log file (wandb's .wandb format): a 7-byte file header, then 32 KiB blocks
    of chunks, each with a (crc32, length, type) header; types 1 = full, 2/3/4 = first/middle/last."""
    data, records, pending, pos = path.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                         # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_runs(wandb_dir: Path) -> list:
    """[(run id, {key: {step: value}})] for each offline run under wandb's dir, oldest first."""
    from wandb.proto.wandb_internal_pb2 import Record
    runs = []
    for path in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        run_id, scalars = None, {}
        for data in leveldb_log_records(path):
            record = Record()
            record.ParseFromString(data)
            if record.HasField("run"):
                run_id = record.run.run_id
            elif record.HasField("history"):
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for key in ("loss", "lr", "tok_s"):
                    scalars.setdefault(key, {})[row["_step"]] = row[key]
        runs.append((run_id, scalars))
    return runs


def offline_env(monkeypatch, tracker: str) -> None:
    for var in ("SWANLAB_MODE", "SWANLAB_API_KEY", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("SWANLAB_PROBE_REQUIREMENTS", "false")              # its pip-freeze snapshot takes 3 s


@pytest.mark.parametrize("tracker", ["swanlab", "wandb"])
def test_tracker_logs_offline_and_resume_continues_the_run(tmp_path, monkeypatch, tracker):
    offline_env(monkeypatch, tracker)
    data = write_tiny_corpus(tmp_path / "data", n=16)                      # 4 micro-batches of 4
    flags = dict(accumulation_steps=1, save_interval=1, learning_rate=1e-3, packing=0)
    argv = tiny_train_args(tmp_path, data["pretrain"], **flags) + ["--use_wandb", "--tracker", tracker]
    train_pretrain.main(argv + ["--max_steps", "2"])                       # "interrupted" after step 2
    first_id = torch.load(tmp_path / "ckpt" / "pretrain_64_resume.pth", weights_only=False)["wandb_id"]
    train_pretrain.main(argv + ["--from_resume", "1"])                     # steps 3 and 4

    if tracker == "wandb":
        import wandb
        wandb.teardown()              # the wandb-core service writes run files asynchronously: wait for it
    out = tmp_path / "out"
    runs = swanlab_runs(out / "swanlog") if tracker == "swanlab" else wandb_runs(out / "wandb")
    assert [run_id for run_id, _ in runs] == [first_id, first_id] and first_id
    ours = [json.loads(line) for line in open(out / "pretrain_64_metrics.jsonl")]
    for (_, scalars), steps in zip(runs, ([1, 2], [3, 4])):
        assert sorted(scalars["loss"]) == steps                            # the resumed run continues the axis
        for step in steps:
            assert scalars["lr"][step] == pytest.approx(get_lr(step, 4, 1e-3), rel=1e-12)
            assert scalars["tok_s"][step] > 0
    logged = {**runs[0][1]["loss"], **runs[1][1]["loss"]}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in ours}, rel=1e-12)


def _one_warning(args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = init_tracker(args)
    ours = [w for w in caught if "--use_wandb" in str(w.message)]
    assert isinstance(run, NoTracker) and len(ours) == 1, [str(w.message) for w in caught]
    run.log({"loss": 1.0}, step=1)                                          # the loop never needs `if wandb:`
    run.finish()
    return str(ours[0].message)


@pytest.mark.parametrize("tracker", ["swanlab", "wandb"])
def test_missing_package_is_one_warning(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(__import__("sys").modules, tracker, None)          # `import swanlab` raises ImportError
    args = build_parser("t").parse_args(["--use_wandb", "--tracker", tracker, "--save_dir", str(tmp_path)])
    assert "not installed" in _one_warning(args)
    assert isinstance(init_tracker(build_parser("t").parse_args([])), NoTracker)   # no --use_wandb


def test_unreachable_swanlab_server_is_one_warning(tmp_path, monkeypatch):
    from swanlab.sdk.internal.pkg.client import session
    monkeypatch.setattr(session, "create", functools.partial(session.create, default_retry=0))  # fail fast
    monkeypatch.setenv("SWANLAB_MODE", "online")
    monkeypatch.setenv("SWANLAB_API_KEY", "not-a-key")
    monkeypatch.setenv("SWANLAB_API_HOST", "http://127.0.0.1:9")           # nothing listens on port 9
    monkeypatch.setenv("SWANLAB_WEB_HOST", "http://127.0.0.1:9")
    args = build_parser("t").parse_args(["--use_wandb", "--save_dir", str(tmp_path)])
    assert "swanlab" in _one_warning(args)


def test_unreachable_wandb_server_is_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")                            # wandb's default waits 90 s
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = build_parser("t").parse_args(["--use_wandb", "--tracker", "wandb", "--save_dir", str(tmp_path)])
    assert "wandb" in _one_warning(args)


def test_tracker_missing_package_is_one_warning(monkeypatch):
    import builtins
    from trainer.core.tracking import init_tracker
    real_import = builtins.__import__

    def no_trackers(name, *a, **k):
        if name in ("swanlab", "wandb"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    for tracker in ("swanlab", "wandb"):
        args = build_parser("t").parse_args(["--use_wandb", "--tracker", tracker])
        with pytest.warns(UserWarning, match=tracker):
            run = init_tracker(args)
        run.log({"loss": 1.0})   # a no-op tracker: the loop never needs `if wandb:`
        run.finish()
    assert init_tracker(build_parser("t").parse_args([])).id is None
