"""PPO, GRPO and SPO: advantage/return/KL/baseline math against hand-computed numbers, rollout helpers
(left padding, truncation, completion masks), rewards (rules and a local stub reward model), and a
few-step run of each trainer on a tiny model chained from SFT, with an exact resume round trip."""
import json
import math
import shutil

import pytest
import torch

from tests.conftest import tiny_config, tiny_train_args, tokenizer_dir, write_tiny_corpus
from trainer import train_full_sft, train_grpo, train_ppo, train_spo
from trainer.core import rl
from trainer.core.rl import (ASSISTANT_START, RewardModel, Rewards, answer_correct, completion_logps,
                              completion_mask, encode_prompts, format_reward, k3_kl, masked_mean, rollout)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def chat(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


# ---- advantages, returns, KL, baseline ----
def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.9], [0.5, 0.5, 0.5, 0.5]])     # 9.9: after the EOS, ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv, ret = train_ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.7 (the state after the EOS is terminal: V = 0)
    a2, a1 = 0.7, 0.1 + 0.95 * 0.7
    a0 = 0.1 + 0.95 * a1
    assert torch.allclose(adv[0], torch.tensor([a0, a1, a2, 0.0]))
    assert torch.allclose(ret[0], torch.tensor([a0 + 0.1, a1 + 0.2, a2 + 0.3, 0.0]))
    # row 1: constant values, deltas 0, 0, 0, 1.5
    assert torch.allclose(adv[1], torch.tensor([1.5 * 0.95 ** 3, 1.5 * 0.95 ** 2, 1.5 * 0.95, 1.5]))
    # lambda = 1, gamma = 1: A_t = R - V_t and every return is the final reward
    adv, ret = train_ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv[0, :3], 1.0 - values[0, :3]) and torch.allclose(ret[0, :3], torch.ones(3))
    assert torch.allclose(ret[1], torch.full((4,), 2.0))


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = train_grpo.group_advantages(rewards, 4, batch_norm=False)
    std = 0.5                                                # unbiased std of (1, 0, 0, 0)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (std + 1e-4))
    normed = train_grpo.group_advantages(rewards, 4)        # the original's second, batch-level normalisation
    assert torch.allclose(normed, (adv - adv.mean()) / (adv.std() + 1e-8))
    assert train_grpo.group_advantages(torch.tensor([0.0, 100.0]), 2, batch_norm=False).abs().max() <= 10


def test_grpo_loss_clips_ratio_and_is_the_policy_gradient_at_ratio_1():
    mask = torch.ones(2, 1)
    old = torch.log(torch.tensor([[0.25], [0.25]]))
    logp = torch.log(torch.tensor([[0.5], [0.5]]))            # ratio 2
    adv = torch.tensor([1.0, -1.0])
    loss, kl, clipped = train_grpo.grpo_loss(logp, old, logp, adv, mask, beta=0.0, epsilon=0.2)
    assert loss.item() == pytest.approx((-1.2 + 2.0) / 2)    # min(2, 1.2) for A=1, min(-2, -1.2) for A=-1
    assert kl.item() == 0 and clipped.item() == 1
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)  # ratio == 1: the gradient is -A / T per token
    loss, _, _ = train_grpo.grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([3.0]), torch.ones(1, 2), 0.0, 0.2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -1.5]]))


def test_k3_kl_and_masked_mean():
    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    kl = k3_kl(logp, ref)
    assert kl[0].item() == pytest.approx(0.5 - math.log(0.5) - 1) and kl[1].item() == 0
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()
    x, mask = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1.5 + 4.0) / 2)


