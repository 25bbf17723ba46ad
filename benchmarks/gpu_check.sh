#!/usr/bin/env bash
# The GPU check in one command, from the repository root of a machine with CUDA:
#
#     bash benchmarks/gpu_check.sh [OUT.json] [more gpu_check.py arguments]
#
# Which Python: $PYTHON if set; else python3 when it already has a torch that sees CUDA and
# torchvision and transformers (a GPU image with them preinstalled, and no network: nothing is
# downloaded, layercrit runs from src/ and pytest, pandas, scipy and the rest must be there);
# else the ecosystem environment built from the repository with `make setup-ecosystem` (PyPI:
# set TORCH_ECO and TORCH_ARGS for a CUDA build, e.g. TORCH_ECO="torch torchvision"). The check
# itself stays within its budget (default 480 s; --budget SECONDS).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
shift || true

usable() {  # a python with a CUDA torch, torchvision, transformers and what layercrit imports
    "$1" - <<'EOF' 2>/dev/null
import torch, torchvision, transformers, pandas, scipy, sklearn, matplotlib, tqdm, safetensors, PIL, pytest
raise SystemExit(0 if torch.cuda.is_available() else 1)
EOF
}

if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif command -v python3 >/dev/null && usable python3; then
    py=python3
else
    make setup-ecosystem
    py=.venv-eco/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "[gpu_check.sh] $("$py" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
exec "$py" benchmarks/gpu_check.py --out "$out" "$@"
