#!/usr/bin/env bash
# Chain vs token trees on the fixtures (tiny Qwen2.5-VL target, MASSV and text drafters,
# six images x two prompts) at T = 0 and T = 1 (the shapes world's tree row is part of
# `massv demo`). Writes bench/results/<date>-cpu-trees.json with the CPU's name and the commit.
# The chain is gamma = 5; the trees are a dynamic 32-node tree (EAGLE-2 style at T = 0)
# and 8 sampled chains of depth 5 (40 nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p massv
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
trees=(--tree dynamic:32,8,4 --tree static:8x1x1x1x1)
runs=()
fx=tests/fixtures
images=(); for i in "$fx"/images/*; do images+=(--image "$i"); done
for t in 0 1; do
  ./target/release/massv bench --target "$fx/qwen2_5_vl-tiny-hub" --text-draft "$fx/drafter-tiny-text" \
    --massv-draft "$fx/drafter-tiny-massv" "${images[@]}" --prompt "Describe the image." \
    --prompt "What is in the picture?" --gamma 5 "${trees[@]}" --temperature "$t" --max-new-tokens 32 \
    --json "$work/fixtures-t$t.json"
  runs+=("fixtures-t$t")
done
out="bench/results/$(date -u +%F)-cpu-trees.json"
python3 - "$work" "$out" "$(git rev-parse --short HEAD)" "${runs[@]}" <<'PY'
import json, sys, datetime
work, out, commit, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit, "runs": {}}
for r in runs:
    d = json.load(open(f"{work}/{r}.json"))
    doc["device"] = d["device"]
    doc["runs"][r] = d
    rows = {row["setup"]: row for row in d["rows"]}
    for drafter in ("text-drafter", "massv-drafter"):
        chain = rows[drafter]["mal"]
        for i, t in enumerate(d["trees"], 1):
            tree = rows[f"{drafter} tree#{i}"]
            print(f"{r:12} {drafter:14} chain MAL {chain:.2f}  {t[:24]:24} MAL {tree['mal']:.2f} ({tree['mal'] / chain:.2f}x, {tree['drafted_per_pass']:.1f} nodes)")
json.dump(doc, open(out, "w"), indent=2)
print("wrote", out)
PY
