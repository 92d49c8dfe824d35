"""minimind-3 (--model_family minimind3) through every training stage on the demo data: each stage writes a
weight whose keys hold q_norm and that loads strictly; the family follows a chain from its first weight; exact
resume; packing changes only the layout; two DDP processes; a weight or resume file of the other family is one
`error:` line (exit 2)."""
import json
import math
import sys

import pytest
import torch

from model.cli import cli
from model.loading import FAMILY_TOKENIZER_DIR, TOKENIZER_DIR, add_lora, load_native
from model.model_minimind import MiniMindForCausalLM
from model.weights import save_weights
from tests.conftest import check_two_ranks, dist_probe_argv, run_launcher, tiny_config, tiny_train_args
from tests.test_post_training import assert_resumes_exactly, losses
from trainer import (train_distill_reason, train_distillation, train_dpo, train_full_sft, train_grpo, train_lora,
                     train_ppo, train_pretrain, train_reason, train_spo)
from trainer.core import rl
from trainer.core.stage import build_parser, resolve_family

MM3 = dict(model_family="minimind3", tokenizer_path=FAMILY_TOKENIZER_DIR["minimind3"])


def args3(tmp, data, **flags) -> list:
    """tiny_train_args for a minimind-3 run (its own tokenizer)."""
    return tiny_train_args(tmp, data, **{**MM3, **flags})


def drop_flag(argv: list, flag: str) -> list:
    i = argv.index(f"--{flag}")
    return argv[:i] + argv[i + 2:]


def assert_minimind3_weight(path, moe: bool = False):
    """The file holds minimind-3 keys (q_norm/k_norm; MoE: a router and 4 experts, no shared ones) and loads
    strictly into the model its .json describes."""
    keys = set(torch.load(path))
    assert any(".self_attn.q_norm." in k for k in keys) and any(".self_attn.k_norm." in k for k in keys)
    assert not any("shared_experts" in k for k in keys)
    if moe:
        assert "model.layers.0.mlp.gate.weight" in keys and any(".mlp.experts.3." in k for k in keys)
    model = load_native(path)                        # strict: every key, every shape
    assert model.config.model_family == "minimind3" and bool(model.config.use_moe) == moe
    return model


@pytest.fixture(scope="module")
def chain3(tmp_path_factory):
    """The demo data and a minimind-3 pretrain -> full_sft chain in which only pretraining names the family: SFT,
    given neither --model_family nor --tokenizer_path, takes both from out/pretrain_64.json."""
    from dataset.demo_data import write_demo_data
    tmp = tmp_path_factory.mktemp("mm3")
    demo = write_demo_data(tmp / "demo", scale=0.02)
    train_pretrain.main(args3(tmp, demo["pretrain"], max_steps=4, accumulation_steps=1, learning_rate=2e-3))
    sft = tiny_train_args(tmp, demo["sft"], max_steps=4, learning_rate=2e-3)
    path, loss = train_full_sft.main(drop_flag(sft, "tokenizer_path"))
    assert path.name == "full_sft_64.pth" and math.isfinite(loss)
    return tmp, demo


def test_the_chain_keeps_the_family_of_its_first_weight(chain3):
    tmp, _ = chain3
    for name in ("pretrain_64", "full_sft_64"):
        assert json.loads((tmp / "out" / f"{name}.json").read_text())["model_family"] == "minimind3"
        assert_minimind3_weight(tmp / "out" / f"{name}.pth")


