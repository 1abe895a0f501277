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
if ! $PY -c "from worker.model import check_model_available, model_reference as m; check_model_available(m())" 2>/tmp/clipmask-model-check; then
  cat /tmp/clipmask-model-check >&2
  echo "WARNING: using a RANDOM demo model (masks are meaningless); see README 'Model weights'." >&2
  [ -f .demo-model/config.json ] || $PY -m worker.random_model .demo-model >/dev/null
  export CLIPMASK_MODEL=$PWD/.demo-model
fi
exec .venv/bin/clipmask run "$SRC" --out "$DST" --prompt "${PROMPT:-a person|a dog}" --negative "${NEGATIVE:-background}" "$@"
