#!/usr/bin/env bash
# The test command: set up .venv, and .venv-img2dataset (img2dataset, which makes the shards of
# tests/test_img2dataset.py; it needs a webdataset older than ours, hence its own environment),
# make sure redis-server and rabbitmq-server exist (and chromium, best effort, for the preview
# page's screenshot test), check the import contracts, run the engine tests under the dependency
# floors (scripts/test-floor.sh, its own .venv-floor), then the whole suite.
# The tests start their own redis-server, RabbitMQ node and S3 (moto) server on free ports; a
# Redis or RabbitMQ already running on the default ports is left alone. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# img2dataset in its own environment (idempotent: reinstalls only when the pin below changes).
IMG2DATASET=img2dataset==1.47.0
img2dataset_stamp=.venv-img2dataset/.img2dataset-installed
if [ ! -f "$img2dataset_stamp" ] || [ "$(cat "$img2dataset_stamp")" != "$IMG2DATASET" ]; then
  [ -x .venv-img2dataset/bin/python ] || "${PYTHON:-python3}" -m venv .venv-img2dataset
  .venv-img2dataset/bin/python -m pip install --quiet "$IMG2DATASET"
  echo "$IMG2DATASET" >"$img2dataset_stamp"
  echo "$IMG2DATASET installed in .venv-img2dataset" >&2
fi
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (the tests start their own on a free port)" >&2
  apt_install redis-server
fi
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && [ ! -x /usr/sbin/rabbitmq-server ] && ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "installing rabbitmq-server (the tests start their own node on free ports)" >&2
  apt_install rabbitmq-server
  # The package starts a system node on 5672; the tests start their own (own name, cookie,
  # config, ports): stop the system one so it holds no memory or CPU while they run.
  $SUDO service rabbitmq-server stop >/dev/null 2>&1 || true
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (the preview page's screenshot test; skipped without it)" >&2
  apt_install chromium || echo "could not install chromium: the screenshot test will be skipped" >&2
fi
# The architecture's import rules (pyproject.toml, [tool.importlinter]): seconds, and first.
.venv/bin/lint-imports --no-cache
# The engine tests under the lowest versions pyproject.toml admits (constraints/floor.txt).
bash scripts/test-floor.sh
exec .venv/bin/python -m pytest -q "$@"
