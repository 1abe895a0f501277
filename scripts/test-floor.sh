#!/usr/bin/env bash
# The engine tests under the floor versions: the lowest release of each dependency that
# pyproject.toml admits, pinned in constraints/floor.txt. Installs clipmask into .venv-floor
# (idempotent: reinstalls only when pyproject.toml or the constraints changed), sharing the main
# .venv's torch by hard links, prints the versions in use and runs the engine tests there. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FLOOR_VENV:-.venv-floor}
stamp="$VENV/.clipmask-floor-installed"
want=$(cat pyproject.toml constraints/floor.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    # Start from the main environment's packages as hard links (torch and its CUDA libraries are
    # about 6 GB): no second copy on disk, no second download. pip then moves every other package
    # to its floor; a removed link leaves the main environment's file alone. Where the disk
    # cannot link (another filesystem), pip installs torch here as it would anyway.
    main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
    floor=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ -d "$main" ] && ! cp -al --remove-destination "$main/." "$floor/" 2>/dev/null; then
      echo "could not hard-link $main into $VENV: installing its packages instead" >&2
    fi
  fi
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
