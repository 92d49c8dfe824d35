"""Launchers with two CPU processes (gloo): the deepspeed launcher, and torchrun as two "machines"
(--nnodes 2, one process each, a rendezvous on 127.0.0.1). Each rank must train on its own samples,
end with the same weights as the other, and only rank 0 may write files (tests/dist_probe.py records
all three). The one-machine torchrun form is tested in tests/test_train.py."""
import shutil
import subprocess
import sys

from tests.conftest import ROOT, check_two_ranks, dist_probe_argv, free_port, launcher_env, run_launcher, write_tiny_corpus


def test_deepspeed_launcher_two_ranks_on_cpu(tmp_path):
    deepspeed = shutil.which("deepspeed")
    assert deepspeed, "the deepspeed launcher is missing: pip install -r requirements.txt"
    data = write_tiny_corpus(tmp_path / "data", n=16)                       # 16 samples / (2 ranks * 4) = 2 steps
    res = run_launcher(lambda port: [deepspeed, "--num_gpus", "2", "--master_port", str(port),
                                     *dist_probe_argv(tmp_path, data["pretrain"], accumulation_steps=1, packing=0)])
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    check_two_ranks(tmp_path, rows_per_rank=8)
    assert "Epoch:[1/1](2/2)" in res.stdout


def test_torchrun_two_nodes_one_process_each(tmp_path):
    """The commands two machines would run (README), here both against 127.0.0.1."""
    data = write_tiny_corpus(tmp_path / "data", n=16)
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               *dist_probe_argv(tmp_path, data["pretrain"], accumulation_steps=1)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env())
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, (out + err)[-3000:]
    check_two_ranks(tmp_path, all_samples=16)                                # packed rows (the default)
    assert "Epoch:[1/1](2/2)" in outputs[0][0] and "Epoch:" not in outputs[1][0]   # rank 0 logs, rank 1 is quiet


def test_progress_total_and_eta_honour_max_steps(tmp_path, capsys, monkeypatch):
    """A 2-epoch run of 4 steps each stopped by --max_steps 6: the lines count to 4 then 2, and the ETA
    covers the whole run (still > 0 at the end of epoch 1, with 2 steps to go), not just the epoch."""
    import itertools
    import re
    from types import SimpleNamespace
    from tests.conftest import tiny_train_args
    from trainer import train_pretrain
    from trainer.core import progress
    clock = itertools.count(0, 60)                                          # a minute per reading: ETAs visible
    monkeypatch.setattr(progress, "time", SimpleNamespace(time=lambda: float(next(clock)),
                                                          perf_counter=progress.time.perf_counter))
    data = write_tiny_corpus(tmp_path / "data", n=16)
    train_pretrain.main(tiny_train_args(tmp_path, data["pretrain"], accumulation_steps=1, epochs=2, max_steps=6,
                                        packing=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch:")]
    totals = [re.search(r"\]\((\d+/\d+)\)", line).group(1) for line in lines]
    assert totals == ["1/4", "2/4", "3/4", "4/4", "1/2", "2/2"]
    etas = [float(re.search(r"eta:([\d.]+)min", line).group(1)) for line in lines]
    assert etas[3] > 0 and etas[-1] == 0


def test_two_nodes_resume_needs_the_file_on_every_node(tmp_path):
    """Machine 0 has the resume file, machine 1 (its own --checkpoint_dir) has not: one clear error on both,
    instead of machine 1 silently starting from scratch."""
    data = write_tiny_corpus(tmp_path / "data", n=16)
    from tests.conftest import tiny_train_args
    from trainer import train_pretrain
    train_pretrain.main(tiny_train_args(tmp_path / "node0", data["pretrain"], max_steps=1))
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "trainer" / "train_pretrain.py"),
                               *tiny_train_args(tmp_path / f"node{rank}", data["pretrain"], max_steps=3, from_resume=1)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env())
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    assert "1 of 2 processes found" in outputs[0][1] and "pretrain_64_resume.pth" in outputs[0][1]


def test_a_launch_is_run_again_only_after_the_gloo_teardown_abort(tmp_path):
    """run_launcher retries exactly once, and only for the gloo teardown abort; any other failure is returned as is."""
    from tests.conftest import GLOO_TEARDOWN_ABORT

    def failing_once(message):
        marker = tmp_path / message[:4]
        code = (f"import pathlib, sys; m = pathlib.Path({str(marker)!r})\n"
                f"if not m.exists(): m.touch(); sys.stderr.write({message!r}); sys.exit(134)")
        return lambda port: [sys.executable, "-c", code]

    assert run_launcher(failing_once(GLOO_TEARDOWN_ABORT)).returncode == 0
    other = run_launcher(failing_once("some other failure"))
    assert other.returncode == 134 and "some other failure" in other.stderr
