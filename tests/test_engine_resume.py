"""Resume and start-up faults: every one stops with one line naming the file, flag or field and the way out
(exit status 2) before anything is written or loaded, or is handled (a fallback to the previous checkpoint, the
schedule of the resumed run) and says so.

Single-process runs of ``pretrain/train.py`` on the copy task (a tiny Transformer-XL), sharing one trained run
that each test copies.
"""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, copy_task, free_port

PY = sys.executable
ENV = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_ext")))
TINY = ["--model.n_layer", "2", "--model.d_model", "32", "--model.n_head", "2", "--model.d_head", "16",
        "--model.d_inner", "64", "--model.tgt_len", "8", "--model.mem_len", "16", "--model.attn_type", "0",
        "--micro-batch-size", "2", "--log.progress", "false", "--log.interval", "1",
        "--checkpoint.export", "false", "--eval.final_splits", "[]", "--log.tensorboard", "false"]


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return copy_task(tmp_path_factory.mktemp("copy") / "copy", train_size=3000, eval_size=100)


def train(data, save, *args, env=None, timeout=480):
    cmd = [PY, "pretrain/train.py", "--data-path", data, "--save", str(save)] + TINY + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def one_line_error(r, *needles):
    """Exit status 2 and a last stderr line ``train.py: ...`` holding every needle, without a traceback."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: "), last
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope="module")
def base_run(copy_data, tmp_path_factory):
    """4 steps with a checkpoint every 2 (iter_0000002, iter_0000004)."""
    run = tmp_path_factory.mktemp("base") / "run"
    ok(train(copy_data, run, "--train-iters", "4", "--save-interval", "2"))
    return run


def copy_of(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def records(run, kind="train"):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if f'"kind": "{kind}"' in line]


# ---------------------------------------------------------------------------------------------------- schedule
def driver(tmp_path, scenario, zero, precision, extra, timeout=560):
    out = tmp_path / f"{scenario}.json"
    args = [PY, os.path.join(ROOT, "tests", "engine_driver.py"), "--scenario", scenario, "--zero", zero,
            "--precision", precision, "--workdir", str(tmp_path), "--out", str(out), "--"] + extra
    r = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_first_update_after_a_resume_uses_the_resumed_runs_schedule(copy_data, tmp_path, precision):
    """3 steps at lr 1e-3 (cosine, ending at step 3); resumed with --lr 1e-9 the first update moves the fp32
    master weights by about 1e-9 (not by the 1e-3 stored with the optimizer state); resumed with --train-iters 6
    the schedule continues past its old end (not at the rate 0 it had reached)."""
    res = driver(tmp_path, "lr_resume", "0,1,2,3", precision, ["--data-path", copy_data] + TINY)
    for stage in "0123":
        lower, extended = res[stage]["lower_lr"], res[stage]["extended"]
        assert lower["steps"] == [4] and extended["steps"] == [4]
        assert lower["first_update"] < 1e-6, (stage, lower["first_update"])
        assert extended["first_update"] > 1e-5, (stage, extended["first_update"])


def test_no_load_optim_continues_the_schedule(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    ok(train(copy_data, run, "--train-iters", "8", "--no-load-optim"))
    from pretrain.engine.schedule import lr_at
    logged = {r["step"]: r["lr"] for r in records(run)}
    for step in (5, 6, 7, 8):
        assert logged[step] == pytest.approx(lr_at(step, lr=2.5e-4, min_lr=0.0, warmup=0, total=8, style="cosine"))
    assert logged[8] == 0.0


def test_the_auxiliary_loss_is_weighted_added_and_logged_apart(copy_data, tmp_path):
    """A mechanism's auxiliary loss of 1000 * sum(embedding): with weight 1 it dominates the first Adam update
    (every embedding weight moves down by the learning rate), with weight 0 it does not touch the update; the
    logged loss is the LM loss in both cases and the auxiliary loss is logged as its own metric."""
    extra = ["--data-path", copy_data] + TINY + ["--model.tgt_len", "32", "--lr", "1e-3"]
    res = driver(tmp_path, "aux", "0", "fp32", extra)["0"]
    on, off = res["1"], res["0"]
    assert on["losses"] == off["losses"] and math.isfinite(on["losses"][0]) and on["losses"][0] > 0
    assert on["aux_losses"][0] == pytest.approx(on["aux_expected"], rel=1e-5)
    lr = on["lr"]
    assert -1.01 * lr < on["emb_delta_min"] <= on["emb_delta_max"] < -0.99 * lr
    assert off["emb_delta_max"] > 0 > off["emb_delta_min"]
    rec = records(tmp_path / "z0_aux1")[-1]
    assert rec["aux_loss"] == pytest.approx(on["aux_expected"], rel=1e-5)
    assert "aux_loss" in records(tmp_path / "z0_aux0")[-1]


# ---------------------------------------------------------------------------------------------------- layout
def test_a_changed_micro_batch_needs_a_resume_policy_and_rewrites_nothing_before(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    before = {n: (run / n).read_bytes() for n in ("config.yaml", "ds_config.json", "metrics.jsonl", "latest")}
    r = train(copy_data, run, "--train-iters", "6", "--micro-batch-size", "4")
    one_line_error(r, "data.resume_policy", "micro-batch 2 (this run: 4)", "--data.resume_policy restart_epoch",
                   "proportional")
    assert {n: (run / n).read_bytes() for n in before} == before  # the failed resume wrote nothing
    r = ok(train(copy_data, run, "--train-iters", "6", "--micro-batch-size", "4",
                 "--data.resume_policy", "restart_epoch"))
    assert "reset: memory states (the stream layout changed)" in r.stdout and "resumed from" in r.stdout
    assert (r.stdout + r.stderr).count("layout changed (micro_batch 2 -> 4)") == 1   # said once
    assert [x["step"] for x in records(run)][-2:] == [5, 6]


def test_a_changed_zero_stage_and_precision_resume_resharded(base_run, copy_data, tmp_path):
    """Written with ZeRO-0 fp32, resumed with ZeRO-1 bf16: the weights and optimizer state go through the
    layout-free copy (tests/test_engine_reshard.py checks them tensor by tensor), the stream and memory are kept."""
    run = copy_of(base_run, tmp_path)
    r = ok(train(copy_data, run, "--train-iters", "6", "--ds_config", "ds_configs/zero1_bf16.json"))
    assert "ZeRO stage 0 (this run: 1), precision fp32 (this run: bf16)" in r.stdout
    assert "weights and optimizer state resharded" in r.stdout and "kept: weights, memory states" in r.stdout
    assert (run / "iter_0000004" / "universal" / "meta.json").exists()
    assert [x["step"] for x in records(run)][-2:] == [5, 6] and all(math.isfinite(x["loss"])
                                                                    for x in records(run)[-1:])


def test_another_model_is_refused_naming_the_field(base_run, copy_data, tmp_path):
    other = tmp_path / "run96"
    r = train(copy_data, other, "--train-iters", "6", "--load", base_run, "--model.d_model", "48")
    one_line_error(r, "checkpoint.load", "model.d_model 32, this run has 48", "config.yaml")
    assert not other.exists()


def _strip_fields(run, tag="iter_0000004"):
    """The checkpoint as a version without the ARMT and GDN sections nor fast_weight.sum_norm would write it."""
    path = run / tag / "memtrain" / "meta.json"
    meta = json.loads(path.read_text())
    for section in ("armt", "gated_deltanet"):
        del meta["model"][section]
    del meta["model"]["fast_weight"]["sum_norm"]
    path.write_text(json.dumps(meta))


def test_a_checkpoint_written_before_a_field_existed_resumes_at_its_default(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    _strip_fields(run)
    r = ok(train(copy_data, run, "--train-iters", "5"))
    assert "iter_0000004 at step 4" in r.stdout
    # ... and a value other than the default is still another model
    run = tmp_path / "again"
    shutil.copytree(base_run, run)
    _strip_fields(run)
    r = train(copy_data, run, "--train-iters", "5", "--model.fast_weight.sum_norm", "false")
    one_line_error(r, "checkpoint.load", "model.fast_weight", "'sum_norm': True", "'sum_norm': False")


# ---------------------------------------------------------------------------------------------------- damage
def test_a_corrupt_rank_file_falls_back_to_the_previous_checkpoint(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    f = run / "iter_0000004" / "memtrain" / "rank_dp0_tp0.pt"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    r = ok(train(copy_data, run, "--train-iters", "5"))
    assert "rank_dp0_tp0.pt" in r.stdout and "falling back to iter_0000002" in r.stdout
    assert "resumed from" in r.stdout and "iter_0000002 at step 2" in r.stdout
    assert [x["step"] for x in records(run)][-3:] == [3, 4, 5]


def test_a_corrupt_file_of_the_same_size_falls_back_too(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    f = run / "iter_0000004" / "memtrain" / "rank_dp0_tp0.pt"
    size = f.stat().st_size
    f.write_bytes(b"\0" * size)
    r = ok(train(copy_data, run, "--train-iters", "5"))
    assert "truncated or corrupt" in r.stdout and "falling back to iter_0000002" in r.stdout


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete_one(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    (run / "latest").write_text("iter_0000099")
    r = ok(train(copy_data, run, "--train-iters", "5"))
    assert "latest names 'iter_0000099', which is missing" in r.stdout
    assert "iter_0000004 at step 4" in r.stdout
    assert (run / "latest").read_text() == "iter_0000005"


def test_no_usable_checkpoint_is_one_line(base_run, copy_data, tmp_path):
    run = copy_of(base_run, tmp_path)
    for f in glob.glob(str(run / "iter_*" / "mp_rank_00_model_states.pt")):
        os.truncate(f, 100)
    one_line_error(train(copy_data, run, "--train-iters", "5"), "no usable checkpoint", "iter_0000004",
                   "iter_0000002", "mp_rank_00_model_states.pt has 100 bytes")


# ---------------------------------------------------------------------------------------------------- data
def _corrupt_copy(copy_data, tmp_path, split, how):
    src_dir, name = os.path.split(copy_data)
    for f in glob.glob(os.path.join(src_dir, name + "_*")):
        shutil.copy(f, tmp_path)
    prefix = str(tmp_path / name)
    target = f"{prefix}_{split}"
    if how == "truncate_bin":
        os.truncate(target + ".bin", os.path.getsize(target + ".bin") - 2)
    elif how == "bad_magic":
        with open(target + ".idx", "r+b") as f:
            f.write(b"NOTMMIDX\0")
    elif how == "truncate_idx":
        os.truncate(target + ".idx", os.path.getsize(target + ".idx") - 8)
    elif how == "small_vocab":
        for s in ("train", "valid", "test"):
            m = json.load(open(f"{prefix}_{s}.json"))
            m["vocab_size"] = 5
            json.dump(m, open(f"{prefix}_{s}.json", "w"))
    return prefix


@pytest.mark.parametrize("split, how, needles", [
    ("train", "truncate_bin", ["copy_train.bin", "truncated"]),
    ("train", "bad_magic", ["copy_train.idx", "bad magic"]),
    ("valid", "truncate_idx", ["copy_valid.idx", "truncated index"]),
    ("valid", "truncate_bin", ["copy_valid.bin"]),
    ("train", "small_vocab", ["copy_train.bin holds token id 9", "vocab_size 5"]),
])
def test_bad_data_stops_the_run_at_start_up(copy_data, tmp_path, split, how, needles):
    prefix = _corrupt_copy(copy_data, tmp_path, split, how)
    run = tmp_path / "run"
    r = train(prefix, run, "--train-iters", "3", "--eval.final_splits", "[valid]")
    one_line_error(r, "data.path", *needles)
    assert "step 1/" not in r.stdout and not run.exists()


# ---------------------------------------------------------------------------------------------------- disk
def test_a_failed_write_is_named_and_leaves_nothing_half_written(tmp_path):
    import errno
    import torch
    from pretrain.engine import checkpoint as ckpt

    class Engine:
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            path = os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    class Part:
        def state_dict(self):
            return {"x": torch.zeros(2)}

    save = tmp_path / "run"
    (save / "iter_0000002" / "memtrain").mkdir(parents=True)
    (save / "iter_0000002" / "memtrain" / "meta.json").write_text('{"step": 2}')
    (save / "latest").write_text("iter_0000002")
    m = ckpt.CheckpointManager(str(save), 2, 0, 0, 1, 1, 0)
    with pytest.raises(ckpt.CheckpointError) as e:
        m.save(Engine(), 3, {"memory": Part()}, {})
    msg = str(e.value)
    assert "cannot write checkpoint iter_0000003" in msg and "No space left on device" in msg
    assert "mp_rank_00_model_states.pt" in msg and "latest still names iter_0000002" in msg
    assert not (save / "iter_0000003").exists() and (save / "latest").read_text() == "iter_0000002"


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_the_run_with_one_line(copy_data, tmp_path):
    """--save on a 2 MiB tmpfs with a checkpoint every step (about 0.3 MiB each): the disk fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mount failed")
    try:
        run = mnt / "run"
        r = train(copy_data, run, "--train-iters", "20", "--save-interval", "1", "--checkpoint.keep_last", "20")
        last = one_line_error(r, "cannot write checkpoint", "No space left on device", str(run))
        latest = (run / "latest").read_text()
        tags = sorted(os.path.basename(p) for p in glob.glob(str(run / "iter_*")))
        assert tags[-1] == latest and latest in last  # nothing half-written: every directory is complete
        assert all((run / t / "memtrain" / "meta.json").exists() for t in tags)
    finally:
        subprocess.run(["umount", str(mnt)])


