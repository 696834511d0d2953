"""megachat.train_config's checks without processes: every bad layout is refused by check_config (which runs before
any process group is created) with a message naming the value and the fix; the DeepSpeed config (build.ds_config)
gets the batch filled in."""
import argparse
from pathlib import Path

import pytest

import torch

from megachat.build import ds_config, largest_layer
from megachat.model import GPT
from megachat.parallel import Grid
from megachat.tensor_parallel import FP8_INSTALL, use_fp8
from megachat.train_config import TrainConfig, add_trainer_args, check_config, config_options, newton_schulz_dtype


def cfg(**kw):
    # depth 4: 4 layers, 2 heads, 2 KV heads; 8 sequences of 32 tokens per step
    base = dict(depth=4, vocab_size=512, seq_len=32, device_batch_size=2, total_batch_size=256, num_iterations=5,
                zero=0, dtype="fp32")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,world,message", [
    (dict(pp=2, zero=2), 2, "ZeRO stage 2 cannot be combined with pipeline parallelism"),
    (dict(pp=2, zero=3), 2, "ZeRO stage 3 cannot be combined with pipeline parallelism"),
    (dict(tp=4), 4, "--tp 4 does not divide n_head = 2"),
    (dict(tp=2, depth=4, n_kv_head=1), 2, None),  # tp a multiple of n_kv_head: KV head replicated, allowed
    (dict(tp=2), 3, "world size 3 is not divisible by tp*pp = 2*1 = 2"),
    (dict(total_batch_size=192), 2, "--total-batch-size 192 is not divisible by device_batch_size * seq_len * dp"),
    (dict(total_batch_size=250), 1, "is not a multiple of --max-seq-len 32"),
    (dict(pp=8, depth=4), 8, "--pp 8 is larger than the number of layers (4)"),
    (dict(dtype="fp16"), 1, "--dtype 'fp16' is not supported"),
    (dict(dtype="bf16", zero=0), 1, "--dtype bf16 needs --zero >= 1"),
    (dict(ns_dtype="fp16"), 1, "ns_dtype 'fp16' is not a Newton-Schulz compute dtype"),
    (dict(sequence_parallel=True), 1, "--sequence-parallel splits the sequence over tensor-parallel ranks: it needs "
                                      "--tp > 1"),
    (dict(sequence_parallel=True, tp=2, seq_len=31, total_batch_size=248), 2,
     "splits the 31 positions of a sequence over --tp 2 ranks: use a --max-seq-len divisible by 2"),
], ids=["zero2_pp2", "zero3_pp2", "tp_not_dividing_heads", "tp_multiple_of_kv_heads_ok", "world_not_tp_pp_dp",
        "batch_not_divisible", "batch_not_whole_sequences", "pp_over_layers", "bad_dtype", "bf16_zero0",
        "bad_ns_dtype", "sp_without_tp", "sp_length_not_divisible"])
def test_check_config_refuses_bad_layouts_with_a_clear_message(kw, world, message):
    if message is None:
        assert check_config(cfg(**kw), world) == 1
        return
    with pytest.raises(ValueError) as e:
        check_config(cfg(**kw), world)
    assert message in str(e.value)


def test_check_config_pads_the_vocab_for_tp_instead_of_refusing_it():
    assert check_config(cfg(tp=2, vocab_size=511), 2) == 1


def test_ds_config_fills_the_batch_from_the_cli_and_clips_in_muon():
    conf = ds_config(cfg(zero=1, dtype="bf16"), dp=2)
    assert (conf["train_batch_size"], conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]) \
        == (8, 2, 2)
    assert conf["zero_optimization"]["stage"] == 1 and conf["bf16"]["enabled"]
    assert conf["data_types"]["grad_accum_dtype"] == "fp32"
    assert conf["gradient_clipping"] == 0.0  # HybridOptimizer clips by the true global norm itself
    assert "bf16" not in ds_config(cfg(dtype="fp32"), dp=1)


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 1}', "is not valid JSON"),
    ('{"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}', "sets 'optimizer'"),
    ('{"scheduler": {"type": "WarmupLR"}}', "sets 'scheduler'"),
    ('{"gradient_clipping": 1.0}', "sets gradient_clipping 1.0, but megachat clips by the global gradient norm"),
    ('{"fp16": {"enabled": true}}', "enables fp16"),
    ('{"bf16": {"enabled": true}}', "enables bf16 but --dtype is fp32"),
])
def test_a_users_ds_config_that_fights_megachat_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        ds_config(cfg(dtype="fp32", ds_config=str(path)), dp=1)
    assert str(path) in str(e.value)
    path.write_text('{"zero_optimization": {"stage": 1}}')  # and a bf16 run needs bf16 in its file
    with pytest.raises(ValueError, match="does not enable bf16 but --dtype is bf16"):
        ds_config(cfg(dtype="bf16", zero=1, ds_config=str(path)), dp=1)


