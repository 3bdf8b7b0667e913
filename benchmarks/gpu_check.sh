#!/usr/bin/env bash
# One prepared GPU check, sized for at most 8 minutes on one H200: `bnet-fastai check --json`, the CUDA tests
# (pytest -m cuda: tests/test_cuda.py and the Triton kernels' tests/test_triton.py), the training-step (BNET
# one-map, composed and the fused Triton kernels) and inference + memory (peak and saved activations of BN, BNET
# composed, BNET one-map, BNET Triton) benchmarks with --json, and a short Fashion-MNIST study
# (all 60,000 training images, 28 px, 5 epochs, BN vs BNET, 3 seeds), each step under its own time cap.
#
#   benchmarks/gpu_check.sh             # on the GPU machine; results in $OUT (else benchmarks/gpu-check-<time>)
#   benchmarks/gpu_check.sh --dry-run   # anywhere, quickly: the plan, the file layout, every option each step
#                                       # passes checked against that command's --help, the install step skipped
#
# A GPU machine may have no network and another Python (3.12 with torch, torchvision, timm, accelerate, pandas,
# matplotlib, scipy and tensorboard): the script installs, with pip --no-index, the wheels of what it lacks
# from the kit beside it (benchmarks/gpu-kit/, git-ignored; `python benchmarks/gpu_kit.py prepare` fills it on
# a machine with the package registries: fastai and its small dependencies, kornia, and Fashion-MNIST's four
# files). Carry the kit with the repository.
#
# $OUT gets at most 8 files (what a device call returns): check.json, cuda-tests.xml, train_step.json,
# eval_and_memory.json, study.md (the report's tables), study-runs.tar.gz (the study's run folders, without
# weights), gpu_check.log (every step's output) and steps.tsv (step, exit status, seconds, cap). Runs, data
# and caches go to $WORK (default /tmp/bnet-gpu-check). Exit 0 when every step passed, else 1.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}
kit=${GPU_KIT:-$here/gpu-kit}
work=${WORK:-/tmp/bnet-gpu-check}
dry=0
case "${1:-}" in
    "") ;;
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option ${1} (valid: --dry-run, --help)" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then out=$OUT; elif [ "$dry" = 1 ]; then out=$(mktemp -d); else
    out=$here/gpu-check-$(date +%Y%m%d-%H%M%S); fi
mkdir -p "$out" "$work"
log=$out/gpu_check.log
steps=$out/steps.tsv
printf 'step\tstatus\tseconds\tcap\n' >"$steps"
cd "$repo" || exit 2
failed=0

# the layout the steps rely on
for f in bnet_fastai/app/cli.py tests/test_cuda.py benchmarks/train_step.py benchmarks/eval_and_memory.py \
         benchmarks/gpu_kit.py; do
    if [ ! -f "$f" ]; then echo "gpu_check.sh: $repo/$f is missing" >&2; exit 2; fi
done

# install what this Python lacks (the kit's wheels) into $work/site; the repository itself goes on PYTHONPATH
site=$work/site
if [ "$dry" = 1 ]; then
    "$python" benchmarks/gpu_kit.py install "$kit" "$site" --dry-run | tee -a "$log" || failed=1
else
    "$python" benchmarks/gpu_kit.py install "$kit" "$site" 2>&1 | tee -a "$log" || exit 2
fi
export PYTHONPATH=$site:$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export BNET_FASTAI_DATA=$work/data BNET_FASTAI_CACHE=$work/cache BNET_FASTAI_RESULTS=$work/results
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d "$kit/fashion-mnist" ]; then
    export BNET_FASTAI_FASHION_MNIST=$kit/fashion-mnist
fi

study=$work/study
# name|cap in seconds|command (run from the repository root)
plan=(
    "check|110|$python -m bnet_fastai check --json $out/check.json"
    "cuda-tests|110|$python -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py --junitxml $out/cuda-tests.xml"
    "train-step|80|$python benchmarks/train_step.py --formats channels_last --rounds 10 --variants bnet-k3-all,bnet-k3-all-composed,bnet-k3-all-triton,bnet-k3-last,bnet-k3-last-triton,authors-k3-all --json $out/train_step.json"
    "inference|40|$python benchmarks/eval_and_memory.py --rounds 20 --json $out/eval_and_memory.json"
    "data|30|$python -m bnet_fastai data fashion-mnist"
    "study|90|$python -m bnet_fastai sweep --dataset fashion-mnist --arch xmininet --norm bn,bnet --seed 0,1,2 --size 28 --bs 128 --lr 0.01 --epochs 5 --workers 2 --keep-weights false --parallel 6 --out $study"
    "report|20|$python -m bnet_fastai report $study --markdown"
)

# --dry-run: every --option of a step must be one its command offers (its --help), the CUDA tests must collect
options_known() {
    local command=$1 help
    if [[ $command == *" -m pytest "* ]]; then
        "$python" -m pytest -m cuda --collect-only -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py \
            >"$work/collect.txt" 2>&1 && grep -q "tests/test_cuda.py::" "$work/collect.txt" \
            && grep -q "tests/test_triton.py::" "$work/collect.txt" && return 0
        echo "the CUDA tests do not collect: $(tail -1 "$work/collect.txt")"; return 1
    fi
    local base=${command%% --*}
    help=$($base --help 2>&1) || { echo "$base --help failed: ${help##*$'\n'}"; return 1; }
    for option in $(grep -o -- ' --[a-z][a-z0-9-]*' <<<"$command"); do
        grep -q -- "$option\b" <<<"$help" || { echo "$base offers no $option"; return 1; }
    done
}

for entry in "${plan[@]}"; do
    IFS='|' read -r name cap command <<<"$entry"
    if [ "$dry" = 1 ]; then
        echo "[$name, at most ${cap} s] $command" | tee -a "$log"
        if why=$(options_known "$command"); then status=ok; else status="bad: $why"; failed=1; fi
        echo "  $status" | tee -a "$log"
        printf '%s\t%s\t%s\t%s\n' "$name" "dry-run ${status}" 0 "$cap" >>"$steps"
        continue
    fi
    echo "== $name (at most ${cap} s): $command" | tee -a "$log"
    start=$SECONDS
    if [ "$name" = report ]; then
        timeout "$cap" $command >"$out/study.md" 2>>"$log"; rc=$?
        cat "$out/study.md" >>"$log"
    else
        timeout --signal=TERM --kill-after=10 "$cap" $command >>"$log" 2>&1; rc=$?
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - start)) "$cap" >>"$steps"
    [ "$rc" = 0 ] || failed=1
    echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$log"
done

if [ "$dry" = 0 ] && [ -d "$study" ]; then
    tar -czf "$out/study-runs.tar.gz" -C "$work" study
fi
echo "gpu_check.sh: $( [ "$failed" = 0 ] && echo 'every step passed' || echo 'a step failed (see steps.tsv)' ); results in $out"
cat "$steps"
exit "$failed"
