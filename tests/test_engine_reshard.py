"""Resuming on another layout: a run checkpointed with one data-parallel size, tensor-parallel size, ZeRO stage or
precision resumes with another, its weights and Adam moments resharded exactly (gathered and compared with those
saved), its streams and memory states mapped by ``data.resume_policy`` or kept (joined and re-split by head), and
training continues from the same model (the validation loss right after the resume equals the saved run's).

Every case runs ``tests/engine_driver.py --scenario state`` under 1 or 2 gloo processes: one launch trains and saves
(for every ZeRO stage in turn), the next resumes those checkpoints under the other layout.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, copy_task, free_port

PY = sys.executable
ENV = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_ext")))
# LaMemo memory (per-head caches) with document resets, 2 accumulation slots
TINY = ["--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2", "--model.d_head", "16",
        "--model.d_inner", "64", "--model.tgt_len", "8", "--model.mem_len", "16", "--model.attn_type", "3",
        "--model.dropout", "0.1", "--micro-batch-size", "2", "--train.grad_accum", "2", "--data.reset_memory",
        "true", "--log.progress", "false", "--log.interval", "1", "--checkpoint.export", "false",
        "--eval.final_splits", "[]", "--eval.interval", "1000", "--log.tensorboard", "false",
        "--log.peak_tflops", "1"]
TOKENS_PER_STEP_PER_RANK = 2 * 2 * 8  # micro-batch x accumulation x segment


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return copy_task(tmp_path_factory.mktemp("copy") / "copy", train_size=3000, eval_size=40)


def launch(nproc, workdir, zero, precision, tag, args, source=None, source_zero=None, source_precision=None,
           flags=(), timeout=560):
    """One driver launch (``flags``: more driver options); returns {stage: record} of the first rank."""
    out = workdir / f"{tag}-{zero.replace(',', '')}{precision}.json"
    drv = [os.path.join(ROOT, "tests", "engine_driver.py"), "--scenario", "state", "--zero", zero, "--precision",
           precision, "--tag", tag, "--workdir", str(workdir), "--out", str(out)] + list(flags)
    for flag, value in (("--source", source), ("--source-zero", source_zero), ("--source-precision", source_precision)):
        if value is not None:
            drv += [flag, value]
    cmd = [PY] + drv if nproc == 1 else \
        [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())] + drv
    r = subprocess.run(cmd + ["--"] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())[0]


def state(workdir, stage, precision, tag, when):
    return torch.load(workdir / f"z{stage}{precision}_{tag}.{when}.pt", weights_only=False)


def assert_same_state(saved, loaded, what):
    assert set(saved) == set(loaded), what
    for name in saved:
        assert set(saved[name]) == set(loaded[name]), (what, name)
        for k, t in saved[name].items():
            assert torch.equal(t, loaded[name][k]), (what, name, k, float((t - loaded[name][k]).abs().max()))
    assert set(saved["embedding.tables.0.weight"]) == {"fp32", "exp_avg", "exp_avg_sq"}, what
    assert int(saved["__step__"]["step"]) > 0, what


def resume_record(run_dir):
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in recs if r["kind"] == "resume"]


@pytest.mark.parametrize("src_dp, dst_dp", [(2, 1), (1, 2)])
def test_a_changed_data_parallel_size_reshards_zero_0_to_3(copy_data, tmp_path, src_dp, dst_dp):
    """2 saves, 3 resumes with the other data-parallel size, under every ZeRO stage."""
    base = ["--data-path", copy_data] + TINY
    streams = {2: ["--eval.micro_batch", "1"], 1: ["--eval.micro_batch", "2"]}  # 2 evaluation streams in all
    policy = ["--data.resume_policy", "proportional"]
    a = launch(src_dp, tmp_path, "0,1,2,3", "fp32", "src", base + streams[src_dp] + ["--train-iters", "2"])
    b = launch(dst_dp, tmp_path, "0,1,2,3", "fp32", "dst", base + streams[dst_dp] + ["--train-iters", "3"] + policy,
               source="src")
    for stage in "0123":
        what = f"ZeRO-{stage} data-parallel {src_dp} -> {dst_dp}"
        assert_same_state(state(tmp_path, stage, "fp32", "src", "final"),
                          state(tmp_path, stage, "fp32", "dst", "start"), what)
        s, r = a[stage], b[stage]
        assert r["step_start"] == 2 and r["steps"] == [3], what
        # the same model: the validation loss right after the resume is the saved run's
        assert r["valid_start"] == pytest.approx(s["valid_final"], abs=1e-6), what
        assert all(math.isfinite(x) for x in r["losses"]), what
        # token accounting: what the saving run consumed, then this layout's tokens per step
        assert r["tokens_start"] == s["tokens_final"] == 2 * src_dp * TOKENS_PER_STEP_PER_RANK, what
        assert r["tokens_final"] == r["tokens_start"] + dst_dp * TOKENS_PER_STEP_PER_RANK, what
        # the stream layout changed: the memory starts afresh, and the record says what was kept and reset
        assert r["memory_fresh_start"] and r["memory_start"] != s["memory_final"], what
        rec = resume_record(tmp_path / f"z{stage}fp32_dst")[-1]
        assert rec["changes"] == {"dp_size": [src_dp, dst_dp]} and rec["resharded"], what
        assert rec["stream"]["policy"] == "proportional", what
        assert rec["stream"]["changed"]["dp_size"] == [src_dp, dst_dp], what
        assert any(x.startswith("memory states") for x in rec["reset"]), what
        assert rec["consumed_tokens"] == s["tokens_final"], what


def test_a_changed_zero_stage_and_precision_reshard(copy_data, tmp_path):
    """Written with ZeRO-1 bf16, resumed with ZeRO-0 fp32, ZeRO-3 bf16 and ZeRO-2 fp32 (one process).

    In bf16 a ZeRO-3 engine computes otherwise than ZeRO 0-2 from the same weights (DeepSpeed's own
    ``torch.nn.functional.linear`` rounds the product to bf16 before adding the bias; docs/training.md), so the
    ZeRO-3 resume is held, bit for bit, against a same-layout ZeRO-1 resume of the same checkpoint computing as
    ZeRO-3 does (``--zero3-linear``, run before any ZeRO-3 engine in that launch): the losses a resume computes
    from the loaded state (validation right after the load, the first step's loss) are equal.  After an update
    they may part in the fp32 masters' last bits (ZeRO-3 reduces gradients by its own path), so no later loss is
    compared."""
    args = ["--data-path", copy_data] + TINY + ["--eval.micro_batch", "2"]
    launch(1, tmp_path, "1", "bf16", "src", args + ["--train-iters", "2"])
    runs = {}
    for zero, precision, flags in (("0", "fp32", ()), ("1,3", "bf16", ("--zero3-linear",)), ("2", "fp32", ())):
        runs.update({(stage, precision): r for stage, r in launch(
            1, tmp_path, zero, precision, "resumed", args + ["--train-iters", "3"], source="src", source_zero="1",
            source_precision="bf16", flags=flags).items()})
    same = runs[("1", "bf16")]   # the same layout: DeepSpeed's own files, no resharding
    assert_same_state(state(tmp_path, "1", "bf16", "src", "final"), state(tmp_path, "1", "bf16", "resumed", "start"),
                      "ZeRO-1 bf16 -> ZeRO-1 bf16")
    assert resume_record(tmp_path / "z1bf16_resumed")[-1]["changes"] == {}
    z3 = runs[("3", "bf16")]
    assert (z3["valid_start"], z3["losses"]) == (same["valid_start"], same["losses"]), \
        (z3["valid_start"], same["valid_start"], z3["losses"], same["losses"])
    for stage, precision in (("0", "fp32"), ("3", "bf16"), ("2", "fp32")):
        r = runs[(stage, precision)]
        what = f"ZeRO-1 bf16 -> ZeRO-{stage} {precision}"
        assert_same_state(state(tmp_path, "1", "bf16", "src", "final"),
                          state(tmp_path, stage, precision, "resumed", "start"), what)
        assert r["steps"] == [3] and all(math.isfinite(x) for x in r["losses"]), what
        rec = resume_record(tmp_path / f"z{stage}{precision}_resumed")[-1]
        assert rec["changes"] == {"zero_stage": [1, int(stage)], **({"precision": ["bf16", precision]}
                                                                    if precision != "bf16" else {})}, what
        # the stream layout did not change: stream position and memory states are kept
        assert "memory states" in rec["kept"] and rec["stream"]["changed"] == {}, what


@pytest.mark.parametrize("src_tp, dst_tp", [(1, 2), (2, 1)])
def test_a_changed_tensor_parallel_size_reshards_weights_and_memory(copy_data, tmp_path, src_tp, dst_tp):
    """LaMemo's per-head caches are joined and re-split by head; the stream position is kept (2 processes are
    2 tensor-parallel ranks, so the data-parallel size stays 1)."""
    args = ["--data-path", copy_data] + TINY + ["--eval.micro_batch", "2"]
    tp = {1: [], 2: ["--tensor-model-parallel-size", "2"]}
    a = launch(src_tp, tmp_path, "0,2", "fp32", "src", args + tp[src_tp] + ["--train-iters", "2"])
    b = launch(dst_tp, tmp_path, "0,2", "fp32", "dst", args + tp[dst_tp] + ["--train-iters", "3"], source="src")
    for stage in "02":
        what = f"ZeRO-{stage} tensor-parallel {src_tp} -> {dst_tp}"
        assert_same_state(state(tmp_path, stage, "fp32", "src", "final"),
                          state(tmp_path, stage, "fp32", "dst", "start"), what)
        s, r = a[stage], b[stage]
        assert r["memory_start"] == s["memory_final"] and not r["memory_fresh_start"], what
        assert r["valid_start"] == pytest.approx(s["valid_final"], abs=1e-5), what
        assert r["steps"] == [3] and all(math.isfinite(x) for x in r["losses"]), what
        rec = resume_record(tmp_path / f"z{stage}fp32_dst")[-1]
        assert rec["changes"] == {"tp_size": [src_tp, dst_tp]} and rec["stream"]["changed"] == {}, what
        assert "memory states (joined and re-split by head)" in rec["kept"], what


def test_a_changed_data_parallel_size_without_a_policy_is_one_line(copy_data, tmp_path):
    args = ["--data-path", copy_data] + TINY
    launch(2, tmp_path, "2", "fp32", "dp2", args + ["--train-iters", "2"])
    r = subprocess.run([PY, "pretrain/train.py", "--ds_config", "ds_configs/zero2_fp32.json", "--save",
                        str(tmp_path / "z2fp32_dp2"), "--train-iters", "3"] + args,
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=480)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "data-parallel size 2 (this run: 1)" in last and "--data.resume_policy restart_epoch" in last, last