def test_a_users_ds_config_keeps_its_own_settings_under_the_cli_batch(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "train_batch_size": 3, '
                    '"wall_clock_breakdown": true}')
    conf = ds_config(cfg(zero=1, ds_config=str(path)), dp=1)
    assert conf["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000} and conf["wall_clock_breakdown"]
    assert conf["train_batch_size"] == 8  # the CLI's global batch wins over the file's


def test_the_horizon_comes_from_iterations_else_flops_else_the_data_ratio():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from base_train import horizon, parse_args
    from megachat.train_config import model_flops_per_token, num_params
    c = cfg(total_batch_size=256)
    flops, params = model_flops_per_token(c), num_params(c)
    base = ["--data", "d", "--tokenizer", "t", "--out", "o", "--total-batch-size", "256"]
    assert horizon(parse_args(base + ["--num-iterations", "7", "--target-flops", "1e15"]), params, flops) == 7
    # a compute budget: steps = FLOPs / (FLOPs per token * tokens per step)
    assert horizon(parse_args(base + ["--target-flops", str(flops * 256 * 40)]), params, flops) == 40
    assert horizon(parse_args(base + ["--target-param-data-ratio", "2"]), params, flops) == round(2 * params / 256)
    with pytest.raises(ValueError, match="no horizon"):
        horizon(parse_args(base + ["--target-param-data-ratio", "0"]), params, flops)


def fit_worker(rank, losses, skipped, signal_at):
    """Trainer.fit's loop with a scripted train_step (no model): what it logs, saves and raises."""
    import os
    import signal

    import torch
    from megachat.parallel import Grid
    from megachat.trainer import Trainer
    trainer = Trainer(cfg=cfg(num_iterations=len(losses)), grid=Grid(), model=None, ds_engine=None,
                      device=torch.device("cpu"))
    saved, logged = [], []

    def train_step(micro_batches):
        trainer.step += 1
        if trainer.step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        rec = {"loss": losses[trainer.step - 1], "grad_norm": 1.0, "lrm": 1.0, "tokens_per_s": 1.0,
               "step_time_s": 1.0}
        return {**rec, "skipped": 1} if trainer.step in skipped else rec

    class Monitor:
        def log(self, step, **metrics):
            logged.append((step, metrics))

    trainer.train_step, trainer.save = train_step, lambda step, keep, background=False: saved.append(step)
    try:
        trainer.fit(lambda i: None, monitor=Monitor(), save_every=2, max_bad_steps=2)
        outcome = "finished"
    except FloatingPointError as e:
        outcome = str(e)
    except SystemExit as e:
        outcome = f"exit {e.code}"
    return {"outcome": outcome, "saved": saved, "logged": logged}


def test_fit_flags_spikes_with_their_samples_skips_bad_steps_and_stops_on_a_streak_or_a_signal():
    from _dist import run_gloo
    losses = [3.0] * 12 + [40.0, 3.0, 3.0, 3.0]
    (r,) = run_gloo(fit_worker, 1, losses, set(), 0)
    spikes = [step for step, m in r["logged"] if m.get("spike")]
    assert spikes == [13] and r["outcome"] == "finished" and r["saved"] == [2, 4, 6, 8, 10, 12, 14, 16]
    (r,) = run_gloo(fit_worker, 1, [3.0] * 8, {3, 5, 6}, 0)  # one bad step, then two in a row
    assert r["outcome"].startswith("loss is 3.0 at step 6: 2 bad step(s) in a row")
    assert r["saved"] == [2, 4]  # step 6 is a save point, but bad steps are not checkpointed
    (r,) = run_gloo(fit_worker, 1, [3.0] * 8, set(), 3)  # SIGUSR1 during step 3
    assert r["outcome"] == "exit 0" and r["saved"] == [2, 3]


def test_zero3_sub_group_holds_the_whole_model_whatever_the_users_file_says(tmp_path):
    # Muon steps every matrix at once; DeepSpeed's default sub group (1e9 parameters) is too small from d32 on
    from megachat.train_config import num_params
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3, "sub_group_size": 1000}}')
    conf = ds_config(cfg(zero=3, ds_config=str(path)), dp=2)
    assert conf["zero_optimization"]["sub_group_size"] == num_params(cfg()) + 1
    assert ds_config(cfg(zero=3), dp=1)["zero_optimization"]["sub_group_size"] == int(1e9)


