#!/usr/bin/env bash
# Creates the virtual environment .venv and installs polyattn into it (editable, with extras).
#
# An installed torch is kept: if the python used here can already import torch, the venv sees it
# (--system-site-packages) and nothing reinstalls it. Otherwise TORCH_SPEC is installed first, so that
# the open `torch>=...` requirement of the package is already satisfied and pip pulls nothing more.
#   TORCH_SPEC   pip requirement for torch (default torch==2.13.0; for a CUDA build pass e.g.
#                "torch==2.13.0 --index-url <your wheel index>")
#   EXTRAS       extras to install (default all)
#   PYTHON       interpreter to build the venv from (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-all}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "setup: keeping the torch installed for $PYTHON"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options such as --index-url
    "$VENV/bin/pip" install --quiet $TORCH_SPEC
fi
# Reinstall only when the package metadata changed since the last install.
stamp="$VENV/.polyattn-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install --quiet -e ".[$EXTRAS]"
    touch "$stamp"
fi
"$VENV/bin/python" -c "import torch, polyattn; print(f'setup: polyattn {polyattn.__version__}, torch {torch.__version__}')"
