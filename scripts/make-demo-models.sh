#!/usr/bin/env bash
# Regenerates the demo's models (assets/) from nothing, with fixed seeds: the shapes
# world's data and tokenizer, the toy Qwen2.5-VL target (LM + merger trained, vision tower
# frozen at its random initialisation), the text-only drafter, and the MASSV drafters after
# phase 1 and after SDViT. Extra arguments go to `massv-train demo-models`
# (e.g. --steps-multiplier 4, --scale mini for a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p massv-train
./target/release/massv-train demo-models --out assets --work target/demo-work "$@"