def test_a_preset_gives_the_defaults_and_flags_on_the_command_line_win():
    import json
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    from base_train import parse_args
    base = ["--data", "d", "--tokenizer", "t", "--out", "o", "--preset", str(root / "configs" / "presets" / "d32.json")]
    args = parse_args(base)
    assert (args.depth, args.max_seq_len, args.total_batch_size) == (32, 2048, 524288)
    preset = json.loads((root / "configs" / "presets" / "d32.json").read_text())
    assert (args.tp, args.pp, args.zero, args.device_batch_size) == (
        preset["layout"]["tp"], preset["layout"]["pp"], preset["layout"]["zero"], preset["batch"]["device_batch_size"])
    override = parse_args(base + ["--depth", "4", "--zero", "0"])
    assert (override.depth, override.zero) == (4, 0) and override.total_batch_size == 524288
    with pytest.raises(ValueError, match="not a preset tools/plan.py writes"):
        parse_args(["--data", "d", "--tokenizer", "t", "--out", "o", "--preset", __file__])


def test_fp8_is_refused_in_one_line_naming_the_install_without_transformer_engine():
    import importlib.util
    with pytest.raises(ValueError, match="use it with --dtype bf16"):
        check_config(cfg(fp8=True), 1)  # fp32
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    for check in (lambda: check_config(cfg(fp8=True, dtype="bf16", zero=1), 1),
                  lambda: use_fp8(None, None)):  # the function the trainer calls, too
        with pytest.raises(ValueError) as e:
            check()
        assert str(e.value) == FP8_INSTALL and "\n" not in FP8_INSTALL
        assert "pip install 'transformer-engine[pytorch]'" in FP8_INSTALL
    p = argparse.ArgumentParser()
    add_trainer_args(p)
    assert config_options(p.parse_args(["--out", "o", "--fp8"]))["fp8"] is True


def test_newton_schulz_runs_in_bf16_as_nanochat_unless_ns_dtype_asks_for_fp32():
    assert newton_schulz_dtype(cfg(dtype="fp32")) == torch.bfloat16  # nanochat's, in an fp32 run
    assert newton_schulz_dtype(cfg(dtype="bf16", zero=1)) == torch.bfloat16
    assert newton_schulz_dtype(cfg(dtype="fp32", ns_dtype="fp32")) == torch.float32
    p = argparse.ArgumentParser()
    add_trainer_args(p)
    assert config_options(p.parse_args(["--out", "o"]))["ns_dtype"] == "bf16"
    assert config_options(p.parse_args(["--out", "o", "--ns-dtype", "fp32"]))["ns_dtype"] == "fp32"


def test_sequence_parallelism_turns_off_deepspeeds_partitioned_pipe_messages():
    # DeepSpeed sends 1/tp of a stage's output from each tp rank, assuming every tp rank holds the same tensor;
    # under sequence parallelism each holds its own shard of the sequence
    assert "pipeline" not in ds_config(cfg(tp=2, pp=2, zero=1), 1)
    pipe = ds_config(cfg(tp=2, pp=2, zero=1, sequence_parallel=True), 1)["pipeline"]
    assert pipe["pipe_partitioned"] is False and pipe["grad_partitioned"] is False


@pytest.mark.parametrize("kw", [dict(), dict(vocab_size=65536), dict(depth=8, vocab_size=100), dict(n_kv_head=1),
                                dict(depth=12, n_kv_head=3, vocab_size=777, tp=2)],
                         ids=["d4", "embedding_largest", "block_largest", "gqa", "gqa_odd_vocab_tp2"])
def test_largest_layer_is_the_largest_entry_of_the_unsharded_models_layers(kw):
    c = cfg(**kw)
    with torch.device("meta"):
        layers = GPT(c.model_config(), grid=Grid()).layers()
    assert largest_layer(c) == max(sum(p.numel() for p in layer.parameters()) for layer in layers)


def test_free_ports_lie_below_the_ephemeral_range_where_no_outgoing_connection_takes_them():
    import socket

    from megachat.parallel import free_port
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(1024 <= p < ephemeral for p in ports), ports
    for port in ports:  # and nothing holds them
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
