#!/usr/bin/env bash
# The engine tests under the floor versions: the lowest release of each dependency that
# pyproject.toml admits, pinned in constraints/floor.txt. Installs clipmask into .venv-floor
# (idempotent: reinstalls only when pyproject.toml or the constraints changed), prints the
# versions in use and runs the engine tests there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FLOOR_VENV:-.venv-floor}
stamp="$VENV/.clipmask-floor-installed"
want=$(cat pyproject.toml constraints/floor.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  # Editable, so the tests run the work tree's code; -c pins every floor exactly, and pip
  # fails here if pyproject.toml's bounds no longer admit one.
  "$VENV/bin/python" -m pip install --quiet -c constraints/floor.txt -e '.[test]'
  echo "$want" >"$stamp"
  echo "clipmask installed in $VENV with the floor versions" >&2
fi
echo "floor versions in $VENV:"
"$VENV/bin/python" -m pip list 2>/dev/null \
  | grep -iE '^(torch|torchvision|transformers|tokenizers|huggingface[-_]hub|safetensors|pillow|isal|numpy|tqdm|celery|kombu|redis|boto3|botocore) '
exec "$VENV/bin/python" -m pytest -q tests/test_engine.py tests/test_postprocess.py tests/test_spec.py tests/test_codecs.py "$@"
