#!/usr/bin/env bash
# The embedded default: set up .venv, then mask a local folder with `clipmask run` (no broker).
#   scripts/run-local.sh [SRC] [DST] [clipmask run options...]
# Without SRC, a few example images are generated into examples/. The model is $CLIPMASK_MODEL
# or CIDAS/clipseg-rd64-refined. Where neither can be loaded (no internet, nothing cached), the
# script says so and runs a small RANDOM model instead, so the pipeline can still be tried:
# its masks are meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SRC=${1:-examples}
DST=${2:-out}
shift $(( $# > 2 ? 2 : $# )) || true
PY=.venv/bin/python
[ -d "$SRC" ] || [ "$SRC" != examples ] || $PY scripts/make_examples.py "$SRC"
# A second at most (cache first, one short probe of the Hub), and one line when it falls back.
if ! reason=$($PY -m worker.model_source 2>&1 >/dev/null); then
  echo "WARNING: masks come from a RANDOM demo model and are meaningless ($reason); see README 'Model weights'." >&2
  [ -f .demo-model/config.json ] || $PY -m worker.random_model .demo-model >/dev/null 2>&1
  export CLIPMASK_MODEL=$PWD/.demo-model
fi
exec .venv/bin/clipmask run "$SRC" --out "$DST" --prompt "${PROMPT:-a person|a dog}" --negative "${NEGATIVE:-background}" "$@"
