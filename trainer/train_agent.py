"""Agentic RL (the original minimind-3's train_agent.py, spec 4.6): GRPO or CISPO where every rollout is a
tool-use dialogue. The policy answers; each `<tool_call>{json}</tool_call>` it writes is executed, the results
come back as `tool` messages, and it goes on, up to --max_turns turns; the trajectory is then scored (found the
expected values? called the right number of tools? finished?) and compared with the other --num_generations
trajectories of its prompt.

    python trainer/train_agent.py --model_family minimind3       # out/full_sft_768.pth -> out/agent_768.pth
    torchrun --nproc_per_node 2 trainer/train_agent.py            # deepspeed --num_gpus=2 trainer/train_agent.py
    python trainer/train_agent.py --device cpu --hidden_size 64 --num_hidden_layers 2 --reward rule \\
        --max_gen_len 16 --max_total_len 1024 --max_steps 2       # tiny CPU run (after a tiny full_sft_64.pth)
    python trainer/train_agent.py --rollout_engine sglang --sglang_base_url http://127.0.0.1:8998   # rollouts on a server
Reads out/full_sft_<hidden>.pth, dataset/agent_rl.jsonl (the demo's dataset/demo/agent_rl.jsonl when absent; format:
dataset/agent_dataset.py) and, with --reward model/mixed, the reward model at ../internlm2-1_8b-reward. Writes
out/agent_<hidden>[_moe].pth, out/agent_<hidden>_metrics.jsonl and checkpoints/agent_<hidden>[_moe]_resume.pth; with
an HTTP rollout engine (trainer/core/rollout_engine.py) also the policy, as a transformers folder, in
--sglang_shared_path.

A rollout, per trajectory (agent_rollouts): the prompt is rendered by the model's chat template with the sample's
tools and `open_thinking` on with probability --thinking_ratio (drawn from (seed, epoch, sample, generation), so a
resumed run draws the same); the policy samples a turn (temperature, top-k 50, top-p 0.85, as the original's
generate) from the token ids so far; the turn's tool calls run in a child process (dataset/tools.py ToolRunner:
time and output limits, no network; a tool that raises, loops, floods its output or returns what JSON cannot hold
becomes an `{"error": ...}` observation, and only the tools the sample offers run). The token sequence is built as
it was sampled: the sampled ids (policy tokens, mask 1, the EOS included), then the observation ids (mask 0): the
text the template puts between the end of the turn and the next generation point, taken as the difference of two
renderings (the conversation closed after the turn, and the one with the tool results and a new generation
prompt). The original instead re-renders the whole conversation and assumes its tokens extend the sampled ones
([OBS] in the spec); when they do not (the template normalises think blocks and leading newlines; BPE may
tokenize a sampled text differently) only the appended part is tokenized here, and `realigned` counts it.
Differences from the original, all deliberate: the sampled EOS is a policy token (the original drops it from
the sampled ids and trains no turn ending); no turn goes past --max_total_len (each turn may sample what is left;
the original truncates the finished sequence from the left, prompt first); a trajectory whose tool results leave
no room is `unfinished` like one that called tools in its last turn, whose calls are not executed (their results
would only follow the last policy token); and the reward model (or, offline, --reward rule) is used as below.

Rewards (the original's calculate_rewards, trajectory_reward), clipped to [-3, 3]: -0.5 per unbalanced
<tool_call> tag; without tool calls: +-0.5 length, the think-block terms, the reward-model score of the answer
(--reward model; --reward rule instead gives --rule_weight times the share of `gt` values the answer states, and
mixed both), minus the repetition penalty; with tool calls: +0.5 when the valid calls (an offered tool, arguments
passing its check) match len(gt) (else -0.5 per call off), +2.5 times the share of `gt` values in the final
answer, -0.5 when unfinished, minus the repetition penalty.
Advantages: (r - group mean) / (group std, biased, + 1e-4). Loss per policy token (agent_loss, spec 4.5 step 7):
CISPO (default) -(stop_grad(min(ratio, eps_high)) * A * log p - beta * k3), GRPO -(min(ratio * A, clip(ratio,
1 +- eps) * A) - beta * k3); averaged over each trajectory's policy tokens, then over trajectories. The old
log-probs are the policy's own with the torch engine (one update per rollout: ratio 1, as the original up to its
bf16 noise); an HTTP engine's are the server's when it returns them (its weights lag up to --save_interval steps,
which the ratio corrects), else the policy's, recomputed locally (ratio 1: the staleness is then not corrected).
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import math
import random
from dataclasses import dataclass, field

import torch

from dataset.agent_dataset import AgentRLDataset, agent_collate
from dataset.scoring import rep_penalty
from dataset.tools import (DEFAULT_TIMEOUT, ToolRunner, call_parts, check_args, is_error, parse_arguments,
                           parse_tool_calls, validate_gt_in_text)
from model.chat_format import END_THINK, END_TOOL_CALL, TOOL_CALL
from model.cli import cli
from model.engine import HF_TOP_K, SamplingParams
from model.loading import ROOT
from trainer.core.batch_plan import BatchPlan
from trainer.core.loop import train_loop
from trainer.core.progress import Logger, is_main_process
from trainer.core.rl import MINIMIND3_TOP_P, RewardModel, adamw_cosine, frozen, k3_kl, token_logps
from trainer.core.rollout_engine import add_rollout_args, create_rollout_engine
from trainer.core.stage import DATA, build_parser, init_config, init_model, init_run, resolve_data, restore, wrap_model
from trainer.core.tracking import init_tracker


# ---- rewards ----
def trajectory_reward(turns: list, tools, gt: list, unfinished: bool) -> tuple:
    """The original's calculate_rewards for one trajectory (turns: the decoded text of each turn), without the
    reward-model term: (reward so far, answer), where answer is the text the reward model scores when no tool was
    called and None otherwise. The caller adds the score and clips to [-3, 3]."""
    response = turns[-1] if turns else ""
    answers = [t.split(END_THINK, 1)[-1].strip() if END_THINK in t else t.strip() for t in turns]
    answer = answers[-1] if answers else response.strip()
    calls = [call for a in answers for call in parse_tool_calls(a)]
    reward = -0.5 * sum(abs(a.count(TOOL_CALL) - a.count(END_TOOL_CALL)) for a in answers)   # tag balance
    if not calls:
        reward += 0.5 if 5 <= len(response.strip()) <= 800 else -0.5                          # length
        if END_THINK in response:
            think, answer = response.split(END_THINK, 1)
            reward += 1.0 if 20 <= len(think.strip()) <= 300 else -0.5                         # think length
            reward += 0.25 if response.count(END_THINK) == 1 else -0.25                        # think closed once
            answer = answer.strip()
        return reward - rep_penalty(answer), answer
    offered = {t["function"]["name"] for t in tools or []}
    valid = sum(name in offered and check_args(name, parse_arguments(raw)) for name, raw in map(call_parts, calls))
    gap = abs(valid - len(gt)) + (len(calls) - valid)
    reward += 0.5 if gap == 0 else -0.5 * gap                                                  # tool count
    final = "" if unfinished else (answer.split(END_TOOL_CALL)[-1] if END_TOOL_CALL in answer else answer)
    if gt:
        reward += 2.5 * len(validate_gt_in_text(final, gt)) / len(gt)                          # gt hits
    if unfinished:
        reward -= 0.5
    return reward - rep_penalty(final or answer), None


def agent_rewards(trajs: list, gts: list, kind: str, rule_weight: float, reward_model=None) -> torch.Tensor:
    """(N,) rewards of the trajectories (gts: each one's expected values). Trajectories without tool calls get the
    reward model's score of their answer to the sample's conversation (--reward model, clipped to [-3, 3] as the
    original), or rule_weight times the share of gt values the answer states (rule), or both (mixed)."""
    parts = [trajectory_reward(t.turns, t.tools, gt, t.unfinished) for t, gt in zip(trajs, gts)]
    rewards = torch.tensor([r for r, _ in parts], dtype=torch.float)
    scored = [i for i, (_, answer) in enumerate(parts) if answer is not None]
    if scored and kind in ("rule", "mixed"):
        rewards[scored] += torch.tensor([rule_weight * len(validate_gt_in_text(parts[i][1], gts[i])) / len(gts[i])
                                         if gts[i] else 0.0 for i in scored])
    if scored and reward_model is not None:
        conversations = [[m for m in trajs[i].prompt_messages if m["role"] in ("system", "user", "assistant")]
                         + [{"role": "assistant", "content": parts[i][1]}] for i in scored]
        rewards[scored] += reward_model.score(conversations).float().clamp(-3, 3)
    return rewards.clamp(-3, 3)


# ---- multi-turn rollouts ----
@dataclass
class Trajectory:
    prompt_messages: list  # the sample's conversation
    tools: list | None
    thinking: bool         # open_thinking of every rendering
    ids: list              # the prompt, then each turn's sampled ids and the observation ids after it
    policy: list           # 1 where ids[i] was sampled by the policy, 0 for prompt and observation tokens
    old_logps: list        # the sampling weights' log-prob of each policy token (nan: unknown, or not a policy token)
    rendered: str          # the chat template's text at the current generation point
    prompt_len: int
    messages: list = field(default_factory=list)   # the conversation so far: the sample's, then assistant/tool turns
    turns: list = field(default_factory=list)      # the decoded text of each turn (special tokens skipped)
    unfinished: bool = False                       # it called tools and got no turn to answer with their results
    tool_calls: int = 0
    tool_errors: int = 0
    realigned: int = 0     # turns after which re-rendering the conversation does not give the sampled ids


def render(tokenizer, messages: list, tools, thinking: bool, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         tools=tools or None, open_thinking=thinking)


def turn_end(tokenizer) -> str:
    """The text the chat template closes an assistant turn with ('<|im_end|>\\n' in both families' templates)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "QZX"}],
                                         tokenize=False)
    return text[text.rindex("QZX") + 3:]


def observation_ids(tokenizer, traj: Trajectory, text: str, observations: list, sampled_eos: bool,
                    end_text: str) -> list:
    """Add the turn `text` and its tool results to traj.messages; return the ids of what the template puts between
    the sampled turn and the next generation point (the turn's end, the tool results, the new generation prompt).
    When the closed conversation does not start with the text the turn was sampled from (the template rewrote the
    turn) the turn still ends with `end_text`, and only the appended part is tokenized. A sampled EOS already holds
    the turn end's first token."""
    traj.messages.append({"role": "assistant", "content": text})
    closed = render(tokenizer, traj.messages, traj.tools, traj.thinking, False)
    traj.messages += [{"role": "tool", "content": o} for o in observations]
    nxt = render(tokenizer, traj.messages, traj.tools, traj.thinking, True)
    if not nxt.startswith(closed):
        raise ValueError("the chat template renders a conversation's earlier turns differently once tool results "
                         "follow them: multi-turn rollouts need a template that only appends")
    head = traj.rendered + text
    tail = closed[len(head):] if closed.startswith(head) else end_text
    if sampled_eos and tail.startswith(tokenizer.eos_token):
        tail = tail[len(tokenizer.eos_token):]
    obs = tokenizer(tail + nxt[len(closed):], add_special_tokens=False).input_ids
    if tokenizer(nxt, add_special_tokens=False).input_ids != traj.ids + obs:   # what the original would have trained on
        traj.realigned += 1
    traj.rendered = nxt
    return obs


def thinking_on(seed: int, epoch: int, index: int, generation: int, ratio: float) -> bool:
    """open_thinking of one trajectory: a draw of its own (string seeds hash the same in every process)."""
    return random.Random(f"agent-thinking:{seed}:{epoch}:{index}:{generation}").random() < ratio


def agent_rollouts(engine, tokenizer, runner, batch: dict, args, thinking: list, seeds: list) -> list:
    """The trajectories of a batch of samples, --num_generations per sample (copies contiguous), generated turn by
    turn: every trajectory still going samples its next turn in one engine call."""
    end_text, eos = turn_end(tokenizer), tokenizer.eos_token_id
    trajs = []
    for i, (messages, tools, where) in enumerate(zip(batch["messages"], batch["tools"], batch["where"])):
        for j in range(args.num_generations):
            on = thinking[i * args.num_generations + j]
            text = render(tokenizer, messages, tools, on, True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) >= args.max_total_len:
                raise ValueError(f"{where}: the prompt has {len(ids)} tokens and --max_total_len {args.max_total_len} "
                                 "leaves no room to answer: raise --max_total_len or shorten the sample")
            trajs.append(Trajectory(messages, tools, on, ids, [0] * len(ids), [math.nan] * len(ids), text, len(ids),
                                    messages=[dict(m) for m in messages]))
    active = list(range(len(trajs)))
    with engine.session(len(trajs)) as generate:
        for turn in range(args.max_turns):
            if not active:
                break
            outs = generate([trajs[k].ids for k in active],
                            [SamplingParams(max_tokens=min(args.max_gen_len, args.max_total_len - len(trajs[k].ids)),
                                            temperature=args.temperature, top_k=HF_TOP_K, top_p=MINIMIND3_TOP_P,
                                            seed=seeds[k][turn]) for k in active])
            going = []
            for k, out in zip(active, outs):
                t = trajs[k]
                t.ids += out.ids
                t.policy += [1] * len(out.ids)
                t.old_logps += out.logps if out.logps is not None else [math.nan] * len(out.ids)
                text = tokenizer.decode(out.ids, skip_special_tokens=True)
                t.turns.append(text)
                calls = parse_tool_calls(text)
                if not calls:
                    continue
                if turn == args.max_turns - 1:
                    t.unfinished = True
                    continue
                allowed = {tool["function"]["name"] for tool in t.tools or []}
                observations = [runner.run_call(call, allowed) for call in calls]
                t.tool_calls += len(calls)
                t.tool_errors += sum(map(is_error, observations))
                obs = observation_ids(tokenizer, t, text, observations, bool(out.ids) and out.ids[-1] == eos, end_text)
                if len(t.ids) + len(obs) >= args.max_total_len:
                    t.unfinished = True
                    continue
                t.ids += obs
                t.policy += [0] * len(obs)
                t.old_logps += [math.nan] * len(obs)
                going.append(k)
            active = going
    return trajs


# ---- loss ----
def agent_loss(logp, old_logp, ref_logp, adv, mask, loss_type: str, beta: float, epsilon: float,
               epsilon_high: float):
    """CISPO or GRPO with a k3 KL penalty (spec 4.5 step 7), per policy token (mask 1); the mean over each
    trajectory's policy tokens, then over trajectories with any (0 when none has). -> (loss, mean k3 over tokens).
    Positions off the mask are neutralised first (ratio 1, KL 0), so nothing there can turn the loss into NaN."""
    on = mask > 0
    ref_logp = torch.where(on, ref_logp, logp.detach())
    old_logp = torch.where(on, old_logp, logp.detach())
    kl = k3_kl(logp, ref_logp)
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    if loss_type == "cispo":     # the ratio only weights the log-prob gradient: clipped from above, never zeroed
        per_token = -(ratio.clamp(max=epsilon_high).detach() * a * logp - beta * kl)
    else:
        per_token = -(torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a) - beta * kl)
    counts = mask.sum(1)
    valid = counts > 0
    if not bool(valid.any()):
        return per_token.sum() * 0.0, kl.detach().sum() * 0.0
    loss = ((per_token * mask).sum(1)[valid] / counts[valid]).mean()
    return loss, ((kl * mask).sum() / counts.sum()).detach()


