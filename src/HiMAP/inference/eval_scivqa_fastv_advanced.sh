#!/usr/bin/env bash
# The user's guide's full suite: baseline, FastV max_head, avg_all_heads (original FastV) and weighted_combination
# alpha = 0.3 / 0.5 / 0.7, all with K=2 and R=288 of 576 image tokens, on the first NUM_SAMPLES questions.
#
#   bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh                 # the guide's settings
#   NUM_SAMPLES=20 OUTPUT_DIR=runs/quick bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh
#   bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh --model-path ./models/llava-1.5-7b-hf --gpu 0 \
#       -- --dtype bfloat16                                                # after "--": passed to fastv-sweep
#   FASTV_EMBEDDED=1 bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh    # embedded tiny model and data
#   bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh --hf-dataset lmms-lab/ScienceQA \
#       -- --hf-config ScienceQA-IMG --split test                          # ScienceQA from HF datasets
#   ZOO=1 FASTV_EMBEDDED=1 bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh  # every method, 3 budgets
#
# Settings (environment variable / option, default = the guide's value):
#   MODEL_PATH     --model-path     liuhaotian/llava-v1.5-7b (a local folder; hub ids must be in the local cache)
#   QUESTION_FILE  --question-file  /root/nfs/code/HiMAP/data/scienceqa/himap-inference-MCQ.json
#   IMAGE_FOLDER   --image-folder   ./data/scienceqa/images/test
#   HF_DATASET     --hf-dataset     (unset) ScienceQA from HF datasets instead of the two above: a hub id in the
#                                   local cache, a local folder or a parquet file (also accepted after "--")
#   NUM_SAMPLES    --num-samples    100 ("all" = every question)
#   GPU            --gpu            2 -> CUDA_VISIBLE_DEVICES. The default applies only where GPU 2 exists and
#                                   CUDA_VISIBLE_DEVICES is not already set; an explicit value is always used
#                                   (GPU="" hides every GPU: a CPU run).
#   OUTPUT_DIR     --output-dir     . (the result files land where the compare step looks by default)
#   BATCH_SIZE     --batch-size     1: questions per generate (1 = the guide's per-question latency; e.g. 16 on a
#                                   GPU for throughput: same predictions, latencies then per batch)
#   COMPARE        --no-compare     1: print the comparison table at the end (0 / --no-compare: skip it)
#   ZOO            --zoo            0: the guide's suite; 1: the method zoo instead: baseline and every pruning method
#                                   at its papers' 192 / 128 / 64-token presets (uniform and pool: 144 / 64), layers
#                                   moved to the model's depth; the comparison also draws OUTPUT_DIR/zoo.png
#   PYTHON                          python
# Any other option is passed to fastv-sweep (e.g. --dtype bfloat16, --max-new-tokens 8, --overwrite, --dry-run).
#
# All configurations run in ONE process with one model load (fastv-sweep). A re-run skips finished configurations
# and resumes an interrupted one. The script stops at the first failure and names the failing step.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../../.." && pwd)"

usage() {
    sed -n '2,35p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

GPU_GIVEN=${GPU+yes}
EXTRA_ARGS=()
while (($#)); do
    case "$1" in
        --model-path) MODEL_PATH="$2"; shift 2 ;;
        --question-file) QUESTION_FILE="$2"; shift 2 ;;
        --image-folder) IMAGE_FOLDER="$2"; shift 2 ;;
        --hf-dataset) HF_DATASET="$2"; shift 2 ;;
        --num-samples) NUM_SAMPLES="$2"; shift 2 ;;
        --output-dir) OUTPUT_DIR="$2"; shift 2 ;;
        --batch-size) BATCH_SIZE="$2"; shift 2 ;;
        --gpu) GPU="$2"; GPU_GIVEN=yes; shift 2 ;;
        --no-compare) COMPARE=0; shift ;;
        --zoo) ZOO=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA_ARGS+=("$@"); break ;;
        *) EXTRA_ARGS+=("$1"); shift ;;
    esac
done

# --hf-dataset after "--" counts as the HF_DATASET setting.
for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
    case "${EXTRA_ARGS[i]}" in
        --hf-dataset) HF_DATASET="${EXTRA_ARGS[i+1]:-}"; EXTRA_ARGS=("${EXTRA_ARGS[@]:0:i}" "${EXTRA_ARGS[@]:i+2}"); break ;;
        --hf-dataset=*) HF_DATASET="${EXTRA_ARGS[i]#--hf-dataset=}"; EXTRA_ARGS=("${EXTRA_ARGS[@]:0:i}" "${EXTRA_ARGS[@]:i+1}"); break ;;
    esac
done

MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
QUESTION_FILE="${QUESTION_FILE:-/root/nfs/code/HiMAP/data/scienceqa/himap-inference-MCQ.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./data/scienceqa/images/test}"
NUM_SAMPLES="${NUM_SAMPLES:-100}"
OUTPUT_DIR="${OUTPUT_DIR:-.}"
BATCH_SIZE="${BATCH_SIZE:-1}"
COMPARE="${COMPARE:-1}"
PYTHON="${PYTHON:-python}"
ZOO="${ZOO:-0}"
ZOO_METHODS=(fastv pdrop sparsevlm dart visionzip divprune uniform pool)

# GPU: an explicit value always wins; the guide's default (2) only where that GPU exists, so that the same command
# does not silently hide every GPU on a smaller machine or break a CPU run.
if [[ -n "${GPU_GIVEN}" ]]; then
    export CUDA_VISIBLE_DEVICES="${GPU}"
    GPU_NOTE="CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} (GPU given)"
