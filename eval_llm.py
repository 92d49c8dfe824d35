"""Command-line chat with a MiniMind model (placeholder until the inference stage lands).

    python eval_llm.py
"""
import sys


def main():
    sys.exit("eval_llm.py: the chat CLI is not implemented yet; run `bash scripts/run_demo.sh` for a model smoke")


if __name__ == "__main__":
    main()