def trajectory_logps(model, ids, attention_mask, start: int):
    """log p of ids[:, start:] given what precedes them (only positions from `start` through the LM head).
    -> ((N, T - start) fp32, MoE aux loss)."""
    out = model(ids, attention_mask=attention_mask, logits_to_keep=ids.shape[1] - start + 1)
    return token_logps(out.logits[:, :-1], ids[:, start:]), out.aux_loss


class EpochClock:
    """The epoch of each rollout: the loop calls the rollout once per micro-batch, in order, from its resume point."""

    def __init__(self, start, per_epoch: int):
        self.done, self.per_epoch = start.epoch * per_epoch + start.step, max(1, per_epoch)

    def tick(self) -> int:
        epoch, self.done = self.done // self.per_epoch, self.done + 1
        return epoch


def pack(trajs: list, pad_id: int, device):
    """Trajectories -> (ids, attention_mask), (N, T) right-padded, and from column `start` (the shortest prompt's
    length: no policy token comes earlier) on, the policy mask and the sampling log-probs (nan: unknown) of each
    position. -> (ids, attention, mask, old_logps, start)."""
    n, width = len(trajs), max(len(t.ids) for t in trajs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention, policy, old = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width), torch.full((n, width), math.nan)
    for row, t in enumerate(trajs):
        length = len(t.ids)
        ids[row, :length], attention[row, :length] = torch.tensor(t.ids), 1
        policy[row, :length], old[row, :length] = torch.tensor(t.policy, dtype=torch.float), torch.tensor(t.old_logps)
    start = min(t.prompt_len for t in trajs)
    return ids.to(device), attention.to(device), policy[:, start:].to(device), old[:, start:].to(device), start


