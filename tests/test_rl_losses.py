"""The RL losses of the original's newest code (d65ef2c), each against a reference written out here by hand on a
fixed batch: GRPO's clipped ratio and CISPO's detached clipped weight (values and gradients), PPO's GAE, whitening,
clipped policy and value losses, clip fraction, approx KL and its early stop; minimind-3's think-aware rule
rewards; RLAIF prompts with --thinking_ratio 0 and 1 against the original's; and a tiny run of each new option."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from dataset.lm_dataset import RLAIFDataset
from dataset.scoring import rep_penalty, think_reward
from model.cli import cli
from tests.conftest import GOLDENS, ROOT, tiny_config, tokenizer_dir
from tests.test_rl import rl_args, sft_chain  # noqa: F401  (sft_chain: the module fixture, a tiny SFT weight)
from trainer import train_grpo, train_ppo
from trainer.core import rl
from trainer.core.rl import Rewards, Rollout

# ---- a fixed batch: 2 completions of 3 tokens, the second one's last token is padding ----
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
OLD = [[-1.2, -0.5, -0.1], [-0.3, -2.0, -0.7]]     # ratios e^0.2 = 1.22, 1, e^-1.9 = 0.15; 1, e^0.8 = 2.23, (pad)
REF = [[-1.1, -0.4, -1.5], [-0.2, -1.0, -0.9]]
ADV = [1.5, -0.5]
MASK = [[1, 1, 1], [1, 1, 0]]
BETA, EPS, EPS_HIGH = 0.1, 0.2, 2.0


def tensors(requires_grad=False):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=requires_grad)
    return (logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64),
            torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64))


def hand_policy(kind):
    """The per-token loss by hand, token mean per completion, then the mean; the gradient of each log-prob
    (the importance weight of CISPO is a constant); and the clipped share, by the same reduction."""
    losses, grads, clipped = [], [[0.0] * 3 for _ in LOGP], []
    for i in range(len(LOGP)):
        n = sum(MASK[i])
        terms, hits = [], 0
        for t in range(3):
            if not MASK[i][t]:
                continue
            lp, a = LOGP[i][t], ADV[i]
            r, d = math.exp(lp - OLD[i][t]), REF[i][t] - lp
            kl, dkl = math.exp(d) - d - 1, 1 - math.exp(d)      # k3 and its derivative in log pi
            if kind == "cispo":
                w = min(r, EPS_HIGH)
                pg, dpg, hit = w * a * lp, w * a, r > EPS_HIGH
            else:
                c = max(min(r, 1 + EPS), 1 - EPS)
                pg = min(r * a, c * a)
                inside = 1 - EPS <= r <= 1 + EPS
                dpg, hit = (r * a if (r * a <= c * a or inside) else 0.0), abs(r - 1) > EPS
            terms.append(-(pg - BETA * kl))
            grads[i][t] = (-dpg + BETA * dkl) / n / len(LOGP)
            hits += hit
        losses.append(sum(terms) / n)
        clipped.append(hits / n)
    return sum(losses) / len(losses), grads, sum(clipped) / len(clipped)


@pytest.mark.parametrize("kind", ["cispo", "grpo"])
def test_grpo_and_cispo_losses_and_gradients_equal_the_hand_computed(kind):
    logp, old, ref, adv, mask = tensors(requires_grad=True)
    fn, clip = (train_grpo.cispo_loss, EPS_HIGH) if kind == "cispo" else (train_grpo.grpo_loss, EPS)
    loss, kl, clipped = fn(logp, old, ref, adv, mask, BETA, clip)
    want, grads, share = hand_policy(kind)
    assert loss.item() == pytest.approx(want, abs=1e-12) and clipped.item() == pytest.approx(share)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(grads, dtype=torch.float64), atol=1e-12)
    assert kl.item() == pytest.approx(rl.masked_mean(rl.k3_kl(logp, ref), mask).item())


def test_cispo_weight_is_detached_and_equals_grpo_at_ratio_one():
    """CISPO's weight carries no gradient: d loss / d logp = -w * A / T (a weight through autograd would add
    w * A * logp). At ratio 1 (one update per rollout, the default) both losses give the same gradient."""
    logp, old, ref, adv, mask = tensors(requires_grad=True)
    train_grpo.cispo_loss(logp, old, ref, adv, mask, 0.0, EPS_HIGH)[0].backward()
    r = torch.exp(logp.detach() - old).clamp(max=EPS_HIGH)
    assert torch.allclose(logp.grad, -(r * adv[:, None] * mask / mask.sum(1, keepdim=True)) / 2)
    grads = []
    for fn, clip in ((train_grpo.cispo_loss, EPS_HIGH), (train_grpo.grpo_loss, EPS)):
        x = logp.detach().clone().requires_grad_()
        fn(x, x.detach(), ref, adv, mask, BETA, clip)[0].backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-15)


# ---- PPO ----
def test_gae_and_whitening_equal_the_original_loop():
    torch.manual_seed(0)
    rewards = torch.zeros(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    last = [2, 4, 0]
    for i, t in enumerate(last):
        rewards[i, t] = [1.0, -0.5, 2.0][i]
    rewards = rewards.double()
    values = torch.randn(3, 5, dtype=torch.float64) * mask            # the rollout's values, 0 past the answer
    gamma, lam = 0.9, 0.8
    want = [[0.0] * 5 for _ in range(3)]
    for i in range(3):                                                  # the original's loop (train_ppo L139-146)
        lastgaelam = 0.0
        for t in reversed(range(5)):
            nv = values[i, t + 1].item() if t < 4 else 0.0
            delta = rewards[i, t].item() + gamma * nv - values[i, t].item()
            lastgaelam = delta + gamma * lam * lastgaelam
            want[i][t] = lastgaelam
    adv, ret = train_ppo.gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float64) * mask)
    assert torch.allclose(ret, (adv + values) * mask)
    unmasked = values + 7.0 * (1 - mask)                                # what lies past the answer never counts
    assert torch.allclose(train_ppo.gae(rewards, unmasked, mask, gamma, lam)[0], adv)
    flat = [want[i][t] for i in range(3) for t in range(5) if mask[i, t]]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / len(flat)
    white = [[(want[i][t] - mean) / math.sqrt(var + 1e-8) * mask[i, t].item() for t in range(5)] for i in range(3)]
    assert torch.allclose(train_ppo.whiten(adv, mask), torch.tensor(white, dtype=torch.float64))


def test_ppo_policy_value_clipfrac_and_approx_kl_equal_the_hand_computed():
    logp, old, _, _, mask = tensors()
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.0, -0.3, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.6, -0.4], [1.0, 0.2, 5.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.0, 0.2, -0.3], [1.05, 0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[0.5, 0.5, 0.5], [-1.0, 0.9, 3.0]], dtype=torch.float64)
    clip_eps, clip_v = 0.2, 0.2
    pol, vals, kls, hits = [], [], [], []
    for i in range(2):
        for t in range(3):
            if not MASK[i][t]:
                continue
            r, a = math.exp(LOGP[i][t] - OLD[i][t]), adv[i, t].item()
            pol.append(max(-a * r, -a * max(min(r, 1 + clip_eps), 1 - clip_eps)))
            hits.append(abs(r - 1) > clip_eps)
            kls.append(0.5 * (LOGP[i][t] - OLD[i][t]) ** 2)
            v, vo, ret = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            vc = min(max(v, vo - clip_v), vo + clip_v)
            vals.append(max((v - ret) ** 2, (vc - ret) ** 2))
    mean = lambda xs: sum(xs) / len(xs)
    loss, clipfrac = train_ppo.clipped_policy_loss(logp, old, adv, mask, clip_eps)
    assert loss.item() == pytest.approx(mean(pol)) and clipfrac.item() == pytest.approx(mean(hits)) == 3 / 5
    value = train_ppo.clipped_value_loss(values, old_values, returns, mask, clip_v)
    assert value.item() == pytest.approx(0.5 * mean(vals))
    assert train_ppo.approx_kl(logp, old, mask).item() == pytest.approx(mean(kls))


def early_stop_rollout():
    """A tiny actor and critic, and a rollout dict of 2 answers as ppo_rollout builds it (3 minibatch passes)."""
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    actor = MiniMindForCausalLM(tiny_config())
    critic = train_ppo.CriticModel(MiniMindForCausalLM(tiny_config()).model)
    seq = torch.randint(3, 100, (2, 7))
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    roll = Rollout(seq, torch.cat([torch.ones(2, 4, dtype=torch.long), cmask], 1), cmask, 4, ["a", "b"],
                   torch.tensor([False, False]))
    with torch.no_grad():
        logp = rl.completion_logps(actor, roll)[0]
    z = torch.zeros(2, 3)
    ro = {"roll": roll, "rewards": torch.tensor([1.0, 0.0]), "old_values": z, "returns": z + 0.5,
          "adv": torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]), "old_logp": logp, "ref_logp": logp,
          "minibatches": [torch.tensor([1, 0])] * 3, "stopped": False, "sums": {}, "stats": {"reward": 0.5}}
    return actor, critic, ro


def test_ppo_early_stop_zeroes_the_loss_from_the_minibatch_over_the_threshold(monkeypatch):
    """approx KL 0.1, 0.3, 0.1 against --early_stop_kl 0.25: the first minibatch learns; the second exceeds it, so
    its loss and every later one's is 0 (still a graph to back-propagate through, for DDP); a missing minibatch
    (a short last batch) is a zero update too. Logged: the means up to the stopping minibatch."""
    actor, critic, ro = early_stop_rollout()
    args = SimpleNamespace(advantage="gae", clip_epsilon=0.2, kl_coef=0.02, vf_coef=0.5, cliprange_value=0.2,
                           early_stop_kl=0.25)
    kls = iter([0.1, 0.3, 0.1, 0.0])
    monkeypatch.setattr(train_ppo, "approx_kl", lambda logp, old, mask: torch.tensor(next(kls)))
    out = [train_ppo.ppo_update(actor, critic, args, ro, k) for k in range(4)]
    assert out[0][0].item() != 0 and [o[0].item() for o in out[1:]] == [0.0, 0.0, 0.0]
    assert ro["stopped"] and all(o[0].requires_grad for o in out)
    out[1][0].backward()
    assert all(p.grad is not None and not p.grad.any() for p in actor.parameters())
    stats = out[-1][1]
    assert stats["approx_kl"] == pytest.approx(0.2) and stats["reward"] == 0.5
    assert {"policy_loss", "critic_loss", "kl_ref", "clipfrac"} <= set(stats)


def test_ppo_first_minibatch_is_on_policy():
    """With the rollout-time log-probs as the old policy, the first minibatch's ratio is 1: approx KL 0, no clip."""
    actor, critic, ro = early_stop_rollout()
    args = SimpleNamespace(advantage="gae", clip_epsilon=0.2, kl_coef=0.02, vf_coef=0.5, cliprange_value=0.2,
                           early_stop_kl=1e-12)
    loss, stats = train_ppo.ppo_update(actor, critic, args, ro, 0)
    assert stats["approx_kl"] < 1e-12 and stats["clipfrac"] == 0 and loss.item() != 0 and not ro["stopped"]


