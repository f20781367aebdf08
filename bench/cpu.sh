#!/usr/bin/env bash
# CPU benchmark: the decode step of Qwen2.5-0.5B-shaped weights (massv synth) against its
# memory-bandwidth floor, and target-only vs drafters on the fixtures. Writes
# bench/results/<date>-cpu.json with the CPU's name, the date and the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p massv
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
./target/release/massv synth --config ../shared/real-models/Qwen2.5-0.5B-Instruct/config.json --out "$work/q05b"
target=tests/fixtures/qwen2_5_vl-tiny-hub
args=(--target "$target" --image tests/fixtures/images/nonsquare_150x100.png --image tests/fixtures/images/ongrid_56x84.png
      --prompt "Describe the image." --max-new-tokens 24 --floor-model "$work/q05b" --floor-steps 16)
[ -d tests/fixtures/drafter-tiny-text ] && args+=(--text-draft tests/fixtures/drafter-tiny-text)
[ -d tests/fixtures/drafter-tiny-massv ] && args+=(--massv-draft tests/fixtures/drafter-tiny-massv)
out="bench/results/$(date -u +%F)-cpu.json"
./target/release/massv bench "${args[@]}" --json "$work/bench.json"
python3 - "$work/bench.json" "$out" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys, datetime
doc = json.load(open(sys.argv[1]))
doc["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
doc["commit"] = sys.argv[3]
json.dump(doc, open(sys.argv[2], "w"), indent=2)
print("wrote", sys.argv[2])
PY
