"""PPO (Schulman et al. 2017) for a chat model: an actor samples answers, a critic (a MiniMind body
with a value head) estimates how good each state is, the actor is pushed toward answers that beat
the critic's estimate with a clipped probability ratio, and a KL penalty keeps it near a frozen reference.

    python trainer/train_ppo.py                              # or: cd trainer && python train_ppo.py
    torchrun --nproc_per_node 2 trainer/train_ppo.py         # deepspeed --num_gpus=2 trainer/train_ppo.py
    python trainer/train_ppo.py --device cpu --hidden_size 64 --num_hidden_layers 2 --reasoning 0 \\
        --reward rule --max_gen_len 16 --max_steps 4         # tiny CPU run, seconds
Reads out/reason_<hidden>.pth (--reasoning 1) or out/full_sft_<hidden>.pth for the actor, the old actor,
the reference and the critic's body; prompts from dataset/rlaif-mini.jsonl (the demo prompts when absent);
with --reward model/mixed the reward model at ../internlm2-1_8b-reward. Writes out/ppo_actor_<hidden>[_moe].pth,
out/ppo_actor_<hidden>_metrics.jsonl and checkpoints/ppo_actor_<hidden>[_moe]_resume.pth (actor, critic,
both optimizers and schedulers, and the old actor, which the original did not restore).

--advantage gae (default, what the original's README describes): token-level. The critic gives V(s_t)
for the state before each completion token; the reward is paid on the last token (the EOS); GAE
(Schulman et al. 2016) with --gamma/--lam gives A_t, returns R_t = A_t + V(s_t) train the critic
(masked MSE), the ratio pi/pi_old is per token, and the KL to the reference is the per-token k3 estimate.
--advantage sequence (the original's code): one value per answer (the critic at the answer's last token),
A = r - V, the ratio is exp of the SUMMED log-ratio of the whole answer (it explodes easily), and the
KL term is the mean difference of summed log-probs. Both: loss = policy + vf_coef * value + kl_coef * kl.
The old actor is a copy of the actor refreshed after every --update_old_actor_freq-th optimizer step,
as the original (the loop's on_update hook; the resume file keeps it as refreshed).
Fixed here: the first generated token is in the response mask, the loss is divided by the accumulation
steps, prompts are truncated from the left, and the critic applies the final norm once.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F
from torch import nn

from model.cli import cli
from trainer.core.loop import train_loop, unwrap
from trainer.core.rl import (Rewards, adamw_cosine, add_rl_args, base_weight, completion_logps, frozen, k3_kl,
                              masked_mean, rl_collate, rl_prompts, rollout)
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


def ppo_losses(args, logp, old_logp, ref_logp, values, rewards, roll):
    """(policy loss, value loss, kl to the reference, mean advantage) for --advantage gae or sequence."""
    mask, p = roll.completion_mask.float(), roll.prompt_len
    clip = lambda ratio, a: -torch.min(ratio * a, ratio.clamp(1 - args.clip_epsilon, 1 + args.clip_epsilon) * a)
    if args.advantage == "gae":
        v = values[:, p - 1:-1]                                      # V(s_t): the state before completion token t
        token_rewards = torch.zeros_like(v).scatter(1, roll.last_index[:, None], rewards[:, None].to(v.dtype))
        adv, returns = gae(token_rewards, v.detach(), mask, args.gamma, args.lam)
        policy = masked_mean(clip(torch.exp(logp - old_logp), adv), mask)
        value = masked_mean((v - returns) ** 2, mask)
        return policy, value, masked_mean(k3_kl(logp, ref_logp), mask), (adv * mask).sum() / mask.sum()
    v = values.gather(1, (p + roll.last_index)[:, None]).squeeze(1)  # the critic after the whole answer
    adv = rewards - v.detach()
    seq = lambda x: (x * mask).sum(1)
    policy = clip(torch.exp(seq(logp) - seq(old_logp)), adv).mean()
    return policy, F.mse_loss(v, rewards), (seq(logp) - seq(ref_logp)).mean(), adv.mean()


def ppo_rollout(actor, old_actor, ref_model, run, args, tokenizer, reward_fn, batch):
    """One batch of prompts (no gradients): a sampled answer each, its reward, and the old actor's and the
    reference's log-probs."""
    roll = rollout(actor, tokenizer, batch["prompt"], args, 1, run.autocast_ctx)
    rewards, stats = reward_fn(batch["messages"], roll.texts, batch["reference"])
    return {"roll": roll, "rewards": rewards.to(run.device), "stats": stats,
            "old_logp": completion_logps(old_actor, roll)[0], "ref_logp": completion_logps(ref_model, roll)[0]}