def test_spo_tracker_numbers_and_state_dict():
    tracker = train_spo.AutoAdaptiveValueTracker()          # reward range [-3, 3], alpha = beta = 1
    assert tracker.get_baseline() == 0.5 and tracker.baseline_reward() == 0.0
    mask = torch.ones(2, 3)
    rho = tracker.update(torch.tensor([3.0, -3.0]), torch.full((2, 3), -1.0), mask)
    assert rho == 0.9 and tracker.alpha == pytest.approx(1.4) and tracker.beta == pytest.approx(1.4)
    rho = tracker.update(torch.tensor([3.0, 3.0]), torch.full((2, 3), -1.03), mask)   # |dm| = 0.03 = D_half / 2
    assert rho == pytest.approx(2 ** -0.5, rel=1e-5)
    assert tracker.alpha == pytest.approx(rho * 1.4 + 1) and tracker.beta == pytest.approx(rho * 1.4)
    assert tracker.baseline_reward() == pytest.approx(-3 + 6 * tracker.alpha / (tracker.alpha + tracker.beta))
    tracker.update(torch.tensor([3.0]), torch.full((1, 3), 5.0), torch.ones(1, 3))    # huge move: rho = 0.5
    other = train_spo.AutoAdaptiveValueTracker()
    other.load_state_dict(tracker.state_dict())
    assert other.state_dict() == tracker.state_dict()
    assert train_spo.AutoAdaptiveValueTracker(reward_range=(0, 1)).baseline_reward() == 0.5


# ---- rollout helpers ----
def test_completion_mask_with_and_without_eos():
    ids = torch.tensor([[5, 2, 7, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 2, 2]])
    assert completion_mask(ids, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]


def test_prompt_truncation_keeps_the_assistant_header(tokenizer):
    long, short = chat(tokenizer, "很长的问题" * 30), chat(tokenizer, "1+1?")
    n = len(tokenizer(short, add_special_tokens=False).input_ids)
    ids, mask = encode_prompts(tokenizer, [long, short], max_len=n + 3)
    header = tokenizer(ASSISTANT_START, add_special_tokens=False).input_ids
    assert ids.shape == (2, n + 3) and mask[0].all()
    assert all(row[-len(header):].tolist() == header for row in ids)
    full = tokenizer(long, add_special_tokens=False).input_ids
    assert ids[0].tolist() == full[-(n + 3):]                                # the END is kept
    assert mask[1].tolist() == [0] * 3 + [1] * n                             # left padding


def test_prompt_without_the_chat_template_raises(tokenizer):
    with pytest.raises(ValueError, match="assistant start"):
        encode_prompts(tokenizer, [chat(tokenizer, "hi"), "plain text prompt"], max_len=64)


def test_left_padding_changes_neither_logps_nor_values(tokenizer):
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config()).eval()
    critic = train_ppo.CriticModel(MiniMindForCausalLM(tiny_config()).model).eval()
    args = type("A", (), {"max_seq_len": 64, "max_gen_len": 6, "temperature": 1.0})
    roll = rollout(model, tokenizer, [chat(tokenizer, "hi"), chat(tokenizer, "a much longer question, is it?")], args, 2)
    assert roll.sequences.shape[0] == 4 and roll.attention_mask[0, 0] == 0 and roll.attention_mask[2, 0] == 1
    with torch.no_grad():
        logp, _ = completion_logps(model, roll)
        values, _ = critic(roll.sequences, roll.attention_mask)
        for i in range(4):                                   # each row alone, without padding
            keep = roll.attention_mask[i].bool()
            seq, n = roll.sequences[i][keep][None], int(roll.completion_mask[i].sum())
            alone = torch.log_softmax(model(seq).logits[0, :-1], -1).gather(-1, seq[0, 1:, None])[:, 0]
            assert torch.allclose(alone[-n:], logp[i, :n], atol=1e-5)
            assert torch.allclose(critic(seq)[0][0], values[i][keep], atol=1e-5)


class EosBiased(torch.nn.Module):
    """Wraps a model: adds `bias` to the EOS logit (so some samples end early) and records, per forward,
    whether it ran in train mode and under CPU autocast."""

    def __init__(self, inner, eos, bias):
        super().__init__()
        self.inner, self.eos, self.bias, self.seen = inner, eos, bias, set()
        self.config = inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, *args, **kwargs):
        self.seen.add((self.training, torch.is_autocast_enabled("cpu")))
        out = self.inner(*args, **kwargs)
        out.logits[..., self.eos] += self.bias
        return out


