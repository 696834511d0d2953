#!/usr/bin/env bash
# nanochat's speedrun with megachat on one node of 8 H100s: FineWeb-Edu -> tokenizer -> shards -> d20 base model
# (configs/presets/d20.json: the layout tools/plan.py picks) -> base evaluation -> midtraining -> SFT -> ChatCORE
# -> report card. Run it again after an interruption: finished steps are kept, training steps resume from their
# newest checkpoint (--resume auto), and a tool refuses to redo finished work rather than overwrite it.
#
#   bash scripts/speedrun.sh                 # outputs in runs/speedrun, data in data/
#   OUT=runs/mine NPROC=4 bash scripts/speedrun.sh
#
# Then talk to it: python scripts/chat_web.py --run runs/speedrun/sft   (http://127.0.0.1:8000/)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-8}
OUT=${OUT:-runs/speedrun}
DATA=${DATA:-data}
PRESET=${PRESET:-configs/presets/d20.json}
DS=(deepspeed --num_gpus "$NPROC")

# 240 FineWeb-Edu shards (~11B tokens: 20 tokens per parameter at d20); the last one is held out for validation
python tools/fetch_data.py fineweb -n 240 --output "$DATA/fineweb"
[[ -f $OUT/tokenizer/mergeable_ranks.tiktoken ]] || python tools/train_tokenizer.py \
  --input "$DATA/fineweb/shard_000[0-7]?.parquet" --max-chars 2000000000 --output "$OUT/tokenizer"
[[ -f $DATA/fineweb_train.idx ]] || python tools/preprocess_data.py \
  --input "$DATA/fineweb/shard_00[01]??.parquet" "$DATA/fineweb/shard_002[0-2]?.parquet" "$DATA/fineweb/shard_0023[0-8].parquet" \
  --tokenizer "$OUT/tokenizer" --output-prefix "$DATA/fineweb_train" --val-input "$DATA/fineweb/shard_00239.parquet"

"${DS[@]}" scripts/base_train.py --preset "$PRESET" --data "$DATA/fineweb_train" \
  --val-data "$DATA/fineweb_train_val" --tokenizer "$OUT/tokenizer" --eval-every 250 --save-every 1000 \
  --out "$OUT/base" --resume auto
"${DS[@]}" scripts/base_eval.py --run "$OUT/base" --eval bpb,core,sample

python tools/fetch_data.py chat --output "$DATA/chat"
"${DS[@]}" scripts/mid_train.py --init-from "$OUT/base" --chat-data "$DATA/chat" --out "$OUT/mid" --resume auto
"${DS[@]}" scripts/chat_sft.py --init-from "$OUT/mid" --chat-data "$DATA/chat" --out "$OUT/sft" --resume auto
"${DS[@]}" scripts/chat_eval.py --run "$OUT/sft"
python scripts/report.py "$OUT/base" "$OUT/mid" "$OUT/sft"