def ppo_update(actor, critic, args, ro):
    """The PPO loss of a rollout (policy + value + KL), returned for the loop to back-propagate into the actor and
    the critic and to step both."""
    roll, old_logp = ro["roll"], ro["old_logp"]
    logp, aux = completion_logps(actor, roll)
    values, critic_aux = critic(roll.sequences, roll.attention_mask)
    policy, value, kl_ref, adv = ppo_losses(args, logp, old_logp, ro["ref_logp"], values.float(), ro["rewards"], roll)
    loss = policy + args.vf_coef * value + args.kl_coef * kl_ref + aux + critic_aux
    kl_old = ((logp.detach() - old_logp) * roll.completion_mask).sum(1).mean()
    return loss, {**ro["stats"], "policy_loss": policy.item(), "value_loss": value.item(), "kl": kl_old.item(),
                  "kl_ref": kl_ref.item(), "advantage": adv.item(), "resp_len": roll.lengths.float().mean().item(),
                  "tokens": int(roll.lengths.sum())}


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
    parser.add_argument("--update_old_actor_freq", type=int, default=4, help="optimizer steps between old-actor refreshes")
    parser.add_argument("--advantage", type=str, default="gae", choices=["gae", "sequence"],
                        help="gae = token-level values and GAE (README); sequence = the original code's r - V(answer)")
    parser.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    args = parser.parse_args(argv)
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args, base_weight(args))             # 2. model config + resume state
    tracker = init_tracker(args, ckp, f"MiniMind-PPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    load = lambda stage: init_model(lm_config, args, run.device, base_weight(args), stage=stage)   # 4. models:
    actor, tokenizer = load("actor")                                  # actor, old actor, reference, critic
    old_actor, ref_model = frozen(load("old actor")[0]), frozen(load("reference")[0])
    critic = CriticModel(load("critic body")[0].model).to(run.device)
    reward_fn = Rewards(args.reward, bool(args.reasoning), args.rule_weight, args.reward_model_path, run.device)
    prompts = rl_prompts(args, tokenizer)                             # 5. prompts and optimizers
    actor_opt, actor_sched = adamw_cosine(actor.parameters(), args, run, len(prompts), args.learning_rate)
    critic_opt, critic_sched = adamw_cosine(critic.parameters(), args, run, len(prompts), args.critic_learning_rate)
    state = {"critic_model": critic, "critic_optimizer": critic_opt, "critic_scheduler": critic_sched,
             "old_actor": old_actor}
    start = restore(ckp, actor, actor_opt, run.scaler, scheduler=actor_sched, **state)   # 6. resume
    actor, critic = (wrap_model(m, run, args, rollouts=True) for m in (actor, critic))    # 7. DDP

    def refresh_old_actor(k):          # after every --update_old_actor_freq-th actor update, as the original
        if optimizer_steps(actor_opt) % args.update_old_actor_freq == 0:
            old_actor.load_state_dict(unwrap(actor).state_dict())

    return train_loop(run, args, actor, [actor_opt, critic_opt], prompts,   # 8. train: rollout, update, refresh
                      rollout_fn=lambda batch: ppo_rollout(actor, old_actor, ref_model, run, args, tokenizer,
                                                           reward_fn, batch),
                      update_fn=lambda ro, k: ppo_update(actor, critic, args, ro), on_update=refresh_old_actor,
                      lm_config=lm_config, tracker=tracker, start=start, collate_fn=rl_collate,
                      schedulers=[actor_sched, critic_sched], state=state)


if __name__ == "__main__":
    cli(main)
