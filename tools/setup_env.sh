#!/usr/bin/env bash
# Create or reuse the project's environment (.venv) with torch, detectron2 and scalenet_d2.
# Idempotent: when nothing it depends on changed, a second run only checks and exits.
#
# detectron2, in this order:
#   1. the environment already has one (e.g. your own source build with compiled ops): use it, touch nothing;
#   2. otherwise install the CPU fallback: detectron2 v0.6's Python sources from PyPI's
#      pb1-detectron2==0.6 sdist, without compiled ops (tools/detectron2_fallback/).
# Environment knobs: VENV (default .venv), PYTHON (interpreter that creates it, default python3),
# TORCH_SPEC (what to install when torch is missing), SCALENET_D2_CACHE (download cache).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-.venv}"
py="$venv/bin/python"
torch_spec="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
stamp="$venv/.scalenet_d2-setup"

inputs_hash() {
  cat setup.py pyproject.toml tools/setup_env.sh tools/detectron2_fallback/*.py | sha256sum | cut -d' ' -f1
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(inputs_hash)" ] \
   && "$py" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['torch', 'torchvision', 'detectron2', 'scalenet_d2'])))" 2>/dev/null; then
  echo "setup: $venv is up to date"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$py" ]; then
  echo "setup: creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$py" -m pip install --disable-pip-version-check)

if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing $torch_spec"
  # shellcheck disable=SC2086
  "${pip[@]}" $torch_spec
fi

d2_status="$("$py" tools/detectron2_fallback/ensure_detectron2.py status)"
d2_wheel=()
case "$d2_status" in
  missing)
    echo "setup: no detectron2 here: building the CPU fallback (detectron2 v0.6 without compiled ops)"
    cache="${SCALENET_D2_CACHE:-$HOME/.cache/scalenet_d2}"
    d2_wheel=("$("$py" tools/detectron2_fallback/ensure_detectron2.py build "$cache/detectron2-fallback/wheels")")
    ;;
  compiled|fallback)
    echo "setup: using the detectron2 already installed ($d2_status)"
    ;;
  *)
    echo "setup: WARNING: $d2_status" >&2
    echo "setup: leaving that detectron2 as it is; rebuild it or remove it to get the fallback" >&2
    ;;
esac

# One resolver run for detectron2 and scalenet_d2, so the fallback's pins hold for both.
"${pip[@]}" "${d2_wheel[@]}" -e ".[dev]"
# detectron2.model_zoo (its own, also after a source build) imports pkg_resources, which
# setuptools 81 removed; fix only that, and say so.
if ! "$py" -c "import detectron2.model_zoo" 2>/dev/null && ! "$py" -c "import pkg_resources" 2>/dev/null; then
  echo "setup: detectron2.model_zoo needs pkg_resources, gone from setuptools>=81: installing setuptools<81"
  "${pip[@]}" "setuptools<81"
fi
"$py" -m pip check
"$py" -c "import detectron2, detectron2.model_zoo, scalenet_d2"
inputs_hash > "$stamp"
echo "setup: done in $(( $(date +%s) - start ))s"