def test_rollout_is_seeded_by_the_global_rng_and_left_padded(tokenizer):
    """The engine's rollouts: the same global seed gives the same samples (what resume relies on), the copies
    of a prompt differ, prompts end at column P, each completion runs to its first EOS (or max_gen_len) and
    pads follow; the model samples in eval mode under the run's autocast and goes back to train mode."""
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    model = EosBiased(MiniMindForCausalLM(tiny_config()), tokenizer.eos_token_id, bias=4.0).train()
    args = type("A", (), {"max_seq_len": 64, "max_gen_len": 8, "temperature": 1.0})
    prompts, eos, pad = [chat(tokenizer, "hi"), chat(tokenizer, "a much longer question, is it?")], 2, 0
    rolls = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        rolls.append(rollout(model, tokenizer, prompts, args, 4, torch.autocast("cpu", dtype=torch.bfloat16)))
    a = rolls[0]
    assert torch.equal(a.sequences, rolls[1].sequences) and a.texts == rolls[1].texts
    assert not torch.equal(a.sequences, rolls[2].sequences) and len(set(a.texts[:4])) > 1
    ids, mask = encode_prompts(tokenizer, prompts, 64)
    assert torch.equal(a.sequences[:, :a.prompt_len], ids.repeat_interleave(4, 0))
    assert torch.equal(a.attention_mask[:, :a.prompt_len], mask.repeat_interleave(4, 0))
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos, pad)
    for i, n in enumerate(a.lengths.tolist()):
        comp = a.completion_ids[i].tolist()
        assert comp[n:] == [pad] * (len(comp) - n) and eos not in comp[:n - 1]
        assert a.clipped[i] == (comp[n - 1] != eos) and (n == 8 if a.clipped[i] else True)
        assert a.texts[i] == tokenizer.decode(comp[:n], skip_special_tokens=True)
    assert a.clipped.any() and not a.clipped.all() and a.completion_ids.shape[1] == a.lengths.max() == 8
    assert model.training and model.seen == {(False, True)}


# ---- rewards ----
def test_format_reward_hand_written():
    good = "<think>\n想一想\n</think>\n<answer>\n4\n</answer>"
    assert format_reward(good) == 1.5
    assert format_reward(good.replace("</think>\n<answer>", "</think>\n\n<answer>")) == 1.5
    assert format_reward(good + " extra") == 1.0                            # layout broken, tags still once
    assert format_reward("<think>\n<think>\nx\n</think>\n<answer>\n4\n</answer>") == 0.5 + 0.75
    assert format_reward("just an answer: 4") == 0.0


def test_answer_reward_hand_written():
    assert answer_correct("<think>\n3+5?\n</think>\n<answer>\n3+5=8。\n</answer>", "8")
    assert answer_correct("3+5=8.0", "8") and not answer_correct("3+5=9", "8")
    assert not answer_correct("<think>\n8\n</think>\n<answer>\n9\n</answer>", "8")   # the <answer> part counts
    assert answer_correct("法国的首都是巴黎。", "巴黎") and not answer_correct("巴黎是首都吗", "巴黎")
    assert not answer_correct("8", "")
    rewards, stats = Rewards("rule", reasoning=True, rule_weight=2.0)(
        [[]] * 3, ["<think>\nx\n</think>\n<answer>\n8\n</answer>", "8", "9"], ["8", "8", "8"])
    assert rewards.tolist() == [1.5 + 2.0, 2.0, 0.0] and stats["acc"] == pytest.approx(2 / 3)
    assert Rewards("rule", reasoning=True, rule_weight=2.0).range == (0.0, 3.5)
    with pytest.raises(ValueError, match="reference answer"):
        Rewards("rule", reasoning=False)([[]], ["8"], [""])


