"""scripts/run_demo.sh (README command #1) end to end, at toy size: the same script and steps as the real
demo, shrunk through its DEMO_* variables so it runs in well under a minute. It runs next to another full_sft
weight (what README's CPU plumbing block leaves in out/), and leaves README's images/demo_loss.png alone."""
import hashlib
import os
import re
import subprocess

from tests.conftest import ROOT, tiny_config


def test_run_demo_script_end_to_end(tmp_path):
    from model.model_minimind import MiniMindForCausalLM
    from model.weights import save_weights, weight_path
    other = tiny_config()   # out/full_sft_64.pth, as after README's "Try the plumbing on CPU" block
    save_weights(MiniMindForCausalLM(other), weight_path(tmp_path / "out", "full_sft", other), other)
    picture = ROOT / "images" / "demo_loss.png"
    before = hashlib.sha256(picture.read_bytes()).hexdigest()
    env = {**os.environ, "DEMO_DATA": str(tmp_path / "data"), "DEMO_OUT": str(tmp_path / "out"),
           "DEMO_CKPT": str(tmp_path / "ckpt"), "DEMO_SCALE": "0.05",
           "DEMO_SIZE": "--hidden_size 32 --num_hidden_layers 2", "DEMO_MAX_STEPS": "3", "OMP_NUM_THREADS": "1"}
    env.pop("DEMO_PLOTS", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "run_demo.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for name in ("pretrain_32.pth", "pretrain_32.json", "full_sft_32.pth", "full_sft_32_metrics.jsonl",
                 "lora/lora_identity_32.pth"):
        assert (tmp_path / "out" / name).is_file(), name
    assert (tmp_path / "ckpt" / "full_sft_32_resume.pth").is_file()
    assert "full_sft_32.pth" in out and "full_sft_64.pth" not in out and "_0.pth" not in out + done.stderr
    assert (tmp_path / "out" / "demo_loss.png").stat().st_size > 10_000       # run outputs under out/
    assert hashlib.sha256(picture.read_bytes()).hexdigest() == before       # the committed picture is untouched
    # the scripted chat ran three times (all questions, identity before and after LoRA) and scored itself
    scores = re.findall(r"accuracy on held-out demo questions: (\d+)/(\d+)", out)
    assert len(scores) == 3 and int(scores[0][1]) > 20 and all(int(t) >= 1 for _, t in scores[1:])
    assert "demo finished in" in out


def test_every_demo_step_is_one_commented_command():
    lines = (ROOT / "scripts" / "run_demo.sh").read_text().splitlines()
    steps = [i for i, line in enumerate(lines) if re.match(r"# \d\. ", line)]
    assert len(steps) >= 6
    for i in steps:   # a comment, then (after any comment continuation) a command
        j = i + 1
        while lines[j].startswith("#"):
            j += 1
        assert lines[j].startswith("python "), lines[j]


def test_demo_defaults_are_cpu_sized():
    text = (ROOT / "scripts" / "run_demo.sh").read_text()
    assert '--hidden_size 256 --num_hidden_layers 4' in text and "--device cpu" in text
