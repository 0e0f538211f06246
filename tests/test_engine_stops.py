"""Every checkpoint a run writes can be resumed: each step is saved at most once, whatever stops the run there, and
a resume never takes an older checkpoint while a newer complete one exists.

* The stop matrix (``tests/engine_driver.py --scenario stops``): every stop kind (exit interval, SIGTERM, SIGUSR1, SIGUSR2,
  the wall-time guard, the end of a shorter run) at a save-interval step and between two, in 1 and 2 processes;
  the same command resumed gives the uninterrupted run: losses, weights, memory and stream position identical.
* SIGKILL at each point of a save (nothing written yet; DeepSpeed's and the rank files; meta.json but not
  ``latest``; ``latest`` but before pruning): the same command resumes from the newest complete checkpoint and ends
  where the uninterrupted run ends.
* A finished run started again writes nothing and still evaluates and exports; a save of a step whose directory
  exists replaces it whole, so ``meta.json`` always describes its own files.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_engine_resume import PY, ENV, TINY, copy_data, ok, records, train  # noqa: F401  (the fixture too)
from test_engine_train import driver

KINDS = ["exit_interval", "SIGTERM", "SIGUSR1", "SIGUSR2", "walltime", "end"]
# constant rate: a run stopped by a shorter --train-iters follows the same schedule as the longer one
STOPS = ["--model.attn_type", "0", "--model.dropout", "0.1", "--data.reset_memory", "true",
         "--optim.schedule", "constant", "--train.grad_accum", "2"]


def _check_stops(results):
    for rank, res in enumerate(results):
        runs = res["2"]
        full = runs.pop("full")
        assert full["steps"] == [1, 2, 3, 4, 5, 6] and full["saves"] == [["iter_0000006", "end"]]
        assert sorted(runs) == sorted(f"{k}_{w}" for k in KINDS for w in ("on", "between"))
        for name, d in runs.items():
            at, interval, stopped, resumed = d["at"], d["interval"], d["stopped"], d["resumed"]
            what = f"rank {rank} {name}"
            tags = [t for t, _ in stopped["saves"]] + [t for t, _ in resumed["saves"]]
            assert len(tags) == len(set(tags)), f"{what}: a step saved twice: {stopped['saves']} {resumed['saves']}"
            assert stopped["final_step"] == at and stopped["steps"] == list(range(1, at + 1)), what
            assert stopped["saves"][-1][0] == f"iter_{at:07d}", (what, stopped["saves"])
            # one save for every reason that met at the step ("end" stands for the interval at the last step)
            parts = stopped["saves"][-1][1].split(" + ")
            if name.startswith("end"):
                assert parts == ["end"], (what, parts)
            else:
                assert parts[:-1] == (["interval"] if name.endswith("_on") else []) and len(parts) >= 1, (what, parts)
            assert resumed["resumed_from"].endswith(f"iter_{at:07d}"), (what, resumed["resumed_from"])
            assert resumed["steps"] == list(range(at + 1, 7)), what
            assert stopped["losses"] + resumed["losses"] == full["losses"], what
            assert resumed["weights"] == full["weights"], what
            assert resumed["memory"] == full["memory"], what
            assert resumed["stream"] == full["stream"], what
            assert resumed["stopped"] is None and (stopped["stopped"] is None) == name.startswith("end"), what


@pytest.mark.parametrize("nproc", [1, 2])
def test_every_stop_kind_on_and_between_save_steps_resumes_exactly(copy_data, tmp_path, nproc):
    """ZeRO-2 (the quickstart's), fp32, dropout on, 2 accumulation slots; with 2 processes the signal reaches
    the last rank only."""
    results = driver(tmp_path, nproc, "stops", "2", ["--data-path", copy_data] + STOPS + TINY, timeout=900)
    _check_stops(results)


# ------------------------------------------------------------------------------------------------ SIGKILL
RUN = ["--train-iters", "6", "--save-interval", "2", "--checkpoint.keep_last", "2"] + STOPS


def _assert_same(a, b, where):
    """Deep equality of two loaded checkpoint objects: tensors bit for bit (dtype and shape included)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):   # the numpy generator's state
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _steps(run):
    return [(r["step"], r["loss"]) for r in records(run)]