# ---------------------------------------------------------------------------------------------------- /dev/shm
def test_no_shared_memory_buffer_is_left_behind(copy_data, tmp_path):
    """DeepSpeed's CPU all-reduce creates a 66 MB /dev/shm file per rank (shown with a bare init_distributed);
    a training run removes its own, however it ends."""
    port = free_port()
    env = dict(ENV, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"
    code = "import deepspeed; deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False)"
    try:
        subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=200, check=True)
        assert glob.glob(pattern), "DeepSpeed no longer creates the buffer: the test below proves nothing"
    finally:
        for f in glob.glob(pattern):
            os.remove(f)
    ok(train(copy_data, tmp_path / "run", "--train-iters", "1", env=env))
    assert not glob.glob(pattern)
    # a run that stops on a configuration error after the process group is up
    r = train(copy_data, tmp_path / "run2", "--train-iters", "1", "--eval.protocol", "sliding", env=env)
    assert r.returncode == 2 and not glob.glob(pattern)


# ---------------------------------------------------------------------------------------------------- logs
def test_progress_through_a_pipe_is_a_few_lines_without_carriage_returns(copy_data, tmp_path):
    r = ok(train(copy_data, tmp_path / "run", "--train-iters", "30", "--log.progress", "true", "--log.interval",
                 "10", "--log.progress_seconds", "0", "--log.progress_steps", "10"))
    assert "\r" not in r.stderr and "\r" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train: step")]
    assert [ln.split(" (")[0] for ln in lines] == ["train: step 10/30", "train: step 20/30", "train: step 30/30"]
    assert all("steps/s" in ln and "ETA" in ln for ln in lines)