# ---- minimind-3: think-aware rule rewards, thinking_ratio ----
def test_think_reward_hand_written():
    thought = "先想一想这个问题的答案是什么呢，再回答。"                 # 20 characters
    assert len(thought) == 20
    text = f"{thought}</think>答案是四。"
    assert think_reward(text) == (0.5 + 1.0 + 0.25, "答案是四。")       # length ok, thought ok, one </think>
    assert think_reward("short") == (-0.5, "short")
    assert think_reward("ab</think>cd</think>" + "x" * 20)[0] == 0.5 - 0.5 - 0.25
    rep = "The cat sat on the mat, the cat sat"       # 8 trigrams (the comma counts), 7 distinct: 2 * 0.5 * 1 / 8
    assert rep_penalty(rep) == pytest.approx(1 / 8) and rep_penalty("a b") == 0.0 and rep_penalty("a a a a a a") == 0.5
    assert think_reward("x" * 30 + "</think>" + rep)[0] == pytest.approx(0.5 + 1.0 + 0.25 - 1 / 8)
    rewards, _ = Rewards("rule", reasoning=True, think_rules=True)([[]] * 2, [text + "8", "8"], ["8", "8"])
    assert rewards.tolist() == [pytest.approx(1.75 + 1.0), pytest.approx(-0.5 + 1.0)]  # no <answer> format reward
    assert Rewards("rule", reasoning=True, think_rules=True).range == (-1.75, 2.75)


