"""What every command line of this repository shares, training and serving alike: the one-line error
wrapper and the model flags. Imports nothing from this project, so serving never loads the training library.

    if __name__ == "__main__":
        cli(main)     # a bad flag, path or data line: one `error:` line, exit code 2
    # args = add_model_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args()

  * cli(main): ValueError, OSError (a full disk too) and CLIError end with `error: <one line>` on stderr and
    the error's exit code (2; a CLIError says its own, e.g. 1 for a training run that diverged), not a
    traceback. MINIMIND_DEBUG=1 shows the traceback;
  * the flags that pick and load a model (add_model_args, add_size_args) with the original's defaults, and
    Typed / was_typed / typed_sizes: which flags the user typed, so a default may give way to what the
    files say while a typed value never does.
"""
import argparse
import gc
import os
import sys

import torch

SIZE_DEFAULTS = {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": 0}   # the original's
FAMILY_HIDDEN = {"minimind2": 512, "minimind3": 768}   # --hidden_size when not typed: each family's published size


# ---- errors ----
class CLIError(Exception):
    """An error cli() reports as one line; `exit_code` is the process's exit status (2: bad input)."""
    exit_code = 2


def cli(main) -> None:
    """Run an entry point's main(): a bad flag, path or data line, a full disk or a CLIError (e.g. a diverged
    training run) ends with one `error:` line and the error's exit code, not a traceback."""
    try:
        main()
    except (ValueError, OSError, CLIError) as err:
        if os.environ.get("MINIMIND_DEBUG"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(err.exit_code if isinstance(err, CLIError) else 2) from None
    code = getattr(main, "__code__", None)
    if getattr(main, "__module__", None) == "__main__" and code is not None and sys.argv and \
            os.path.realpath(sys.argv[0]) == os.path.realpath(code.co_filename):
        # the script's process ends now: the garbage collector's last passes over everything torch and
        # transformers imported took about a second of every run's exit on 2 cores (bench_cpu_step.py); frozen objects are left to the
        # exit itself (atexit handlers still run, files are still flushed and closed)
        gc.freeze()


def one_line(err: BaseException) -> str:
    """The message of an error, or for an error re-raised from a DataLoader worker (whose message holds
    the worker's whole traceback) the original error's own last line."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, OSError) and err.filename:
        text = f"{err.filename}: {err.strerror or text}"
    return text


# ---- flags ----
class Typed(argparse.Action):
    """Store the value and record the flag's dest in `namespace.typed`, the set of flags the user typed:
    a default may then be replaced by what the files say (a size flag left alone lets the one weight file
    that exists decide), while a typed value never is."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.typed = set(getattr(namespace, "typed", ())) | {self.dest}


def was_typed(args, name: str) -> bool:
    """Did the user type flag `--name` (declared with action=Typed)?"""
    return name in getattr(args, "typed", ())


def add_size_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--hidden_size --num_hidden_layers --use_moe with the original's defaults (typed_sizes tells which were typed)."""
    p = parser
    p.add_argument("--hidden_size", type=int, default=SIZE_DEFAULTS["hidden_size"], action=Typed,
                   help="names the weight file {weight}_{hidden}[_moe].pth (default 512); when not typed and that "
                        "file is missing, the one {weight}_*.pth in --save_dir is used")
    p.add_argument("--num_hidden_layers", type=int, default=SIZE_DEFAULTS["num_hidden_layers"], action=Typed,
                   help="layers, used when the weight has no .json config (default 8)")
    p.add_argument("--use_moe", type=int, default=SIZE_DEFAULTS["use_moe"], choices=[0, 1], action=Typed,
                   help="1 = the MoE weight file ({weight}_{hidden}_moe.pth); default 0")
    p.set_defaults(typed=set())
    return p


def add_family_arg(parser: argparse.ArgumentParser, default: str = None) -> argparse.ArgumentParser:
    """--model_family, the one flag that picks the model family in every script (stage scripts, eval_llm.py, the
    server, the web demo, conversion). Training from scratch: it decides the architecture (default minimind2).
    Loading: the weight's config or keys decide, and a typed value that contradicts them is an error."""
    parser.add_argument("--model_family", type=str, default=default, choices=["minimind2", "minimind3"], action=Typed,
                        help="minimind2 (MiniMind2, the original's fa82707 models) or minimind3 (the original's newest "
                             "models: q/k norm, Qwen3 layout, their own tokenizer in model/minimind3); when not typed, "
                             "a weight's config or keys decide, and training from scratch builds minimind2. "
                             "--hidden_size not typed: 512 for minimind2, 768 for minimind3")
    return parser


def family_hidden_size(args) -> int:
    """--hidden_size as typed, else the published size of --model_family's family (512 or 768)."""
    if was_typed(args, "hidden_size") or not getattr(args, "model_family", None):
        return args.hidden_size
    return FAMILY_HIDDEN[args.model_family]


def typed_sizes(args) -> dict:
    """{"hidden_size", "num_hidden_layers", "use_moe"}: the typed value, or None where the flag was not typed."""
    return {name: getattr(args, name) if was_typed(args, name) else None for name in SIZE_DEFAULTS}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The original's model-loading flags with its defaults (eval_llm.py, the server, the web demo, eval_bench.py);
    model.loading.load_model(args) reads them."""
    p = parser
    p.add_argument("--load_from", type=str, default="model",
                   help="a transformers model folder (one with config.json), a native .pth weight file, or the "
                        "folder holding the tokenizer of native weights (default: model)")
    p.add_argument("--save_dir", type=str, default="out", help="folder of the native weight files (default: out)")
    p.add_argument("--weight", type=str, default="full_sft",
                   help="weight prefix: pretrain, full_sft, dpo, reason, ppo_actor, grpo, spo, full_dist")
    p.add_argument("--lora_weight", type=str, default="None",
                   help="LoRA name (file {save_dir}/lora/{name}_{hidden}.pth) or a .pth path; None = no LoRA")
    add_size_args(p)
    add_family_arg(p)
    p.add_argument("--inference_rope_scaling", action="store_true",
                   help="YaRN RoPE scaling (16x longer positions, from 2048 original positions)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available), cpu, cuda:1, ...")
    p.add_argument("--tokenizer_path", type=str, default=None,
                   help="tokenizer folder (default: --load_from if it holds tokenizer files, else the model family's: "
                        "the repo's model/ for MiniMind2, model/minimind3 for minimind-3)")
    return p
