"""The training engine end to end: exact resume, tensor parallelism, signals, non-finite steps, memory at work,
gradient accumulation that weighs scored tokens (one step's gradient under every split of its rows),
and what a run leaves behind (metrics, TensorBoard, export, evaluation, generation, plot).

Multi-process cases run 2 gloo processes under torchrun (or DeepSpeed's launcher) on a random free port with
a timeout.  Most cases go through ``tests/engine_driver.py``, which runs several trainings inside one process
group; resume exactness is the property: a run stopped at step 3 and resumed gives the losses of a run that
never stopped, bit for bit (fp32, CPU).
"""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, copy_task, free_port

PY = sys.executable
ENV = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_ext")))

# a tiny model on the copy task: 32-token examples, 8-token segments
TINY = ["--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2", "--model.d_head", "16",
        "--model.d_inner", "64", "--model.tgt_len", "8", "--model.mem_len", "16",
        "--micro-batch-size", "2", "--train.grad_accum", "2", "--log.progress", "false", "--log.interval", "1",
        "--checkpoint.export", "false", "--eval.final_splits", "[]", "--log.tensorboard", "false"]


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return copy_task(tmp_path_factory.mktemp("copy") / "copy", train_size=12000, eval_size=200)


def torchrun(nproc, args, timeout=300):
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.run(cmd + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def driver(tmp_path, nproc, scenario, zero, extra, precision="fp32", timeout=300):
    out = tmp_path / f"{scenario}.json"
    args = [os.path.join(ROOT, "tests", "engine_driver.py"), "--scenario", scenario, "--zero", zero,
            "--precision", precision, "--workdir", str(tmp_path), "--out", str(out), "--"] + extra
    if nproc == 1:
        r = subprocess.run([PY] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    else:
        r = torchrun(nproc, args, timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def check_resume(results, stages):
    for rank, res in enumerate(results):
        for stage in stages:
            d = res[str(stage)]
            full, stopped, resumed = d["full"], d["stopped"], d["resumed"]
            assert full["steps"] == [1, 2, 3, 4, 5, 6] and all(map(math.isfinite, full["losses"]))
            assert stopped["final_step"] == 3 and stopped["steps"] == [1, 2, 3]
            assert stopped["losses"] == full["losses"][:3]
            assert resumed["steps"] == [4, 5, 6], f"rank {rank} ZeRO-{stage} did not resume at step 4"
            # bit for bit: the same losses and the same final memory states as the run that never stopped
            assert resumed["losses"] == full["losses"][3:], (rank, stage, resumed["losses"], full["losses"])
            assert resumed["memory"] == full["memory"], (rank, stage)
        # every ZeRO stage computes the same fp32 training, and reports the same gradient norms (measured by
        # the trainer for ZeRO-0, by DeepSpeed for 1-3)
        losses = [res[str(s)]["full"]["losses"] for s in stages]
        norms = [res[str(s)]["full"]["grad_norms"] for s in stages]
        for other, other_norms in zip(losses[1:], norms[1:]):
            assert max(abs(a - b) for a, b in zip(losses[0], other)) < 1e-5
            assert all(a > 0 and abs(a - b) < 1e-4 * a for a, b in zip(norms[0], other_norms)), (norms[0], other_norms)


def test_resume_is_exact_for_zero_0_to_3_with_data_parallel(copy_data, tmp_path):
    """XL memory, dropout on, roll, memory resets at documents, 2 accumulation slots, data parallel 2."""
    extra = ["--data-path", copy_data, "--model.attn_type", "0", "--model.dropout", "0.1", "--data.roll", "true",
             "--data.reset_memory", "true", "--train-iters", "6"] + TINY
    results = driver(tmp_path, 2, "resume", "0,1,2,3", extra)
    check_resume(results, [0, 1, 2, 3])
    # the two data-parallel ranks read disjoint stripes of the corpus, and different tokens
    r0, r1 = (results[r]["0"]["full"] for r in (0, 1))
    assert (r0["dp_rank"], r1["dp_rank"], r0["dp_size"]) == (0, 1, 2)
    s0 = {s for slot in r0["stripes"] for s in slot}
    s1 = {s for slot in r1["stripes"] for s in slot}
    assert len(s0) == len(s1) == 4 and not s0 & s1
    assert r0["first_tokens"] != r1["first_tokens"]


def test_resume_is_exact_for_zero_0_to_3_with_tensor_parallel(copy_data, tmp_path):
    """LaMemo look-ahead memory under tensor parallelism 2 (heads and their caches split)."""
    extra = ["--data-path", copy_data, "--model.attn_type", "3", "--model.dropout", "0.1", "--data.roll", "true",
             "--data.reset_memory", "true", "--train-iters", "6", "--tensor-model-parallel-size", "2"] + TINY
    results = driver(tmp_path, 2, "resume", "0,1,2,3", extra)
    check_resume(results, [0, 1, 2, 3])
    assert {r["0"]["full"]["tp_rank"] for r in results} == {0, 1}
    # both tensor-parallel ranks report the same (replicated) losses
    assert results[0]["0"]["full"]["losses"] == results[1]["0"]["full"]["losses"]


def test_resume_is_exact_with_rmt_memory_tokens_and_bptt(copy_data, tmp_path):
    """RMT memory tokens over XL layers, gradients through 2 segments per micro-batch, dropout on, resets at
    documents: the memory tokens (and whether a row starts from the learned ones) are checkpointed and restored;
    under ZeRO-3 the learned memory is gathered for the forward like every other parameter."""
    extra = ["--data-path", copy_data, "--model.attn_type", "0", "--model.rmt.num_mem_tokens", "3",
             "--train.bptt_segments", "2", "--model.dropout", "0.1", "--data.roll", "true",
             "--data.reset_memory", "true", "--train-iters", "6"] + TINY
    check_resume(driver(tmp_path, 1, "resume", "0,3", extra), [0, 3])


@pytest.mark.parametrize("memory", [["--model.attn_type", "70", "--model.mem_len", "0"],
                                    ["--model.attn_type", "0", "--model.mem_len", "0", "--model.armt.num_mem_tokens",
                                     "2"]], ids=["gdn", "armt"])
def test_resume_is_exact_with_gated_deltanet_and_armt_and_bptt(copy_data, tmp_path, memory):
    """Gated DeltaNet's state (matrix and convolution inputs) and ARMT's associative memories, gradients through 2
    segments per micro-batch, dropout on, resets at documents: stopped and resumed, the run is the one that never
    stopped (ZeRO-0)."""
    extra = ["--data-path", copy_data, "--train.bptt_segments", "2", "--model.dropout", "0.1",
             "--data.roll", "true", "--data.reset_memory", "true", "--train-iters", "6"] + TINY + memory
    check_resume(driver(tmp_path, 1, "resume", "0", extra), [0])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_replay_backprop_trains_as_backprop_through_the_unroll(copy_data, tmp_path, precision):
    """train.mrbp (one backward per segment, last first, the state gradient carried back) gives the training of
    plain backpropagation through the same bptt_segments, with dropout, under ZeRO 0-3 and 2 data-parallel
    ranks: the same losses step by step and the same weights (to rounding: the gradients are summed in another
    order); only the last backward of a micro-batch reduces gradients across ranks."""
    common = TINY + ["--data-path", copy_data, "--train-iters", "4", "--train.bptt_segments", "2",
                     "--model.dropout", "0.1", "--data.reset_memory", "true"]
    tol = 1e-5 if precision == "fp32" else 2e-2
    stages = "0,1,2,3" if precision == "fp32" else "0"
    plain = driver(tmp_path / "plain", 2, "losses", stages, common, precision=precision)
    mrbp = driver(tmp_path / "mrbp", 2, "losses", stages, common + ["--train.mrbp", "true"], precision=precision)
    for a, b in zip(plain, mrbp):
        for stage in stages.split(","):
            pa, pb = a[stage]["run"], b[stage]["run"]
            assert pa["steps"] == pb["steps"] == [1, 2, 3, 4]
            assert all(abs(x - y) <= tol * abs(x) for x, y in zip(pa["losses"], pb["losses"])), \
                (stage, pa["losses"], pb["losses"])
            if precision == "fp32":
                assert abs(pa["param_sum"] - pb["param_sum"]) <= 1e-5 * abs(pa["param_sum"]), stage


def test_tensor_parallel_training_equals_one_rank(copy_data, tmp_path):
    """The same run on 1 process and on 2 tensor-parallel processes gives the same losses (no dropout:
    dropout inside tensor-parallel regions draws per-rank masks by design, as in Megatron)."""
    extra = ["--data-path", copy_data, "--model.attn_type", "3", "--model.dropout", "0.0", "--data.roll", "true",
             "--train-iters", "5"] + TINY
    one = driver(tmp_path / "tp1", 1, "losses", "0", extra)[0]["0"]["run"]["losses"]
    two = driver(tmp_path / "tp2", 2, "losses", "2", extra + ["--tensor-model-parallel-size", "2"])
    for rank in (0, 1):
        losses = two[rank]["2"]["run"]["losses"]
        assert len(losses) == len(one) == 5
        assert max(abs(a - b) for a, b in zip(one, losses)) < 1e-5, (one, losses)


@pytest.mark.parametrize("precision, stages", [("fp32", "0"), ("bf16", "2")])
def test_a_non_finite_step_is_skipped_and_changes_nothing(copy_data, tmp_path, precision, stages):
    """Step 2's loss is NaN: the update is skipped and each slot keeps its memory, so weights and memory equal
    those of a run that stopped after step 1.  fp32 ZeRO-0 relies on the trainer's guarded optimizer, bf16
    ZeRO-2 on DeepSpeed's gradient check."""
    extra = ["--data-path", copy_data, "--model.attn_type", "0", "--model.dropout", "0.0"] + TINY
    results = driver(tmp_path, 1, "skip", stages, extra, precision=precision)
    for stage in stages.split(","):
        d = results[0][stage]
        poisoned, short = d["poisoned"], d["short"]
        assert poisoned["finite"] == [True, False] and poisoned["code"] == 0
        assert poisoned["losses"][0] == short["losses"][0]
        assert poisoned["params_finite"]
        assert poisoned["memory"] == short["memory"]
        assert poisoned["param_sum"] == short["param_sum"]


def test_non_finite_steps_in_a_row_stop_the_run_without_a_poisoned_checkpoint(copy_data, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([PY, "pretrain/train.py", "--data-path", copy_data, "--model.attn_type", "0",
                        "--train-iters", "6", "--save-interval", "1", "--train.max_nonfinite", "2",
                        "--debug.inject_nonfinite", "[3,4]", "--save", str(run)] + TINY,
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "non-finite steps in a row" in r.stdout
    # step 3 was skipped (weights and memory kept), so its interval checkpoint is a good one; the run stopped at
    # step 4 without saving
    assert (run / "latest").read_text().strip() == "iter_0000003"
    assert not glob.glob(str(run / "iter_000000[4-9]"))
    # checkpoint.keep_last (2): only the two newest complete checkpoints remain
    assert sorted(os.path.basename(p) for p in glob.glob(str(run / "iter_*"))) == ["iter_0000002", "iter_0000003"]
    # and it resumes into finite training
    r = subprocess.run([PY, "pretrain/train.py", "--data-path", copy_data, "--model.attn_type", "0",
                        "--train-iters", "6", "--save", str(run)] + TINY,
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    tail = [json.loads(l) for l in open(run / "metrics.jsonl")][-3:]
    assert [x["step"] for x in tail] == [4, 5, 6] and all(math.isfinite(x["loss"]) for x in tail)
    assert all(isinstance(x["grad_norm"], float) and x["grad_norm"] > 0 for x in tail)  # ZeRO-0 fp32: ours


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank_of(pid):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def test_sigterm_on_one_rank_saves_a_checkpoint_and_every_rank_exits_cleanly(copy_data, tmp_path):
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "pretrain/train.py", "--data-path", copy_data, "--model.attn_type", "3", "--train-iters", "100000",
           "--save", str(run)] + TINY
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        assert metrics.exists(), "training did not start"
        workers = [p for p in _children(proc.pid) if _rank_of(p) is not None]
        target = [p for p in workers if _rank_of(p) == 1]
        assert target, f"no rank-1 worker among {workers}"
        os.kill(target[0], signal.SIGTERM)          # only rank 1 receives it
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step" in out and "signal SIGTERM" in out
    tag = (run / "latest").read_text().strip()
    meta = json.loads((run / tag / "memtrain" / "meta.json").read_text())
    assert meta["reason"] == "signal SIGTERM" and meta["step"] >= 3
    assert sorted(os.listdir(run / tag / "memtrain")) == ["meta.json", "rank_dp0_tp0.pt", "rank_dp1_tp0.pt"]


def test_exit_duration_saves_and_stops(copy_data, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([PY, "pretrain/train.py", "--data-path", copy_data, "--model.attn_type", "0",
                        "--train-iters", "100000", "--exit-duration-in-mins", "0.0001", "--save", str(run)] + TINY,
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tag = (run / "latest").read_text().strip()
    meta = json.loads((run / tag / "memtrain" / "meta.json").read_text())
    assert meta["reason"].startswith("exit duration") and 1 <= meta["step"] < 100000


def _last_eval(run_dir, split="valid"):
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in recs if r.get("kind") == "eval" and r["split"] == split][-1]


def test_memory_solves_the_copy_task_where_no_memory_cannot(copy_data, tmp_path):
    """Segments (8) shorter than the example (32): the first copy of X needs the previous segment. With a
    16-token XL memory the model learns it within a fixed budget; without memory it stays near chance (1/8)."""
    acc = {}
    for mem in (16, 0):
        run = tmp_path / f"mem{mem}"
        r = subprocess.run(
            [PY, "pretrain/train.py", "--data-path", copy_data, "--model.attn_type", "0", "--model.n_layer", "2",
             "--model.d_model", "64", "--model.n_head", "4", "--model.d_head", "16", "--model.d_inner", "128",
             "--model.dropout", "0.0", "--model.tgt_len", "8", "--model.mem_len", str(mem), "--train-iters", "600",
             "--micro-batch-size", "32", "--data.align", "document", "--data.reset_memory", "true",
             "--lr", "2e-3", "--optim.warmup_iters", "50", "--clip-grad", "1.0", "--log.progress", "false",
             "--log-interval", "100", "--save", str(run), "--checkpoint.export", "false",
             "--log.tensorboard", "false", "--eval.micro_batch", "8"],
            cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        acc[mem] = _last_eval(run)["accuracy"]
    assert acc[16] > 0.9, acc
    assert acc[0] < 0.3, acc


def test_a_run_leaves_metrics_events_an_export_that_evaluates_and_generates(copy_data, tmp_path):
    """DeepSpeed's launcher, tensor parallel 2 with ZeRO-3: the consolidated export scores the validation split
    in one process exactly as the trainer did; generation samples and decodes; the plot is written."""
    run = tmp_path / "run"
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "pretrain/train.py",
           "--ds_config", "ds_configs/zero3_fp32.json", "--data-path", copy_data, "--model.attn_type", "3",
           "--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2", "--model.d_head", "16",
           "--model.d_inner", "64", "--model.tgt_len", "8", "--model.mem_len", "16", "--model.dropout", "0.0",
           "--tensor-model-parallel-size", "2", "--train-iters", "8", "--micro-batch-size", "4",
           "--eval-interval", "4", "--eval-iters", "4", "--eval.micro_batch", "8", "--log-interval", "4",
           "--save", str(run),
           "--log.progress", "false"]
    deepspeed_bin = os.path.join(os.path.dirname(PY), "deepspeed")
    cmd[0] = deepspeed_bin if os.path.exists(deepspeed_bin) else "deepspeed"
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    finally:
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            os.remove(f)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(l) for l in open(run / "metrics.jsonl")]
    train = [x for x in recs if x["kind"] == "train"]
    evals = [x for x in recs if x["kind"] == "eval"]
    assert [x["step"] for x in train] == [4, 8]
    for x in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "peak_mem_gb"):
            assert isinstance(x[key], float) and math.isfinite(x[key]), (key, x)
    assert [(x["step"], x["split"]) for x in evals] == [(4, "valid"), (8, "valid")]
    assert all("ppl" in x and "accuracy" in x and x["tokens"] > 0 for x in evals)
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert (run / "config.yaml").exists() and (run / "ds_config.json").exists()
    export = run / "export"
    assert sorted(os.listdir(export)) == ["export.json", "model.safetensors", "model.yaml", "tokenizer.vocab.json"]

    ev = subprocess.run([PY, "pretrain/evaluate.py", "--model", str(export), "--split", "valid", "--protocol",
                         "train", "--batch-size", "8", "--output", str(tmp_path / "eval.json")],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=200)
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["scored_tokens"] == evals[-1]["tokens"] and res["protocol"] == "train"
    assert abs(res["loss"] - evals[-1]["loss"]) < 1e-4, (res["loss"], evals[-1]["loss"])
    assert "scored tokens" in ev.stdout and "accuracy" in ev.stdout

    gen = subprocess.run([PY, "pretrain/generate.py", "--model", str(export), "--prompt", "1 2 3 4 5 6 7 0 <s>",
                          "--max-new-tokens", "12", "--output", str(tmp_path / "gen.jsonl")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=200)
    assert gen.returncode == 0, gen.stderr[-2000:]
    sample = json.loads((tmp_path / "gen.jsonl").read_text().splitlines()[0])
    assert sample["new_tokens"] == 12 and len(sample["completion"].split()) == 12

    png = tmp_path / "curves.png"
    p = subprocess.run([PY, "pretrain/plot.py", str(run), "-o", str(png)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--optim.schedule", "exp"], "optim.schedule"),
    (["--data-path", "/nonexistent/prefix"], "data.path"),
    (["--model.attn_type", "7"], "model.attn_type"),
    (["--micro-batch-size", "4", "--ds_config", "{ds}"], "train.micro_batch"),
])
def test_invalid_configurations_fail_at_start_up_naming_the_field(copy_data, tmp_path, args, message):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}}')
    args = [a.replace("{ds}", str(ds)) for a in args]
    argv = ["pretrain/train.py", "--data-path", copy_data, "--train-iters", "1", "--save", str(tmp_path / "r")]
    r = subprocess.run([PY] + argv + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-1000:]
    assert f"config field '{message}'" in r.stderr, r.stderr[-1000:]
    assert not os.path.exists(tmp_path / "r" / "latest")


def _hand_masked_copy(tmp_path):
    """The copy task's tokens with a hand-made loss mask on the training split: read as 4 stripes of 16 targets
    per step, the rows of step 1 score 0, 3 (in the first 8 targets), 16 and 5 (in the last 8) targets."""
    import numpy as np
    from data_tools.indexed import IndexedDataset, bin_path
    prefix = copy_task(tmp_path / "copy", train_size=64, eval_size=4, seed=5)
    tokens = IndexedDataset(prefix + "_train")
    mask = np.memmap(bin_path(prefix + "_train.mask"), dtype=IndexedDataset(prefix + "_train.mask").dtype,
                     mode="r+")
    assert mask.size == tokens.num_tokens
    stripe = (tokens.num_tokens - 1) // 4 // 16 * 16      # OrderedStream's stripe length (align token, 4 stripes)
    mask[:] = 0
    for row, targets in enumerate([[], [2, 3, 5], range(16), range(9, 14)]):
        for t in targets:                                 # target t of a row is token begin + 1 + t
            mask[row * stripe + 1 + t] = 1
    mask.flush()
    return prefix, [0, 3, 16, 5]


def test_one_step_has_the_same_gradient_however_its_rows_are_split(tmp_path):
    """Gradient accumulation weighs scored tokens, not micro-batches: one step over the same 4 rows of 16
    targets, which score 0, 3, 16 and 5 targets, gives the same gradient (1e-6) and logged loss as one
    micro-batch of 4, as 2 x 2, 1 x 4, over 2 data-parallel ranks (2 x 1, 1 x 2), through 2 BPTT segments of 8
    and by memory replay (train.mrbp), and under ZeRO-2 the same gradient norm.

    The BPTT split is exact for Transformer-XL with mem_len >= the segment length: the second of 2 segments of
    8 attends to the first through the memory (carried with its gradient) at the relative distances it has in
    one segment of 16, and an empty memory is masked, so k = 2 x 8 and k = 1 x 16 compute the same function of
    the same 16 tokens per row.  An auxiliary loss (0.5 * mean of the stack's output squared, per segment) is
    added: averaged over segments and micro-batches of equal rows it is the same under every split too."""
    import torch
    data, per_row = _hand_masked_copy(tmp_path)
    common = ["--data-path", data, "--model.attn_type", "0", "--model.n_layer", "2", "--model.d_model", "32",
              "--model.n_head", "2", "--model.d_head", "16", "--model.d_inner", "64", "--model.mem_len", "16",
              "--model.dropout", "0.0", "--data.reset_memory", "true", "--train-iters", "1", "--log.progress",
              "false", "--checkpoint.export", "false", "--eval.final_splits", "[]", "--eval.interval", "0",
              "--log.tensorboard", "false", "--train.aux_loss_weight", "1", "--log.peak_tflops", "1"]

    def lay(name, micro, accum, k, zero=0, mrbp=False):
        return {"name": name, "zero": zero,
                "args": ["--micro-batch-size", str(micro), "--train.grad_accum", str(accum),
                         "--train.bptt_segments", str(k), "--model.tgt_len", str(16 // k)]
                + (["--train.mrbp", "true"] if mrbp else [])}

    def run(nproc, layouts):
        out = tmp_path / f"grads{nproc}.json"
        args = [os.path.join(ROOT, "tests", "engine_driver.py"), "--scenario", "grads", "--layouts",
                json.dumps(layouts), "--workdir", str(tmp_path), "--out", str(out), "--"] + common
        if nproc == 1:
            r = subprocess.run([PY] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        else:
            r = torchrun(nproc, args)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(out.read_text())[0]

    res = run(1, [lay("m4a1", 4, 1, 1), lay("m2a2", 2, 2, 1), lay("m1a4", 1, 4, 1), lay("m1a4k2", 1, 4, 2),
                  lay("m1a4k2mrbp", 1, 4, 2, mrbp=True)])
    res.update(run(2, [lay("dp2m2a1", 2, 1, 1), lay("dp2m1a2k2", 1, 2, 2), lay("dp2m1a2k2mrbp", 1, 2, 2, mrbp=True),
                       lay("dp2m1a2zero2", 1, 2, 1, zero=2)]))
    ref = res.pop("m4a1")
    g0 = torch.load(ref["grad"])
    assert ref["scored"] == sum(per_row) and ref["finite"] and math.isfinite(ref["loss"])
    assert g0.norm() > 0 and abs(g0.norm() - ref["grad_norm"]) <= 1e-6 * ref["grad_norm"]
    for name, r in res.items():
        assert r["scored"] == ref["scored"] and r["finite"], name
        assert abs(r["loss"] - ref["loss"]) <= 1e-6 * ref["loss"], (name, r["loss"], ref["loss"])
        assert abs(r["aux_loss"] - ref["aux_loss"]) <= 1e-6 * ref["aux_loss"], (name, r["aux_loss"], ref["aux_loss"])
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= 1e-6 * ref["grad_norm"], (name, r["grad_norm"], ref)
        if r["grad"] is not None:
            g = torch.load(r["grad"])
            assert float((g - g0).abs().max()) <= 1e-6 * float(g0.abs().max()), (name, float((g - g0).abs().max()))
    assert res["dp2m2a1"]["dp_size"] == 2 and res["m1a4"]["dp_size"] == 1
