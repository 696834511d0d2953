#!/usr/bin/env bash
# `make demo`: nanochat's whole recipe at toy size on this machine's 2 CPU cores, every step under the real
# deepspeed launcher (2 gloo processes, fp32: CPU bf16 matmuls are ~80x slower than fp32):
#   1. data: offline demo corpus -> tokenizer -> train/val shards (scripts/prepare_demo_data.sh)
#   2. base training: a tiny GPT, val bits-per-byte every 50 steps, a greedy sample at the end
#   3. base evaluation: val bpb and CORE on the offline task packages (a few examples per task: a smoke test)
#   4. midtraining, 5. SFT, 6. a few RL steps: on the offline chat data (identity, SimpleSpelling, SpellingBee;
#      the real sources need tools/fetch_data.py chat, and each phase says which task it leaves out)
#   7. ChatCORE of the RL model (a few examples per task), 8. one question to it through the inference engine,
#   9. the report card: $OUT/base/report.md with loss and val-bpb plots of every phase
# Everything lands in ${DEMO_OUT:-demo_out}: base/, mid/, sft/, rl/ (each with metrics.jsonl, tensorboard/,
# checkpoints/, model/ = the final weights). Rerunning retrains from scratch; the data step reuses what it already built.
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

DS=(deepspeed --num_gpus 2 --master_port "$PORT")
QUIET='^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^\s*$'  # DeepSpeed's log chatter; errors stay
"${DS[@]}" "$ROOT/scripts/base_eval.py" --run "$RUN" --eval bpb,core \
  --eval-tokens 32768 --max-per-task "${DEMO_CORE_PER_TASK:-16}" 2>&1 | grep --line-buffered -v -E "$QUIET"
echo "demo: evaluation report in $RUN/base_eval.md"

# The chat phases, each continuing the previous one's weights (--init-from).
CHAT=(--dtype fp32 --zero 1)
rm -rf "$OUT/mid" "$OUT/sft" "$OUT/rl"
"${DS[@]}" "$ROOT/scripts/mid_train.py" --init-from "$RUN" --out "$OUT/mid" "${CHAT[@]}" --mixture-scale 0.005 \
  --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096 --eval-every 20 --eval-tokens 16384 2>&1 \
  | grep --line-buffered -v -E "$QUIET"
"${DS[@]}" "$ROOT/scripts/chat_sft.py" --init-from "$OUT/mid" --out "$OUT/sft" "${CHAT[@]}" --mixture-scale 0.1 \
  --max-seq-len 512 --examples-per-step 16 --device-batch-size 4 --eval-every 5 --eval-examples 32 \
  --acc-every 10 --acc-examples 32 2>&1 | grep --line-buffered -v -E "$QUIET"
"${DS[@]}" "$ROOT/scripts/chat_rl.py" --init-from "$OUT/sft" --out "$OUT/rl" "${CHAT[@]}" --task SpellingBee \
  --num-iterations "${DEMO_RL_STEPS:-4}" --questions-per-step 4 --num-samples 4 --max-new-tokens 64 --max-seq-len 512 \
  --device-batch-size 4 --eval-every 4 --eval-questions 8 --eval-samples 2 2>&1 | grep --line-buffered -v -E "$QUIET"
"${DS[@]}" "$ROOT/scripts/chat_eval.py" --run "$OUT/rl" --max-per-task "${DEMO_CHAT_PER_TASK:-8}" \
  --max-tokens 64 2>&1 | grep --line-buffered -v -E "$QUIET"

# One question to the chat model through the inference engine (scripts/chat_cli.py -p, greedy).
PROMPT="What is your name?"
ANSWER=$("$PY" "$ROOT/scripts/chat_cli.py" --run "$OUT/rl" -p "$PROMPT" --temperature 0 --max-tokens 32)
echo "demo: chat -> \"$PROMPT\" -> \"${ANSWER//$'\n'/ }\""

"$PY" "$ROOT/scripts/report.py" "$RUN" "$OUT/mid" "$OUT/sft" "$OUT/rl"
