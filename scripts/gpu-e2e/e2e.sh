#!/usr/bin/env bash
# The end-to-end GPU run of mistral.rs with Engram (issue 20), from a bundle written by
# `cargo xtask test-gpu --e2e --bundle DIR`; run on the device machine from the repository
# root: `bash DIR/e2e.sh`. Needs no Rust there: the CUDA host and the `engram` CLI travel
# compressed; the models are made there (make_llama.py, torch) and the Engram checkpoints
# by `engram init-checkpoint`.
#
# Phases, each recorded under $OUT as it ends (a run stopped by the call's limit still
# returns what it finished):
#   0. engram-plugin's `cuda` feature tests (CUDA-tensor hidden states against host
#      tensors, bit for bit), from the repository's tests/data;
#   1. ~1B shape, f32: identity (zero-value Engram vs --no-engram: logits bit-equal),
#      KV cache vs recompute (greedy ids equal), the in-host trace against the reference
#      (`engram check-trace`);
#   2. ~8B shape, bf16, tables of >= 30B parameters (bf16, in /dev/shm: host RAM):
#      throughput with mistral.rs's own figures, modes alternating (none, device,
#      pinned-host), each run a fresh host process: a 2k-token prompt (prefill, then
#      decode at batch 1) and 32 prompts (decode at batch 32).
# Exit status: 0 all checks passed, 1 a check failed, 2 no GPU, 3 out of time.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
exec > >(tee -a "$out/e2e.log") 2>&1
deadline=$((SECONDS + ${ENGRAM_E2E_SECONDS:-560}))
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "e2e.sh: NO GPU: nothing was run" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
work="${ENGRAM_E2E_WORK:-/tmp/engram-e2e}"
shm="${ENGRAM_E2E_SHM:-/dev/shm/engram-e2e}"
mkdir -p "$work" "$shm"
for b in engram-mistralrs-host engram plugin-cuda_tensors; do
  [ -x "$work/$b" ] || { xz -dc "$here/$b.xz" > "$work/$b.part" && chmod +x "$work/$b.part" && mv "$work/$b.part" "$work/$b"; } || exit 1
