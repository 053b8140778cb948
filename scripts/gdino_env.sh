#!/usr/bin/env bash
# The groundingdino-py environment: the original Grounding-DINO code needs transformers < 5, so it
# cannot join the main environment. Builds .venv-gdino (once; again when this script changes)
# with torch pinned as in constraints.txt, then runs the detector's test there:
#
#   scripts/gdino_env.sh   # build if needed, run tests/annotate/detectors/test_groundingdino_py.py
#   GDINO_VENV=path scripts/gdino_env.sh
#
# A Ray actor of the `groundingdino_py` backend runs in this interpreter (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${GDINO_VENV:-.venv-gdino}
STAMP=$VENV/.installed
pin() { grep -i "^$1==" constraints.txt; }

if [ ! -f "$STAMP" ] || [ "$STAMP" -ot "$0" ] || [ "$STAMP" -ot constraints.txt ]; then
    started=$(date +%s)
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$(pin torch)" "$(pin torchvision)"
    "$VENV/bin/python" -m pip install -q "$(pin torch)" "$(pin torchvision)" \
        groundingdino-py==0.4.0 transformers==4.57.6 \
        "$(pin pydantic)" "$(pin pyyaml)" "$(pin pyarrow)" "$(pin safetensors)" "$(pin pytest)"
    touch "$STAMP"
    echo "built $VENV in $(($(date +%s) - started)) s"
fi
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q --noconftest tests/annotate/detectors/test_groundingdino_py.py
