"""SPO (Xu et al. 2025, "Single-stream Policy Optimization"): one answer per prompt, judged against
a persistent, adaptive baseline instead of a group mean; REINFORCE on the log-probs plus a k3 KL
penalty to a frozen reference. Experimental in the original too.

    python trainer/train_spo.py                              # or: cd trainer && python train_spo.py
    torchrun --nproc_per_node 2 trainer/train_spo.py         # deepspeed --num_gpus=2 trainer/train_spo.py
    python trainer/train_spo.py --device cpu --hidden_size 64 --num_hidden_layers 2 --reasoning 0 \\
        --reward rule --max_gen_len 16 --max_steps 8         # tiny CPU run, seconds
Reads out/reason_<hidden>.pth (--reasoning 1) or out/full_sft_<hidden>.pth, prompts from
dataset/rlaif-mini.jsonl (the demo prompts when absent) and, with --reward model/mixed, the reward model.
Writes out/spo_<hidden>[_moe].pth, out/spo_<hidden>_metrics.jsonl and checkpoints/spo_<hidden>[_moe]_resume.pth
(policy, optimizer, scheduler and the value tracker, which the original did not save).

The baseline is the mean of a Beta(alpha, beta) belief about the normalised reward. After each
batch: alpha <- rho * alpha + r_mean, beta <- rho * beta + (1 - r_mean), where r_mean is the batch's
reward mapped to [0, 1] and the forgetting factor rho = clip(2^(-|m_old - m| / D_half), 0.5, 0.96)
shrinks when the policy moved (m = mean token log-prob of the batch). Advantage: A = clip(r - baseline, +-5).
The original mapped rewards with (r + 3) / 6 although reasoning rewards reach 4.5; here the reward's
real range is used ([-3, 3] for the reward model alone, as the original).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from model.cli import cli
from trainer.core.loop import train_loop
from trainer.core.rl import (Rewards, adamw_cosine, add_rl_args, base_weight,
                              completion_logps, frozen, k3_kl, masked_mean, rl_collate, rl_prompts, rollout)
from trainer.core.rollout_engine import create_rollout_engine
from trainer.core.tracking import init_tracker
from trainer.core.stage import DATA, build_parser, init_config, init_model, init_run, restore, wrap_model


class AutoAdaptiveValueTracker:
    """The persistent SPO baseline (the original's class and defaults); checkpointed via state_dict."""

    def __init__(self, rho_mode: str = "kl", rho_const: float = 0.9, D_half: float = 0.06, clip_lower: float = 0.5,
                 clip_upper: float = 0.96, reward_range=(-3.0, 3.0)):
        self.rho_mode, self.rho_const, self.D_half = rho_mode, rho_const, D_half
        self.clip_lower, self.clip_upper = clip_lower, clip_upper
        self.low, self.high = reward_range
        n_init = 1.0 / (1.0 - clip_lower)              # prior strength: 2 pseudo-observations
        self.alpha = self.beta = 0.5 * n_init          # prior mean 0.5
        self.old_mean_logprob = None

    def get_baseline(self) -> float:
        """The expected normalised reward, in [0, 1]."""
        return self.alpha / (self.alpha + self.beta)

    def baseline_reward(self) -> float:
        """The baseline in reward units."""
        return self.low + (self.high - self.low) * self.get_baseline()

    def update(self, rewards: torch.Tensor, cur_logprobs: torch.Tensor, masks: torch.Tensor) -> float:
        """Fold one batch into the tracker; returns the forgetting factor rho that was used."""
        mean_logprob = ((cur_logprobs * masks).sum() / masks.sum().clamp_min(1)).item()
        if self.rho_mode == "kl" and self.old_mean_logprob is not None:
            rho = 2 ** (-abs(self.old_mean_logprob - mean_logprob) / self.D_half)
            rho = min(max(rho, self.clip_lower), self.clip_upper)
        else:
            rho = self.rho_const
        self.old_mean_logprob = mean_logprob
        r = ((rewards.float() - self.low) / (self.high - self.low)).clamp(0, 1).mean().item()
        self.alpha = rho * self.alpha + r
        self.beta = rho * self.beta + (1 - r)
        return rho

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "old_mean_logprob": self.old_mean_logprob}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.beta, self.old_mean_logprob = state["alpha"], state["beta"], state["old_mean_logprob"]


