#!/usr/bin/env bash
# Create .venv (once) and install tix with the given extras. Used by the README's commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv 2>/dev/null || python3 -m venv --without-pip .venv
. .venv/bin/activate
stamp=".venv/.tix-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # What an install leaves in .venv, measured on a fresh one: pip alone would stop a minute in with "No space left
  # on device" and a half-built .venv, so say up front what is missing and where.
  case "$extras" in
    test) need_mb=3700 ;;   # torch (CPU), TensorFlow and JAX
    *) need_mb=1100 ;;
  esac
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "setup: installing tix${extras:+[$extras]} into $(pwd)/.venv needs about $need_mb MB of disk;" \
         "only $free_mb MB is free there. Free some space (or clone tix onto a larger disk) and run this again." >&2
    exit 1
  fi
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
