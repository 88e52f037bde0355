#!/usr/bin/env bash
# The GPU verification of helexa's ExLlama backends, in one run (issue 14; docs/gpu.md):
# install the wheels it brings, build ExLlamaV2's and ExLlamaV3's CUDA extensions with all
# cores, write a tiny random-weight llama as safetensors, quantise it with each library's
# own converter (EXL2, EXL3), start a real cortex and neuron, stream through the fabric with
# the official openai client, cancel a stream midway, let the model unload and check its
# VRAM is freed, and measure tokens/s through the fabric against each library's own
# generator called directly (target: at least 95%). Then, if time is left, the backends'
# conformance suite on the GPU.
#
#   scripts/gpu_check.sh OUTDIR [--dry-run]
#
# On the GPU machine, with the device tool (docs/gpu.md):
#   run(command="scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
# OUTDIR then holds summary.md, results.json and logs.tar.gz (every step's log; the device
# tool brings back at most 8 files). The summary is printed at the end too.
#
# .whl/ (ignored by git) is filled here, once, by scripts/gpu/fetch_wheels.sh, which runs
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl exllamav2==0.3.2 exllamav3==1.6.5 fastparquet==2026.9.0 cramjam==2.14.0 marisa-trie==1.4.1 \
#     trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1 trio-websocket==0.12.2 wsproto==1.3.2 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
#     openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 pytest-trio==0.8.0
#   .venv/bin/python scripts/gpu/tiny_model.py tokenizer .whl/smollm2-tokenizer
# (about 25 MB; the machine has torch, transformers, safetensors, numpy, pandas, tokenizers,
# jinja2, httpx, click, psutil, nvcc and no network).
#
# Every step logs to OUTDIR/logs/NN-STEP.log under its own time limit; a failed step does
# not stop the others, and a step whose inputs failed is skipped with the reason. The whole
# run keeps to HELEXA_GPU_BUDGET_S (default 470 s). Builds and models go to .gpu-build/ in
# the repository (ignored by git), so a second run on the same (still warm) machine reuses
# them; ExLlamaV3's extension build (~190 CUDA files) may not finish in the first run.
#
# --dry-run (or HELEXA_GPU_DRY=1) runs every step that needs no CUDA, on any machine: the
# wheels install into a temporary target (checked for Python 3.12), the tokenizer and the
# tiny model are written, models.toml is generated, and a real cortex and neuron serve a
# synthetic model through the same client checks (no VRAM figures). tests/runtime runs it.
#
# Environment: HELEXA_GPU_BUDGET_S, HELEXA_GPU_PYTHON (default python3; .venv/bin/python in
# a dry run), HELEXA_GPU_WORK (default .gpu-build, a temporary directory in a dry run),
# HELEXA_GPU_TOKENS (512), HELEXA_GPU_ROUNDS (3), HELEXA_GPU_CONCURRENCY (8),
# HELEXA_GPU_IDLE_TTL (10 s), HELEXA_GPU_TINY_ARGS (tiny_model.py's shape flags),
# HELEXA_GPU_SLIM_V3=0 (build every ExLlamaV3 kernel, not only the 4-bit ones the tiny model
# uses; see scripts/gpu/slim_exllamav3.py),
# HELEXA_GPU_KEEP_LOGS=1 (keep OUTDIR/logs/ beside the tarball), HELEXA_GPU_ENGINES ("v2 v3";
# "v3" alone gives ExLlamaV3's build every core), HELEXA_GPU_FRESH=1 (redo the tiny model and
# the quantised ones even if .gpu-build has them), HELEXA_GPU_SYNTHETIC_RATE (tokens/s of the
# synthetic model; 0, unlimited, on a GPU, 2000 in a dry run), MAX_JOBS (all cores).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$1; shift
DRY=${HELEXA_GPU_DRY:-0}
for arg in "$@"; do
    case $arg in --dry-run) DRY=1 ;; *) usage ;; esac