def spo_loss(logp, ref_logp, adv, mask, beta: float):
    """REINFORCE on the token log-probs with a k3 KL penalty; -> (loss, mean kl)."""
    kl = k3_kl(logp, ref_logp)
    return masked_mean(-logp * adv.unsqueeze(1) + beta * kl, mask), masked_mean(kl, mask).detach()


def spo_rollout(model, ref_model, value_tracker, engine, run, args, tokenizer, reward_fn, batch):
    """One batch of prompts (no gradients): one answer each (sampled by --rollout_engine), its reward, its advantage
    over the tracker's baseline and the reference's log-probs."""
    roll = rollout(model, tokenizer, batch["prompt"], args, 1, run.autocast_ctx, engine)
    rewards, stats = reward_fn(batch["messages"], roll.texts, batch["reference"])
    baseline = value_tracker.baseline_reward()             # read before this batch updates it
    return {"roll": roll, "rewards": rewards, "adv": (rewards - baseline).clamp(-5, 5).to(run.device),
            "ref_logp": completion_logps(ref_model, roll)[0], "stats": {**stats, "baseline": baseline}}


def spo_update(model, value_tracker, args, ro):
    """The SPO loss of a rollout (returned for the loop); then the batch is folded into the tracker (SPO takes
    one update per rollout)."""
    roll, mask = ro["roll"], ro["roll"].completion_mask.float()
    logp, aux = completion_logps(model, roll)
    loss, kl = spo_loss(logp, ro["ref_logp"], ro["adv"], mask, args.beta)
    rho = value_tracker.update(ro["rewards"], logp.detach(), mask)
    return loss + aux, {**ro["stats"], "kl": kl.item(), "rho": rho,
                        "resp_len": roll.lengths.float().mean().item(), "tokens": int(roll.lengths.sum())}


def main(argv=None):
    parser = build_parser("MiniMind SPO", save_weight="spo", epochs=1, batch_size=2, learning_rate=1e-7,
                          accumulation_steps=4, log_interval=1, save_interval=10, max_seq_len=66,
                          data_path=DATA / "rlaif-mini.jsonl", demo_data="rlaif.jsonl", wandb_project="MiniMind-SPO")
    add_rl_args(parser, from_weight=None)
    parser.add_argument("--beta", type=float, default=0.02, help="weight of the k3 KL penalty to the reference")
    args = parser.parse_args(argv)
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args, base_weight(args))             # 2. model config + resume state
    tracker = init_tracker(args, ckp, f"MiniMind-SPO-Epoch-{args.epochs}-BS-{args.batch_size}-LR-{args.learning_rate}")
    model, tokenizer = init_model(lm_config, args, run.device, base_weight(args), stage="policy")   # 4. models
    reward_fn = Rewards(args.reward, bool(args.reasoning), args.rule_weight, args.reward_model_path, run.device)
    value_tracker = AutoAdaptiveValueTracker(reward_range=reward_fn.range)     # the persistent baseline
    ref_model = frozen(init_model(lm_config, args, run.device, base_weight(args), stage="reference")[0])
    prompts = rl_prompts(args, tokenizer)                             # 5. prompts and optimizer
    optimizer, scheduler = adamw_cosine(model.parameters(), args, run, len(prompts), args.learning_rate)
    start = restore(ckp, model, optimizer, run.scaler, scheduler=scheduler,    # 6. resume
                    value_tracker=value_tracker)
    model = wrap_model(model, run, args, rollouts=True)               # 7. DDP
    engine = create_rollout_engine(args, model, tokenizer, run, "spo")    # --rollout_engine: who samples
    result = train_loop(run, args, model, [optimizer], prompts,       # 8. train: rollout, then one update
                        rollout_fn=lambda batch: spo_rollout(model, ref_model, value_tracker, engine, run, args,
                                                             tokenizer, reward_fn, batch),
                        update_fn=lambda ro, k: spo_update(model, value_tracker, args, ro),
                        lm_config=lm_config, tracker=tracker, start=start, collate_fn=rl_collate,
                        schedulers=[scheduler], state={"value_tracker": value_tracker})
    engine.update_policy(model)                     # a rollout server ends on the trained policy (the last sync)
    return result


if __name__ == "__main__":
    cli(main)
