#!/usr/bin/env bash
# The GPU check (issue 13, item 10): everything the CPU test suite cannot prove, in one run of under 8 minutes on
# one H100/H200, one summary line per check (`check NAME: ...`), each step under its own `timeout` and all of
# them under one deadline, so a hung step costs its own limit and the rest still run.
#
#     bench/prepare_gpu_wheels.sh      # once, on a CPU machine with PyPI: bench/gpu_wheels/ (~6 MB, git-ignored)
#     bench/gpu_check.sh               # on the GPU machine, from a copy of the repository carrying bench/gpu_wheels
#                                      (a session's device tool: command bench/gpu_check.sh, carry [bench/gpu_wheels])
#
# The GPU machine has its own CUDA torch, lightning, transformers and peft but no hydra-core/omegaconf,
# webdataset or deepspeed, and no package index: they are installed from bench/gpu_wheels into a venv that sees
# the system's packages (its torch is never replaced). Logs and the summary go to $OUT/gpu_check (the device
# runner brings $OUT back) or /tmp/gpu_check_out. Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S
# (default 450), GPU_CHECK_WORK (scratch for runs and checkpoints, default /tmp/gpu_check_work), GPU_CHECK_SMOKE=1
# (the plumbing on a CPU machine: tiny shapes, CPU accelerator; its figures mean nothing and DeepSpeed through
# Lightning refuses a CPU accelerator, so z2/z3/consolidate fail there by design).
#
# Checks, in order:
#   setup        the wheels install; python, torch, CUDA device
#   train_1b     bench/bench_train.py: 1b bf16-mixed training step, 4 × 2048 frames: MFU vs the device's dense
#                bf16 datasheet peak, frames/s
#   memory_1b    the same run's torch.cuda.max_memory_allocated vs the planner (csm_train/plan.py)
#   tiny         python -m csm_train +experiment=tiny on the GPU in bf16-mixed: loss, MFU from the trainer's log
#   z2, z3       python -m csm_train +experiment=100m trainer=deepspeed_z2/z3 for a few steps through Lightning
#   consolidate  python -m csm_train.convert --to ours on the ZeRO-3 checkpoint (z2's if z3 failed), loaded back
#   attention    bench/bench_attention.py --device cuda --preset 100m --seq-len 2048 --dtype bf16 (flash vs
#                packed masks); "missing" where the script is not in this tree
#   serve        bench/bench_serve.py --device cuda: python -m serve on a random 1b, 1/8/16 concurrent streaming
#                clients, batched (max_batch=16) vs one at a time: aggregate audio s/s ratio, p95 time to first
#                audio vs a lone client (issue 16); skipped where the machine lacks what serve imports
#   decode_1b    bench/bench_generate.py --device cuda --preset 1b --dtype bf16 --contenders eager,compiled: batch 1
#                RTF (all 32 codebooks) and time to the first 5 frames, eager vs compile_decoding (torch.compile with
#                CUDA graphs; issue 17 item 2, goal RTF <= 0.2 and first audio <= 200 ms on an H100/H200)
#   ckpt_1b      (if time is left) the 1b step again with activation checkpointing: its compute and memory cost
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
LOGS=${OUT:-/tmp/gpu_check_out}/gpu_check
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
WHEELS=$REPO/bench/gpu_wheels
SYSTEM_PYTHON=${PYTHON:-python3}
mkdir -p "$LOGS" "$WORK"
SUMMARY=$LOGS/summary.txt
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    DEV=cpu ACCEL=cpu BIG=tiny ROWS=1 SEQ=256 TINY_STEPS=3 SMALL=(model.preset=tiny data.batch_size=2)
else
    DEV=cuda ACCEL=gpu BIG=1b ROWS=4 SEQ=2048 TINY_STEPS=30 SMALL=()
fi
: >"$SUMMARY"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME LIMIT_S CMD...: CMD under `timeout` (never past the deadline), output in $LOGS/NAME.log;
# sets RC and SECONDS_TAKEN. 124/137: timed out.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 20)); then
        RC=125 SECONDS_TAKEN=0
        echo "skipped: ${left}s left of the ${BUDGET}s budget" >"$LOGS/$name.log"
        return
    fi
    ((limit > left)) && limit=$left
    local t0
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    RC=$?
    SECONDS_TAKEN=$(($(date +%s) - t0))
}