done
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
: >"$LOGS/steps.tsv"
START=$(date +%s)
BUDGET=${HELEXA_GPU_BUDGET_S:-470}
TOKENS=${HELEXA_GPU_TOKENS:-512}
ROUNDS=${HELEXA_GPU_ROUNDS:-3}
CONCURRENCY=${HELEXA_GPU_CONCURRENCY:-8}
IDLE_TTL=${HELEXA_GPU_IDLE_TTL:-10}
ENGINES=${HELEXA_GPU_ENGINES:-v2 v3}
REUSE=$([ "${HELEXA_GPU_FRESH:-0}" = 1 ] && echo 0 || echo 1)
SLIM_V3=${HELEXA_GPU_SLIM_V3:-1}
SYNTHETIC_RATE=${HELEXA_GPU_SYNTHETIC_RATE:-$([ "$DRY" = 1 ] && echo 2000 || echo 0)}
CONTROL_PORT=${HELEXA_GPU_CONTROL_PORT:-17071}
GATEWAY_PORT=${HELEXA_GPU_GATEWAY_PORT:-18081}
GATEWAY=http://127.0.0.1:$GATEWAY_PORT

WHEELS=${HELEXA_GPU_WHEELS:-$REPO/.whl}
TEMP_WORK=""
if [ "$DRY" = 1 ]; then
    PY=${HELEXA_GPU_PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
    [ -n "${HELEXA_GPU_WORK:-}" ] || TEMP_WORK=$(mktemp -d -t helexa-gpu-dry-XXXXXX)
    WORK=${HELEXA_GPU_WORK:-$TEMP_WORK}
else
    PY=${HELEXA_GPU_PYTHON:-python3}
    WORK=${HELEXA_GPU_WORK:-$REPO/.gpu-build}
fi
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
SITE=$WORK/site
PY_IS_312=$("$PY" -c 'import sys; print(int(sys.version_info[:2] == (3, 12)))' 2>/dev/null || echo 0)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" != 1 ] && command -v nvidia-smi >/dev/null; then
    # Build for this GPU's architecture only: each extra architecture costs another pass.
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
    [ -n "$CAP" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
fi

declare -A STATUS
N=0
CORTEX_PID="" NEURON_PID="" BUILD3_PID=""

remaining() { echo $((BUDGET - ($(date +%s) - START))); }
wanted() { case " $ENGINES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
record() {  # record NAME STATUS SECONDS NOTE
    STATUS[$1]=$2
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$LOGS/steps.tsv"
    printf '== %-14s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4"
}
skip() { N=$((N + 1)); record "$1" skipped 0 "$2"; }
ok() { [ "${STATUS[$1]:-}" = ok ]; }
needs() {  # needs STEP...: the first one that did not succeed, or nothing
    local d
    for d in "$@"; do ok "$d" || { echo "$d"; return; }; done
}
step() {  # step NAME MAX_SECONDS COMMAND: run COMMAND (bash) under the smaller of MAX and what is left
    local name=$1 max=$2 command=$3 left limit t0 rc note=""
    N=$((N + 1))
    left=$(remaining)
    if [ "$left" -lt 20 ]; then record "$name" skipped 0 "out of time (budget ${BUDGET}s)"; return 1; fi
    limit=$((max < left ? max : left))
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$command" >"$(printf '%s/%02d-%s.log' "$LOGS" "$N" "$name")" 2>&1
    rc=$?
    case $rc in
        0) record "$name" ok $(($(date +%s) - t0)) "" ;;
        124 | 137) record "$name" failed $(($(date +%s) - t0)) "timed out after ${limit}s" ;;
        *) record "$name" failed $(($(date +%s) - t0)) "exit $rc" ;;
    esac
    return $rc
}
export PY REPO WORK SITE LOGS GATEWAY TOKENS ROUNDS CONCURRENCY DRY WHEELS REUSE

# --- the fabric: a cortex and a neuron in the background ---------------------------------

