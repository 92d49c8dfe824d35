"""PPO (Schulman et al. 2017) for a chat model, as the original's newest code (d65ef2c): an actor samples
answers, a critic (a MiniMind body with a value head) estimates how good each state is, and the actor is
pushed toward answers that beat the critic's estimate with a clipped probability ratio, over several passes
of minibatches of each rollout, with a KL penalty that keeps it near a frozen reference.

    python trainer/train_ppo.py                              # or: cd trainer && python train_ppo.py
    torchrun --nproc_per_node 2 trainer/train_ppo.py         # deepspeed --num_gpus=2 trainer/train_ppo.py
    python trainer/train_ppo.py --device cpu --hidden_size 64 --num_hidden_layers 2 --reasoning 0 \\
        --reward rule --max_gen_len 16 --max_steps 4         # tiny CPU run, seconds
Reads out/reason_<hidden>.pth (--reasoning 1) or out/full_sft_<hidden>.pth for the actor, the reference and
the critic's body; prompts from dataset/rlaif-mini.jsonl (the demo prompts when absent); with --reward
model/mixed the reward model at ../internlm2-1_8b-reward. Writes out/ppo_actor_<hidden>[_moe].pth,
out/ppo_actor_<hidden>_metrics.jsonl and checkpoints/ppo_actor_<hidden>[_moe]_resume.pth (actor, critic, both
optimizers and schedulers).

Rollout (no gradients): one answer per prompt, its reward, the old log-probs (the actor's at rollout time; with
--rollout_engine sglang/openai the rollout server's, trainer/core/rollout_engine.py), the reference's, and the
critic's V(s_t) before each answer token. --advantage gae (default): the reward is paid on
the answer's last token, GAE (--gamma, --lam; V after the answer = 0) gives A_t and R_t = A_t + V_t, and A is
whitened over the batch's answer tokens. Then --ppo_update_iters passes over the batch in random minibatches of
--mini_batch_size answers, each one optimizer step of actor and critic on (means over answer tokens)
  loss = mean max(-A * ratio, -A * clip(ratio, 1 +- clip_epsilon)) + kl_coef * mean k3(ref, pi)
       + vf_coef * 0.5 * mean max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2)
approx_kl = mean 0.5 * log(ratio)^2 (averaged over ranks): from the minibatch where it exceeds --early_stop_kl on,
the rollout's losses are multiplied by 0 and no optimizer step is taken (every rank runs the same passes and
backward, so DDP stays in step; the original still steps AdamW with zero gradients for the rest of that pass,
which its momentum and weight decay turn into updates after the stop). Logged: approx_kl and clipfrac (the share
of tokens whose ratio left 1 +- clip_epsilon), means over the minibatches. --advantage sequence: fa82707's code
(A = r - V(answer), the ratio of summed log-probs, plain MSE); --update_old_actor_freq N > 0: fa82707's old actor,
refreshed after every N-th optimizer step, gives the old log-probs (kept in the resume file). The scheduler steps
once per rollout. minimind-3: --thinking_ratio and the think-aware rule rewards, as in train_grpo.py.
Fixed against the original: the first generated token is in the response mask, prompts are cut from the left,
and the critic applies the final norm once.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dataset.lm_dataset import is_minimind3_tokenizer
from model.cli import cli
from trainer.core.loop import train_loop, unwrap
from trainer.core.rl import (Rewards, adamw_cosine, add_rl_args, base_weight, check_rl_args, completion_logps, frozen,
                              k3_kl, old_or, rl_collate, rl_prompts, rollout, rollout_logps)
from trainer.core.rollout_engine import create_rollout_engine
from trainer.core.tracking import init_tracker
from trainer.core.stage import DATA, build_parser, init_config, init_model, init_run, restore, wrap_model


class CriticModel(nn.Module):
    """V(prefix) for every position: a MiniMind body (its output is already final-normed) + Linear(H, 1)."""

    def __init__(self, body):
        super().__init__()
        self.model = body
        self.value_head = nn.Linear(body.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask=None):
        hidden, _, aux_loss = self.model(input_ids, attention_mask)
        return self.value_head(hidden).squeeze(-1), aux_loss         # (B, T), MoE aux loss


def token_mean(x, mask):
    """Mean over every masked token of the batch (the original PPO's reduction)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over (N, R) completions: delta_t = r_t + gamma * V_{t+1} - V_t,
    A_t = delta_t + gamma * lam * A_{t+1}; the state after the last masked token is terminal (V = 0).
    -> (advantages, returns = A + V), both zero outside the mask."""
    n, r = rewards.shape
    adv = torch.zeros_like(values)
    next_adv = next_value = torch.zeros(n, device=values.device, dtype=values.dtype)
    for t in reversed(range(r)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m            # a masked tail carries nothing back
        next_value = values[:, t] * m
        adv[:, t] = next_adv
    return adv, (adv + values) * mask


def whiten(adv, mask, eps: float = 1e-8):
    """(A - mean) / sqrt(var + eps) with the mean and (biased) variance over the masked tokens; 0 elsewhere."""
    mean = token_mean(adv, mask)
    return (adv - mean) * torch.rsqrt(token_mean((adv - mean) ** 2, mask) + eps) * mask


def clipped_policy_loss(logp, old_logp, adv, mask, clip_eps: float):
    """PPO's clipped surrogate, token mean: max(-A * ratio, -A * clip(ratio, 1 +- eps)).
    -> (loss, clip fraction: share of tokens with |ratio - 1| > eps)."""
    ratio = torch.exp(logp - old_logp)
    loss = token_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)), mask)
    return loss, token_mean(((ratio.detach() - 1).abs() > clip_eps).float(), mask)


def clipped_value_loss(values, old_values, returns, mask, clip_range: float):
    """0.5 * token mean of max((V - R)^2, (clip(V, V_old +- clip_range) - R)^2): the critic may not move a value
    further than clip_range from its rollout-time estimate to lower its loss."""
    clipped = torch.max(torch.min(values, old_values + clip_range), old_values - clip_range)
    return 0.5 * token_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def approx_kl(logp, old_logp, mask):
    """KL(pi_old || pi) estimate k2 = token mean of 0.5 * (log pi - log pi_old)^2, averaged over the ranks so that
    every rank takes the same early-stop decision."""
    kl = token_mean(0.5 * (logp.detach() - old_logp) ** 2, mask)
    if dist.is_initialized():
        dist.all_reduce(kl)                  # SUM: gloo has no AVG
        kl = kl / dist.get_world_size()
    return kl


def ppo_rollout(actor, old_actor, critic, ref_model, engine, run, args, tokenizer, reward_fn, batch):
    """One batch of prompts (no gradients): an answer each (by --rollout_engine), its reward, the old log-probs
    (the old actor's; else a rollout server's, or the actor's where it gave none), the reference's, the critic's
    values, GAE advantages and returns, and the minibatches of the --ppo_update_iters passes."""
    roll = rollout(actor, tokenizer, batch["prompt"], args, 1, run.autocast_ctx, engine)
    rewards, stats = reward_fn(batch["messages"], roll.texts, batch["reference"])
    rewards, mask, p = rewards.to(run.device), roll.completion_mask.float(), roll.prompt_len
    values = unwrap(critic)(roll.sequences, roll.attention_mask)[0].float()
    old_values = values[:, p - 1:-1] * mask                           # V(s_t): the state before answer token t
    token_rewards = torch.zeros_like(old_values).scatter(1, roll.last_index[:, None], rewards[:, None])
    adv, returns = gae(token_rewards, old_values, mask, args.gamma, args.lam)
    n = len(roll.texts)
    size = min(args.mini_batch_size, n)
    minibatches = [perm[i:i + size] for perm in (torch.randperm(n) for _ in range(args.ppo_update_iters))
                   for i in range(0, n, size)]
    return {"roll": roll, "rewards": rewards, "old_values": old_values, "returns": returns, "adv": whiten(adv, mask),
            "old_logp": rollout_logps(unwrap(actor), roll, True) if old_actor is None else
            completion_logps(old_actor, roll)[0],
            "ref_logp": completion_logps(ref_model, roll)[0], "minibatches": minibatches, "stopped": False,
            "sums": {}, "stats": {**stats, "resp_len": roll.lengths.float().mean().item(),
                                  "tokens": int(roll.lengths.sum())}}


def ppo_update(actor, critic, args, ro, k):
    """Minibatch k of the rollout's passes: the PPO loss (policy + KL + value), returned for the loop to
    back-propagate into the actor and the critic and to step both; multiplied by 0 from the minibatch whose approx
    KL exceeds --early_stop_kl on. A short last batch has fewer minibatches than the loop's updates: the missing
    ones run one answer with the loss multiplied by 0 too."""
    empty = k >= len(ro["minibatches"])
    rows = ro["minibatches"][0][:1] if empty else ro["minibatches"][k]
    roll, mask, p = ro["roll"].select(rows), ro["roll"].completion_mask[rows].float(), ro["roll"].prompt_len
    ref_logp, rewards = ro["ref_logp"][rows], ro["rewards"][rows]
    logp, aux = completion_logps(actor, roll)
    old_logp = old_or(ro["old_logp"][rows], logp)         # a server's pads (nan) -> ratio 1, masked out anyway
    values, critic_aux = critic(roll.sequences, roll.attention_mask)
    values = values.float()
    kl = approx_kl(logp, old_logp, mask)
    counted = not (empty or ro["stopped"])              # logged: up to the minibatch that stops the rollout
    ro["stopped"] = ro["stopped"] or bool(kl > args.early_stop_kl)
    if args.advantage == "gae":
        policy, clipfrac = clipped_policy_loss(logp, old_logp, ro["adv"][rows], mask, args.clip_epsilon)
        kl_ref = token_mean(k3_kl(logp, ref_logp), mask)
        value = clipped_value_loss(values[:, p - 1:-1], ro["old_values"][rows], ro["returns"][rows], mask,
                                   args.cliprange_value)
    else:                                                            # fa82707's one value per answer
        v = values.gather(1, (p + roll.last_index)[:, None]).squeeze(1)
        adv, seq = rewards - v.detach(), lambda x: (x * mask).sum(1)
        ratio = torch.exp(seq(logp) - seq(old_logp))
        policy = -torch.min(ratio * adv, ratio.clamp(1 - args.clip_epsilon, 1 + args.clip_epsilon) * adv).mean()
        clipfrac = ((ratio.detach() - 1).abs() > args.clip_epsilon).float().mean()
        kl_ref, value = (seq(logp) - seq(ref_logp)).mean(), F.mse_loss(v, rewards)
    loss = policy + args.kl_coef * kl_ref + args.vf_coef * value + aux + critic_aux
    if counted:
        for key, x in (("policy_loss", policy), ("critic_loss", value), ("kl_ref", kl_ref), ("approx_kl", kl),
                       ("clipfrac", clipfrac)):
            ro["sums"][key] = ro["sums"].get(key, 0.0) + x.item()
        ro["sums"]["n"] = ro["sums"].get("n", 0) + 1
    sums = dict(ro["sums"])
    n = max(sums.pop("n", 0), 1)
    stats = {**ro["stats"], **{key: total / n for key, total in sums.items()}}
    # after the stop: no optimizer step (the same on every rank: the approx KL is averaged over ranks)
    return (loss * 0.0 if ro["stopped"] or empty else loss), {**stats, "skip_step": ro["stopped"]}


def optimizer_steps(optimizer) -> int:
    """Optimizer steps taken so far (AdamW's own count, so it survives a resume)."""
    state = next(iter(optimizer.state.values()), {})
    return int(state.get("step", 0))


def main(argv=None):
    parser = build_parser("MiniMind PPO", save_weight="ppo_actor", epochs=1, batch_size=2, learning_rate=8e-8,
                          accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path=DATA / "rlaif-mini.jsonl", demo_data="rlaif.jsonl", wandb_project="MiniMind-PPO")
    add_rl_args(parser, from_weight=None)
    parser.add_argument("--critic_learning_rate", type=float, default=8e-8, help="critic peak LR (cosine to LR/10)")
    parser.add_argument("--clip_epsilon", type=float, default=0.1, help="ratio clip range")
    parser.add_argument("--vf_coef", type=float, default=0.5, help="weight of the critic's value loss")
    parser.add_argument("--kl_coef", type=float, default=0.02, help="weight of the KL penalty to the reference")
    parser.add_argument("--update_old_actor_freq", type=int, default=0,
                        help="0 = the old policy is the actor at rollout time (the original's newest); N > 0 = "
                             "fa82707's separate old actor, refreshed after every N-th optimizer step")
    parser.add_argument("--advantage", type=str, default="gae", choices=["gae", "sequence"],
                        help="gae = token-level values and GAE (the original's newest); "
                             "sequence = fa82707's r - V(answer)")
    parser.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    parser.add_argument("--cliprange_value", type=float, default=0.2, help="how far a value may move from its "
                        "rollout-time estimate before its loss is clipped (gae)")
    parser.add_argument("--ppo_update_iters", type=int, default=2, help="passes over each rollout")
    parser.add_argument("--mini_batch_size", type=int, default=2,
                        help="answers per minibatch (one optimizer step each)")
    parser.add_argument("--early_stop_kl", type=float, default=0.25,
                        help="stop a rollout's updates once a minibatch's approx KL to the old policy exceeds this")
    args = parser.parse_args(argv)
    check_rl_args(args)
    if args.ppo_update_iters < 1 or args.mini_batch_size < 1:
        raise ValueError("--ppo_update_iters and --mini_batch_size must be at least 1")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1 and args.cliprange_value > 0 and args.early_stop_kl > 0):
        raise ValueError("PPO needs 0 <= --gamma, --lam <= 1 and positive --cliprange_value and --early_stop_kl")
    updates = args.ppo_update_iters * -(-args.batch_size // args.mini_batch_size)
    if updates > 1 and args.accumulation_steps > 1:
        raise ValueError(f"{updates} minibatch updates per rollout (--ppo_update_iters x batches of --mini_batch_size) "
                         "take one optimizer step each: use --accumulation_steps 1")
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args, base_weight(args))             # 2. model config + resume state
    tracker = init_tracker(args, ckp, f"MiniMind-PPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    load = lambda stage: init_model(lm_config, args, run.device, base_weight(args), stage=stage)   # 4. models:
    actor, tokenizer = load("actor")                                  # actor, reference, critic (old actor)
    ref_model = frozen(load("reference")[0])
    old_actor = frozen(load("old actor")[0]) if args.update_old_actor_freq > 0 else None
    critic = CriticModel(load("critic body")[0].model).to(run.device)
    reward_fn = Rewards(args.reward, bool(args.reasoning), args.rule_weight, args.reward_model_path, run.device,
                        think_rules=is_minimind3_tokenizer(tokenizer))
    prompts = rl_prompts(args, tokenizer)                             # 5. prompts and optimizers
    actor_opt, actor_sched = adamw_cosine(actor.parameters(), args, run, len(prompts), args.learning_rate)
    critic_opt, critic_sched = adamw_cosine(critic.parameters(), args, run, len(prompts), args.critic_learning_rate)
    state = {"critic_model": critic, "critic_optimizer": critic_opt, "critic_scheduler": critic_sched,
             **({"old_actor": old_actor} if old_actor is not None else {})}
    start = restore(ckp, actor, actor_opt, run.scaler, scheduler=actor_sched, **state)   # 6. resume
    actor, critic = (wrap_model(m, run, args, rollouts=True) for m in (actor, critic))    # 7. DDP
    engine = create_rollout_engine(args, actor, tokenizer, run, "ppo")                     # --rollout_engine

    def refresh_old_actor(k):          # fa82707: after every --update_old_actor_freq-th actor update
        if optimizer_steps(actor_opt) % args.update_old_actor_freq == 0:
            old_actor.load_state_dict(unwrap(actor).state_dict())

    result = train_loop(run, args, actor, [actor_opt, critic_opt], prompts,   # 8. train: rollout, minibatch updates
                        rollout_fn=lambda batch: ppo_rollout(actor, old_actor, critic, ref_model, engine, run, args,
                                                             tokenizer, reward_fn, batch),
                        update_fn=lambda ro, k: ppo_update(actor, critic, args, ro, k), updates=updates,
                        on_update=refresh_old_actor if old_actor is not None else None,
                        lm_config=lm_config, tracker=tracker, start=start, collate_fn=rl_collate,
                        schedulers=[actor_sched, critic_sched], state=state)
    engine.update_policy(actor)                     # a rollout server ends on the trained policy (the last sync)
    return result


if __name__ == "__main__":
    cli(main)