# why NAME: one line saying how a step ended when it did not succeed.
why() {
    case $RC in
        124 | 137) echo "TIMEOUT after ${SECONDS_TAKEN}s" ;;
        125) echo "SKIPPED ($(cat "$LOGS/$1.log"))" ;;
        *) echo "FAILED rc=$RC in ${SECONDS_TAKEN}s: $(grep -E 'Error|error|Exception' "$LOGS/$1.log" | tail -1 | cut -c1-200)" ;;
    esac
}

# ---- setup: the missing packages from bench/gpu_wheels, into a venv over the system's site-packages --------
NEEDED="import hydra, omegaconf, webdataset, deepspeed"
setup() {
    local venv=$WORK/venv t0
    t0=$(date +%s)
    if "$SYSTEM_PYTHON" -c "$NEEDED" 2>/dev/null; then
        PY=$SYSTEM_PYTHON
        echo "$SYSTEM_PYTHON already has everything"
        return 0
    fi
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: run bench/prepare_gpu_wheels.sh on a CPU machine and carry bench/gpu_wheels"
        return 1
    fi
    timeout 60 "$SYSTEM_PYTHON" -m venv --system-site-packages --without-pip "$venv" && PY=$venv/bin/python
    # pip's resolver against what is installed: a package the machine has (torch, numpy, pyyaml, ...) is kept.
    if [ "$PY" = "$venv/bin/python" ] && timeout 120 "$PY" -m pip install --no-index --find-links "$WHEELS" \
        --no-warn-script-location hydra-core==1.3.8 omegaconf webdataset==1.0.2 deepspeed==0.19.8; then
        echo "installed with pip into $venv"
    else
        # No venv or pip, or pip could not resolve: unpack the wheels whose module the system lacks (wheels are zips).
        echo "pip unavailable or failed; unpacking the missing wheels into $WORK/site"
        PY=$SYSTEM_PYTHON
        timeout 60 "$SYSTEM_PYTHON" - "$WHEELS" "$WORK/site" <<'EOF' || return 1
import importlib.util, pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
modules = {"hydra_core": "hydra", "antlr4_python3_runtime": "antlr4", "py_cpuinfo": "cpuinfo"}
for whl in sorted(wheels.glob("*.whl")):
    dist = whl.name.split("-")[0]
    module = modules.get(dist, dist)
    if importlib.util.find_spec(module) is None:
        zipfile.ZipFile(whl).extractall(site)
        print("unpacked", whl.name)
EOF
        export PYTHONPATH=$PYTHONPATH:$WORK/site
    fi
    "$PY" -c "$NEEDED; print('imports ok')" && echo "setup took $(($(date +%s) - t0))s"
}
PY=$SYSTEM_PYTHON
if setup >"$LOGS/setup.log" 2>&1; then
    ENV=$("$PY" -c "import sys, torch, lightning, deepspeed; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), lightning {lightning.__version__}, deepspeed {deepspeed.__version__}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else \"NONE\"}')" 2>/dev/null | tail -1)
    say "check setup: ok ($(tail -1 "$LOGS/setup.log")); $ENV"
else
    say "check setup: FAILED: $(tail -3 "$LOGS/setup.log" | tr '\n' ' ' | cut -c1-300)"
fi
export PY

# ---- 1b training step: MFU, frames/s, peak memory vs the planner ---------------------------------------------
summary_of() { grep '^summary:' "$LOGS/$1.log" | tail -1; }
field() { sed -n "s/.* $2 \([^ ]*\).*/\1/p" <<<"$1"; }
run train_1b 150 "$PY" bench/bench_train.py --device $DEV --dtype bf16 --preset $BIG --rows $ROWS --seq $SEQ --steps 5
if ((RC == 0)); then
    S=$(summary_of train_1b)
    say "check train_1b: MFU $(field "$S" mfu) of the dense bf16 peak, $(field "$S" frames_per_s) frames/s, step $(field "$S" step_ms) ms ($BIG, $ROWS x $SEQ frames, bf16 autocast, activation checkpointing off, on $(field "$S" device))"
    if [ -n "$(field "$S" planned_gib)" ]; then
        say "check memory_1b: peak allocated $(field "$S" peak_gib) GiB vs planner $(field "$S" planned_gib) GiB (ratio $(field "$S" ratio))"
    else
        say "check memory_1b: not measured (no CUDA allocator on $(field "$S" device))"
    fi