def test_missing_reward_model_suggests_rule(tmp_path):
    with pytest.raises(FileNotFoundError, match="--reward rule"):
        RewardModel(tmp_path / "internlm2-1_8b-reward")


def test_sequence_classifier_reward_model(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rm = RewardModel(tmp_path)
    convs = [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": a}] for a in ("2", "我不知道，真的不知道")]
    scores = rm.score(convs)
    assert scores.shape == (2,) and scores[0] != scores[1]
    for conv, s in zip(convs, scores):                        # batched (padded) == one at a time
        assert rm.score([conv])[0].item() == pytest.approx(s.item(), abs=1e-5)
    rewards, _ = Rewards("mixed", reasoning=False, model_path=tmp_path)([convs[0][:1]] * 2, ["2", "3"], ["2", "2"])
    expected = rm.score([convs[0][:1] + [{"role": "assistant", "content": a}] for a in ("2", "3")]).clamp(-3, 3)
    assert torch.allclose(rewards, expected + torch.tensor([1.0, 0.0]))


STUB_CONFIG = """from transformers import PretrainedConfig
class StubRewardConfig(PretrainedConfig):
    model_type = "stub_reward"
"""
STUB_MODEL = """import torch
from transformers import PreTrainedModel
from .configuration_stub import StubRewardConfig
class StubRewardModel(PreTrainedModel):
    config_class = StubRewardConfig
    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()
    def _init_weights(self, module):
        pass
    def get_score(self, tokenizer, conversation):
        return self.scale.item() * len(conversation[-1]["content"]) - len(conversation)
"""


def test_internlm2_style_get_score_reward_model(tmp_path, tokenizer):
    """A remote-code model exposing get_score(tokenizer, messages), like internlm2-1_8b-reward."""
    from transformers import AutoConfig, AutoModel
    (tmp_path / "configuration_stub.py").write_text(STUB_CONFIG)
    (tmp_path / "modeling_stub.py").write_text(STUB_MODEL)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "stub_reward", "auto_map": {
        "AutoConfig": "configuration_stub.StubRewardConfig", "AutoModel": "modeling_stub.StubRewardModel"}}))
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "q"}]
    rewards, _ = Rewards("model", reasoning=True, model_path=tmp_path)(
        [msgs, msgs], ["<think>\nx\n</think>\n<answer>\n12345\n</answer>", "a"], ["", ""])
    full = min(len("<think>\nx\n</think>\n<answer>\n12345\n</answer>") - 2, 3)     # clipped to [-3, 3]
    assert rewards.tolist() == pytest.approx([1.5 + 0.4 * full + 0.6 * 3, 1 - 2])
    # minimind-3 (think_rules): the original's newest rules, and the model scores only the answer after </think>
    rewards, _ = Rewards("model", reasoning=True, think_rules=True, model_path=tmp_path)(
        [msgs], ["t" * 25 + "</think>ab"], [""])
    assert rewards.tolist() == pytest.approx([0.5 + 1.0 + 0.25 + (len("ab") - 2)])