RL_FLAGS = dict(reasoning=0, reward="rule", max_gen_len=8, batch_size=2)
STAGES = {  # stage -> (module, demo data key, flags)
    "lora": (train_lora, "lora_identity", dict(epochs=2)),
    "dpo": (train_dpo, "dpo", dict(learning_rate=1e-4)),
    "reason": (train_reason, "r1", dict(from_weight="full_sft")),
    "distillation": (train_distillation, "sft", dict(student_hidden_size=64, student_num_layers=2,
                                                     teacher_hidden_size=64, teacher_num_layers=2)),
    "ppo": (train_ppo, "rlaif", dict(RL_FLAGS, critic_learning_rate=1e-3)),
    "grpo": (train_grpo, "rlaif", dict(RL_FLAGS, num_generations=2)),
    "spo": (train_spo, "rlaif", dict(RL_FLAGS, accumulation_steps=1)),
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_minimind3(chain3, tmp_path, stage):
    """Each stage after SFT, from the minimind-3 full_sft weight (reasoning also under its original name,
    train_distill_reason.py): a finite loss and a strictly loadable minimind-3 weight (LoRA: an adapter that loads
    onto the minimind-3 base)."""
    tmp, demo = chain3
    module, key, flags = STAGES[stage]
    flags = {**dict(from_dir=tmp / "out", max_steps=2, learning_rate=1e-3), **flags}
    if stage == "lora":
        flags["save_dir"] = tmp_path / "out" / "lora"
    path, loss = module.main(args3(tmp_path, demo[key], **flags))
    assert path.exists() and math.isfinite(loss)
    if stage == "lora":
        base = load_native(tmp / "out" / "full_sft_64.pth")
        assert add_lora(base, path) == path and base.config.model_family == "minimind3"
    else:
        assert_minimind3_weight(path)
    if stage == "reason":
        assert train_distill_reason.main is train_reason.main
    assert len(losses(path.parent, path.stem)) == 2


def test_moe_pretrain_and_sft(tmp_path):
    """minimind-3's MoE (top-1 router, no shared expert) through pretraining and SFT: router and experts saved,
    the balancing loss finite."""
    from dataset.demo_data import write_demo_data
    demo = write_demo_data(tmp_path / "demo", scale=0.02)
    flags = dict(use_moe=1, max_steps=2, accumulation_steps=1, learning_rate=1e-3)
    path, loss = train_pretrain.main(args3(tmp_path, demo["pretrain"], **flags))
    assert path.name == "pretrain_64_moe.pth" and math.isfinite(loss)
    assert_minimind3_weight(path, moe=True)
    path, loss = train_full_sft.main(args3(tmp_path, demo["sft"], **flags))
    assert path.name == "full_sft_64_moe.pth" and math.isfinite(loss)
    model = assert_minimind3_weight(path, moe=True)
    assert model.config.num_experts_per_tok == 1 and model.config.n_shared_experts == 0


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_equals_uninterrupted(chain3, tmp_path, stage):
    """Stopped at an optimizer-step boundary and resumed: the uninterrupted run's weights and losses, bit for bit.
    Resuming that run as MiniMind2 (the flag left out) is one error naming the flag."""
    tmp, demo = chain3
    module, data = (train_pretrain, demo["pretrain"]) if stage == "pretrain" else (train_full_sft, demo["sft"])
    flags = dict(MM3, from_dir=tmp / "out", accumulation_steps=2, batch_size=2, learning_rate=1e-3)
    path = assert_resumes_exactly(module, data, tmp_path, flags)
    assert_minimind3_weight(path)
    if stage == "pretrain":
        as_minimind2 = tiny_train_args(tmp_path / "cut", data, accumulation_steps=2, batch_size=2, from_resume=1,
                                       max_steps=10)
        with pytest.raises(ValueError, match="written by a minimind-3 run .* resume with --model_family minimind3"):
            module.main(as_minimind2)


def test_packing_changes_only_the_layout(chain3, tmp_path):
    """SFT (minimind-3's chat template and loss masks) with --packing 1 (the default) and 0 at the same seed: the
    same samples in every micro-batch, so the same loss at every step (fp32, up to the kernels' rounding), fewer
    padded positions packed."""
    tmp, demo = chain3
    logs = {}
    for packing in (0, 1):
        path, _ = train_full_sft.main(args3(tmp_path / f"p{packing}", demo["sft"], from_dir=tmp / "out", batch_size=6,
                                            max_steps=3, max_seq_len=128, accumulation_steps=1, learning_rate=1e-3,
                                            packing=packing, dtype="float32"))
        logs[packing] = [json.loads(line) for line in open(path.parent / f"{path.stem}_metrics.jsonl")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(logs[0], logs[1]))
    assert sum(r["pad"] for r in logs[1]) < sum(r["pad"] for r in logs[0])


@pytest.mark.slow   # DDP has no family-specific code (test_train's torchrun tests cover it): ~6 s
def test_torchrun_two_processes(tmp_path):
    """Two gloo processes with the family flag: each rank its own samples, identical minimind-3 weights, only
    rank 0 writes."""
    from tests.conftest import write_tiny_corpus
    data = write_tiny_corpus(tmp_path / "data", n=32)
    res = run_launcher(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(port),
                                     *dist_probe_argv(tmp_path, data["pretrain"], accumulation_steps=1, **MM3)])
    assert res.returncode == 0, res.stderr[-3000:]
    check_two_ranks(tmp_path, all_samples=32)
    assert_minimind3_weight(tmp_path / "out" / "pretrain_64.pth")


