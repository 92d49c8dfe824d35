"""GRPO (Shao et al. 2024, DeepSeekMath): sample G answers per prompt, score them, and push up the
answers that beat their group's mean reward; no critic, a k3 KL penalty to a frozen reference. The policy
term is CISPO's (the original's newest default) or GRPO's clipped ratio (--loss_type).

    python trainer/train_grpo.py                             # or: cd trainer && python train_grpo.py
    torchrun --nproc_per_node 2 trainer/train_grpo.py        # deepspeed --num_gpus=2 trainer/train_grpo.py
    python trainer/train_grpo.py --device cpu --hidden_size 64 --num_hidden_layers 2 --reasoning 0 \\
        --reward rule --max_gen_len 16 --num_generations 4 --max_steps 4       # tiny CPU run, seconds
    python trainer/train_grpo.py --rollout_engine sglang --sglang_base_url http://127.0.0.1:8998   # rollouts on a server
Reads out/reason_<hidden>.pth (--reasoning 1) or out/full_sft_<hidden>.pth (--reasoning 0), prompts from
dataset/rlaif-mini.jsonl (the demo prompts when absent) and, with --reward model/mixed, the reward model
at ../internlm2-1_8b-reward. Writes out/grpo_<hidden>[_moe].pth, out/grpo_<hidden>_metrics.jsonl and
checkpoints/grpo_<hidden>[_moe]_resume.pth (policy, optimizer, scheduler).

Advantages (as fa82707): A = clip((r - mean_group) / (std_group + 1e-4), +-10) with the unbiased
group std, then renormalised over the whole batch (--batch_adv_norm 0 turns that off). minimind-3 (as the
original's newest code): A = (r - mean_group) / (biased std_group + 1e-4), no clamp, no renormalisation. With ratio =
pi / pi_old per token and kl the k3 estimate to the reference, the loss per token is
  --loss_type cispo (default): -(stop_grad(min(ratio, --epsilon_high)) * A * log pi - beta * kl)
  --loss_type grpo:            -(min(ratio * A, clip(ratio, 1 +- --epsilon) * A) - beta * kl)
both averaged over each completion's tokens (up to and including its EOS), then over completions (the
original's reduction for both). With --num_iterations 1 (the original) pi_old = stop_grad(pi), the ratio is 1
and both are the plain policy gradient -A * grad log pi (the same update, different loss values); with
--rollout_engine sglang/openai pi_old is the rollout server's (its weights synced every --save_interval rollouts,
trainer/core/rollout_engine.py), and the ratio corrects for its lag; with N > 1
the same rollout is reused for N optimizer steps against the rollout-time log-probs: GRPO's clip then zeroes
the gradient of a token whose ratio left 1 +- epsilon in the direction its advantage pushes, CISPO keeps every
token's gradient and caps its weight. Each of the N steps is the loop's guarded optimizer step (a non-finite one
is skipped and counted); the scheduler steps once per rollout (its length counts optimizer steps at
--num_iterations 1).
minimind-3 (its tokenizer): --thinking_ratio of the prompts open a think block (dataset/lm_dataset.RLAIFDataset),
and the rewards add the original's newest think-aware rules (dataset/scoring.think_reward; trainer/core/rl.Rewards).
Logged: ratio_clip (the share of tokens whose ratio was clipped), the fraction of groups whose rewards are all
equal (no learning signal) and of completions cut at --max_gen_len without an EOS.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from dataset.lm_dataset import is_minimind3_tokenizer
from model.cli import cli
from trainer.core.loop import train_loop
from trainer.core.rl import (Rewards, adamw_cosine, add_rl_args, base_weight, check_rl_args, completion_logps, frozen,
                              k3_kl, masked_mean, old_or, rl_collate, rl_prompts, rollout, rollout_logps)
from trainer.core.rollout_engine import create_rollout_engine
from trainer.core.tracking import init_tracker
from trainer.core.stage import DATA, build_parser, init_config, init_model, init_run, restore, wrap_model


def group_advantages(rewards: torch.Tensor, group: int, batch_norm: bool = True, eps: float = 1e-4,
                     clip: float = 10.0, newest: bool = False) -> torch.Tensor:
    """(B*G,) rewards, copies of a prompt contiguous -> (B*G,) group-normalised advantages. newest=True (minimind-3):
    the original's newest (r - mean) / (biased std + 1e-4), no clamp (and no batch renormalisation by default)."""
    r = rewards.view(-1, group)
    if newest:
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)
    else:
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).clamp(-clip, clip).view(-1)
    if batch_norm:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