else
    say "check train_1b: $(why train_1b)"
    say "check memory_1b: not measured (train_1b did not finish)"
fi

# ---- tiny on the GPU, bf16-mixed, through python -m csm_train ---------------------------------------------
run tiny 120 "$PY" -m csm_train +experiment=tiny run_dir="$WORK/tiny" trainer.accelerator=$ACCEL trainer.devices=1 \
    trainer.precision=bf16-mixed trainer.max_steps=$TINY_STEPS trainer.log_every_n_steps=1 checkpoint.every_n_steps=100
if ((RC == 0)); then
    PERF=$("$PY" - "$WORK/tiny/logs/metrics.csv" <<'EOF' 2>/dev/null
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
last = lambda key: next((r[key] for r in reversed(rows) if r.get(key)), "n/a")
mfu = last("perf/mfu")
print(f"MFU {float(mfu):.4f}" if mfu != "n/a" else "MFU n/a", f"frames/s {float(last('perf/frames_per_s')):.0f}" if last("perf/frames_per_s") != "n/a" else "")
EOF
    )
    say "check tiny: $(grep -E '^step [0-9]+:' "$LOGS/tiny.log" | tail -1) ($PERF, ${SECONDS_TAKEN}s)"
else
    say "check tiny: $(why tiny)"
fi

# ---- DeepSpeed ZeRO-2 and ZeRO-3 through Lightning, 100m, a few steps ----------------------------------------
for stage in z2 z3; do
    run "$stage" 150 "$PY" -m csm_train +experiment=100m trainer=deepspeed_$stage data=synthetic run_dir="$WORK/$stage" \
        trainer.devices=1 trainer.max_steps=4 trainer.log_every_n_steps=1 checkpoint.every_n_steps=4 trainer.accelerator=$ACCEL "${SMALL[@]}"
    if ((RC == 0)); then
        say "check $stage: $(grep -E '^step [0-9]+:' "$LOGS/$stage.log" | tail -1) (${SECONDS_TAKEN}s; checkpoint $(find "$WORK/$stage/checkpoints" -maxdepth 1 -name '*.ckpt' -printf '%f ' 2>/dev/null))"
    else
        say "check $stage: $(why "$stage")"
    fi
done