@pytest.fixture(scope="module")
def uninterrupted(copy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    ok(train(copy_data, run, *RUN))
    return run


@pytest.mark.parametrize("point,resumes_at", [("start", 2), ("rank_files", 2), ("meta", 4), ("latest", 4)])
def test_a_kill_during_a_save_resumes_from_the_newest_complete_checkpoint(copy_data, uninterrupted, tmp_path,
                                                                           point, resumes_at):
    run = tmp_path / "run"
    r = train(copy_data, run, *RUN, "--debug.kill_in_save", point, "--debug.kill_in_save_step", "4")
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]
    r = ok(train(copy_data, run, *RUN))
    assert f"resumed from {run}/iter_{resumes_at:07d} at step {resumes_at}" in r.stdout, r.stdout[-3000:]
    if point == "meta":   # latest still names iter_2: the newer complete checkpoint wins, and the log says why
        assert "latest names 'iter_0000002', older than the complete iter_0000004" in r.stdout
    # every step's loss as in the uninterrupted run (the steps redone after a fallback included), same last state
    full = dict(_steps(uninterrupted))
    assert all(full[s] == loss for s, loss in _steps(run)), (_steps(run), full)
    assert {s for s, _ in _steps(run)} == set(full)
    final = [json.load(open(os.path.join(d, "iter_0000006", "memtrain", "meta.json"))) for d in (run, uninterrupted)]
    # the same files with the same contents (not the same bytes: pickle's memo depends on object identity)
    assert sorted(final[0]["files"]) == sorted(final[1]["files"])
    assert final[0]["consumed_tokens"] == final[1]["consumed_tokens"]
    for rel in final[0]["files"]:
        _assert_same(*(torch.load(os.path.join(d, "iter_0000006", rel), map_location="cpu", weights_only=False)
                       for d in (run, uninterrupted)), rel)
    assert (run / "latest").read_text() == "iter_0000006"
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000004", "iter_0000006"]   # keep_last 2, no leftover


def test_a_finished_run_started_again_writes_nothing_and_ends_as_before(copy_data, uninterrupted, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    meta = (run / "iter_0000006" / "memtrain" / "meta.json").read_text()
    r = ok(train(copy_data, run, *RUN, "--eval.final_splits", "[valid]"))
    assert "resumed from" in r.stdout and "already holds step 6; not written again" in r.stdout
    assert "saved checkpoint" not in r.stdout and "done:" in r.stdout
    assert (run / "iter_0000006" / "memtrain" / "meta.json").read_text() == meta
    assert records(run, "eval")[-1]["step"] == 6


def test_a_stop_says_how_to_resume_instead_of_done(copy_data, tmp_path):
    run = tmp_path / "run"
    r = ok(train(copy_data, run, "--train-iters", "4", "--save-interval", "2", "--exit-interval", "2"))
    assert "done:" not in r.stdout
    assert f"stopped at step 2 of 4 (exit interval 2): checkpoint {run}/iter_0000002; run the same command again " \
           f"to resume" in r.stdout
    assert r.stdout.count("saved checkpoint") == 1 and "iter_0000002 (interval + exit interval 2)" in r.stdout
    r = ok(train(copy_data, run, "--train-iters", "4", "--save-interval", "2", "--exit-interval", "2"))
    assert f"resumed from {run}/iter_0000002 at step 2" in r.stdout and "done:" in r.stdout


# ------------------------------------------------------------------------------------------------ the manager
class _Engine:
    """DeepSpeed's save as far as the manager sees it: files under SAVE/TAG, of a size that depends on the call."""

    def __init__(self, files):
        self.files = files

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        for name, size in self.files.items():
            path = os.path.join(save_dir, tag, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"x" * size)


class _Part:
    def state_dict(self):
        return {"x": 1}


def test_a_repeated_save_of_a_step_describes_exactly_its_own_files(tmp_path):
    """A save into a step directory that exists (an earlier run's, killed or corrupt) replaces it whole: the
    recorded sizes and reason are the new save's, files of the old one (another layout's) are gone, and the
    checkpoint verifies."""
    from pretrain.engine import checkpoint as ckpt
    save = str(tmp_path)
    m = ckpt.CheckpointManager(save, 2, 0, 0, 1, 1, 0)
    m.save(_Engine({"mp_rank_00_model_states.pt": 10, "zero_pp_rank_1_optim_states.pt": 7}), 2, {"p": _Part()},
           {"reason": "interval"})
    m.save(_Engine({"mp_rank_00_model_states.pt": 12}), 2, {"p": _Part()}, {"reason": "interval + signal SIGTERM"})
    meta = ckpt.read_meta(save, "iter_0000002")
    assert meta["reason"] == "interval + signal SIGTERM" and ckpt.verify(save, "iter_0000002", meta) is None
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "memtrain/rank_dp0_tp0.pt"}
    assert meta["files"]["mp_rank_00_model_states.pt"] == 12


def test_candidates_are_newest_first_whatever_latest_names(tmp_path):
    from pretrain.engine import checkpoint as ckpt
    from test_engine_components import _fake_checkpoint
    root = str(tmp_path)
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 4, latest=False)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000002")
    tags, notes = ckpt.candidates(root)
    assert tags == ["iter_0000004", "iter_0000002"]
    assert notes == [f"{root}/latest names 'iter_0000002', older than the complete iter_0000004 "
                     f"({ckpt.LATEST_BEHIND})"]
