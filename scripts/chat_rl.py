"""RL on GSM8K (or SpellingBee): nanochat's simplified GRPO on the one trainer, tp x dp with ZeRO (pp = 1).

    deepspeed --num_gpus N scripts/chat_rl.py --init-from SFT_RUN_DIR --out RUN_DIR [--task GSM8K|SpellingBee] \
        [--chat-data DIR] [--tp T --zero Z --dtype bf16] [--questions-per-step 16 --num-samples 16] \
        [--max-new-tokens 256 --temperature 1.0 --top-k 50] [--device-batch-size 8] [--num-iterations -1] \
        [--lr-scale 0.05] [--eval-every 60 --eval-questions 400 --eval-samples 8] [--save-every 60] [--resume]

Each step samples --num-samples completions of each of --questions-per-step train questions with the live model
(the inference engine, calculator included; the questions are split over dp slices, every tp rank of a slice
samples together), rewards each by the task's score, and takes one optimizer step on -sum(A * logp) over the
sampled tokens, A = reward - the question's mean reward (megachat.rl). GSM8K trains on its train split, which
needs --chat-data (tools/fetch_data.py chat gsm8k); SpellingBee is synthetic and offline. One epoch of the train
questions by default (GSM8K: 7473 // 16 = 467 steps), the learning rate from --lr-scale x the base rates down to
0 linearly over the run, no gradient clipping, as nanochat. pass@1..k on held-out questions at step 0, every
--eval-every steps and at the end. RUN_DIR gets config.json (phase "rl"), metrics.jsonl, tensorboard/,
checkpoints/ (--resume continues exactly) and model/ (the final weights).
"""
import argparse
import os

import torch.distributed as dist

from megachat import cli, rl
from megachat.build import build_trainer
from megachat.checkpoint import load_parent
from megachat.engine import Engine, Sampling
from megachat.monitor import Monitor
from megachat.parallel import check_layout, init_distributed
from megachat.train_config import add_trainer_args, config_from_run, config_options, loop_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="the SFT run directory (or a nanochat checkpoint directory)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the SFT run's)")
    p.add_argument("--task", choices=["GSM8K", "SpellingBee"], default="GSM8K")
    p.add_argument("--chat-data", default=None, help="directory of tools/fetch_data.py chat (GSM8K's train split)")
    p.add_argument("--eval-data-dir", default=None, help="evaluation data cache (default: $MEGACHAT_EVAL_DIR)")
    p.add_argument("--questions-per-step", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=16, help="completions sampled per question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-seq-len", type=int, default=-1,
                   help="training row length (default: the longest prompt of the run + --max-new-tokens)")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (default: one epoch of the questions)")
    p.add_argument("--lr-scale", type=float, default=0.05, help="x the base learning rates (nanochat's init_lr_frac)")
    p.add_argument("--eval-questions", type=int, default=400, help="held-out questions per evaluation")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per question: pass@1 .. pass@this")
    add_trainer_args(p, device_batch_size=8, eval_every=60)
    p.set_defaults(save_every=60)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.pp != 1:
        raise ValueError(f"--pp {args.pp}: RL samples its rollouts with the inference engine, which runs with pp = "
                         f"1; split the model with --tp and the questions over data-parallel ranks instead")
    if args.zero == 3:  # every forward would gather the weights over dp, but each dp slice decodes its own questions
        raise ValueError("--zero 3: ZeRO-3 gathers the weights with a collective over the data-parallel ranks in "
                         "every forward, and each data-parallel slice's rollouts stop after their own number of "
                         "decode steps (the ranks would wait on each other forever); use --zero 1 or 2")
    weights, parent, tokenizer, tokenizer_dir = load_parent(args.init_from, args.tokenizer)
    train, held_out, where = rl.load_rl_tasks(args.task, args.chat_data, args.eval_questions, args.seed,
                                              args.eval_data_dir)
    init_distributed(timeout_s=args.collective_timeout)
    rank = dist.get_rank()
    dp = check_layout(dist.get_world_size(), args.tp, 1)
    Q = args.questions_per_step
    rl.check_rl_batch(Q, args.num_samples, args.device_batch_size, dp)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, len(train) // Q)
    seq_len = args.max_seq_len if args.max_seq_len > 0 else (
        rl.prompt_length(tokenizer, train, num_iterations * Q) + args.max_new_tokens)
    # lr x (1 - step / num_iterations) (warmdown over the whole run) and no clipping: nanochat's chat_rl
    cfg = config_from_run(parent, seq_len=seq_len, device_batch_size=args.device_batch_size,
                          total_batch_size=Q * args.num_samples * seq_len, num_iterations=num_iterations,
                          lr_scale=args.lr_scale, warmdown_ratio=1.0, grad_clip=0.0,
                          **{**config_options(args), "pp": 1})
    trainer = build_trainer(cfg, args.out, resume=args.resume, weights=None if args.resume else weights)
    grid = trainer.grid
    # seed: the base of every question's own seed (megachat.rl.sample_seed), as the run's --seed
    sampling = Sampling(num_samples=args.num_samples, max_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=cfg.seed)
    evaluation = Sampling(num_samples=args.eval_samples, max_tokens=args.max_new_tokens, temperature=1.0, top_k=50,
                          seed=cfg.seed)  # nanochat's pass@k sampling
    trainer.write_run_config(args.out, phase="rl", parent=os.path.abspath(args.init_from),
                             tokenizer=tokenizer_dir, task=args.task,
                             chat_data=os.path.abspath(args.chat_data) if args.chat_data else None,
                             rl={"questions_per_step": Q, "sampling": vars(sampling),
                                 "eval_questions": len(held_out), "eval_sampling": vars(evaluation)})
    if rank == 0:
        print(f"megachat chat_rl: {where}", flush=True)
        print(f"megachat chat_rl: depth {cfg.depth}, tp {cfg.tp} x dp {grid.dp}, ZeRO-{cfg.zero}, {cfg.dtype}, "
              f"{cfg.num_iterations} steps of {Q} questions x {args.num_samples} samples (rows of {seq_len} tokens, "
              f"grad accum {trainer.grad_accum}), start at step {trainer.step}", flush=True)
    monitor = Monitor(args.out, enabled=rank == 0, resume_step=trainer.step if args.resume else None)
    # the live training weights (ZeRO-3: gathered by its hooks); the running batch holds a question's samples at least
    engine = Engine(trainer.model, tokenizer, max_batch=max(32, args.num_samples, args.eval_samples))
    on_grid = dict(dp_rank=grid.dp_rank, dp_size=grid.dp, scores=grid.tp_rank == 0)  # tp ranks share samples

    def batches(i):
        micro, stats = rl.rollout_batches(engine, train, i, Q, sampling, seq_len=seq_len,
                                          device_batch_size=cfg.device_batch_size, **on_grid)
        monitor.log(i + 1, **stats)
        if rank == 0:
            print(f"step {i + 1:6d} rollouts | reward {stats['reward']:.4f} | sequence length "
                  f"{stats['sequence_length']:.1f}", flush=True)
        return micro

    def evaluate(step):
        return rl.pass_at_k(engine, held_out, evaluation, **on_grid)

    trainer.fit(batches, evaluate, monitor=monitor, **loop_options(args))
    trainer.finish(args.out, monitor)


if __name__ == "__main__":
    cli.run(main)
