#!/usr/bin/env bash
# `make demo`: the whole path on this machine's CPU in about 10 minutes.
#   1. data: offline demo corpus -> tokenizer -> train/val shards (scripts/prepare_demo_data.sh)
#   2. base training: a tiny GPT on 2 gloo processes under the real deepspeed launcher (dp 2, ZeRO-1, fp32:
#      CPU bf16 matmuls are ~80x slower than fp32), val bits-per-byte every 50 steps, a greedy sample at the end
#   3. base evaluation of the trained weights (RUN_DIR/model.pt) on the same 2-rank grid: val bpb and CORE on
#      the offline task packages (a few examples per task: a smoke test, not a score), into base/base_eval.md
# Everything lands in ${DEMO_OUT:-demo_out}: base/metrics.jsonl, base/tensorboard/ (tensorboard --logdir it),
# base/checkpoints/, base/model.pt, base/base_eval.md. Rerunning retrains from scratch; the data step reuses what it already built.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${DEMO_OUT:-$ROOT/demo_out}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

bash "$ROOT/scripts/prepare_demo_data.sh" "$OUT"

RUN="$OUT/base"
rm -rf "$RUN"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus 2 --master_port "$PORT" "$ROOT/scripts/base_train.py" \
  --data "$OUT/data/demo" --val-data "$OUT/data/demo_val" --tokenizer "$OUT/tokenizer" \
  --depth "${DEMO_DEPTH:-3}" --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096 \
  --num-iterations "${DEMO_STEPS:-300}" --zero 1 --dtype fp32 \
  --eval-every 50 --eval-tokens 32768 --save-every 100 \
  --sample-prompt "Once upon a time" --sample-tokens 32 --out "$RUN" 2>&1 \
  | grep --line-buffered -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^\s*$'  # DeepSpeed's log chatter; errors stay

"$PY" - "$RUN" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
bpb = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
print("demo: val bpb " + " -> ".join(f"{b:.3f} (step {s})" for s, b in bpb))
if len(bpb) < 2 or not bpb[-1][1] < bpb[0][1]:
    sys.exit("demo: val bpb did not fall")
print(f"demo: TensorBoard logs in {sys.argv[1]}/tensorboard (tensorboard --logdir {sys.argv[1]}/tensorboard)")
EOF

deepspeed --num_gpus 2 --master_port "$PORT" "$ROOT/scripts/base_eval.py" --run "$RUN" --eval bpb,core \
  --eval-tokens 32768 --max-per-task "${DEMO_CORE_PER_TASK:-16}" 2>&1 \
  | grep --line-buffered -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^\s*$'
echo "demo: evaluation report in $RUN/base_eval.md"

# One question to the trained model through the inference engine (scripts/chat_cli.py -p, greedy). A base model
# has not learnt the chat format: it continues the prompt as text, so the prompt is a story opening.
PROMPT="Once upon a time, there was a little girl who"
ANSWER=$("$PY" "$ROOT/scripts/chat_cli.py" --run "$RUN" -p "$PROMPT" --temperature 0 --max-tokens 24)
echo "demo: chat -> \"$PROMPT\" -> \"${ANSWER//$'\n'/ }\""
