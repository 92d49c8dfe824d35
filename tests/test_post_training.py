"""LoRA, DPO, distillation and reasoning stages: their losses against hand-computed values, and a
few-step run of each on a tiny model chained from pretrain -> SFT."""
import json
import math

import pytest
import torch

from tests.conftest import tiny_train_args, tokenizer_dir, write_tiny_corpus
from trainer import train_distillation, train_dpo, train_full_sft, train_lora, train_pretrain, train_reason
from trainer.core.rl import sequence_logps, token_logps


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny pretrain -> full_sft chain in one directory, plus stage data files."""
    tmp = tmp_path_factory.mktemp("chain")
    data = write_tiny_corpus(tmp / "data", n=48)
    train_pretrain.main(tiny_train_args(tmp, data["pretrain"], accumulation_steps=1, learning_rate=2e-3))
    train_full_sft.main(tiny_train_args(tmp, data["sft"], learning_rate=2e-3, epochs=1))
    pairs = [{"chosen": conv(f"{a}+{a}等于几？", f"{a}+{a}={2 * a}。"),
              "rejected": conv(f"{a}+{a}等于几？", f"我不知道，也许是{2 * a + 1}吧，谁知道呢。")} for a in range(24)]
    data["dpo"] = write_jsonl(tmp / "data" / "dpo.jsonl", pairs)
    r1 = [{"conversations": conv(f"{a}+1等于几？", f"<think>\n{a}加1得到{a + 1}。\n</think>\n<answer>\n{a + 1}\n</answer>")}
          for a in range(24)]
    data["r1"] = write_jsonl(tmp / "data" / "r1.jsonl", r1)
    data["identity"] = write_jsonl(tmp / "data" / "identity.jsonl",
                                   [{"conversations": conv(q, "我是MiniMind，一个小小的语言模型。")}
                                    for q in ("你是谁？", "你叫什么名字？", "介绍一下你自己", "Who are you?")] * 6)
    return tmp, data


def losses(out_dir, name):
    return [json.loads(line)["loss"] for line in open(out_dir / f"{name}_metrics.jsonl")]


def decreasing_on_average(values):
    half = len(values) // 2
    return sum(values[half:]) / (len(values) - half) < sum(values[:half]) / half


# ---- LoRA ----
def test_lora_trains_only_the_adapter(chain):
    tmp, data = chain
    base = torch.load(tmp / "out" / "full_sft_64.pth")
    path, loss = train_lora.main(tiny_train_args(tmp, data["identity"], save_dir=tmp / "out" / "lora",
                                                 from_dir=tmp / "out", epochs=3, learning_rate=5e-3))
    assert path == tmp / "out" / "lora" / "lora_identity_64.pth" and math.isfinite(loss)
    adapter = torch.load(path)
    assert set(adapter) == {f"model.layers.{i}.self_attn.{m}.lora.{ab}.weight"
                            for i in range(2) for m in ("q_proj", "o_proj") for ab in "AB"}
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".B." in k)   # B moved away from 0
    resume = torch.load(tmp / "ckpt" / "lora_identity_64_resume.pth", weights_only=False)["model"]
    for key, value in base.items():                                          # base weights bit-identical
        assert torch.equal(resume[key], value.float()), key
    assert decreasing_on_average(losses(tmp / "out" / "lora", "lora_identity_64"))


def test_lora_missing_base_weight_names_the_stage(tmp_path):
    data = write_tiny_corpus(tmp_path / "data", n=8)
    with pytest.raises(FileNotFoundError, match=r"full_sft_64\.pth.*train_full_sft\.py"):
        train_lora.main(tiny_train_args(tmp_path, data["sft"], save_dir=tmp_path / "lora", from_dir=tmp_path / "nowhere"))


def test_missing_weight_is_one_line_naming_the_size_that_exists(tmp_path):
    """From the command line: no traceback, exit code 2, and the flags that would load the weight that is there."""
    import subprocess
    import sys
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from tests.conftest import ROOT
    from model.weights import save_weights, weight_path
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2)
    save_weights(MiniMindForCausalLM(cfg), weight_path(tmp_path, "full_sft", cfg), cfg)
    res = subprocess.run([sys.executable, str(ROOT / "trainer" / "train_dpo.py"), "--device", "cpu",
                          "--save_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: weight file ") and "full_sft_512.pth not found" in res.stderr
    assert "full_sft_64.pth exists: add --hidden_size 64 --num_hidden_layers 2" in res.stderr


# ---- DPO ----
def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    rc, rr = torch.tensor([-1.2, -2.0]), torch.tensor([-1.2, -1.1])
    loss, stats = train_dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = [0.5 * ((-1.0 + 1.2) - (-1.5 + 1.2)), 0.5 * ((-2.0 + 2.0) - (-1.0 + 1.1))]   # 0.25, -0.05
    expected = sum(-math.log(1 / (1 + math.exp(-v))) for v in z) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["acc"] == 0.5 and stats["margin"] == pytest.approx(sum(z) / 2)
    same, _ = train_dpo.dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert same.item() == pytest.approx(math.log(2))


def test_sequence_logps_mean_and_sum():
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    ref = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logps(logits, targets), ref, atol=1e-6)
    assert torch.allclose(sequence_logps(ref, mask, "sum"), (ref * mask).sum(-1))
    assert torch.allclose(sequence_logps(ref, mask), (ref * mask).sum(-1) / mask.sum(-1))


@pytest.mark.parametrize("ref_cache", [0, 1])
def test_dpo_runs_and_starts_at_ln2(chain, ref_cache):
    tmp, data = chain
    out = tmp / f"dpo{ref_cache}"
    path, loss = train_dpo.main(tiny_train_args(out, data["dpo"], from_dir=tmp / "out", learning_rate=1e-3,
                                                batch_size=4, ref_cache=ref_cache, beta=0.1))
    assert path.name == "dpo_64.pth" and path.exists()
    log = [json.loads(line) for line in open(out / "out" / "dpo_64_metrics.jsonl")]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)   # policy == reference at the first step
    assert {"acc", "margin"} <= set(log[0])
    assert log[-1]["margin"] > 0 and decreasing_on_average([r["loss"] for r in log])


# ---- distillation ----
def test_kd_term_is_zero_when_teacher_is_student():
    logits = torch.randn(2, 5, 11)
    targets, mask = torch.randint(0, 11, (2, 5)), torch.ones(2, 5)
    loss, ce, kd = train_distillation.distillation_loss(logits, logits.clone(), targets, mask, 0.5, 1.5)
    assert abs(kd.item()) < 1e-6 and loss.item() == pytest.approx(0.5 * ce.item(), abs=1e-6)
    teacher = torch.randn(2, 5, 13)                                   # bigger teacher vocab is sliced
    _, _, kd = train_distillation.distillation_loss(logits, teacher, targets, mask, 0.5, 2.0)
    p = torch.softmax(teacher[..., :11] / 2.0, -1)
    expected = (p * (p.log() - torch.log_softmax(logits / 2.0, -1))).sum(-1).mean() * 4.0
    assert kd.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_runs_with_a_bigger_teacher(chain):
    tmp, data = chain
    teacher_dir = tmp / "teacher"
    train_pretrain.main(tiny_train_args(teacher_dir, data["pretrain"], hidden_size=96, accumulation_steps=1,
                                        max_steps=4, save_weight="full_sft"))
    # teacher weights live in another directory: link them next to the student's
    (tmp / "out" / "full_sft_96.pth").write_bytes((teacher_dir / "out" / "full_sft_96.pth").read_bytes())
    path, loss = train_distillation.main(tiny_train_args(tmp / "kd", data["sft"], from_dir=tmp / "out",
                                                         learning_rate=2e-3, epochs=1) +
                                         ["--student_hidden_size", "64", "--student_num_layers", "2",
                                          "--teacher_hidden_size", "96", "--teacher_num_layers", "2"])
    assert path.name == "full_dist_64.pth" and path.exists() and math.isfinite(loss)
    log = [json.loads(line) for line in open(tmp / "kd" / "out" / "full_dist_64_metrics.jsonl")]
    assert {"ce", "distill"} <= set(log[0]) and log[0]["distill"] > 0


def test_bench_distill_compares_sft_and_distillation(chain, tmp_path):
    """bench/bench_distill.py at toy size: one pretrained student, then plain SFT and distillation, scored."""
    from bench import bench_distill
    from dataset import demo_data
    tmp, data = chain
    teacher_dir = tmp_path / "teacher"
    train_pretrain.main(tiny_train_args(teacher_dir, data["pretrain"], hidden_size=96, accumulation_steps=1,
                                        max_steps=2, save_weight="full_sft"))
    demo = demo_data.write_demo_data(tmp_path / "demo", scale=0.05)
    rows = bench_distill.main(["--work_dir", str(tmp_path / "work"), "--teacher_dir", str(teacher_dir / "out"),
                               "--teacher_hidden_size", "96", "--teacher_num_layers", "2",
                               "--student_hidden_size", "64", "--student_num_layers", "2",
                               "--tokenizer_path", str(tokenizer_dir()), "--pretrain_path", str(demo["pretrain"]),
                               "--sft_path", str(demo["sft"]), "--eval_path", str(demo["eval"]),
                               "--epochs", "1", "--max_steps", "3", "--val_dialogues", "10"])
    work = tmp_path / "work"
    for name in ("pretrain_64.pth", "full_sft_64.pth", "full_dist_64.pth", "full_sft_96.pth"):
        assert (work / name).is_file(), name
    n_eval = sum(1 for _ in open(demo["eval"], encoding="utf-8"))
    assert [r[0].split(",")[0] for r in rows] == ["teacher (SFT)", "student", "student"]
    for _, _, _, r in rows:
        assert math.isfinite(r["val_ce"]) and r["val_ce"] > 0 and r["total"] == n_eval
    # the two students differ only in the loss: same start, data and steps, different weights
    sft, dist = (torch.load(work / f, map_location="cpu") for f in ("full_sft_64.pth", "full_dist_64.pth"))
    assert sft.keys() == dist.keys() and any(not torch.equal(sft[k], dist[k]) for k in sft)
    assert json.loads((work / "distill_bench.json").read_text())[0]["model"] == "teacher (SFT)"


# ---- reasoning ----
def test_tag_weights_only_on_supervised_complete_tags():
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    text = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
            "answer<think><|im_end|>\n<|im_start|>assistant\n<think>\nwater\n</think>\n<answer>\n4\n</answer><|im_end|>\n")
    ids = torch.tensor([tok(text).input_ids])
    mask = torch.zeros_like(ids)
    start = len(tok(text.split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n").input_ids)
    mask[0, start:] = 1                                      # the assistant part is supervised
    tag_ids = [tok(t, add_special_tokens=False).input_ids for t in train_reason.TAGS]
    w = train_reason.tag_weights(ids, mask, tag_ids, 10.0)[0]
    heavy = [i for i in range(ids.shape[1]) if w[i] == 10]
    expected = []
    seq = ids[0].tolist()
    for t in tag_ids:
        for i in range(start, len(seq) - len(t) + 1):
            if seq[i:i + len(t)] == t:
                expected += range(i, i + len(t))
    assert sorted(heavy) == sorted(expected) and len(heavy) == sum(len(t) for t in tag_ids)
    assert all(w[i] == 0 for i in range(start))              # 'er' of 'user', the prompt's <think>: untouched
    assert all(w[i] == 1 for i in range(start, len(seq)) if i not in heavy)


def test_reason_runs(chain):
    tmp, data = chain
    (tmp / "out" / "dpo_64.pth").write_bytes((tmp / "out" / "full_sft_64.pth").read_bytes())
    path, loss = train_reason.main(tiny_train_args(tmp, data["r1"], learning_rate=2e-3, epochs=2))
    assert path.name == "reason_64.pth" and path.exists() and math.isfinite(loss)
    assert decreasing_on_average(losses(tmp / "out", "reason_64"))


# ---- exact resume through the one loop, for every supervised stage after pretraining ----
STAGES = {  # stage -> (module, data key, weight file prefix, flags)
    "full_sft": (train_full_sft, "sft", "full_sft", {}),
    "lora": (train_lora, "identity", "lora_identity", dict(lora_name="lora_identity")),
    "dpo": (train_dpo, "dpo", "dpo", dict(learning_rate=1e-4)),
    "distillation": (train_distillation, "sft", "full_dist", dict(student_hidden_size=64, student_num_layers=2,
                                                                  teacher_hidden_size=64, teacher_num_layers=2)),
    "reason": (train_reason, "r1", "reason", dict(from_weight="full_sft")),
}


def assert_resumes_exactly(module, data, tmp_path, flags: dict, lora: bool = False):
    """Run `module.main` for 8 micro-batches, and again stopped after 4 (an optimizer-step boundary with
    --accumulation_steps 2) then resumed with --from_resume 1: the same weights, bit for bit, and the same logged
    losses. Returns the uninterrupted run's weight path."""
    out = lambda run: tmp_path / run / ("out/lora" if lora else "out")
    args = lambda run, **extra: tiny_train_args(tmp_path / run, data, **{**flags, **extra}) + (
        ["--save_dir", str(out(run))] if lora else [])
    full_path, _ = module.main(args("full", max_steps=8))
    module.main(args("cut", max_steps=4))
    module.main(args("cut", max_steps=8, from_resume=1))
    a, b = torch.load(full_path), torch.load(out("cut") / full_path.name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log, cut_log = (losses(out(run), full_path.stem) for run in ("full", "cut"))
    assert len(full_log) == 8 and full_log == cut_log
    return full_path


@pytest.mark.parametrize("stage", STAGES)
def test_stage_resumes_exactly(chain, tmp_path, stage):
    """A run stopped at an optimizer-step boundary and resumed equals the uninterrupted run, bit for bit."""
    tmp, data = chain
    module, key, prefix, flags = STAGES[stage]
    flags = {**dict(from_dir=tmp / "out", accumulation_steps=2, batch_size=2, learning_rate=1e-3), **flags}
    full_path = assert_resumes_exactly(module, data[key], tmp_path, flags, lora=stage == "lora")
    assert full_path.name.startswith(prefix)