write_models() {
    local gpus=0
    gpus=$("$PY" -c 'import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())' 2>/dev/null || echo 0)
    # With NVML seeing the GPU, place the ExLlama models as GPU models (min_devices = 1).
    local devices=$([ "${gpus:-0}" -ge 1 ] && echo 1 || echo 0)
    cat >"$WORK/models.toml" <<EOF
# Generated by scripts/gpu_check.sh. NVML saw ${gpus:-0} GPU(s).
[models."tiny-exl2"]
backend = "exllamav2"
memory_mb = 2048
min_devices = $devices
max_context = 4096
idle_ttl = $IDLE_TTL
[models."tiny-exl2".config]
metadata = $EXL2_METADATA

[models."tiny-exl3"]
backend = "exllamav3"
memory_mb = 4096
min_devices = $devices
max_context = 4096
idle_ttl = $IDLE_TTL
[models."tiny-exl3".config]
metadata = $EXL3_METADATA

# The fabric with no model behind it: its own ceiling on this machine.
[models."tiny-synthetic"]
backend = "synthetic"
memory_mb = 1
max_context = 4096
idle_ttl = $IDLE_TTL
[models."tiny-synthetic".config]
metadata = { tokens = 100000, tokens_per_second = $SYNTHETIC_RATE }
EOF
}

fabric_up() {
    rm -rf "$WORK/cortex"
    "$PY" -m helexa.cli cortex --data-dir "$WORK/cortex" --control-socket "127.0.0.1:$CONTROL_PORT" \
        --gateway-socket "127.0.0.1:$GATEWAY_PORT" --models "$WORK/models.toml" >"$LOGS/cortex.log" 2>&1 &
    CORTEX_PID=$!
    for _ in $(seq 100); do [ -s "$WORK/cortex/join-token" ] && break; sleep 0.2; done
    [ -s "$WORK/cortex/join-token" ] || { echo "the cortex wrote no join token"; return 1; }
    "$PY" -m helexa.cli neuron --cortex "ws://127.0.0.1:$CONTROL_PORT" --node-id gpu-neuron \
        --join-token-file "$WORK/cortex/join-token" >"$LOGS/neuron.log" 2>&1 &
    NEURON_PID=$!
    for _ in $(seq 150); do
        if "$PY" -m helexa.cli status --cortex "$GATEWAY" --data-dir "$WORK/cortex" --json >"$LOGS/fleet.json" 2>/dev/null &&
            grep -q '"node_id": "gpu-neuron"' "$LOGS/fleet.json"; then
            export HELEXA_ADMIN_TOKEN="$(cat "$WORK/cortex/admin-token")"
            echo "the neuron joined"
            return 0
        fi
        kill -0 "$NEURON_PID" 2>/dev/null || { echo "the neuron exited"; return 1; }
        sleep 0.2
    done
    echo "the neuron did not join"
    return 1
}

fabric_down() {
    local pid
    for pid in $NEURON_PID $CORTEX_PID; do
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        wait "$pid" 2>/dev/null
    done
    NEURON_PID="" CORTEX_PID=""
}

# --- ExLlamaV3's extension build, in the background ----------------------------------------

build3_running() { [ -n "$BUILD3_PID" ] && kill -0 "$BUILD3_PID" 2>/dev/null; }
build3_pause() { build3_running && kill -STOP -- "-$BUILD3_PID" 2>/dev/null; }   # keep timings clean
build3_resume() { build3_running && kill -CONT -- "-$BUILD3_PID" 2>/dev/null; }
build3_objects() { find "$TORCH_EXTENSIONS_DIR/exllamav3_ext" -name '*.o' 2>/dev/null | wc -l; }
build3_sources() { find "$SITE/exllamav3/exllamav3_ext" \( -name '*.cu' -o -name '*.cpp' \) -not -path '*/rocm/*' 2>/dev/null | wc -l; }

FAILED=0
finish() {  # stop what runs, summarise, pack the logs; FAILED counts failed steps
    FAILED=$(cut -f2 "$LOGS/steps.tsv" 2>/dev/null | grep -c '^failed$')
    build3_resume
    fabric_down
    "$PY" "$REPO/scripts/gpu/summary.py" "$OUT" --budget "$BUDGET" --elapsed $(($(date +%s) - START)) \
        $([ "$DRY" = 1 ] && echo --dry-run) >"$OUT/summary.md" 2>"$LOGS/summary.err" ||
        cat "$LOGS/summary.err" >>"$OUT/summary.md"
    cp "$WORK/models.toml" "$LOGS/" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs
    [ "${HELEXA_GPU_KEEP_LOGS:-$DRY}" = 1 ] || rm -rf "$LOGS"
    cat "$OUT/summary.md"
    if build3_running; then
        echo "ExLlamaV3's extension is still building ($(build3_objects) of $(build3_sources) objects, process group $BUILD3_PID)."
        echo "It goes on while this machine is held: run 'HELEXA_GPU_ENGINES=v3 scripts/gpu_check.sh OUTDIR' now (within 30 s) to finish it and check ExLlamaV3."
    fi
    [ -z "$TEMP_WORK" ] || rm -rf "$TEMP_WORK"
}
trap 'finish; trap - EXIT; exit 130' INT TERM
trap 'finish; exit $([ "$FAILED" = 0 ] && echo 0 || echo 1)' EXIT

