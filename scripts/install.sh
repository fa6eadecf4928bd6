#!/usr/bin/env bash
# Installs the pinned stack and the project (editable) into a virtual environment.
#
#   bash scripts/install.sh            # .venv/, CPU or CUDA chosen by whether nvidia-smi sees a GPU
#   DERM_DEVICE=cpu bash scripts/install.sh
#   VENV=/opt/derm DERM_DEVICE=cuda bash scripts/install.sh   # e.g. in the GPU image
#
# The pins live in requirements/ and nowhere else (the Docker images use the same files).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
python=${PYTHON:-python3}
device=${DERM_DEVICE:-auto}
if [ "$device" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
case "$device" in cpu|cuda) ;; *) echo "install: DERM_DEVICE must be cpu, cuda or auto, not '$device'" >&2; exit 2;; esac

"$python" - <<'PY' || { echo "install: Python >= 3.10 is required (set PYTHON=...)" >&2; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

echo "install: $device stack into $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install -r requirements/base.txt -r "requirements/$device.txt"
# torchrec last and without its declared deps, so pip never pulls the CUDA fbgemm-gpu on CPU.
"${pip[@]}" install --no-deps -r requirements/torchrec.txt
"${pip[@]}" install --no-deps -e .
# redis-server: the Redis feature-store tests start a throwaway one (tests/redis_server.py); they
# skip without it, except under CI, where they fail. Installed from Debian's packages when we can.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install: redis-server (Debian package, for the Redis feature-store tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "install: note: redis-server not found; the Redis store tests will skip. Install it with" \
      "'sudo apt-get install redis-server' (Debian/Ubuntu) or 'brew install redis' (macOS)." >&2
  fi
fi
fbgemm=$([ "$device" = cpu ] && echo fbgemm-gpu-cpu || echo fbgemm-gpu)
"$venv/bin/python" - "$fbgemm" <<'PY'
import sys
from importlib.metadata import version

import faiss, fbgemm_gpu, pyarrow, torch, torchrec  # noqa: F401  (fails loudly if a wheel is broken)

names = ("torch", "torchrec", sys.argv[1], "torchx", "pyarrow", "faiss-" + ("cpu" if "cpu" in sys.argv[1] else "gpu"))
print("install: ok:", ", ".join(f"{n} {version(n)}" for n in names))
PY