# ---- the RL form of the loop: rollout, then K updates, each a guarded optimizer step ----
def toy_rl_loop(tmp_path, updates, bad=(), accumulation_steps=1, max_steps=0):
    """trainer.core.loop.train_loop on a tiny model with a toy loss, 8 rows in rollouts of 2, under CPU bf16 autocast.
    `bad`: the (rollout, update) pairs whose loss is NaN. Returns what the functions and the hook saw."""
    from trainer.core.loop import ResumePoint, train_loop
    from trainer.core.stage import build_parser, init_run
    from trainer.core.tracking import NoTracker
    from model.model_minimind import MiniMindForCausalLM
    args = build_parser("toy", save_weight="toy").parse_args(tiny_train_args(
        tmp_path, tmp_path / "unused.jsonl", dtype="bfloat16", batch_size=2, accumulation_steps=accumulation_steps,
        max_steps=max_steps, grad_clip=0))
    run, cfg = init_run(args), tiny_config()
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(cfg)
    layer = model.model.layers[0].mlp.gate_proj                    # a Linear: autocast caches its bf16 cast
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = {"rollouts": [], "updates": [], "hook": []}

    def rollout_fn(rows):
        assert not torch.is_grad_enabled()                          # rollouts take no gradients
        seen["rollouts"].append(list(rows))
        return {"n": len(seen["rollouts"]), "x": torch.ones(2, 64)}

    def update_fn(ro, k):
        out = layer(ro["x"])
        seen["updates"].append((ro["n"], k, out.detach().float().clone(), opt.param_groups[0]["lr"]))
        loss = out.float().pow(2).mean()
        return loss * float("nan") if (ro["n"], k) in bad else loss, {"tokens": 2}

    def on_update(k):
        seen["hook"].append((len(seen["rollouts"]), k, int(opt.state[layer.weight]["step"])))

    train_loop(run, args, model, [opt], list(range(8)), rollout_fn=rollout_fn, update_fn=update_fn,
               updates=updates, on_update=on_update, lm_config=cfg, tracker=NoTracker(), start=ResumePoint(),
               collate_fn=lambda rows: rows, schedulers=[sched])
    return seen, opt, sched, layer


def test_rl_loop_runs_every_update_through_the_guarded_step(tmp_path, capsys):
    seen, opt, sched, layer = toy_rl_loop(tmp_path, updates=3, bad={(2, 1)})
    assert len(seen["rollouts"]) == 4 and sorted(sum(seen["rollouts"], [])) == list(range(8))
    assert [(n, k) for n, k, *_ in seen["updates"]] == [(n, k) for n in range(1, 5) for k in range(3)]
    # the hook follows every applied update; rollout 2's update 2 was NaN: skipped, counted, no hook
    assert [(n, k) for n, k, _ in seen["hook"]] == [(n, k) for n in range(1, 5) for k in range(3) if (n, k) != (2, 1)]
    assert [s for *_, s in seen["hook"]] == list(range(1, 12)) and int(opt.state[layer.weight]["step"]) == 11
    assert "step 2 update 2/3: the loss or a gradient is not finite" in capsys.readouterr().out
    outs = {(n, k): out for n, k, out, _ in seen["updates"]}
    for n in range(1, 5):   # each update sees the weights the previous one wrote (not autocast's cached cast)...
        assert not torch.equal(outs[n, 0], outs[n, 1])
    assert torch.equal(outs[2, 1], outs[2, 2])                        # ...and the skipped one changed nothing
    # the scheduler counts rollouts (its length does): constant lr within one, a step after each
    assert [lr for n, k, _, lr in seen["updates"]] == [1e-2 * 0.5 ** (n - 1) for n in range(1, 5) for _ in range(3)]
    assert sched.last_epoch == 4


def test_rl_loop_stops_after_max_nonfinite_updates_in_a_row(tmp_path):
    from trainer.core.loop import MAX_NONFINITE, TrainingError
    bad = {(n, k) for n in range(1, 5) for k in range(2)}
    with pytest.raises(TrainingError, match=f"{MAX_NONFINITE} optimizer steps in a row"):
        toy_rl_loop(tmp_path, updates=2, bad=bad)
    seen, opt, sched, layer = toy_rl_loop(tmp_path / "one", updates=1, bad={(3, 0)}, max_steps=3)
    assert [(n, s) for n, _, s in seen["hook"]] == [(1, 1), (2, 2)] and sched.last_epoch == 2   # no step for 3
    with pytest.raises(ValueError, match="accumulation_steps 1"):
        toy_rl_loop(tmp_path, updates=2, accumulation_steps=2)