EXL2_METADATA="{ path = \"$WORK/tiny-exl2\", max_seq_len = 65536 }"
EXL3_METADATA="{ path = \"$WORK/tiny-exl3\", cache_tokens = 262144, max_batch_size = 16 }"
EXL2_JSON='{"max_seq_len": 65536}'
EXL3_JSON='{"cache_tokens": 262144, "max_batch_size": 16}'
echo "helexa GPU check: out=$OUT work=$WORK python=$PY dry=$DRY budget=${BUDGET}s MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"

# 1. What the machine has.
step env 60 '
    date -u; uname -a; echo "cores: $(nproc)"; free -g 2>/dev/null
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    nvcc --version 2>&1 || echo "no nvcc"
    "$PY" -c "import sys; print(sys.version)"
    "$PY" -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())" 2>&1
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|safetensors|tokenizers|numpy|pandas|jinja2|flash|ninja) " || true
'

# 2. The wheels it brings, then what this interpreter can import.
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    skip install "no .whl/ here (scripts/gpu/fetch_wheels.sh fills it where a registry is reachable)"
elif [ "$DRY" = 1 ] && [ "$PY_IS_312" != 1 ]; then
    # Not Python 3.12 here: check that the set installs for 3.12 (one version of each, all
    # there); this interpreter's own packages stand in for them below.
    step install 180 '"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "$WHEELS"/*.whl && ls "$SITE" | grep dist-info'
else
    # Installed once per machine: a second run must not rewrite ExLlamaV3's sources under a
    # build that the first run left going.
    step install 180 'stamp=$(ls "$WHEELS"/*.whl | xargs -n1 basename | sort | sha256sum | cut -c1-16)
        if [ "$(cat "$SITE/.helexa-wheels" 2>/dev/null)" = "$stamp" ]; then echo "already installed ($stamp)"; else
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl &&
            echo "$stamp" >"$SITE/.helexa-wheels"; fi && ls "$SITE" | grep dist-info' && export PYTHONPATH=$SITE:$PYTHONPATH
