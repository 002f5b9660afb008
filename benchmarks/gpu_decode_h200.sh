#!/usr/bin/env bash
# The GPU floor table in one device lease (docs/results/gpu_decode.md): benchmarks/gpu_decode.py at 32K for every
# method, then at 128K for as many as the time left allows. One process per group of methods, so a failure in one
# group costs only its rows; each group writes its own run directory under OUT (rows.jsonl, env.json), resumable.
#
#   bash benchmarks/gpu_decode_h200.sh OUT [SECONDS] [extra gpu_decode.py arguments...]
#
# SECONDS (default 400) bounds the whole script: a group starts only with time left and is stopped at the end.
# The extra arguments go to every group (a toy shape on a CPU: see tests/test_gpu_decode.py).
set -u
out=${1:?usage: gpu_decode_h200.sh OUT [SECONDS] [gpu_decode.py arguments...]}
limit=${2:-400}
shift $(($# >= 2 ? 2 : 1))
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
mkdir -p "$out"

group() {  # name, lengths, methods, extra arguments
    local left=$((limit - SECONDS))
    if ((left < 30)); then
        echo "== $1: skipped, ${left} s left"
        return
    fi
    echo "== $1 (at ${SECONDS} s, ${left} s left)"
    timeout --signal=INT "$left" python3 "$here/gpu_decode.py" --lengths "$2" --methods "$3" --out "$out/$1" "${@:4}" \
        || echo "== $1: exit status $?"
}

# The order is what the next lease needs most first: the 2026-12-04 lease measured the shared and scored groups
# (docs/results/gpu_decode.md) but not the block methods, and H2O and StreamingLLM changed since.
group 32k-blocks 32768 infllm,actqkv "$@"
group 32k-scored 32768 h2o,pyramidkv "$@"
group 32k-shared 32768 snapkv,streamingllm,nacl,refreshkv "$@"
group 128k-blocks 131072 infllm,actqkv "$@"
group 128k-shared 131072 snapkv,streamingllm,nacl,refreshkv "$@"
echo "== done at ${SECONDS} s"