# ---- the trainers end to end ----
@pytest.fixture(scope="module")
def sft_chain(tmp_path_factory):
    """A tiny full_sft weight (a few SFT steps from scratch) and a small RLAIF prompt file with answers."""
    tmp = tmp_path_factory.mktemp("rl")
    data = write_tiny_corpus(tmp / "data", n=16)
    train_full_sft.main(tiny_train_args(tmp, data["sft"], from_weight="none", max_steps=2, learning_rate=1e-3))
    rows = [{"conversations": [{"role": "user", "content": f"{a}+{a}等于几？"}, {"role": "assistant", "content": "无"}],
             "answer": str(2 * a)} for a in range(8)]
    with open(tmp / "data" / "rlaif.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return tmp


RL = {"ppo": (train_ppo, "ppo_actor_64", ["scheduler", "critic_model", "critic_optimizer", "critic_scheduler"],
              dict(critic_learning_rate=1e-3)),                  # 2 passes of 1 minibatch: 2 updates per rollout
      "grpo": (train_grpo, "grpo_64", ["scheduler"], dict(num_generations=2)),          # --loss_type cispo
      "spo": (train_spo, "spo_64", ["scheduler", "value_tracker"], dict(accumulation_steps=1)),
      "grpo_2_updates": (train_grpo, "grpo_64", ["scheduler"], dict(num_generations=2, num_iterations=2,
                                                                     loss_type="grpo"))}
KL_KEY = {"ppo": "approx_kl"}   # PPO logs the KL to the old policy (and kl_ref); the others the KL to the reference


def rl_args(chain, out, **flags):
    flags = {**dict(from_dir=chain / "out", reasoning=0, reward="rule", max_gen_len=8, batch_size=2,
                    learning_rate=1e-3), **flags}
    return tiny_train_args(out, chain / "data" / "rlaif.jsonl", **flags)


@pytest.fixture(scope="module")
def uninterrupted(sft_chain, tmp_path_factory):
    """run(module, **flags): the uninterrupted run `module.main(rl_args(...))` of these flags, run once in this
    module (a resume test and another one compare against the same run) under the tests' even-length reward;
    returns (its directory, the weight path main returned, the loss)."""
    runs = {}

    def run(module, **flags):
        key = (module.__name__, tuple(sorted(flags.items())))
        if key not in runs:
            out = tmp_path_factory.mktemp("full")
            runs[key] = (out, *module.main(rl_args(sft_chain, out, **flags)))
        return runs[key]
    return run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stage", RL)
def test_rl_stage_runs_and_resumes_exactly(stage, dtype, sft_chain, tmp_path, monkeypatch, uninterrupted):
    """Both precisions, whatever --dtype auto picks on this machine: under bf16 the rollouts' tokens depend on
    how the engine batched their prefills, so that must not depend on thread timing (Engine.generate)."""
    # a tiny untrained model never answers right: reward even-length answers so the rewards vary
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    module, name, keys, flags = RL[stage]
    flags = {**flags, "dtype": dtype}
    full, path, loss = uninterrupted(module, max_steps=4, **flags)
    assert path == full / "out" / f"{name}.pth" and path.exists() and math.isfinite(loss)
    base, trained = torch.load(sft_chain / "out" / "full_sft_64.pth"), torch.load(path)
    assert set(base) == set(trained) and any(not torch.equal(base[k], trained[k]) for k in base)
    log = [json.loads(line) for line in open(full / "out" / f"{name}_metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert {"reward", "acc", KL_KEY.get(stage, "kl")} <= set(log[0])
    # stop after 3 steps, resume to 4: bit-identical to the uninterrupted run
    module.main(rl_args(sft_chain, tmp_path / "cut", max_steps=3, **flags))
    ckp = torch.load(tmp_path / "cut" / "ckpt" / f"{name}_resume.pth", weights_only=False)
    assert ckp["step"] == 3 and all(ckp.get(k) is not None for k in keys)
    module.main(rl_args(sft_chain, tmp_path / "cut", max_steps=4, from_resume=1, **flags))
    resumed = torch.load(tmp_path / "cut" / "out" / f"{name}.pth")
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)
    full_ckp = torch.load(full / "ckpt" / f"{name}_resume.pth", weights_only=False)
    cut_ckp = torch.load(tmp_path / "cut" / "ckpt" / f"{name}_resume.pth", weights_only=False)
    for key in keys:
        a, b = full_ckp[key], cut_ckp[key]
        if key in ("critic_model", "old_actor"):
            assert all(torch.equal(a[k], b[k]) for k in a), key
        elif key == "critic_optimizer":
            assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])
        elif key == "value_tracker":
            assert a == b
        else:
            assert (a["last_epoch"], a["_last_lr"]) == (b["last_epoch"], b["_last_lr"]), key