# ---- consolidation of the ZeRO checkpoint, loaded back -------------------------------------------------------
CKPT=$WORK/z3/checkpoints/last.ckpt
[ -e "$CKPT" ] || CKPT=$WORK/z2/checkpoints/last.ckpt
export CKPT WORK
# shellcheck disable=SC2016  # expanded by the inner bash
CONSOLIDATE='
"$PY" -m csm_train.convert "$CKPT" "$WORK/consolidated" --to ours || {
    echo "the safe reader refused; retrying with --trust-pickle (our own run'"'"'s directory)"
    "$PY" -m csm_train.convert --trust-pickle "$CKPT" "$WORK/consolidated" --to ours || exit 1
    echo "NEEDED --trust-pickle"
}
"$PY" -c "
import sys, torch
from csm_train import CSM
m = CSM.from_pretrained(sys.argv[1])
finite = all(bool(torch.isfinite(p).all()) for p in m.parameters())
print(f\"consolidated: {m.num_parameters():,} parameters, all finite: {finite}\")
" "$WORK/consolidated"
'
if [ -e "$CKPT" ]; then
    run consolidate 90 bash -c "$CONSOLIDATE"
    if ((RC == 0)); then
        say "check consolidate: $(grep '^consolidated:' "$LOGS/consolidate.log") from $(basename "$(dirname "$(dirname "$CKPT")")")$(grep -q 'NEEDED --trust-pickle' "$LOGS/consolidate.log" && echo ' (safe reader refused: needed --trust-pickle)')"
    else
        say "check consolidate: $(why consolidate)"
    fi
else
    say "check consolidate: no ZeRO checkpoint to consolidate (z2 and z3 wrote none)"
fi

# ---- flash attention vs packed masks (bench/bench_attention.py, another engineer's) -------------------------
if [ -f bench/bench_attention.py ]; then
    run attention 150 "$PY" bench/bench_attention.py --device $DEV --preset 100m --seq-len $SEQ --dtype bf16
    if ((RC == 0)) && grep -q '^attention:' "$LOGS/attention.log"; then
        grep '^attention:' "$LOGS/attention.log" | while read -r line; do say "check $line"; done
    elif ((RC == 0)); then
        say "check attention: ran but printed no 'attention:' line (see $LOGS/attention.log)"
    else
        say "check attention: $(why attention)"
    fi
else
    say "check attention: missing (bench/bench_attention.py is not in this tree)"
fi

# ---- the speech server: batched vs one request at a time (bench/bench_serve.py, issue 16) ---------------------
# Its packages come from bench/gpu_wheels in a pip install of their own: a failure here leaves training's alone.
SERVE_NEEDED="import fastapi, uvicorn, python_multipart, httpx, rich, av, soundfile, soxr, pyloudnorm, scipy"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then SERVE=(--presets tiny --concurrency 1 2 --frames 5); else
    SERVE=(--presets "$BIG" --concurrency 1 8 16 --frames 50 --torch-threads 0); fi
if [ ! -f bench/bench_serve.py ]; then
    say "check serve: missing (bench/bench_serve.py is not in this tree)"
else
    if ! "$PY" -c "$SERVE_NEEDED" 2>/dev/null && [ "$PY" != "$SYSTEM_PYTHON" ]; then
        timeout 120 "$PY" -m pip install --no-index --find-links "$WHEELS" --no-warn-script-location \
            fastapi uvicorn python-multipart httpx rich av soundfile soxr pyloudnorm >"$LOGS/serve_setup.log" 2>&1
    fi
    if MISSING=$("$PY" -c "$SERVE_NEEDED" 2>&1); then
        run serve 180 "$PY" bench/bench_serve.py --device $DEV "${SERVE[@]}" --work "$WORK/serve"
        if ((RC == 0)) && grep -q '^serve:' "$LOGS/serve.log"; then
            grep '^serve:' "$LOGS/serve.log" | while read -r line; do say "check $line (${SECONDS_TAKEN}s)"; done
        elif ((RC == 0)); then
            say "check serve: ran but printed no 'serve:' line (see $LOGS/serve.log)"
        else
            say "check serve: $(why serve)"
        fi
    else
        say "check serve: SKIPPED (cannot import what serve needs: $(tail -1 <<<"$MISSING" | cut -c1-150))"
    fi
fi

# ---- decoding speed: eager vs compiled frame steps, 1b bf16, batch 1 (issue 17 item 2) ------------------------
run decode_1b 240 "$PY" bench/bench_generate.py --device $DEV --preset $BIG --dtype bf16 --contenders eager,compiled \
    --frames 64
LINES=$(grep -E '^\| (eager|compiled) \|' "$LOGS/decode_1b.log" |
    awk -F' *[|] *' '{printf "%s: first frame (prefill + 1) %s s, %s frames/s, RTF %s, %s eager\n", $2, $3, $4, $5, $6}')
if ((RC == 0)) && [ -n "$LINES" ]; then
    while read -r line; do say "check decode_1b: $line (${SECONDS_TAKEN}s)"; done <<<"$LINES"
elif ((RC == 0)); then
    say "check decode_1b: ran but printed no contender line (see $LOGS/decode_1b.log)"
else
    say "check decode_1b: $(why decode_1b)"
fi

# ---- 1b with activation checkpointing: what it costs (compute) and saves (memory) ---------------------------
run ckpt_1b 120 "$PY" bench/bench_train.py --device $DEV --dtype bf16 --preset $BIG --rows $ROWS --seq $SEQ --steps 3 \
    --checkpointing
if ((RC == 0)); then
    S=$(summary_of ckpt_1b)
    say "check ckpt_1b: with activation checkpointing step $(field "$S" step_ms) ms, MFU $(field "$S" mfu), peak $(field "$S" peak_gib) GiB vs planner $(field "$S" planned_gib) GiB"
else
    say "check ckpt_1b: $(why ckpt_1b)"
fi

say "gpu_check: $(($(date +%s) - START))s in all; logs in $LOGS"