# ---- one step: rollout, then update ----
def agent_rollout(model, ref_model, engine, runner, tokenizer, reward_model, clock, run, args, batch):
    """No gradients: the trajectories of a batch, their rewards and group advantages, and the reference's log-probs."""
    engine.prepare(model)
    group = args.num_generations
    n = len(batch["messages"]) * group
    seeds = torch.randint(2 ** 62, (n, args.max_turns)).tolist()   # drawn whatever happens: a resumed run draws the same
    epoch = clock.tick()
    thinking = [thinking_on(args.seed, epoch, index, j, args.thinking_ratio)
                for index in batch["index"] for j in range(group)]
    trajs = agent_rollouts(engine, tokenizer, runner, batch, args, thinking, seeds)
    gts = [gt for gt in batch["gt"] for _ in range(group)]
    rewards = agent_rewards(trajs, gts, args.reward, args.rule_weight, reward_model)
    r = rewards.view(-1, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)
    ids, attention, mask, old, start = pack(trajs, tokenizer.pad_token_id, run.device)
    if args.debug_mode and is_main_process() and clock.done % args.debug_interval == 0:
        for t, reward in zip(trajs[:group], rewards):
            Logger(f"[debug] reward {reward:.3f}, gt {batch['gt'][0]}:\n{tokenizer.decode(t.ids)}\n" + "-" * 60)
    stats = {"reward": rewards.mean().item(), "zero_std": (r.max(1).values == r.min(1).values).float().mean().item(),
             "turns": sum(len(t.turns) for t in trajs) / n, "tool_calls": sum(t.tool_calls for t in trajs) / n,
             "tool_errors": sum(t.tool_errors for t in trajs) / max(1, sum(t.tool_calls for t in trajs)),
             "unfinished": sum(t.unfinished for t in trajs) / n, "realigned": sum(t.realigned for t in trajs) / n,
             "resp_len": mask.sum().item() / n, "tokens": int(mask.sum().item())}
    return {"ids": ids, "attention": attention, "start": start, "mask": mask, "adv": adv.to(run.device),
            "old_logp": None if bool(torch.isnan(old).all()) else old,
            "ref_logp": trajectory_logps(ref_model, ids, attention, start)[0], "stats": stats}


