#!/usr/bin/env bash
# The prepared GPU check, for one call on a lent GPU machine (about 10 minutes on one H200).
#
# Here, once (the machine there cannot download anything):
#   bash benchmarks/gpu_check.sh --prepare     # wheels into .whl/, model shapes into outputs/gpu-shapes
# There (through the device tool, carrying .whl and outputs/gpu-shapes):
#   bash benchmarks/gpu_check.sh               # writes $OUT/gpu-check.{json,md} and $OUT/log
set -uo pipefail
cd "$(dirname "$0")/.."
# the packages the GPU image lacks or has too old (it has torch, accelerate, safetensors, tokenizers, peft, pytest)
WHEELS="transformers==5.24.0 optimum==2.3.0 huggingface-hub==2.4.0 datasets==5.2.0 evaluate==0.4.6 gguf==0.19.0 \
compressed-tensors==0.20.1 filelock==4.3.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0"
if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w" || python3 -m pip download -q --no-deps -d .whl "$w"
    done
    .venv/bin/python benchmarks/gpu_check.py --prepare outputs/gpu-shapes
    du -sh .whl outputs/gpu-shapes
    exit 0
fi
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi 2>&1 | head -15 | tee "$OUT/log"
python3 benchmarks/gpu_check.py --shapes outputs/gpu-shapes --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log"
