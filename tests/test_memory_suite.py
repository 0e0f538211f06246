"""benchmarks/memory_suite.py: the --quick setting runs the whole pipeline (tasks generated, every variant trained
through pretrain/train.py at matched parameter count, table, JSON, plot), and impossible settings fail before any
work with one line naming the flag."""
import json
import os

import pytest

from benchmarks import memory_suite as suite


@pytest.mark.slow
def test_quick_run_reports_an_accuracy_for_every_variant_and_distance(tmp_path, capsys):
    out = tmp_path / "suite.json"
    md = tmp_path / "results.md"
    md.write_text(f"# Results\n\nbefore\n{suite.MARK_BEGIN}\nNot run yet.\n{suite.MARK_END}\nafter\n")
    assert suite.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--results-md", str(md),
                       "--set=--model.dropout", "--set=0.0"]) == 0
    report = json.loads(out.read_text())
    for key in ("date", "command", "machine", "settings", "budget", "seeds", "accuracy", "parameter_matching",
                "table", "tasks", "wall_seconds"):
        assert key in report, key
    assert report["seeds"] == [1] and report["budget"]["runs"] == 4 and report["failed_runs"] == 0
    assert list(report["tasks"]) == ["mqar"]
    task = report["tasks"]["mqar"]
    assert task["distances"] == [1, 2]
    assert list(task["variants"]) == ["xl", "rmt8"]
    for k in ("1", "2"):        # the data really puts every answer k segments after its pair
        meta = task["data"][k]["task"]
        assert meta["example_len"] == (int(k) + 1) * 8 and task["data"][k]["segments_per_example"] == int(k) + 1
    target = task["variants"]["xl"]["params"]["params"]
    for name, v in task["variants"].items():
        p = v["params"]
        assert p["target"] == target and p["matched"] and abs(p["params"] - target) <= 0.02 * target, name
        assert v["reach"]
        for k in ("1", "2"):
            acc = v["accuracy"][k]
            assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (name, k, acc)
            (run,) = v["runs"][k]
            assert run["accuracy"] == acc and "--data.reset_memory" in run["command"]
            assert run["command"][-2:] == ["--model.dropout", "0.0"]        # --set: after the suite's options
    assert task["variants"]["rmt8"]["params"]["d_inner"] != task["variants"]["xl"]["params"]["d_inner"]
    assert (tmp_path / "suite.png").stat().st_size > 0
    text = md.read_text()        # the table replaced the block between the markers, the rest kept
    assert text.startswith("# Results\n\nbefore\n") and text.endswith(f"{suite.MARK_END}\nafter\n")
    assert "Not run yet" not in text and report["table"] in text
    printed = capsys.readouterr().out
    assert "| xl |" in printed and "| rmt8 |" in printed and "[4/4]" in printed


@pytest.mark.parametrize("argv, flag", [
    (["--tasks", "babifacts", "--distances", "1,9", "--babi-haystacks", "64"], "--distances 9"),
    (["--tasks", "mqar", "--segment", "8", "--mqar-queries", "5", "--mqar-pairs", "5"], "--mqar-pairs 5"),
    (["--tasks", "mqar", "--segment", "8", "--mqar-queries", "6", "--mqar-pairs", "2"], "--mqar-queries 6"),
    (["--tasks", "retrieval", "--segment", "16", "--distances", "4"], "--distances 4"),
    (["--tasks", "mqar,lambada"], "--tasks"),
    (["--variants", "xl,nonesuch"], "--variants"),
    (["--distances", "0,2"], "--distances"),
    (["--results-md", "/nonexistent/results.md"], "--results-md"),
    (["--variant", "odd=--model.nonesuch 3"], "--variant odd"),
    (["--variant", "odd=--train.threads 3"], "--variant odd"),
    (["--variant", "odd=--model.attn_type"], "--variant"),
    (["--variants", "hybrid", "--n-layer", "2"], "--variants hybrid"),
])
def test_bad_settings_fail_first_with_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    work = tmp_path / "work"
    assert suite.main(["--quick", "--work", str(work), "--out", str(tmp_path / "x.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memory_suite.py: ") and flag in err and "\n" not in err, err
    assert not os.path.exists(work / "runs") and not (tmp_path / "x.json").exists()


def test_default_variants_come_from_the_registry():
    known = suite.suite_variants()
    names = suite.default_variants(known)
    for name in ("none", "xl", "xl_cover", "lamemo", "linear", "delta", "compressive", "gdn", "rmt8", "rmt8_xl",
                 "armt16", "hybrid", "slots_xl"):
        assert name in names, name
    from pretrain.model import registry
    for mech in registry.mechanisms("stack").values():      # every stack memory's benchmark configs
        assert set(mech.bench_configs) <= set(names)
    assert suite.resolve(known["xl_cover"], 3, 8)["mem_len"] == 32
    # the fast-weight layers in both settings: carried (the memory) and the toolkit's limited context
    for name in ("linear", "delta"):
        assert f"{name}_limited" in names
        assert known[f"{name}_limited"] == dict(known[name], fast_weight={"carry_state": False,
                                                                           "positions": "absolute"})
    assert not any(n.startswith(("gdn", "xl", "rmt")) and n.endswith("_limited") for n in known)


def test_custom_variants_become_nested_overrides():
    name, kw = suite.parse_variant("delta_limited=--model.attn_type 24 --model.mem_len 0 "
                                   "--model.fast_weight.carry_state false --model.fast_weight.positions absolute")
    assert name == "delta_limited"
    assert kw == {"attn_type": 24, "mem_len": 0, "fast_weight": {"carry_state": False, "positions": "absolute"}}
    assert suite.flags(kw)[-4:] == ["--model.fast_weight.carry_state", "False", "--model.fast_weight.positions",
                                    "absolute"]