def agent_update(model, args, ro):
    """The loss of the current policy on a rollout; old log-probs the rollout did not give are the policy's own."""
    logp, aux = trajectory_logps(model, ro["ids"], ro["attention"], ro["start"])
    old = logp.detach()
    if ro["old_logp"] is not None:
        old = torch.where(torch.isnan(ro["old_logp"]), old, ro["old_logp"])
    loss, kl = agent_loss(logp, old, ro["ref_logp"], ro["adv"], ro["mask"], args.loss_type, args.beta, args.epsilon,
                          args.epsilon_high)
    return loss + aux, {**ro["stats"], "kl": kl}


def main(argv=None):
    parser = build_parser("MiniMind Agent RL", save_weight="agent", from_weight="full_sft", epochs=1, batch_size=2,
                          learning_rate=3e-7, accumulation_steps=1, log_interval=1, save_interval=10, max_seq_len=1024,
                          data_path=DATA / "agent_rl.jsonl", demo_data="agent_rl.jsonl", wandb_project="MiniMind-Agent-RL")
    parser.add_argument("--max_gen_len", type=int, default=768, help="max new tokens per turn")
    parser.add_argument("--max_total_len", type=int, default=2500,
                        help="max tokens of a whole trajectory (prompt, turns, tool results); --max_seq_len is not used")
    parser.add_argument("--max_turns", type=int, default=3, help="max policy turns per trajectory (the original's 3)")
    parser.add_argument("--num_generations", type=int, default=4, help="trajectories sampled per prompt (G >= 2)")
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the k3 KL penalty to the reference")
    parser.add_argument("--loss_type", type=str, default="cispo", choices=["grpo", "cispo"], help="policy loss")
    parser.add_argument("--epsilon", type=float, default=0.2, help="GRPO ratio clip range")
    parser.add_argument("--epsilon_high", type=float, default=5.0, help="CISPO upper bound of the ratio weight")
    parser.add_argument("--thinking_ratio", type=float, default=0.1, help="probability of open_thinking per trajectory")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the rollouts")
    parser.add_argument("--reward", type=str, default="model", choices=["model", "rule", "mixed"],
                        help="what scores answers given without tools: model = reward model (original); rule = "
                             "share of the row's gt values stated (offline); mixed = both")
    parser.add_argument("--rule_weight", type=float, default=1.0, help="rule score for stating every gt value")
    parser.add_argument("--reward_model_path", type=str, default=str(ROOT.parent / "internlm2-1_8b-reward"),
                        help="local reward model directory (InternLM2 get_score or a sequence classifier)")
    parser.add_argument("--tool_timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds of wall time per tool call before it becomes an error observation")
    parser.add_argument("--debug_mode", action="store_true", help="print the first prompt's trajectories")
    parser.add_argument("--debug_interval", type=int, default=20, help="rollouts between --debug_mode prints")
    add_rollout_args(parser)                                          # --rollout_engine torch|sglang|openai ...
    args = parser.parse_args(argv)
    if args.num_generations < 2:
        raise ValueError("--num_generations must be at least 2 (the group baseline needs two trajectories)")
    if args.max_turns < 1 or args.max_gen_len < 1:
        raise ValueError("--max_turns and --max_gen_len must be at least 1")
    if not 0.0 <= args.thinking_ratio <= 1.0:
        raise ValueError(f"--thinking_ratio must be in [0, 1], got {args.thinking_ratio}")
    run = init_run(args)                                              # 1. distributed, device, seed, precision
    lm_config, ckp = init_config(args)                                # 2. model config + resume state
    tracker = init_tracker(args, ckp, f"Agent-RL-E{args.epochs}-B{args.batch_size}-LR{args.learning_rate}")  # 3.
    model, tokenizer = init_model(lm_config, args, run.device, stage="policy")                      # 4. models
    ref_model = frozen(init_model(lm_config, args, run.device, stage="reference")[0])
    reward_model = RewardModel(args.reward_model_path, run.device) if args.reward in ("model", "mixed") else None
    train_ds = AgentRLDataset(resolve_data(args), tokenizer, skip_bad_lines=bool(args.skip_bad_lines))   # 5. data
    optimizer, scheduler = adamw_cosine(model.parameters(), args, run, len(train_ds), args.learning_rate)
    start = restore(ckp, model, optimizer, run.scaler, scheduler=scheduler)   # 6. resume
    model = wrap_model(model, run, args, rollouts=True)               # 7. DDP
    engine = create_rollout_engine(args, model, tokenizer, run, "agent", args.max_total_len)
    clock = EpochClock(start, BatchPlan(train_ds, args, run, agent_collate).num_batches(0))
    with ToolRunner(timeout=args.tool_timeout) as runner:             # 8. train: multi-turn rollout, then update
        result = train_loop(run, args, model, [optimizer], train_ds,
                            rollout_fn=lambda batch: agent_rollout(model, ref_model, engine, runner, tokenizer,
                                                                   reward_model, clock, run, args, batch),
                            update_fn=lambda ro, k: agent_update(model, args, ro), lm_config=lm_config,
                            tracker=tracker, start=start, collate_fn=agent_collate, schedulers=[scheduler])
    engine.update_policy(model)                     # a rollout server ends on the trained policy (the last sync)
    return result


if __name__ == "__main__":
    cli(main)