done
host="$work/engram-mistralrs-host"
engram="$work/engram"
# NVRTC, cuBLAS and cuRAND (loaded at run time) and cudart (linked by candle's and
# mistralrs-quant's kernels): the image's pip wheels.
extra=""
for f in $(find /usr/local /opt /usr/lib -maxdepth 10 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libcurand.so*' -o -name 'libcudart.so*' \) -not -path '*/stubs/*' 2>/dev/null); do
  extra="$extra:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$extra"
export ENGRAM_BACKEND=cuda
commit="$(cat "$here/COMMIT" 2>/dev/null || echo unknown)"
runs="$out/runs.jsonl"
: > "$runs"
failed=""
left() { [ $SECONDS -lt $deadline ]; }
note() { echo "e2e.sh: $*" >&2; }

# run NAME MODEL [host args...]: one host process, its JSON summary appended to runs.jsonl.
run() {
  local name="$1" model="$2"; shift 2
  local start=$SECONDS
  if "$host" --model "$model" --json "$@" > "$work/$name.json" 2> "$work/$name.err"; then
    python3 - "$name" "$work/$name.json" "$((SECONDS - start))" >> "$runs" <<'PY'
import json, sys
name, path, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
line = [l for l in open(path) if l.startswith("{")][-1]
print(json.dumps({"run": name, "wall_s": secs, "host": json.loads(line)}))
PY
    note "$name: $((SECONDS - start)) s"
  else
    note "$name FAILED: $(tail -5 "$work/$name.err")"
    failed="$failed $name"
    return 1
  fi
}

# ---- 0. the plugin's CUDA tensor path ----
[ -z "${ENGRAM_TEST_DATA:-}" ] && [ -f "$PWD/tests/data/forward_demo_small.safetensors" ] && export ENGRAM_TEST_DATA="$PWD/tests/data"
if timeout 300 "$work/plugin-cuda_tensors" --test-threads=1 --include-ignored > "$out/plugin-cuda_tensors.txt" 2>&1; then
  echo '{"check":"plugin_cuda_tensors","passed":true}' >> "$runs"; note "plugin cuda_tensors: passed"
else
  echo '{"check":"plugin_cuda_tensors","passed":false}' >> "$runs"; failed="$failed plugin-cuda_tensors"
  note "plugin cuda_tensors FAILED: $(tail -20 "$out/plugin-cuda_tensors.txt")"
fi

# ---- 1. checks on the ~1B shape ----
python3 "$here/make_llama.py" --shape 1b --tokenizer "$here/tokenizer" --out "$work/llama-1b" --seed 1 || exit 1
"$engram" init-checkpoint --model "$work/llama-1b" --out "$work/llama-1b-zero" --layers 1,8 --vocab 200000 --zero-value > /dev/null || exit 1
"$engram" init-checkpoint --model "$work/llama-1b" --out "$work/llama-1b-strong" --layers 1,8 --vocab 200000 --value-scale 2.0 > /dev/null || exit 1
prompt="Write a short story about a lighthouse keeper who finds a message in a bottle."
check=(--prompt "$prompt" --max-tokens 24 --dtype f32 --device cuda)
run identity-engram "$work/llama-1b-zero" "${check[@]}" --dump-logits "$work/id-on.f32"
run identity-none "$work/llama-1b-zero" "${check[@]}" --no-engram --dump-logits "$work/id-off.f32"
if cmp -s "$work/id-on.f32" "$work/id-off.f32"; then
  echo '{"check":"identity","passed":true}' >> "$runs"; note "identity: logits bit-equal"
else
  echo '{"check":"identity","passed":false}' >> "$runs"; failed="$failed identity"; note "identity FAILED: logits differ"
fi
run kv "$work/llama-1b-strong" "${check[@]}"
run recompute "$work/llama-1b-strong" "${check[@]}" --no-kv-cache
python3 - "$work/kv.json" "$work/recompute.json" >> "$runs" <<'PY' || failed="$failed kv-vs-recompute"
import json, sys
ids = [[o.get("text") for o in json.loads([l for l in open(p) if l.startswith("{")][-1])["outputs"]] for p in sys.argv[1:]]
ok = ids[0] == ids[1]
print(json.dumps({"check": "kv_vs_recompute", "passed": ok}))
sys.exit(0 if ok else 1)
PY
rm -rf "$work/trace"
ENGRAM_TRACE_DIR="$work/trace" run trace "$work/llama-1b-strong" "${check[@]}"
if "$engram" check-trace --json --tolerance "${ENGRAM_E2E_TRACE_TOL:-1e-4}" --model "$work/llama-1b-strong" "$work/trace" > "$work/check-trace.json"; then
  python3 -c 'import json,sys; r=[l for l in open(sys.argv[1]) if l.startswith("{")][-1]; print(json.dumps({"check":"trace","passed":True,"report":json.loads(r)}))' "$work/check-trace.json" >> "$runs"
else
  echo '{"check":"trace","passed":false}' >> "$runs"; failed="$failed trace"
fi

# ---- 2. throughput on the ~8B shape ----
python3 "$here/make_llama.py" --shape 8b --tokenizer "$here/tokenizer" --out "$work/llama-8b" --seed 8 || exit 1
# Two Engram layers x orders 2-3 x 1024 columns x 7.33M rows = 30.0B parameters (60.1 GB
# of bf16): in tmpfs (the disk holds the models), so "host memory" is RAM.
avail=$(df -B1 --output=avail "$shm" | tail -1)
if [ "${avail:-0}" -lt 61000000000 ]; then
  note "only $avail bytes free in $shm: the 60 GB table does not fit (set ENGRAM_E2E_SHM)"; failed="$failed checkpoint-8b"
elif left; then
  [ -f "$shm/llama-8b-engram/engram.safetensors" ] || "$engram" init-checkpoint --model "$work/llama-8b" --out "$shm/llama-8b-engram" --layers 2,16 --n-embed-per-ngram 1024 --vocab 7330000 > "$work/init-8b.txt" || { note "8B checkpoint not written"; failed="$failed checkpoint-8b"; }
fi
long="$(python3 -c 'import random; r=random.Random(7); w="the of engine steam valve river light north harbour signal cargo winter market copper".split(); print(" ".join(r.choice(w) for _ in range(1900)))')"
batch=()
for i in $(seq 1 32); do batch+=(--prompt "Tell me fact number $i about the sea."); done
for rep in 1 2; do
  for mode in none device pinned-host; do
    for load in prefill2k-decode1 decode32; do
      left || { note "out of time before $mode $load run $rep"; break 3; }
      case $load in
        prefill2k-decode1) args=(--prompt "$long" --max-tokens 64) ;;
        decode32) args=("${batch[@]}" --max-tokens 64) ;;
      esac
      case $mode in
        none) ENGRAM_CUDA_TABLES= run "8b-$mode-$load-$rep" "$shm/llama-8b-engram" "${args[@]}" --dtype bf16 --device cuda --no-engram ;;
        *) ENGRAM_CUDA_TABLES=$mode run "8b-$mode-$load-$rep" "$shm/llama-8b-engram" "${args[@]}" --dtype bf16 --device cuda ;;
      esac
    done
  done
done
python3 "$here/collect.py" --runs "$runs" --device "$out/device.txt" --commit "$commit" \
  --model "$work/llama-8b/params.json" --checkpoint "$shm/llama-8b-engram" --out "$out/gpu-e2e.json"
if [ $SECONDS -ge $deadline ]; then note "stopped at the time limit: gpu-e2e.json is partial"; exit 3; fi
if [ -n "$failed" ]; then note "FAILED:$failed"; exit 1; fi
note "all checks passed; $out/gpu-e2e.json"
