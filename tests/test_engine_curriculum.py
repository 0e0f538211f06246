"""Curricula (``train.curriculum``): stages over the training data and the BPTT depth, switched by steps or by a loss
threshold, logged per stage, and exactly resumable: a run resumed from any checkpoint (inside a stage, at a stage
switch by steps, inside a loss stage with a partly filled loss window, at a switch by loss) gives the uninterrupted
run's losses, weights, memory and stream position, bit for bit (fp32, CPU); a checkpoint of a curriculum and one
written without are not resumed across.

The data is the copy task at 1, 2 and 4 segments of 8 tokens per example (lengths 2, 5 and 8), as RMT's curriculum
over the number of segments.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from pretrain.config_base import ConfigError
from test_engine_resume import ENV, PY, TINY, records
from test_engine_train import torchrun


def _copy(prefix, length, train_size, eval_size=10):
    subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "synthetic.py"), "copy", "--length",
                    str(length), "--segment-multiple", "8", "--train-size", str(train_size), "--valid-size",
                    str(eval_size), "--test-size", str(eval_size), "--seed", "3", "--output-prefix", str(prefix)],
                   check=True, capture_output=True, timeout=120)
    return str(prefix)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The copy task at 1, 2 and 4 segments per example (the last is the run's --data-path, its target task)."""
    d = tmp_path_factory.mktemp("tasks")
    return {n: _copy(d / f"copy{n}", length, size) for n, length, size in ((1, 2, 40), (2, 5, 300), (4, 8, 600))}


def curriculum_args(tasks, loss_window=3):
    """Stage 0: 1 segment per example, BPTT 1, for 2 steps; stage 1: 2 segments, BPTT 2, until the mean loss of 3
    steps is below 50 (met as soon as the window is full: after step 5); stage 2: the target task at the run's
    BPTT depth (train.bptt_segments 4), to the end.  The run's depth differs from stage 0's, which a fresh run
    starts at."""
    stages = (f"[{{data: {tasks[1]}, bptt_segments: 1, steps: 2}}, {{data: {tasks[2]}, bptt_segments: 2, "
              f"loss: 50, window: {loss_window}, max_steps: 10}}, {{}}]")
    return ["--data-path", tasks[4], "--data.align", "document", "--train.bptt_segments", "4",
            "--train.curriculum", stages]


# ------------------------------------------------------------------------------------------------ exact resume
RESUME_AT = [1, 2, 4, 5, 7]     # inside stage 0, at the switch by steps, inside the loss stage, at its switch, stage 2


