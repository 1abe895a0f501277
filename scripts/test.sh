#!/usr/bin/env bash
# The test command: set up .venv, make sure redis-server exists, run the whole suite.
# The tests start their own redis-server and S3 (moto) servers on free ports; a Redis already
# running on 6379 is left alone. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (the tests start their own on a free port)" >&2
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
