#!/usr/bin/env bash
# Alternating A/B of head-only `tlcli train` between two checkouts of tlcli, each run in a fresh
# process with a fresh feature cache; prints "side pair wall_s val_accuracy" per run.
#   bench/ab_head_only.sh BEFORE_CHECKOUT AFTER_CHECKOUT [PAIRS]
# AB_ARGS: more `tlcli train` options for both sides (e.g. --fine-tune); AFTER_ARGS: for the
# after side only (e.g. --extractor tf, against a checkout from before that option existed).
# Needs ../shared (hymenoptera and MobileNetV2) and the venv of the current checkout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
data="$here/../shared/data/hymenoptera_data"
backbone="$here/../shared/models/mobilenet_v2_100_224_feature_vector"
[ -d "$data" ] && [ -d "$backbone" ] || { echo "SKIP: ../shared is not here"; exit 0; }
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); pairs=${3:-5}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$pairs"); do
  for side in before after; do
    if [ "$side" = before ]; then src=$before; else src=$after; fi
    rm -rf "$tmp/cache" "$tmp/out"
    start=$(date +%s.%N)
    (cd "$src" && PYTHONPATH="$src" "$py" -c 'from tlcli.cli import run; run()' train \
      "$data/train" --val-dir "$data/val" --backbone "$backbone" --image-size 224 \
      --cache-dir "$tmp/cache" --out "$tmp/out" --force --json ${AB_ARGS:-} \
      $([ "$side" = after ] && echo "${AFTER_ARGS:-}") > "$tmp/result.json" 2>/dev/null)
    end=$(date +%s.%N)
    acc=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["val_accuracy"])' "$tmp/result.json")
    echo "$side $i $(echo "$end - $start" | bc) $acc"
  done
done
