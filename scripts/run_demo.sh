#!/usr/bin/env bash
# The one-command demo (README command #1). Runs offline on a laptop CPU.
# Grows stage by stage; for now: build a tiny MiniMind, check it, and generate a few tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/model_smoke.py   # tiny model: forward, KV-cache decode, generate
