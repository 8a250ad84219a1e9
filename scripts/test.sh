#!/usr/bin/env bash
# The test suite on a fresh machine: installs tix with its test extras (PyTorch CPU oracles) into .venv, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check .
exec python -m pytest -n 2 --dist loadfile --durations=25 "$@"
