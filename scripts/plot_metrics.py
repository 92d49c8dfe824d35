"""Plot the metrics JSONL of training runs: loss, learning rate and tokens/s against the step.

    python scripts/plot_metrics.py out/pretrain_512_metrics.jsonl out/full_sft_512_metrics.jsonl \\
        --out out/demo_curves.png
Every stage appends one JSON line per log interval to `{save_dir}/{weight}_metrics.jsonl`; several
files are drawn as successive runs on one shared step axis (a resumed run continues its file).
Writes one PNG with three panels.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import argparse
import json


def read_metrics(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no metrics")
    return rows


def plot_runs(paths: list, out: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    offset = 0
    for path in paths:
        rows = read_metrics(Path(path))
        iters = rows[0].get("iters") or 1
        x = [offset + (r["epoch"] - 1) * iters + r["step"] for r in rows]
        label = Path(path).name.replace("_metrics.jsonl", "")
        for ax, key in zip(axes, ("loss", "lr", "tok_s")):
            ax.plot(x, [r.get(key, float("nan")) for r in rows], label=label)
        offset = x[-1]
    for ax, name in zip(axes, ("loss", "learning rate", "tokens/s")):
        ax.set_title(name)
        ax.set_xlabel("micro-batch step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot loss / lr / tokens-per-second from metrics JSONL files",
                                allow_abbrev=False)
    p.add_argument("paths", nargs="+", help="metrics JSONL files, drawn in order")
    p.add_argument("--out", type=str, default=str(Path(__file__).resolve().parents[1] / "out" / "metrics.png"),
                   help="output PNG (default: out/metrics.png in the repo)")
    p.add_argument("--title", type=str, default="", help="figure title (default: none)")
    args = p.parse_args(argv)
    print(plot_runs(args.paths, Path(args.out), args.title))


if __name__ == "__main__":
    main()