@pytest.fixture(scope="module")
def mm3_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ROOT / "model" / "minimind3"))


def rlaif_file(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_thinking_ratio_0_and_1_give_the_original_prompts(tmp_path, mm3_tokenizer):
    """tests/goldens/mm3_rlaif_prompts.json: the original's RLAIFDataset prompt for one question with
    thinking_ratio 0 and 1. Its random system prompt (drawn there) is not added by ours, so the golden's system
    turn is given in the row (roles come from the file) or cut from the golden."""
    golden = json.loads((GOLDENS / "mm3_rlaif_prompts.json").read_text(encoding="utf-8"))
    system, question = "你是minimind，一个小巧但有用的语言模型。", "请解释光合作用"
    path = rlaif_file(tmp_path / "rl.jsonl", [
        {"conversations": [{"role": "system", "content": system}, {"role": "user", "content": question},
                           {"role": "assistant", "content": "无"}]},
        {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": "无"}]}])
    for ratio in (0.0, 1.0):
        want = golden[f"thinking_ratio={ratio}"]
        ds = RLAIFDataset(path, mm3_tokenizer, thinking_ratio=ratio)
        assert ds[0]["prompt"] == want
        assert ds[1]["prompt"] == want.replace(f"<|im_start|>system\n{system}<|im_end|>\n", "")
        assert [m["role"] for m in ds[0]["messages"]] == ["system", "user"]
    assert golden["thinking_ratio=1.0"].endswith("<|im_start|>assistant\n<think>\n")
    assert rl.generation_header(golden["thinking_ratio=1.0"]) == "<|im_start|>assistant\n<think>\n"


def test_thinking_ratio_draw_is_fixed_per_row_and_seed(tmp_path, mm3_tokenizer):
    path = rlaif_file(tmp_path / "rl.jsonl", [{"conversations": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "无"}]}])
    ds, again, other = (RLAIFDataset(path, mm3_tokenizer, thinking_ratio=0.9, seed=s) for s in (42, 42, 7))
    draws = [ds.open_thinking(i) for i in range(2000)]
    assert draws == [again.open_thinking(i) for i in range(2000)] != [other.open_thinking(i) for i in range(2000)]
    assert 0.87 < sum(draws) / len(draws) < 0.93
    assert ds[0]["prompt"] == ds[0]["prompt"]
    with pytest.raises(ValueError, match="last turn must be the assistant"):
        RLAIFDataset(rlaif_file(tmp_path / "bad.jsonl", [{"conversations": [
            {"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}]), mm3_tokenizer)[0]


def test_thinking_ratio_has_no_effect_with_minimind2(tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    path = rlaif_file(tmp_path / "rl.jsonl", [{"conversations": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "无"}]}])
    assert RLAIFDataset(path, tok, thinking_ratio=0.0)[0] == RLAIFDataset(path, tok, thinking_ratio=1.0)[0]


# ---- tiny runs of the new options, and bad values ----
@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
def test_grpo_loss_types_run(loss_type, sft_chain, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    path, loss = train_grpo.main(rl_args(sft_chain, tmp_path, max_steps=2, num_generations=2, num_iterations=2,
                                         loss_type=loss_type, epsilon=0.2, epsilon_high=1.0001, dtype="float32"))
    log = [json.loads(line) for line in open(tmp_path / "out" / "grpo_64_metrics.jsonl")]
    assert path.exists() and math.isfinite(loss) and len(log) == 2 and all("ratio_clip" in r for r in log)


def test_ppo_new_flags_run_and_log_clipfrac_and_approx_kl(sft_chain, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(rl, "answer_correct", lambda text, ref: len(text) % 2 == 0)
    flags = dict(max_steps=2, critic_learning_rate=1e-3, gamma=0.9, lam=0.9, cliprange_value=0.1,
                 ppo_update_iters=2, mini_batch_size=1, early_stop_kl=10.0, dtype="float32")
    path, loss = train_ppo.main(rl_args(sft_chain, tmp_path / "a", **flags))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch:")]
    assert path.exists() and math.isfinite(loss) and len(lines) == 2
    assert all(" approx_kl:" in line and " clipfrac:" in line and " kl_ref:" in line for line in lines)
    # an early stop at once: every minibatch after the first is multiplied by 0 (the last one logs loss 0)
    train_ppo.main(rl_args(sft_chain, tmp_path / "b", **{**flags, "early_stop_kl": 1e-12}))
    log = [json.loads(line) for line in open(tmp_path / "b" / "out" / "ppo_actor_64_metrics.jsonl")]
    assert [r["loss"] for r in log] == [0.0, 0.0] and all(r["approx_kl"] > 1e-12 for r in log)
    # found in review: the zeroed minibatches still stepped AdamW (momentum and weight decay moved the weights
    # after the stop). Only each rollout's first minibatch is applied: 2 rollouts, 2 actor steps, not 2 x 4
    resume = torch.load(tmp_path / "b" / "ckpt" / "ppo_actor_64_resume.pth", weights_only=False)
    steps = {int(s["step"]) for s in resume["optimizer"]["state"].values()}
    assert steps == {2}, steps


@pytest.mark.parametrize("module, flags, message", [
    (train_grpo, ["--loss_type", "ppo"], "invalid choice"),
    (train_grpo, ["--epsilon_high", "0"], "--epsilon and --epsilon_high must be positive"),
    (train_grpo, ["--thinking_ratio", "1.5"], "--thinking_ratio must be between 0 and 1"),
    (train_ppo, ["--ppo_update_iters", "0"], "--ppo_update_iters and --mini_batch_size must be at least 1"),
    (train_ppo, ["--lam", "2"], "0 <= --gamma, --lam <= 1"),
    (train_ppo, ["--accumulation_steps", "2"], "use --accumulation_steps 1")])
def test_bad_values_are_one_line(module, flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(lambda: module.main(["--save_dir", str(tmp_path), "--checkpoint_dir", str(tmp_path), *flags]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and (flags[0] == "--loss_type" or len(err.splitlines()) == 1)


def test_minimind3_grpo_advantages_are_the_newest_originals():
    """Found in review: minimind-3 GRPO kept fa82707's advantages. The newest: (r - mean) / (biased std + 1e-4),
    no clamp, no batch renormalisation."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = train_grpo.group_advantages(rewards, 4, batch_norm=False, newest=True)
    std = math.sqrt(0.1875)                  # population std of [1, 0, 0, 0]
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, abs=1e-6) and adv[0].item() == pytest.approx(1.7317, abs=1e-4)
    old = train_grpo.group_advantages(rewards, 4)          # MiniMind2: unchanged (unbiased std, batch renormalised)
    assert old[0].item() == pytest.approx(2.291, abs=1e-3)


def test_minimind3_rl_starts_from_full_sft_unless_reasoning_is_typed():
    """Found in review: --reasoning defaulted to 1 for minimind-3 too, so its RL looked for reason_768.pth."""
    args = SimpleNamespace(reasoning=None, from_weight=None, model_family="minimind3")
    assert rl.base_weight(args) == "full_sft" and args.reasoning == 0
    args = SimpleNamespace(reasoning=None, from_weight=None, model_family=None)
    assert rl.base_weight(args) == "reason" and args.reasoning == 1
    args = SimpleNamespace(reasoning=1, from_weight=None, model_family="minimind3")
    assert rl.base_weight(args) == "reason"
