#!/usr/bin/env bash
# The GPU validation pack in one command: native CUDA build + every CUDA test, kernel
# benchmarks, InPlace-ABN Table 3 by real allocation, training throughput; writes
# results/gpu_<device>.md. About 8 minutes on one GPU; needs no network.
#
#   bash scripts/gpu_check.sh                          # on a CUDA machine
#   bash scripts/gpu_check.sh --out "$OUT" --logs "$OUT"   # report, log and raw JSON into $OUT
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gc  # CPU, tiny inputs, nothing in results/
#
# Options are scripts/gpu_check.py's (--budget SECONDS, --work DIR, --verbose). This wrapper makes
# the project importable first: torch (+ torchvision) must be installed; hydra-core, omegaconf and
# antlr4-python3-runtime are installed from wheels in .whl/ when missing (carried to an offline
# machine, see below); the project itself with `pip install -e . --no-deps --no-build-isolation`,
# or, where that fails, through a PYTHONPATH overlay of this checkout (nothing installed).
#
# Wheels for an offline machine (here, once; ~400 KB; antlr4 ships only as an sdist, so `pip wheel`):
#   python3 -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log() { echo "[$(date +%H:%M:%S)] gpu_check.sh: $*"; }
export PYTHONUNBUFFERED=1

# The CUDA toolkit: abnexp.norm.native uses $CUDA_HOME, else /usr/local/cuda (never PATH's nvcc,
# which may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
        export CUDA_HOME=/usr/local/cuda
    elif nvcc_path=$(command -v nvcc) && nvcc_path=$(readlink -f "$nvcc_path") \
            && [ "$(head -c 4 "$nvcc_path" | tail -c 3)" = "ELF" ]; then
        export CUDA_HOME=$(dirname "$(dirname "$nvcc_path")")  # a real nvcc binary, not a wrapper script
    fi
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    log "error: $PY cannot import torch; set PYTHON=/path/to/python"
    exit 2
fi

# Hydra and OmegaConf (pure Python), from carried wheels when the machine lacks them.
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        log "installing .whl/*.whl into /tmp/abnexp_site (no network)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/abnexp_site .whl/*.whl \
            && export PYTHONPATH=/tmp/abnexp_site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "warning: hydra-core / omegaconf are missing and there is no .whl/ folder: the stages that compose a config will fail"
    fi
fi

# The project: importable from this checkout, with abnexp.configs and abnexp.kernels (package-dir
# mappings of pyproject.toml, which a plain PYTHONPATH=. does not give).
from_here() {
    "$PY" - <<'EOF' 2>/dev/null
import pathlib, sys
import abnexp.kernels, abnexp
here = pathlib.Path("abnexp").resolve()
sys.exit(0 if pathlib.Path(abnexp.__file__).resolve().parent == here else 1)
EOF
}
overlay() {  # abnexp/ with configs/ and kernels/ linked in as abnexp.configs / abnexp.kernels
    local site
    site=$(mktemp -d /tmp/abnexp_overlay.XXXXXX)
    mkdir "$site/abnexp"
    for f in "$PWD"/abnexp/*; do ln -s "$f" "$site/abnexp/"; done
    ln -s "$PWD/configs" "$site/abnexp/configs"
    ln -s "$PWD/kernels" "$site/abnexp/kernels"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    log "using this checkout through the overlay $site (PYTHONPATH)"
}
if ! from_here; then
    if "$PY" -c "import abnexp" 2>/dev/null; then
        overlay  # installed from another checkout: leave that install alone
    else
        log "pip install -e . --no-deps --no-build-isolation -q"
        "$PY" -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -n 3
        from_here || overlay
    fi
fi

log "python: $("$PY" -c 'import sys; print(sys.executable)'), CUDA_HOME=${CUDA_HOME:-unset}"
exec "$PY" scripts/gpu_check.py "$@"
