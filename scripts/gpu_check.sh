#!/usr/bin/env bash
# The GPU validation pack in one command: both GPU kernel backends (ABNEXP_KERNELS=native, the
# CUDA module, and ABNEXP_KERNELS=triton) built, tested and benchmarked, InPlace-ABN Table 3 by real
# allocation, training throughput; writes results/gpu_<device>.md. About 9 minutes on one GPU;
# needs no network.
#
#   bash scripts/gpu_check.sh --prepare                    # here, with network: fills .gpu_pack/
#   bash scripts/gpu_check.sh                              # on a CUDA machine (with .gpu_pack/ carried)
#   bash scripts/gpu_check.sh --out "$OUT" --logs "$OUT"   # report, log and raw JSON into $OUT
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gc      # CPU, tiny inputs, nothing in results/
#
# Options are scripts/gpu_check.py's (--budget SECONDS, --work DIR, --verbose). The GPU machine
# needs python with torch and torchvision and nothing else. Everything else comes from .gpu_pack/
# (git-ignored; carry it to the machine with the checkout, ~40 MB), made by --prepare:
#   .gpu_pack/wheels  `pip wheel` of scripts/gpu_pack_requirements.txt (Hydra, OmegaConf, TensorBoard,
#                     tqdm, matplotlib, pytest, ninja and their dependencies), less what torch and
#                     torchvision bring; binary wheels are for this Python: prepare with the GPU
#                     machine's Python minor version (PYTHON=python3.X);
#   .gpu_pack/cache   the demo dataset ($ABNEXP_CACHE), so that scikit-image is not needed there.
# Missing packages are installed from the wheels into a temporary folder (never into the machine's
# environment). The project is used from this checkout through an overlay in that folder (abnexp/
# with configs/ and kernels/ linked in as abnexp.configs / abnexp.kernels, the package-dir mappings
# of pyproject.toml), first on PYTHONPATH; scripts/gpu_check.py starts every subprocess in its work
# folder, so the checkout's own abnexp/ (without configs) is never first on sys.path.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
PACK=$ROOT/.gpu_pack
log() { echo "[$(date +%H:%M:%S)] gpu_check.sh: $*"; }
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
    # The torch + torchvision closure is on the GPU machine already: their wheels are left out.
    rm -rf "$PACK/wheels" && mkdir -p "$PACK/wheels" "$PACK/cache"
    "$PY" -m pip wheel -q -w "$PACK/wheels" -r scripts/gpu_pack_requirements.txt || exit 1
    "$PY" - "$PACK/wheels" <<'EOF' || exit 1
import re, sys
from importlib import metadata
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have, todo = set(), ["torch", "torchvision"]
while todo:  # the installed closure of torch and torchvision (what a bare GPU machine has)
    name = norm(todo.pop())
    if name in have:
        continue
    have.add(name)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        continue
    todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
for wheel in Path(sys.argv[1]).glob("*.whl"):
    if norm(wheel.name.split("-")[0]) in have:
        wheel.unlink()
EOF
    ABNEXP_CACHE="$PACK/cache" "$PY" -c "from abnexp.data.demo import ensure_demo; print(ensure_demo())" || exit 1
    log "prepared $PACK: $(ls "$PACK/wheels" | wc -l) wheels, $(du -sh "$PACK" | cut -f1) in all"
    exit 0
fi

# The CUDA toolkit for the native module: abnexp.norm.cuda_toolkit finds it ($CUDA_HOME, else PATH's
# nvcc followed to the real binary, else /usr/local/cuda) and says loudly when it cannot build.

if ! "$PY" -c "import torch" 2>/dev/null; then
    log "error: $PY cannot import torch; set PYTHON=/path/to/python"
    exit 2
fi

SITE=$(mktemp -d "${TMPDIR:-/tmp}/abnexp_gpu_site.XXXXXX")
MODULES="hydra omegaconf tensorboard tqdm matplotlib pytest ninja"  # import names of scripts/gpu_pack_requirements.txt
missing=$(cd "$SITE" && "$PY" -c "
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $MODULES)
if [ -n "$missing" ]; then
    if ls "$PACK"/wheels/*.whl >/dev/null 2>&1; then
        log "missing $missing: installing $PACK/wheels into $SITE (no network)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
            "$PACK"/wheels/*.whl || log "warning: installing the wheels failed"
    else
        log "warning: missing $missing and no $PACK/wheels (run 'bash scripts/gpu_check.sh --prepare' where pip can download): stages that need them will fail"
    fi
fi
[ -d "$SITE/bin" ] && export PATH=$SITE/bin:$PATH  # ninja's binary
if [ -z "${ABNEXP_CACHE:-}" ] && [ -d "$PACK/cache" ]; then
    export ABNEXP_CACHE=$PACK/cache  # the prepared demo dataset
fi

mkdir "$SITE/abnexp"
for f in "$ROOT"/abnexp/*; do ln -s "$f" "$SITE/abnexp/"; done
ln -s "$ROOT/configs" "$SITE/abnexp/configs"
ln -s "$ROOT/kernels" "$SITE/abnexp/kernels"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
where=$(cd "$SITE" && "$PY" -c "import abnexp.configs, abnexp.kernels, abnexp; print(abnexp.__file__)") \
    || { log "error: the overlay $SITE does not import abnexp.configs"; exit 2; }
log "python: $("$PY" -c 'import sys; print(sys.executable)'), abnexp from $where (overlay of $ROOT), CUDA_HOME=${CUDA_HOME:-unset}"
exec "$PY" scripts/gpu_check.py "$@"