def test_grpo_inner_iterations_clip_the_ratio(sft_chain, tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    path, loss = train_grpo.main(rl_args(sft_chain, tmp_path, max_steps=2, num_generations=2, num_iterations=3,
                                         loss_type="grpo", clip_epsilon=0.05, learning_rate=1e-2))
    log = [json.loads(line) for line in open(tmp_path / "out" / "grpo_64_metrics.jsonl")]
    assert math.isfinite(loss) and max(r["ratio_clip"] for r in log) > 0      # later iterations moved off-policy
    with pytest.raises(ValueError, match="num_generations"):
        train_grpo.main(rl_args(sft_chain, tmp_path, num_generations=1))


def test_ppo_resumes_exactly_from_an_old_actor_refresh(sft_chain, tmp_path, monkeypatch, uninterrupted):
    """fa82707's old actor (--update_old_actor_freq N > 0): the refresh hook runs right after the optimizer step,
    so a resume file written at a refresh step holds the refreshed old actor (the actor's weights) and the resumed
    run goes on as the uninterrupted one."""
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    flags = dict(critic_learning_rate=1e-3, update_old_actor_freq=2, ppo_update_iters=1, dtype="float32")
    _, full, _ = uninterrupted(train_ppo, max_steps=4, **flags)
    train_ppo.main(rl_args(sft_chain, tmp_path / "cut", max_steps=2, **flags))
    ckp = torch.load(tmp_path / "cut" / "ckpt" / "ppo_actor_64_resume.pth", weights_only=False)
    assert all(torch.equal(ckp["old_actor"][k], ckp["model"][k]) for k in ckp["model"])
    resumed, _ = train_ppo.main(rl_args(sft_chain, tmp_path / "cut", max_steps=4, from_resume=1, **flags))
    a, b = torch.load(full), torch.load(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_sequence_advantage_runs(sft_chain, tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    path, loss = train_ppo.main(rl_args(sft_chain, tmp_path, max_steps=2, advantage="sequence",
                                        critic_learning_rate=1e-3))
    assert path.name == "ppo_actor_64.pth" and math.isfinite(loss)


def test_missing_reward_model_is_a_clear_error(sft_chain, tmp_path):
    args = rl_args(sft_chain, tmp_path, max_steps=1) + ["--reward", "model", "--reward_model_path",
                                                         str(tmp_path / "nowhere")]
    with pytest.raises(FileNotFoundError, match="--reward rule"):
        train_grpo.main(args)


def test_bench_rl_demo_mode_at_toy_size(sft_chain, tmp_path):
    """bench/bench_rl.py from an SFT weight on the demo's unit RL prompts: every algorithm trains through its
    real trainer in two segments (the second resumed), each scored on the held-out prompts and the broad set."""
    from bench import bench_rl
    from dataset import demo_data
    demo = demo_data.write_demo_data(tmp_path / "demo", scale=0.05)
    heads = {}                       # the first 8 questions of each scored file: 11 scorings of 96 + 25 are slow
    for key in ("rlaif_units_eval", "eval"):
        heads[key] = tmp_path / "demo" / f"{key}_head.jsonl"
        heads[key].write_text("".join(demo[key].read_text(encoding="utf-8").splitlines(True)[:8]), encoding="utf-8")
    work = tmp_path / "work"
    result = bench_rl.main(["--work_dir", str(work), "--from_dir", str(sft_chain / "out"), "--hidden_size", "64",
                            "--num_hidden_layers", "2", "--tokenizer_path", str(tokenizer_dir()),
                            "--rl_data", str(demo["rlaif_units"]), "--eval_data", str(heads["rlaif_units_eval"]),
                            "--broad_eval", str(heads["eval"]), "--rl_steps", "2", "--eval_every", "1",
                            "--prompts_per_step", "4", "--num_generations", "2", "--max_gen_len", "6",
                            "--eval_samples", "1", "--grpo_lr", "1e-2", "--ppo_lr", "1e-2", "--spo_lr", "1e-2",
                            "--plot", str(tmp_path / "rl.png")])
    curve = result["curve"]
    assert [(r["algo"], r["step"]) for r in curve] == [("sft", 0)] + [(a, s) for a in ("grpo", "ppo", "spo")
                                                                        for s in (1, 2)]
    assert all(0 <= r["sample_reward"] <= 1 and 0 <= r["greedy_acc"] <= 1 for r in curve)
    assert [r["completions"] for r in curve[1:3]] == [4, 8]
    assert set(result["broad_eval"]) == {"sft", "grpo", "ppo", "spo"}
    sft = torch.load(sft_chain / "out" / "full_sft_64.pth")
    for algo, weight in bench_rl.WEIGHT.items():
        trained = torch.load(work / algo / f"{weight}_64.pth")
        assert any(not torch.equal(sft[k], trained[k]) for k in sft), algo
        steps = [json.loads(line)["step"] for line in open(work / algo / f"{weight}_64_metrics.jsonl")]
        assert steps[-1] == 2, algo                        # segment 2 resumed at step 2, not from scratch
    assert json.loads((work / "rl_bench.json").read_text())["curve"] == curve


def test_bench_rl_without_sft_weight_says_what_to_run(tmp_path):
    from bench import bench_rl
    with pytest.raises(SystemExit, match="run_demo.sh"):
        bench_rl.main(["--work_dir", str(tmp_path / "w"), "--from_dir", str(tmp_path / "none")])


@pytest.mark.parametrize("stage, flags", [("grpo", {}), ("spo", {"accumulation_steps": 2})])
def test_rl_resumes_exactly_from_a_save_written_mid_run(stage, flags, sft_chain, tmp_path, monkeypatch):
    """A --save_interval save is written at the next optimizer step (once that step's gradients show the weights
    are sound), after the next rollout has drawn from the RNG and (SPO) updated its baseline: the resume file
    must still hold the RNG and stage state of its own boundary. Resuming from the file as it was written mid-run
    gives the uninterrupted run's weights."""
    from trainer.core import loop
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    module, name, _, base_flags = RL[stage]
    flags = {**base_flags, **flags, "dtype": "float32", "save_interval": 2}
    kept, real_save = tmp_path / "kept.pth", loop._Saver.save

    def keep_first_mid_run_file(self, point, barrier=True):
        real_save(self, point, barrier)
        if not kept.exists():
            shutil.copy(tmp_path / "run" / "ckpt" / f"{name}_resume.pth", kept)

    # the uninterrupted run (keeping a copy of its first mid-run save changes nothing in it)
    monkeypatch.setattr(loop._Saver, "save", keep_first_mid_run_file)
    path, _ = module.main(rl_args(sft_chain, tmp_path / "run", max_steps=6, **flags))
    monkeypatch.setattr(loop._Saver, "save", real_save)
    full = torch.load(path)
    assert torch.load(kept, weights_only=False)["step"] == 2
    shutil.copy(kept, tmp_path / "run" / "ckpt" / f"{name}_resume.pth")   # as if killed after it
    module.main(rl_args(sft_chain, tmp_path / "run", max_steps=6, from_resume=1, **flags))
    resumed = torch.load(tmp_path / "run" / "out" / f"{name}.pth")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_grpo_refuses_zero_iterations_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match="--num_iterations must be at least 1"):
        train_grpo.main(rl_args(tmp_path, tmp_path / "out", num_iterations=0))