def _check(results):
    for rank, res in enumerate(results):
        runs = res["0"]
        full = runs["full"]
        assert full["steps"] == list(range(1, 9)) and full["final_step"] == 8
        assert full["curriculum"]["stage"] == 2 and full["curriculum"]["start"] == 5, full["curriculum"]
        assert full["bptt_segments"] == 4 and full["memory_k"] == 4
        for at in RESUME_AT:
            r = runs[str(at)]
            what = f"rank {rank} resumed at {at}"
            assert r["resumed_from"].endswith(f"iter_{at:07d}"), (what, r["resumed_from"])
            assert r["steps"] == list(range(at + 1, 9)), what
            assert r["losses"] == full["losses"][at:], (what, r["losses"], full["losses"])
            assert r["weights"] == full["weights"], what
            assert r["memory"] == full["memory"], what
            assert r["stream"] == full["stream"], what
            assert r["curriculum"] == full["curriculum"], what
        # a checkpoint of the curriculum resumed without it, and one written without a curriculum resumed with it
        assert "config field 'train.curriculum'" in res["0"]["refused_without"]
        assert "written in stage 3 of a curriculum" in res["0"]["refused_without"]
        assert "same train.curriculum" in res["0"]["refused_without"]
        assert "config field 'train.curriculum'" in res["0"]["refused_with"]
        assert "was written without a curriculum" in res["0"]["refused_with"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_curriculum_resumes_exactly_inside_and_at_stage_switches(tasks, tmp_path, nproc):
    """Dropout on, 2 accumulation slots; with 2 processes every rank reads its own stripes of each stage's data."""
    extra = curriculum_args(tasks) + TINY + [
        "--train-iters", "8", "--model.dropout", "0.1", "--optim.schedule", "constant", "--train.grad_accum", "2",
        "--log.interval", "4", "--lr", "1e-3"]
    out = tmp_path / "curriculum.json"
    args = [os.path.join(ROOT, "tests", "engine_driver.py"), "--scenario", "curriculum", "--zero", "0",
            "--resume-points", ",".join(map(str, RESUME_AT)), "--workdir", str(tmp_path), "--out", str(out),
            "--"] + extra
    if nproc == 1:
        r = subprocess.run([PY] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    else:
        r = torchrun(2, args, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    _check(results)
    if nproc == 2:
        return
    # what the uninterrupted run logged and saved
    run = tmp_path / "z0_full"
    stages = records(run, "curriculum")
    assert [(s["stage"], s["step"], s["segments_per_example"], s["bptt_segments"]) for s in stages] == \
        [(0, 0, 1, 1), (1, 2, 2, 2), (2, 5, 4, 4)]
    assert stages[0]["reason"] == "start" and stages[1]["reason"] == "2 steps"
    assert stages[2]["reason"].startswith("mean loss ") and "of the last 3 steps < 50" in stages[2]["reason"]
    assert [s["data"] for s in stages] == [tasks[1] + "_train", tasks[2] + "_train", tasks[4] + "_train"]
    # a log window never spans two stages: the windows of log.interval 4 are cut at the switches
    assert [(t["step"], t["stage"]) for t in records(run)] == [(2, 0), (4, 1), (5, 1), (8, 2)]
    # 2 micro-batches x 2 rows x 8 tokens x the stage's BPTT depth per step
    assert [t["consumed_tokens"] for t in records(run)] == [64, 64 + 128, 64 + 192, 64 + 192 + 3 * 128]
    meta = {t: json.loads((run / f"iter_{t:07d}" / "memtrain" / "meta.json").read_text()) for t in (1, 2, 4, 5)}
    assert [meta[t]["bptt_segments"] for t in (1, 2, 4, 5)] == [1, 2, 2, 4]   # the stage's, after the step's switch
    assert [meta[t]["curriculum"]["stage"] for t in (1, 2, 4, 5)] == [0, 1, 1, 2]
    assert len(meta[4]["curriculum"]["losses"]) == 2 and meta[5]["curriculum"]["losses"] == []
    assert meta[4]["curriculum"]["losses"] == results[0]["0"]["full"]["losses"][2:4]   # steps 3 and 4
    # a checkpoint at a switch holds the new stage at its start: its stream at step 0, every memory state empty
    import torch
    for t, switch in ((1, False), (2, True), (4, False), (5, True)):
        part = torch.load(run / f"iter_{t:07d}" / "memtrain" / "rank_dp0_tp0.pt", weights_only=False)
        empty = all(not v.any() for slot in part["memory"]["slots"] for v in slot["tensors"].values())
        assert empty == switch and (part["stream"]["step"] == 0) == switch, t


# ------------------------------------------------------------------------------------------------ the stage logic
def _curriculum(*stages):
    from pretrain.engine.curriculum import Curriculum, Stage
    return Curriculum([Stage(index=i, prefix=f"d{i}", data=None, k=1, segments_per_example=None, **s)
                       for i, s in enumerate(stages)])


def _rec(loss, finite=True, scored=8):
    return {"loss": loss, "finite": finite, "scored": scored}


def test_a_loss_stage_ends_at_the_first_full_window_below_the_threshold():
    c = _curriculum(dict(steps=None, loss=1.0, window=3, max_steps=None), dict(steps=None, loss=None, window=10,
                                                                                max_steps=None))
    seen = []
    # window means: (3, 1, 1) -> 1.67; (1, 1, 0.8) -> 0.93 < 1 at step 4; a skipped step and a step scoring
    # nothing do not enter the window
    for step, rec in enumerate([_rec(3.0), _rec(1.0), _rec(float("nan"), finite=False), _rec(0.0, scored=0),
                                _rec(1.0), _rec(0.8)], start=1):
        c.observe(rec)
        seen.append(c.due(step))
    assert seen[:5] == [None] * 5 and seen[5].startswith("mean loss 0.9333 of the last 3 steps < 1")
    c.advance(6)
    assert (c.stage, c.start, c.losses) == (1, 6, []) and c.due(1000) is None   # the last stage never ends


def test_a_loss_stage_ends_at_max_steps_and_a_steps_stage_after_its_steps():
    c = _curriculum(dict(steps=3, loss=None, window=10, max_steps=None),
                    dict(steps=None, loss=0.5, window=2, max_steps=2), dict(steps=None, loss=None, window=10,
                                                                            max_steps=None))
    assert [c.due(s) for s in (1, 2)] == [None, None] and c.due(3) == "3 steps"
    c.advance(3)
    c.observe(_rec(2.0))
    assert c.due(4) is None
    c.observe(_rec(2.0))
    assert c.due(5).startswith("max_steps 2 (mean loss 2.0000")
    state = c.state_dict()
    other = _curriculum(dict(steps=3, loss=None, window=10, max_steps=None),
                        dict(steps=None, loss=0.5, window=2, max_steps=2), dict(steps=None, loss=None, window=10,
                                                                                max_steps=None))
    other.load_state_dict(json.loads(json.dumps(state)), "ckpt")
    assert (other.stage, other.start, other.losses) == (c.stage, c.start, c.losses)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("value, field, words", [
    ("[]", "train.curriculum", "empty list"),
    ("[{steps: 2, loss: 1.0}, {}]", "train.curriculum[0].steps", "not both"),
    ("[{bptt_segments: 2}, {}]", "train.curriculum[0]", "needs an end"),
    ("[{steps: 2}, {steps: 3}]", "train.curriculum[1]", "last stage runs to train.iters"),
    ("[{steps: 0}, {}]", "train.curriculum[0].steps", ">= 1"),
    ("[{loss: -1}, {}]", "train.curriculum[0].loss", "> 0"),
    ("[{loss: 1, window: 0}, {}]", "train.curriculum[0].window", ">= 1"),
    ("[{steps: 3, max_steps: 4}, {}]", "train.curriculum[0].max_steps", "caps a loss stage"),
    ("[{steps: 2}, {bptt_segments: 0}]", "train.curriculum[1].bptt_segments", ">= 1"),
    ("[{steps: 2, segments: 4}, {}]", "train.curriculum[0].segments", "unknown field"),
])
def test_invalid_stages_name_the_field(value, field, words):
    from pretrain.engine.run_config import parse_args
    with pytest.raises(ConfigError) as e:
        parse_args(["--train.curriculum", value])
    assert e.value.field == field and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_curriculum_from_yaml(tmp_path):
    from pretrain.engine.run_config import parse_args
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  curriculum:\n    - {data: d/copy1, steps: 100}\n"
                      "    - {data: d/copy2, bptt_segments: 2, loss: 0.5, window: 20, max_steps: 1000}\n"
                      "    - {bptt_segments: 4}\n")
    cfg, _ = parse_args(["--config", str(preset)])
    st = cfg.train.curriculum
    assert [s.data for s in st] == ["d/copy1", "d/copy2", None] and [s.bptt_segments for s in st] == [None, 2, 4]
    assert (st[1].loss, st[1].window, st[1].max_steps) == (0.5, 20, 1000) and st[0].window == 10
    assert parse_args([])[0].train.curriculum is None


def test_stage_data_is_checked_at_start_up(tasks, tmp_path):
    """A missing prefix, and data of another tokenizer, stop at start-up naming the stage's field (in-process: the
    data checks run before any process group); segments per example come from the task's metadata."""
    from pretrain.engine.curriculum import resolve_stages
    from pretrain.engine.data import load_data_info
    from pretrain.engine.run_config import parse_args
    run_data = load_data_info(tasks[4])

    def stages(value):
        cfg, _ = parse_args(["--data-path", tasks[4], "--train.curriculum", value])
        return resolve_stages(cfg, run_data, 8)

    st = stages(f"[{{data: {tasks[1]}, steps: 1}}, {{data: {tasks[2]}_train, steps: 1}}, {{}}]")
    assert [s.segments_per_example for s in st] == [1, 2, 4]
    assert [s.prefix for s in st] == [tasks[1] + "_train", tasks[2] + "_train", tasks[4] + "_train"]
    with pytest.raises(ConfigError) as e:
        stages(f"[{{data: {tmp_path}/nothing, steps: 1}}, {{}}]")
    assert e.value.field == "train.curriculum[0].data" and "nothing.bin/.idx not found" in str(e.value)
    other = _copy(tmp_path / "wide", 2, 40)
    m = json.load(open(other + "_train.json"))
    vocab = os.path.join(tmp_path, m["tokenizer"]["file"])
    symbols = json.load(open(vocab))
    json.dump(symbols[:-1] + ["Z"], open(vocab, "w"))    # another vocabulary of the same size
    with pytest.raises(ConfigError) as e:
        stages(f"[{{data: {other}, steps: 1}}, {{}}]")
    assert e.value.field == "train.curriculum[0].data" and "every stage must use the run's tokenizer" in str(e.value)