fi
step imports 60 '"$PY" -c "
import importlib.util
import trio, trio_websocket, pydantic, cryptography, openai, safetensors, numpy, jinja2, helexa.cli
print(\"helexa, its cortex and neuron, the openai client: importable\")
for engine in (\"exllamav2\", \"exllamav3\", \"torch\", \"pytest_trio\", \"fastparquet\", \"marisa_trie\"):
    print(engine, \"present\" if importlib.util.find_spec(engine) else \"ABSENT\")
"'

# 3. The extensions: ExLlamaV3's (the longer) in the background at low priority, ExLlamaV2's now.
if [ "$DRY" = 1 ]; then
    skip build-v3 "dry run: needs CUDA"
    skip build-v2 "dry run: needs CUDA"
elif ! ok imports; then
    skip build-v3 "imports did not succeed"
    skip build-v2 "imports did not succeed"
else
    wanted v2 || skip build-v2 "not in HELEXA_GPU_ENGINES"
    wanted v3 || skip build-v3 "not in HELEXA_GPU_ENGINES"
fi
if ok imports && [ "$DRY" != 1 ] && wanted v3; then
    # ExLlamaV3 builds kernels for every bitrate; the tiny model needs one (see
    # scripts/gpu/slim_exllamav3.py). HELEXA_GPU_SLIM_V3=0 builds them all (and restores a
    # slimmed install), which takes far longer.
    if [ "$SLIM_V3" = 1 ]; then
        step slim-v3 60 '"$PY" "$REPO/scripts/gpu/slim_exllamav3.py" "$SITE" --bits 4'
    else
        step slim-v3 60 '"$PY" "$REPO/scripts/gpu/slim_exllamav3.py" "$SITE" --restore'
    fi
    N=$((N + 1))
    BUILD3_LOG=$(printf '%s/%02d-build-v3.log' "$LOGS" "$N")
    BUILD3_STEP=$N BUILD3_START=$(date +%s)
    setsid nice -n 10 "$PY" -c 'import exllamav3, exllamav3.ext; print("exllamav3", exllamav3.__version__ if hasattr(exllamav3, "__version__") else "")' \
        >"$BUILD3_LOG" 2>&1 &
    BUILD3_PID=$!
fi
if ok imports && [ "$DRY" != 1 ] && wanted v2; then
    step build-v2 360 '"$PY" -c "import exllamav2, exllamav2.ext; from exllamav2 import attn; print(\"exllamav2\", exllamav2.__version__, \"paged attention (flash-attn):\", attn.has_flash_attn_with_paged)"'
fi

# 4. The tiny model (CPU).
if [ -f "$WHEELS/smollm2-tokenizer/tokenizer.json" ]; then
    step tokenizer 30 'rm -rf "$WORK/tokenizer" && cp -r "$WHEELS/smollm2-tokenizer" "$WORK/tokenizer" && ls "$WORK/tokenizer"'
else
    step tokenizer 120 '"$PY" "$REPO/scripts/gpu/tiny_model.py" tokenizer "$WORK/tokenizer"'
fi
if ok tokenizer; then
    step tiny-model 180 'if [ "$REUSE" = 1 ] && [ -f "$WORK/tiny/model.safetensors" ]; then echo "reusing $WORK/tiny"; else
        rm -rf "$WORK/tiny" && "$PY" "$REPO/scripts/gpu/tiny_model.py" model --tokenizer "$WORK/tokenizer" '"${HELEXA_GPU_TINY_ARGS:-}"' "$WORK/tiny"; fi &&
        ls -la "$WORK/tiny"'
else
    skip tiny-model "no tokenizer"
fi

# 5. The fabric, serving from here on (models load on first use).
write_models
N=$((N + 1))
t0=$(date +%s)
if ok imports && fabric_up >"$(printf '%s/%02d-fabric-up.log' "$LOGS" "$N")" 2>&1; then
    record fabric-up ok $(($(date +%s) - t0)) ""
else
    record fabric-up failed $(($(date +%s) - t0)) "$(tail -n1 "$(printf '%s/%02d-fabric-up.log' "$LOGS" "$N")" 2>/dev/null)"
fi

engine_steps() {  # engine_steps KIND TAG MODEL_ID METADATA_JSON CONVERT_COMMAND
    local kind=$1 tag=$2 model=$3 metadata=$4 convert=$5 missing reuse
    missing=$(needs "build-$tag" tiny-model)
    # A rerun on the same machine keeps the quantised model (HELEXA_GPU_FRESH=1 redoes it).
    reuse='[ "$REUSE" = 1 ] && grep -qs "quant_method.*exl'"${tag#v}"'" "$WORK/'"$model"'/config.json" && echo "reusing $WORK/'"$model"'" ||'
    if [ -n "$missing" ]; then skip "convert-$tag" "$missing did not succeed"; else step "convert-$tag" 240 "$reuse ( $convert )"; fi
    missing=$(needs "convert-$tag")
    if [ -n "$missing" ]; then
        skip "direct-$tag" "$missing did not succeed"
    else
        build3_pause
        step "direct-$tag" 240 '"$PY" "$REPO/scripts/gpu/direct_bench.py" '"$kind"' "$WORK/'"$model"'" --metadata '"'$metadata'"' \
            --tokens "$TOKENS" --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --json "$LOGS/direct-'"$kind"'.json"'
        build3_resume
    fi
    missing=$(needs "convert-$tag" fabric-up)
    if [ -n "$missing" ]; then
        skip "fabric-$tag" "$missing did not succeed"
    else
        build3_pause
        step "fabric-$tag" 240 '"$PY" "$REPO/scripts/gpu/fabric_check.py" --gateway "$GATEWAY" --model '"$model"' \
            --tokens "$TOKENS" --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --unload-wait '"$((IDLE_TTL + 40))"' \
            --json "$LOGS/fabric-'"$kind"'.json"'
        build3_resume
    fi
}

# 6. ExLlamaV2: quantise (its converter, 4.0 bits), measure directly, then through the fabric.
wanted v2 && engine_steps exllamav2 v2 tiny-exl2 "$EXL2_JSON" 'rm -rf "$WORK/exl2-work" "$WORK/tiny-v2" && mkdir -p "$WORK/exl2-work" &&
    "$PY" -m exllamav2.conversion.convert_exl2 -i "$WORK/tiny" -o "$WORK/exl2-work" -cf "$WORK/tiny-v2" \
        -b 4.0 -hb 6 -r 16 -mr 8 -l 512 -ml 512 &&
    grep -q "\"exl2\"" "$WORK/tiny-v2/config.json" && rm -rf "$WORK/tiny-exl2" && mv "$WORK/tiny-v2" "$WORK/tiny-exl2"'
# (the converter writes tiny-v2; the models are served as tiny-exl2 / tiny-exl3)

# 7. ExLlamaV3: wait for its extension (leaving time for its own steps), then the same.
if [ -n "$BUILD3_PID" ]; then
    while build3_running && [ "$(remaining)" -gt 200 ]; do sleep 2; done
    if build3_running; then
        record build-v3 failed $(($(date +%s) - BUILD3_START)) "not finished: $(build3_objects) of $(build3_sources) objects built (still building in process group $BUILD3_PID)"
    elif wait "$BUILD3_PID"; then
        record build-v3 ok $(($(date +%s) - BUILD3_START)) "$(build3_objects) objects"
    else
        record build-v3 failed $(($(date +%s) - BUILD3_START)) "see $(basename "$BUILD3_LOG")"
    fi
fi
# With the slim build: every layer 4 bits (mul1 codebook), the output layer unquantised.
printf 'target_bpw: 4.0\nhead_bits: 16\ntensors:\n  "*": 4\n' >"$WORK/exl3-recipe.yaml"
EXL3_BITS=$([ "$SLIM_V3" = 1 ] && echo "-b 4.0 -rcp $WORK/exl3-recipe.yaml" || echo "-b 4.0")
wanted v3 && engine_steps exllamav3 v3 tiny-exl3 "$EXL3_JSON" 'rm -rf "$WORK/exl3-work" "$WORK/tiny-v3" &&
    "$PY" -m exllamav3.conversion.convert_model -i "$WORK/tiny" -o "$WORK/tiny-v3" -w "$WORK/exl3-work" \
        '"$EXL3_BITS"' -cr 16 -cc 512 &&
    grep -q "\"exl3\"" "$WORK/tiny-v3/config.json" && rm -rf "$WORK/tiny-exl3" && mv "$WORK/tiny-v3" "$WORK/tiny-exl3"'

# 8. The fabric's own ceiling here (a synthetic model); in a dry run, the client checks.
if ok fabric-up; then
    step fabric-synthetic 120 '"$PY" "$REPO/scripts/gpu/fabric_check.py" --gateway "$GATEWAY" --model tiny-synthetic \
        --tokens "$TOKENS" --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --unload-wait '"$((IDLE_TTL + 40))"' --no-vram \
        --json "$LOGS/fabric-synthetic.json"'
else
    skip fabric-synthetic "fabric-up did not succeed"
fi
fabric_down

# 9. If time is left: the backends' own tests on this GPU (conformance suite included).
for tag in $ENGINES; do
    kind=exllamav${tag#v}
    missing=$(needs "convert-$tag")
    if [ -n "$missing" ]; then
        skip "tests-$tag" "$missing did not succeed"
    else
        variable=HELEXA_EXL${tag#v}_MODEL
        step "tests-$tag" 150 "$variable=\"\$WORK/tiny-exl${tag#v}\" \"\$PY\" -m pytest \"\$REPO/tests/runtime/test_conformance.py\" \
            \"\$REPO/tests/runtime/test_$kind.py\" -k $kind -q -p no:cacheprovider -rs"
    fi
done
