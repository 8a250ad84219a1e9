#!/usr/bin/env bash
# The main job on a fresh machine: install tix into .venv, then learn a token for the bundled example concept (a yellow
# dotted heart, which no word of the toy world names) against the bundled toyworld model, then score the final
# validation grid with the toy world's scorer. About 3-4 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tix invert --config configs/toyworld.yaml --images examples/yellow-dotted-heart --token "<my-heart>" \
    --out runs/demo --overwrite "$@"
echo
python scripts/score_demo.py runs/demo --fixed shape=heart colour=yellow pattern=dotted
echo
echo "validation grids: runs/demo/validation/step-*/my-heart.png (columns: the prompts in configs/toyworld.yaml)"
echo "report:           runs/demo/report.html   loss curve: runs/demo/loss.png"
echo "embedding:        runs/demo/learned_embeds.safetensors (loads in diffusers' load_textual_inversion)"
