#!/usr/bin/env bash
# The larger results-page run of issue 10: the RULER suite on the default model, every shipped
# policy, keep 0.25 and 0.1. Resumable: rerun the same line after an interruption; grow it with
# more samples or the 8k length by adding --extend (the rows already in OUT are reused).
#
#   scripts/ruler-suite.sh OUT LENGTHS SAMPLES [--extend]
#   scripts/ruler-suite.sh kvlab-results/ruler-suite 4k 1            # one sample per task at 4k
#   scripts/ruler-suite.sh kvlab-results/ruler-suite 4k,7808 3 --extend
#
# The 8k point is 7808 context tokens on the default model: SmolLM2 has 8192 positions, and the
# longest RULER question + answer (niah_multikey_3: ~100 + 128 tokens) must fit beside a context
# that may run 2% past its target (`kvlab compare` names the length that fits when one does not).
# RULER's own 8k likewise counts prompt and answer together in 8192 positions.
# THREADS (default: torch's choice) sets OMP_NUM_THREADS; use 1 when the cores are shared.
set -euo pipefail
out=${1:?OUT directory}
lengths=${2:?lengths, e.g. 4k or 4k,8k}
samples=${3:?samples per task and length}
shift 3
# snapkv first (the paired reference), then every other registered policy except `full` (always
# run) and `kvpress` (the bridge to NVIDIA's presses)
policies=$(python -c "from kvpress_lab.registry import default_registry as r
names = [n for n in r().names('policy') if n not in ('full', 'kvpress', 'snapkv')]
print(','.join(['snapkv', *names]))")
if [[ -n "${THREADS:-}" ]]; then export OMP_NUM_THREADS=$THREADS; fi
exec kvlab compare --policies "$policies" --tasks ruler --lengths "$lengths" --keep 0.25,0.1 \
  --samples "$samples" --out "$out" --no-progress "$@"