def grpo_loss(logp, old_logp, ref_logp, adv, mask, beta: float, epsilon: float):
    """GRPO's clipped-ratio policy gradient with a k3 KL penalty, per token: -(min(ratio * A, clip(ratio, 1 +- eps)
    * A) - beta * kl), token mean per completion, then mean.
    -> (loss, mean kl, share of tokens with |ratio - 1| > eps)."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    surrogate = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    kl = k3_kl(logp, ref_logp)
    loss = masked_mean(-(surrogate - beta * kl), mask)
    clipped = masked_mean(((ratio - 1).abs() > epsilon).float(), mask)
    return loss, masked_mean(kl, mask).detach(), clipped.detach()


def cispo_loss(logp, old_logp, ref_logp, adv, mask, beta: float, epsilon_high: float):
    """CISPO (MiniMax-M1, 2025): REINFORCE with a clipped, detached importance weight, per token:
    -(stop_grad(min(ratio, eps_high)) * A * logp - beta * kl), token mean per completion, then mean. Unlike
    GRPO's clip, no token loses its gradient; a far off-policy one only gets a capped weight.
    -> (loss, mean kl, share of tokens with ratio > eps_high)."""
    ratio = torch.exp(logp - old_logp)
    weight = ratio.clamp(max=epsilon_high).detach()
    kl = k3_kl(logp, ref_logp)
    loss = masked_mean(-(weight * adv.unsqueeze(1) * logp - beta * kl), mask)
    clipped = masked_mean((ratio > epsilon_high).float(), mask)
    return loss, masked_mean(kl, mask).detach(), clipped.detach()


def grpo_rollout(model, ref_model, engine, run, args, tokenizer, reward_fn, batch):
    """One batch of prompts (no gradients): G sampled answers each (by --rollout_engine), their rewards, group
    advantages and the reference's log-probs; the rollout-time log-probs the ratio is taken against: a rollout
    server's, and with --num_iterations N > 1 the policy's where there are none."""
    group = args.num_generations
    roll = rollout(model, tokenizer, batch["prompt"], args, group, run.autocast_ctx, engine)
    rep = lambda xs: [x for x in xs for _ in range(group)]
    rewards, stats = reward_fn(rep(batch["messages"]), roll.texts, rep(batch["reference"]))
    r = rewards.view(-1, group)
    stats = {**stats, "zero_std": (r.max(1).values == r.min(1).values).float().mean().item(),
             "truncated": roll.clipped.float().mean().item(), "resp_len": roll.lengths.float().mean().item(),
             "tokens": int(roll.lengths.sum())}
    newest = args.model_family == "minimind3"
    batch_norm = bool(args.batch_adv_norm if args.batch_adv_norm is not None else not newest)
    return {"roll": roll, "adv": group_advantages(rewards, group, batch_norm, newest=newest).to(run.device),
            "ref_logp": completion_logps(ref_model, roll)[0], "stats": stats,
            "old_logp": rollout_logps(model, roll, args.num_iterations > 1)}


def grpo_update(model, args, ro, k):
    """Update k of a rollout: the CISPO or GRPO loss of the current policy (with N = 1 and the torch engine the
    ratio is pi / stop_grad(pi) == 1), returned for the loop to back-propagate and step."""
    logp, aux = completion_logps(model, ro["roll"])
    old_logp = old_or(ro["old_logp"], logp)
    policy_loss, clip = (cispo_loss, args.epsilon_high) if args.loss_type == "cispo" else (grpo_loss, args.epsilon)
    loss, kl, clip_frac = policy_loss(logp, old_logp, ro["ref_logp"], ro["adv"], ro["roll"].completion_mask.float(),
                                      args.beta, clip)
    return loss + aux, {**ro["stats"], "kl": kl.item(), "ratio_clip": clip_frac.item()}


def main(argv=None):
    parser = build_parser("MiniMind GRPO", save_weight="grpo", epochs=1, batch_size=2, learning_rate=8e-8,
                          accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path=DATA / "rlaif-mini.jsonl", demo_data="rlaif.jsonl", wandb_project="MiniMind-GRPO")
    add_rl_args(parser, from_weight=None)
    parser.add_argument("--num_generations", type=int, default=8, help="completions sampled per prompt (G >= 2)")
    parser.add_argument("--beta", type=float, default=0.02, help="weight of the k3 KL penalty to the reference")
    parser.add_argument("--num_iterations", type=int, default=1,
                        help="optimizer steps per rollout (1 = the original's single on-policy update)")
    parser.add_argument("--loss_type", type=str, default="cispo", choices=["grpo", "cispo"],
                        help="cispo = clipped, detached importance weight times log-prob (the original's newest "
                             "default); grpo = PPO-style clipped ratio")
    parser.add_argument("--epsilon", "--clip_epsilon", type=float, default=0.2, dest="epsilon",
                        help="grpo: ratio clip range 1 +- epsilon (matters when num_iterations > 1)")
    parser.add_argument("--epsilon_high", type=float, default=5.0,
                        help="cispo: cap on the importance weight (matters when num_iterations > 1)")
    parser.add_argument("--batch_adv_norm", type=int, default=None, choices=[0, 1],
                        help="1 = renormalise group advantages over the batch (fa82707, the default); 0 = group only "
                             "(the default with --model_family minimind3, as the original's newest code)")
    args = parser.parse_args(argv)
    if args.num_iterations < 1:
        raise ValueError("--num_iterations must be at least 1 (optimizer steps per rollout)")
    if args.num_generations < 2:
        raise ValueError("--num_generations must be at least 2 (the group baseline needs two answers)")
    if not (args.epsilon > 0 and args.epsilon_high > 0):
        raise ValueError(f"--epsilon and --epsilon_high must be positive, got {args.epsilon} and {args.epsilon_high}")
    check_rl_args(args)
    if args.num_iterations > 1 and args.accumulation_steps > 1:
        raise ValueError("--num_iterations > 1 takes one optimizer step per iteration: use --accumulation_steps 1")
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args, base_weight(args))             # 2. model config + resume state
    tracker = init_tracker(args, ckp, f"MiniMind-GRPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    model, tokenizer = init_model(lm_config, args, run.device, base_weight(args), stage="policy")   # 4. models
    ref_model = frozen(init_model(lm_config, args, run.device, base_weight(args), stage="reference")[0])
    reward_fn = Rewards(args.reward, bool(args.reasoning), args.rule_weight, args.reward_model_path, run.device,
                        think_rules=is_minimind3_tokenizer(tokenizer))
    prompts = rl_prompts(args, tokenizer)                             # 5. prompts and optimizer
    optimizer, scheduler = adamw_cosine(model.parameters(), args, run, len(prompts), args.learning_rate)
    start = restore(ckp, model, optimizer, run.scaler, scheduler=scheduler)     # 6. resume
    model = wrap_model(model, run, args, rollouts=True)               # 7. DDP
    engine = create_rollout_engine(args, model, tokenizer, run, "grpo")   # --rollout_engine: who samples
    result = train_loop(run, args, model, [optimizer], prompts,       # 8. train: rollout, then N updates
                        rollout_fn=lambda batch: grpo_rollout(model, ref_model, engine, run, args, tokenizer,
                                                              reward_fn, batch),
                        update_fn=lambda ro, k: grpo_update(model, args, ro, k), updates=args.num_iterations,
                        lm_config=lm_config, tracker=tracker, start=start, collate_fn=rl_collate,
                        schedulers=[scheduler])
    engine.update_policy(model)                     # a rollout server ends on the trained policy (the last sync)
    return result


if __name__ == "__main__":
    cli(main)
