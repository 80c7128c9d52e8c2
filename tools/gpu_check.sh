#!/usr/bin/env bash
# One-shot GPU check: what only a GPU can show, in one command, with one table at the end.
#
#   tools/gpu_check.sh [--official-msg DIR] [--official-mgssaf DIR] [--out DIR] [--python PY]
#   tools/gpu_check.sh --dry-run          # the same steps on the CPU at tiny sizes (CI runs this)
#
# Steps (each with its own time limit; a failed step does not stop the others):
#   1. NCCL training of the demo configs for 2 epochs at float16 and bfloat16, then --eval of the checkpoint
#      (pytest -m cuda -k training_then_eval: 1 GPU, and 2 GPUs where there are two);
#   2. the other CUDA tests (pytest -m cuda): SDPA's fused kernels with the attention bias, AMP, channels-last and
#      torch.compile against eager, gradient checkpointing's peak memory, NCCL collectives;
#   3. every model's training step with the math SDPA kernel disabled: a fused kernel serves every attention;
#   4. bench/benchmark.py for the six variants (and the official models where their checkouts are given) at batch
#      128, float16 AMP: inference and training img/s, peak memory, ratios to the official;
#   5. the same with --compile for the T variants.
# The table and every step's log go to --out (default output/gpu_check). Budget: about 8 minutes on one H100.
#
# On a machine without yacs / termcolor (the device image), put their wheels in .whl/ first (see the device
# tool's README): the script installs what .whl/ holds into a scratch folder when an import fails.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OFFICIAL_MSG=''
OFFICIAL_MGSSAF=''
OUT='output/gpu_check'
PY=''
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --official-msg) OFFICIAL_MSG="$2"; shift ;;
    --official-mgssaf) OFFICIAL_MGSSAF="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
TABLE="$OUT/table.txt"
: > "$TABLE"

if ! "$PY" -c 'import yacs, termcolor, timm' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

if [ "$DRY" = 1 ]; then
  export GPU_CHECK_DRY_RUN=1  # the CPU case of the training test runs here, not in the suite
  DEVICE=cpu
  CFGS="configs/msg_demo.yaml"  # one model: the steps' code paths, not the figures
  T_CFGS="configs/msg_demo.yaml"
  BATCH=2
  AMP=()  # float16 autocast is a GPU feature: float32 here
  MIN_TIME=0.05
  TRAIN_TESTS=(tests/test_cuda.py -k 'cpu-2-bfloat16-msg')
  CUDA_TESTS=(tests/test_cuda.py -k 'cpu and (sdpa or collectives)')
else
  DEVICE=cuda
  CFGS="configs/msg_tiny_p4_win7_224.yaml configs/msg_small_p4_win7_224.yaml configs/msg_base_p4_win7_224.yaml
        configs/MG-SSAF/MG-SSAF-T.yaml configs/MG-SSAF/MG-SSAF-S.yaml configs/MG-SSAF/MG-SSAF-B.yaml"
  T_CFGS="configs/msg_tiny_p4_win7_224.yaml configs/MG-SSAF/MG-SSAF-T.yaml"
  BATCH=128
  AMP=(--amp-dtype float16)
  MIN_TIME=1
  TRAIN_TESTS=(-m cuda tests/test_cuda.py -k 'training_then_eval')
  CUDA_TESTS=(-m cuda tests/test_cuda.py -k 'not training_then_eval')
fi
OFFICIAL=()
[ -n "$OFFICIAL_MSG" ] && OFFICIAL+=(--official-msg "$OFFICIAL_MSG")
[ -n "$OFFICIAL_MGSSAF" ] && OFFICIAL+=(--official-mgssaf "$OFFICIAL_MGSSAF")

FAILED=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, log it, add a row to the table
  local name="$1" limit="$2"; shift 2
  local log="$OUT/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log" t0=$SECONDS rc
  echo ">>> $name: $*" >&2
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  local status=ok
  if [ $rc = 124 ]; then status="timeout (${limit} s)"; FAILED=1
  elif [ $rc != 0 ]; then status="failed (exit $rc)"; FAILED=1; fi
  local summary
  summary=$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$log" | tail -n 1 | tr -s ' ' | cut -c1-80)
  printf '%-44s %-16s %5ss  %s\n' "$name" "$status" "$((SECONDS - t0))" "$summary" >> "$TABLE"
}

"$PY" - > "$OUT/machine.txt" 2>&1 <<EOF
import torch
dev = torch.device('$DEVICE')
name = torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'CPU'
print(f'torch {torch.__version__}, device {dev} ({name}), GPUs: {torch.cuda.device_count()}')
EOF

step "1. training + eval (fp16, bf16), $DEVICE" 300 "$PY" -m pytest -q -p no:cacheprovider "${TRAIN_TESTS[@]}"
step "2. CUDA tests (SDPA, AMP, compile, memory)" 300 "$PY" -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}"
step "3. fused SDPA kernels, every attention" 120 "$PY" - "$DEVICE" <<'EOF'
import sys
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, '.')
import models  # noqa: F401

device = sys.argv[1]
fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
if device == 'cpu':
    fused = [SDPBackend.FLASH_ATTENTION]  # the CPU's only fused kernel (no bias gradient: MSG falls back on CPU)
for name in ('msg_transformer_tiny', 'mg_ssaf_tiny'):
    model = timm.create_model(name, num_classes=10).to(device)
    x = torch.randn(1, 3, 224, 224, device=device)
    dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    try:
        with sdpa_kernel(fused), torch.autocast(device, dtype=dtype):
            model(x).float().sum().backward()
        print(f'{name}: a fused SDPA kernel for every attention, forward and backward')
    except RuntimeError as e:
        if device == 'cuda':
            raise
        print(f'{name}: CPU: {str(e).splitlines()[0][:100]}')
print('passed')
EOF
step "4. benchmark, six variants, batch $BATCH" 420 "$PY" bench/benchmark.py --cfg $CFGS "${OFFICIAL[@]}" \
  --device "$DEVICE" --batch-size "$BATCH" "${AMP[@]}" --min-time "$MIN_TIME" --saved-bytes --json "$OUT/benchmark.json"
if [ "$DRY" = 1 ]; then
  printf '%-44s %-16s %5ss  %s\n' "5. benchmark --compile, T variants" "skipped" 0 \
    "dry run: compiling on a CPU takes minutes" >> "$TABLE"
else
  step "5. benchmark --compile, T variants" 420 "$PY" bench/benchmark.py --cfg $T_CFGS --device "$DEVICE" \
    --batch-size "$BATCH" "${AMP[@]}" --min-time "$MIN_TIME" --compile --json "$OUT/benchmark_compile.json"
fi

echo
cat "$OUT/machine.txt"
cat "$TABLE"
for log in "$OUT"/4*.log "$OUT"/5*.log; do  # the benchmark's own table and ratios
  [ -f "$log" ] || continue
  echo
  awk '/ GFLOP\/s; device |^device /{p=1} p' "$log"
done
exit $FAILED
