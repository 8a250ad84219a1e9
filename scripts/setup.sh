#!/usr/bin/env bash
# Create .venv (once) and install tix with the given extras. Used by the README's commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv 2>/dev/null || python3 -m venv --without-pip .venv
. .venv/bin/activate
stamp=".venv/.tix-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
