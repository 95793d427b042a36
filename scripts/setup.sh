#!/usr/bin/env bash
# Set up HNQ's development environment in .venv. Safe to run again: steps whose result is
# already in place are skipped.
#
# Environment:
#   PYTHON       interpreter that creates .venv (default: python3; 3.10 or newer)
#   HNQ_RUNTIME  cpu (default) installs onnxruntime, gpu installs onnxruntime-gpu
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
HNQ_RUNTIME=${HNQ_RUNTIME:-cpu}
VENV=.venv
VENV_PYTHON=$VENV/bin/python
DATA_DIR=/usr/share/datasets/fashion-mnist
# Records what the last complete project install was made from, so a rerun can skip it.
STAMP=$VENV/.hnq-setup-stamp

log() { printf 'setup: %s\n' "$*"; }
fail() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

case $HNQ_RUNTIME in
    cpu) runtime_package=onnxruntime; other_runtime_package=onnxruntime-gpu ;;
    gpu) runtime_package=onnxruntime-gpu; other_runtime_package=onnxruntime ;;
    *) fail "HNQ_RUNTIME is '$HNQ_RUNTIME' but must be 'cpu' or 'gpu'" ;;
esac

check_python_version() {
    local python=$1
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        fail "$python is Python $("$python" -c 'import platform; print(platform.python_version())'), but HNQ needs Python 3.10 or newer; set PYTHON to a newer interpreter (and remove $VENV if it was made by the old one)"
    fi
}

is_installed() {
    "$VENV_PYTHON" -m pip show --quiet "$1" >/dev/null 2>&1
}

# 1. Virtual environment.
if [[ ! -x $VENV_PYTHON ]]; then
    command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; install Python 3.10 or newer, or set PYTHON"
    check_python_version "$PYTHON"
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
check_python_version "$VENV_PYTHON"

# 2. pip.
"$VENV_PYTHON" -m pip install --quiet --upgrade pip

# 3. torch and torchvision, as a matched pair and before the project: an unpinned resolve
# of the project's torch>=2.4 would download a several-GB build, and a torchvision that
# does not match torch fails to import ('operator torchvision::nms does not exist').
torch_version_code='import torch, torchvision; print(torch.__version__)'
if ! torch_version=$("$VENV_PYTHON" -c "$torch_version_code" 2>/dev/null); then
    machine=$(uname -m)
    case $machine in
        x86_64) torch_pair=(torch==2.14.1 torchvision==0.29.1) ;;
        aarch64 | arm64) torch_pair=(torch==2.9.1 torchvision==0.24.1) ;;
        *) fail "no torch/torchvision pair is known for machine type '$machine'; install a matching pair into $VENV by hand, then run this script again" ;;
    esac
    log "installing ${torch_pair[*]}"
    "$VENV_PYTHON" -m pip install --quiet "${torch_pair[@]}"
    torch_version=$("$VENV_PYTHON" -c "$torch_version_code") \
        || fail "torch and torchvision fail to import after 'pip install ${torch_pair[*]}'; see the error above"
fi

# 4. Fashion-MNIST from Debian's dataset-fashion-mnist package.
if [[ ! -d $DATA_DIR ]]; then
    apt_install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist)
    if ! command -v apt-get >/dev/null; then
        log "Fashion-MNIST not found at $DATA_DIR and apt-get is missing; pass --data-dir with a folder holding the four Fashion-MNIST idx files"
    elif [[ $EUID -eq 0 ]]; then
        log "installing dataset-fashion-mnist"
        apt-get update -qq
        "${apt_install[@]}"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        log "installing dataset-fashion-mnist with sudo"
        sudo apt-get update -qq
        sudo "${apt_install[@]}"
    else
        log "Fashion-MNIST not found at $DATA_DIR; to install it, run as root: apt-get update && apt-get install dataset-fashion-mnist"
    fi
fi

# 5. The project, editable, with one ONNX Runtime and the test tools. onnxruntime and
# onnxruntime-gpu both install the `onnxruntime` import package, so removing one deletes
# files of the other: when the other one is present, remove both and install afresh.
# The editable install records which folders are packages, so the stamp also covers the
# list of __init__.py files: a folder that becomes a package needs a reinstall.
package_list_hash=$(find hnq onnx_ops models -name __init__.py | sort | sha256sum | cut -d' ' -f1)
stamp_value="$(sha256sum pyproject.toml | cut -d' ' -f1) $package_list_hash $HNQ_RUNTIME"
if is_installed "$other_runtime_package"; then
    runtime_packages=("$other_runtime_package")
    if is_installed "$runtime_package"; then
        runtime_packages+=("$runtime_package")
    fi
    log "removing ${runtime_packages[*]}, because onnxruntime and onnxruntime-gpu share the onnxruntime folder"
    "$VENV_PYTHON" -m pip uninstall --quiet -y "${runtime_packages[@]}"
    rm -f "$STAMP"
fi
if [[ -f $STAMP && $(cat "$STAMP") == "$stamp_value" ]] \
    && is_installed hnq && is_installed "$runtime_package"; then
    log "project already installed from this pyproject.toml ($HNQ_RUNTIME runtime); skipping pip"
else
    log "installing hnq in editable mode with extras [$HNQ_RUNTIME,dev]"
    "$VENV_PYTHON" -m pip install --quiet -e ".[$HNQ_RUNTIME,dev]"
    printf '%s\n' "$stamp_value" >"$STAMP"
fi

# 6. Summary. The torch version comes from step 3, which saves a second import of torch.
TORCH_VERSION=$torch_version "$VENV_PYTHON" - <<'EOF'
import os
import platform

import onnxruntime

providers = ", ".join(onnxruntime.get_available_providers())
print(
    f"setup: done: python {platform.python_version()}, torch {os.environ['TORCH_VERSION']}, "
    f"onnxruntime {onnxruntime.__version__} (providers: {providers})"
)
EOF
