"""Perplexity against context length, with plain RoPE and with YaRN (--inference_rope_scaling).

    python scripts/eval_rope.py --weight pretrain                 # out/pretrain_512.pth on the demo corpus
    python scripts/eval_rope.py --weight full_sft --text_path long.txt --lengths 256,512,1024,2048,4096,8192
    python scripts/eval_rope.py --weight none --hidden_size 64 --num_hidden_layers 2 --lengths 128,256  # random init, seconds

The text (--text_path: a .jsonl with "text" or "conversations" fields, or any plain text file; default the demo
pretrain corpus) is tokenised into one stream. For every length L the same --num_windows non-overlapping
windows of L tokens are scored twice, with the original RoPE tables and with YaRN x16; perplexity is
exp(mean next-token loss over every position of the windows). A model trained on 512-token samples has never
seen later positions, so the curve shows how each variant extrapolates. Writes the plot (--out, default
out/rope_ppl.png; README's images/rope_ppl.png is a committed copy of one run) and prints the table. --weight none
scores a randomly initialised model and labels the plot so. The weight is found as eval_llm.py finds it
(model/loading.py); a bad path or weight is one `error:` line, exit code 2.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json
import math
import os
import tempfile
import textwrap

import torch

from model.cli import add_size_args, cli, typed_sizes
from model.loading import (ROOT, TOKENIZER_DIR, find_weight, load_native, load_tokenizer, native_config,
                           resolve_path)
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM


def read_text(path) -> str:
    """Plain text, or the "text" / "conversations" fields of a .jsonl file, joined by newlines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text_path {path} not found (python dataset/demo_data.py writes the demo corpus)")
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")
    parts = []
    for lineno, line in enumerate(path.open(encoding="utf-8"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: bad JSON ({err})") from None
        if "text" in row:
            parts.append(row["text"])
        elif "conversations" in row:
            parts.append("\n".join(turn["content"] for turn in row["conversations"]))
        else:
            raise ValueError(f"{path}:{lineno}: expected a 'text' or 'conversations' field")
    return "\n".join(parts)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, length: int, num_windows: int, device: str = "cpu") -> float:
    """exp(mean loss) over `num_windows` consecutive windows of `length` tokens from the start of `tokens`."""
    total, count = 0.0, 0
    for w in range(num_windows):
        window = tokens[w * length:(w + 1) * length].unsqueeze(0).to(device)      # (1, L)
        logits = model(window).logits[0, :-1].float()                              # (L-1, V)
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(total / count)


def load_pair(args):
    """(plain-RoPE model, YaRN model, label): the same weights under both position encodings."""
    if args.weight == "none":
        torch.manual_seed(0)
        sizes = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe))
        plain = MiniMindForCausalLM(MiniMindConfig(**sizes)).eval()
        yarn = MiniMindForCausalLM(MiniMindConfig(**sizes, inference_rope_scaling=True))
        label = f"random init, untrained ({args.hidden_size}x{args.num_hidden_layers}) - illustration only"
    else:
        sizes = typed_sizes(args)
        path = find_weight(resolve_path(args.save_dir), args.weight, sizes["hidden_size"], sizes["use_moe"])
        plain = load_native(path, **sizes)
        yarn = MiniMindForCausalLM(native_config(path, **sizes, rope_scaling=True))
        label = f"{path.name} ({plain.count_parameters()[0] / 1e6:.1f}M params)"
    yarn.load_state_dict(plain.state_dict())
    return plain, yarn.eval(), label


def plot_perplexity(rows: list, label: str, out, train_len: int = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(lengths, [r["rope"] for r in rows], "o-", label="RoPE (theta=1e6)")
    ax.plot(lengths, [r["yarn"] for r in rows], "s--", label="YaRN x16 (--inference_rope_scaling)")
    if train_len:
        ax.axvline(train_len, color="grey", linestyle=":", label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("MiniMind perplexity vs context length\n" + "\n".join(textwrap.wrap(label, 90)), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description="MiniMind perplexity vs context length, RoPE vs YaRN", allow_abbrev=False)
    p.add_argument("--text_path", default=str(ROOT / "dataset" / "demo" / "pretrain.jsonl"),
                   help=".jsonl or plain text file (default: the demo pretrain corpus)")
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192", help="comma-separated context lengths (tokens)")
    p.add_argument("--num_windows", default=4, type=int, help="windows of each length averaged over")
    p.add_argument("--train_len", default=512, type=int, help="training sample length marked on the plot; 0 = none")
    p.add_argument("--out", default=str(ROOT / "out" / "rope_ppl.png"), help="where the plot is written "
                                                                              "(default: out/rope_ppl.png)")
    p.add_argument("--label", default="", help="extra text for the plot title (e.g. how the model was trained)")
    p.add_argument("--tokenizer_path", default=str(TOKENIZER_DIR), help="tokenizer folder (default: model/)")
    p.add_argument("--save_dir", default="out", help="folder of native weights (default: out)")
    p.add_argument("--weight", default="pretrain", help="weight prefix ({save_dir}/{weight}_{hidden}[_moe].pth); "
                                                         "none = random init (default: pretrain)")
    add_size_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available) or cpu")
    args = p.parse_args(argv)
    lengths = sorted(int(n) for n in str(args.lengths).split(","))
    tokenizer = load_tokenizer(args.tokenizer_path)
    text_path = resolve_path(args.text_path)
    tokens = torch.tensor(tokenizer(read_text(text_path), add_special_tokens=False, verbose=False)["input_ids"])
    need = lengths[-1] * args.num_windows
    if len(tokens) < need:
        raise ValueError(f"{text_path} has {len(tokens)} tokens; {args.num_windows} windows of {lengths[-1]} "
                         f"need {need} (lower --num_windows or --lengths, or use a longer text)")
    plain, yarn, label = load_pair(args)
    label = f"{label}; {args.label}" if args.label else label
    plain, yarn = plain.to(args.device), yarn.to(args.device)
    rows = []
    print(f"{label}; {text_path.name}, {args.num_windows} windows per length")
    print(f"{'length':>8}  {'ppl RoPE':>10}  {'ppl YaRN':>10}")
    for length in lengths:
        rows.append({"length": length, "rope": perplexity(plain, tokens, length, args.num_windows, args.device),
                     "yarn": perplexity(yarn, tokens, length, args.num_windows, args.device)})
        print(f"{length:>8}  {rows[-1]['rope']:>10.2f}  {rows[-1]['yarn']:>10.2f}", flush=True)
    out = plot_perplexity(rows, label, args.out, args.train_len or None)
    print(f"plot written to {out}")
    return rows


if __name__ == "__main__":
    cli(main)