elif [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    GPU_NOTE="CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} (already set)"
else
    num_gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    if ((num_gpus > 2)); then
        export CUDA_VISIBLE_DEVICES=2
        GPU_NOTE="CUDA_VISIBLE_DEVICES=2 (the guide's default)"
    else
        GPU_NOTE="CUDA_VISIBLE_DEVICES unset (${num_gpus} GPUs here: the guide's GPU 2 does not exist; set GPU to choose)"
    fi
fi

NUM_SAMPLES_ARGS=(--num-samples "${NUM_SAMPLES}")
if [[ "${NUM_SAMPLES}" == "all" ]]; then
    NUM_SAMPLES_ARGS=()
fi

# Prefer this checkout's package over another installation.
export PYTHONPATH="${REPO_ROOT}/src${PYTHONPATH:+:${PYTHONPATH}}"

STEP=""
on_exit() {
    local status=$?
    if ((status != 0)) && [[ -n "${STEP}" ]]; then
        echo "eval_scivqa_fastv_advanced.sh: FAILED at step '${STEP}' (exit status ${status})." >&2
        if [[ "${STEP}" == sweep* ]]; then
            echo "  Finished configurations are kept; fix the problem above and re-run the same command to resume." >&2
        fi
    fi
}
trap on_exit EXIT

# The banner shows the paths that will be used: with FASTV_EMBEDDED on, the sweep replaces the three paths by the
# embedded ones, decided as fastv_advanced/embedded.py does (any value but empty/0/false/no/off, case and surrounding
# spaces ignored; the files under this checkout, symlinks resolved).
embedded_value="$(printf '%s' "${FASTV_EMBEDDED:-}" | tr '[:upper:]' '[:lower:]' | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')"
SHOWN_MODEL="${MODEL_PATH}" SHOWN_QUESTIONS="${QUESTION_FILE}" SHOWN_IMAGES="${IMAGE_FOLDER}" EMBEDDED_NOTE=""
case "${embedded_value}" in
    ""|0|false|no|off) ;;
    *)
        EMBEDDED_ROOT="$(cd "${REPO_ROOT}" && pwd -P)"
        SHOWN_MODEL="${EMBEDDED_ROOT}/models/tiny-llava-scienceqa"
        SHOWN_QUESTIONS="${EMBEDDED_ROOT}/data/scienceqa/himap-inference-MCQ.json"
        SHOWN_IMAGES="${EMBEDDED_ROOT}/data/scienceqa/images/test"
        EMBEDDED_NOTE=" (FASTV_EMBEDDED is on: the embedded tiny model and data)" ;;
esac

if [[ "${ZOO}" != "0" ]]; then
    echo "FastV Advanced method zoo: baseline, ${ZOO_METHODS[*]} at the 192/128/64-token presets (uniform, pool: 144/64)"
    GRID_ARGS=(--pruning-method "${ZOO_METHODS[@]}" --pruning-preset 192 144 128 64)
    STEP_NAME="sweep (23 configurations, one model load)"
    PLOT_ARGS=(--plot "${OUTPUT_DIR}/zoo.png")
else
    echo "FastV Advanced suite: baseline, max_head, avg_all_heads, weighted_combination alpha 0.3/0.5/0.7 (R=288, K=2)"
    GRID_ARGS=(--fast-v-sys-length 35 --fast-v-image-token-length 576 --ranks 288 --agg-layers 2
               --methods max_head avg_all_heads weighted_combination --alphas 0.3 0.5 0.7)
    STEP_NAME="sweep (6 configurations, one model load)"
    PLOT_ARGS=()
fi
echo "  model ${SHOWN_MODEL}${EMBEDDED_NOTE}"
if [[ -n "${HF_DATASET:-}" ]]; then
    # The HF dataset replaces the question file and the image folder (its images come from its image column).
    DATA_ARGS=(--hf-dataset "${HF_DATASET}")
    echo "  questions: HF dataset ${HF_DATASET}; samples ${NUM_SAMPLES}"
else
    DATA_ARGS=(--question-file "${QUESTION_FILE}" --image-folder "${IMAGE_FOLDER}")
    echo "  questions ${SHOWN_QUESTIONS}; images ${SHOWN_IMAGES}; samples ${NUM_SAMPLES}"
fi
echo "  output ${OUTPUT_DIR}; batch size ${BATCH_SIZE}; ${GPU_NOTE}"

STEP="${STEP_NAME}"
echo
echo "== step 1/2: ${STEP}"
"${PYTHON}" -m fastv_advanced.cli.sweep \
    --model-path "${MODEL_PATH}" \
    "${DATA_ARGS[@]}" \
    --single-pred-prompt \
    "${GRID_ARGS[@]}" \
    --baseline \
    ${NUM_SAMPLES_ARGS[@]+"${NUM_SAMPLES_ARGS[@]}"} \
    --output-dir "${OUTPUT_DIR}" \
    --batch-size "${BATCH_SIZE}" \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}

for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    if [[ "${arg}" == "--dry-run" ]]; then
        STEP=""
        exit 0
    fi
done

if [[ "${COMPARE}" != "0" ]]; then
    STEP="compare (compare_fastv_results.py --results-dir ${OUTPUT_DIR})"
    echo
    echo "== step 2/2: ${STEP}"
    "${PYTHON}" "${SCRIPT_DIR}/compare_fastv_results.py" --results-dir "${OUTPUT_DIR}" \
        ${PLOT_ARGS[@]+"${PLOT_ARGS[@]}"}
fi
STEP=""
echo
echo "Done. Results: ${OUTPUT_DIR}/scienceqa_results_*.json; compare again with:"
echo "  python ./src/HiMAP/inference/compare_fastv_results.py --results-dir ${OUTPUT_DIR}"
