#!/usr/bin/env bash
# Compatibility with an earlier release: a bundle and a feature cache written by the checkout
# BEFORE, used by this one: the same predictions with both engines, and nothing re-extracted.
#   bench/compat.sh BEFORE_CHECKOUT     (e.g. a git worktree of the previous release)
# Needs ../shared (MobileNet v1 0.25) and this checkout's venv.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
before=$(cd "$1" && pwd)
py="$here/.venv/bin/python"
bb="$here/../shared/models/mobilenet_v1_025_224_feature_vector"
[ -d "$bb" ] || { echo "SKIP: ../shared is not here"; exit 0; }
data="$here/sample_data/images"
t=$(mktemp -d)
cli() { (cd "$1" && PYTHONPATH="$1" "$py" -c 'import sys; from tlcli.cli import run; sys.argv[0]="tlcli"; run()' "${@:2}"); }
cli "$before" train "$data" --backbone "$bb" --image-size 224 --cache-dir "$t/cache" --out "$t/old-model" --json > "$t/old-train.json" 2>/dev/null
cli "$before" export --tflite --model "$t/old-model" --json > /dev/null 2>&1
for tree in before here; do for eng in tf tflite; do
  cli "${!tree}" predict "$data" --model "$t/old-model" --engine $eng --json --top-k 3 > "$t/$tree-$eng.jsonl" 2>/dev/null
done; done
for eng in tf tflite; do
  if cmp -s "$t/before-$eng.jsonl" "$t/here-$eng.jsonl"; then echo "the earlier bundle, engine $eng: identical predictions ($(wc -l < "$t/here-$eng.jsonl") images)"; else echo "the earlier bundle, engine $eng: DIFFERENT"; diff "$t/before-$eng.jsonl" "$t/here-$eng.jsonl" | head -5; fi
done
cli "$here" train "$data" --backbone "$bb" --image-size 224 --cache-dir "$t/cache" --out "$t/new-model" --json > "$t/new-train.json" 2>/dev/null
"$py" - "$t/old-train.json" "$t/new-train.json" <<'PY'
import json, sys
o, n = (json.load(open(p)) for p in sys.argv[1:])
print(f"the old feature cache, read by this checkout: extracted {n['extracted']}, from cache {n['cached']} "
      f"(the old run extracted {o['extracted']}); val accuracy old {o['val_accuracy']:.4f}, this {n['val_accuracy']:.4f}")
PY
rm -rf "$t"