def one_line_error(capsys, argv, module=train_full_sft) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(lambda: module.main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    return err


def test_a_start_weight_of_the_other_family_is_one_line(tmp_path, capsys):
    """SFT from a minimind-3 pretrain weight with --model_family minimind2, with and without its .json (then the
    keys tell), and from a MiniMind2 weight with --model_family minimind3: one line naming the flag, exit 2,
    nothing written."""
    from tests.conftest import write_tiny_corpus
    data = write_tiny_corpus(tmp_path / "data", n=8)["sft"]
    out = tmp_path / "out"
    save_weights(MiniMindForCausalLM(tiny_config(model_family="minimind3")), out / "pretrain_64.pth",
                 tiny_config(model_family="minimind3"))
    argv = tiny_train_args(tmp_path, data, model_family="minimind2", max_steps=1)
    assert "holds a minimind-3 model and this run builds MiniMind2: add --model_family minimind3" in \
        one_line_error(capsys, argv)
    (out / "pretrain_64.json").unlink()
    assert "add --model_family minimind3" in one_line_error(capsys, argv)
    save_weights(MiniMindForCausalLM(tiny_config()), out / "pretrain_64.pth", tiny_config())
    err = one_line_error(capsys, args3(tmp_path, data, max_steps=1))
    assert "holds a MiniMind2 model and this run builds minimind-3" in err and "--model_family minimind2" in err
    assert not (out / "full_sft_64.pth").exists()


def test_family_size_and_tokenizer_follow_the_flag_or_the_start_weight(tmp_path):
    """--model_family typed: its size (768 unless --hidden_size is typed) and tokenizer. Not typed: the start
    weight's .json (or keys) decide, at the typed size, or, with none typed, at 512 and then a minimind-3 768
    file; no such file (or random init): MiniMind2 as before. A typed --tokenizer_path is kept."""
    def family(*argv, save_dir=tmp_path):
        args = build_parser("t", from_weight="pretrain").parse_args(["--save_dir", str(save_dir), *argv])
        resolve_family(args)
        return args.model_family, args.hidden_size, args.tokenizer_path

    mm3_dir, mm2_dir = str(FAMILY_TOKENIZER_DIR["minimind3"]), str(TOKENIZER_DIR)
    assert family("--model_family", "minimind3") == ("minimind3", 768, mm3_dir)
    assert family("--model_family", "minimind3", "--hidden_size", "64", "--tokenizer_path", "tok") == \
        ("minimind3", 64, "tok")
    assert family() == ("minimind2", 512, mm2_dir)                                 # nothing there
    assert family("--from_weight", "none", "--model_family", "minimind2") == ("minimind2", 512, mm2_dir)
    (tmp_path / "pretrain_768.json").write_text(tiny_config(model_family="minimind3", hidden_size=768).to_json_string())
    assert family() == ("minimind3", 768, mm3_dir)                                 # what --model_family alone wrote
    assert family("--hidden_size", "512") == ("minimind2", 512, mm2_dir)           # typed size: that file only
    (tmp_path / "pretrain_512.json").write_text(tiny_config(hidden_size=512).to_json_string())
    assert family() == ("minimind2", 512, mm2_dir)                                 # the default file comes first
    torch.save({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, tmp_path / "pretrain_64.pth")
    assert family("--hidden_size", "64") == ("minimind3", 64, mm3_dir)             # no .json: the keys
    assert family("--hidden_size", "64", "--model_family", "minimind2")[0] == "minimind2"   # typed: kept


def test_rl_prompts_of_the_minimind3_template_keep_their_think_block():
    """minimind-3's generation prompt ends with an empty think block after the assistant start; truncation from
    the left keeps all of it, and a prompt that does not open an assistant turn is still refused."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(FAMILY_TOKENIZER_DIR["minimind3"]))
    chat = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
    short, long = chat("1+1?"), chat("很长的问题" * 30)
    assert short.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    header = tok(rl.generation_header(short), add_special_tokens=False).input_ids
    ids, mask = rl.encode_prompts(tok, [long, short], max_len=len(header) + 2)
    assert all(row[-len(header):].tolist() == header for row in ids) and mask[0].all()
    with pytest.raises(ValueError, match="assistant start"):
        rl.encode_prompts(tok, [short + "<|im_end|>\n"], max_len=64)
    with pytest.raises(ValueError, match="shorter than the assistant header"):
        rl.encode_prompts(tok, [short], max_len=len(header) - 1)
