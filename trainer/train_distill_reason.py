"""Alias of train_reason.py under the original's script name (train_distill_reason.py).

    python trainer/train_distill_reason.py [flags of train_reason.py]
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.cli import cli
from trainer.train_reason import main

if __name__ == "__main__":
    cli(main)
