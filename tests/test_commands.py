"""The evaluation, generation and plotting commands: every numeric option checked against its meaning with a
one-line error naming the flag; missing, truncated or corrupt exports and data give one line naming the file
and the way out (exit status 2), never a traceback; nucleus sampling's limit; results written atomically.

The exports here are written directly from freshly built tiny models (``write_export``), so no training runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

torch = pytest.importorskip("torch")

from data_tools.preprocess import main as preprocess_main  # noqa: E402
from pretrain import evaluate, generate, plot  # noqa: E402

PY = sys.executable
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
TEXT = "".join(f"{w} the quick brown fox jumps over the lazy dog {w}.\n" for w in range(400))


def _export(tmp, data_prefix, attn_type, mem_len, seed=0):
    from pretrain.config_base import to_dict
    from pretrain.engine.export import write_export
    from pretrain.model import ModelConfig, build_model, parallel
    from pretrain.model.weights import gather_full
    if not parallel.is_initialized():
        parallel.initialize(1)
    meta = json.load(open(data_prefix + "_train.json"))
    cfg = ModelConfig(vocab_size=meta["vocab_size"], n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32,
                      attn_type=attn_type, tgt_len=8, mem_len=mem_len, dropout=0.0)
    torch.manual_seed(seed)
    model = build_model(cfg)
    splits = {s: f"{data_prefix}_{s}" for s in ("train", "valid")}
    out = str(tmp / f"export_{attn_type}")
    write_export(out, gather_full(model), to_dict(cfg), splits["train"],
                 {"step": 0, "source": str(tmp / "run"), "metric": "bpc", "data": splits, "vocab_size": cfg.vocab_size,
                  "eod_id": meta["eod_id"], "pad_id": meta["pad_id"], "eval": {}})
    return out


def _char_data(tmp, text):
    """``text`` written to ``tmp``/text.txt and preprocessed character-level into train/valid splits (90:10);
    returns their prefix, ``tmp``/data/c."""
    (tmp / "text.txt").write_text(text)
    assert preprocess_main(["--input", str(tmp / "text.txt"), "--tokenizer", "chars", "--split", "90,10",
                            "--output-prefix", str(tmp / "data" / "c"), "--no-progress"]) == 0
    return str(tmp / "data" / "c")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Character-level data (train/valid) and two exports of untrained tiny models: XL and LaMemo."""
    tmp = tmp_path_factory.mktemp("cmd")
    prefix = _char_data(tmp, TEXT)
    return {"dir": tmp, "data": prefix, "xl": _export(tmp, prefix, 0, 8), "lamemo": _export(tmp, prefix, 3, 8)}


def run_main(module, argv, capsys):
    """Run a command in this process: (exit status, stdout, stderr)."""
    try:
        rc = module.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err, prog, text):
    return err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and text in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------- options
# each command with the arguments it needs besides --model, so that only the option under test is wrong
COMMANDS = {"generate.py": (generate, ["--prompt", "a"]), "evaluate.py": (evaluate, [])}


@pytest.mark.parametrize("prog, argv, message", [
    ("generate.py", ["--top-p", "0"],
     "argument --top-p: must be a number in (0, 1] (1 = no nucleus filtering), got '0'"),
    ("generate.py", ["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]"),
    ("generate.py", ["--top-p", "nan"], "argument --top-p: must be a number in (0, 1]"),
    ("generate.py", ["--temperature", "-1"], "argument --temperature: must be a number >= 0 (0 = greedy), got '-1'"),
    ("generate.py", ["--temperature", "inf"], "argument --temperature: must be a number >= 0 (0 = greedy), got 'inf'"),
    ("generate.py", ["--top-k", "-2"], "argument --top-k: must be an integer >= 0 (0 = all), got '-2'"),
    ("generate.py", ["--top-k", "2.5"], "argument --top-k: must be an integer >= 0 (0 = all), got '2.5'"),
    ("generate.py", ["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got '0'"),
    ("generate.py", ["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    ("generate.py", ["--mem-len", "-1"], "argument --mem-len: must be an integer >= 0 (0 = no memory), got '-1'"),
    ("generate.py", ["--segment-len", "0"], "argument --segment-len: must be an integer >= 1, got '0'"),
    ("generate.py", ["--clamp-len", "x"], "argument --clamp-len: must be an integer, got 'x'"),
    ("evaluate.py", ["--tgt-len", "0"], "argument --tgt-len: must be an integer >= 1, got '0'"),
    ("evaluate.py", ["--mem-len", "-3"], "argument --mem-len: must be an integer >= 0 (0 = no memory), got '-3'"),
    ("evaluate.py", ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    ("evaluate.py", ["--stride", "0"], "argument --stride: must be an integer >= 1, got '0'"),
    ("evaluate.py", ["--max-steps", "-1"], "argument --max-steps: must be an integer >= 0 (0 = all), got '-1'"),
    ("evaluate.py", ["--threads", "-1"], "argument --threads: must be an integer >= 0 (0 = all cores), got '-1'"),
    ("evaluate.py", ["--clamp-len", "1e3"], "argument --clamp-len: must be an integer, got '1e3'"),
])
def test_numeric_options_are_checked(capsys, tmp_path, prog, argv, message):
    command, needed = COMMANDS[prog]
    rc, out, err = run_main(command, ["--model", tmp_path] + needed + argv, capsys)
    assert rc == 2 and one_line_error(err, prog, message), err


def test_settings_are_checked_against_the_model(exports, capsys):
    """Values valid alone but not for this model or protocol: named by their flag."""
    rc, _, err = run_main(generate, ["--model", exports["lamemo"], "--prompt", "the", "--mem-len", "0"], capsys)
    assert rc == 2 and one_line_error(err, "generate.py", "--mem-len 0: LaMemo (attn_type 3) needs a memory"), err
    rc, _, err = run_main(evaluate, ["--model", exports["xl"], "--split", "valid", "--mem-len", "0", "--same-length"],
                          capsys)
    assert rc == 2 and one_line_error(err, "evaluate.py", "--same-length: needs a memory"), err
    rc, _, err = run_main(evaluate, ["--model", exports["xl"], "--split", "valid", "--protocol", "sliding",
                                     "--tgt-len", "8", "--stride", "9"], capsys)
    assert rc == 2 and one_line_error(err, "evaluate.py", "--stride 9: must be at most the window (--tgt-len 8)"), err
    rc, _, err = run_main(evaluate, ["--model", exports["xl"], "--split", "test"], capsys)
    assert rc == 2 and one_line_error(err, "evaluate.py", "--split test: no test split"), err
    rc, _, err = run_main(generate, ["--model", exports["xl"], "--prompt", "the", "--stop-at-eod"], capsys)
    assert rc == 2 and one_line_error(err, "generate.py", "--stop-at-eod: the model's tokenizer"), err
    rc, _, err = run_main(generate, ["--model", exports["xl"], "--prompt", "the €"], capsys)
    assert rc == 2 and one_line_error(err, "generate.py", "cannot be encoded with the model's tokenizer"), err


# ------------------------------------------------------------------------------------------ sampling
def test_nucleus_sampling_limits():
    """top_p -> 0 keeps only the most likely token (greedy); top_p 1 keeps the whole distribution; top_k 1 is
    greedy; the values the command rejects are rejected here too."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    logprobs = torch.log_softmax(logits, -1)
    greedy = logprobs.argmax(-1)
    assert torch.equal(generate.sample_next(logprobs, 1.0, 0, 1e-6, g), greedy)
    assert torch.equal(generate.sample_next(logprobs, 1.0, 1, 1.0, g), greedy)
    assert torch.equal(generate.sample_next(logprobs, 0.0, 0, 0.95, g), greedy)
    flat = torch.zeros(1, 4).log_softmax(-1).expand(4000, 4)
    counts = torch.bincount(generate.sample_next(flat, 1.0, 0, 1.0, g), minlength=4)
    assert (counts > 800).all(), counts  # every token of a uniform distribution is drawn
    counts = torch.bincount(generate.sample_next(flat, 1.0, 0, 0.5, g), minlength=4)
    assert (counts > 0).sum() == 2, counts  # half the mass: two of the four tokens
    for bad in ((1.0, 0, 0.0), (-1.0, 0, 0.9), (1.0, -1, 0.9), (1.0, 0, 1.5)):
        with pytest.raises(ValueError):
            generate.sample_next(logprobs, *bad, g)


def test_generate_tiny_top_p_equals_greedy_and_writes_jsonl(exports, capsys, tmp_path):
    outs = []
    for argv in (["--temperature", "0"], ["--top-p", "1e-9"]):
        rc, out, err = run_main(generate, ["--model", exports["xl"], "--prompt", "the quick", "--max-new-tokens", "12",
                                           "--output", tmp_path / "new" / "s.jsonl"] + argv, capsys)
        assert rc == 0, err
        outs.append(json.loads((tmp_path / "new" / "s.jsonl").read_text())["completion"])
    assert outs[0] == outs[1] and len(outs[0]) == 12
    assert sorted(os.listdir(tmp_path / "new")) == ["s.jsonl"]  # no temporary file left


# ------------------------------------------------------------------------------------------- exports
def _broken_exports(exports, tmp):
    good = exports["xl"]

    def copy(name):
        d = tmp / name
        shutil.copytree(good, d)
        return d
    cases = {}
    d = copy("truncated")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(d / "model.safetensors") // 2)
    cases["truncated"] = (d, f"{d / 'model.safetensors'}: truncated or corrupt")
    d = copy("garbage")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    cases["garbage"] = (d, f"{d / 'model.safetensors'}: truncated or corrupt")
    d = copy("badjson")
    (d / "export.json").write_text("{oops")
    cases["badjson"] = (d, f"{d / 'export.json'}: unreadable")
    d = copy("badyaml")
    (d / "model.yaml").write_text("d_model: [1,\n")
    cases["badyaml"] = (d, f"{d / 'model.yaml'}: unreadable")
    d = copy("otherwidth")
    (d / "model.yaml").write_text((d / "model.yaml").read_text().replace("d_model: 16", "d_model: 24"))
    cases["otherwidth"] = (d, f"{d / 'model.safetensors'}: does not fit the model")
    d = copy("unknownfield")
    (d / "model.yaml").write_text((d / "model.yaml").read_text() + "colour: blue\n")
    cases["unknownfield"] = (d, f"{d / 'model.yaml'}: config field 'colour': unknown field")
    d = copy("notokenizer")
    for f in os.listdir(d):
        if f.startswith("tokenizer"):
            os.remove(d / f)
    cases["notokenizer"] = (d, "the export's tokenizer")
    d = tmp / "missing"
    cases["missing"] = (d, f"{d}: no such export directory (exports are written by pretrain/train.py")
    d = copy("incomplete")
    os.remove(d / "export.json")
    cases["incomplete"] = (d, f"{d}: not an export directory (export.json missing; exports are written by "
                              f"pretrain/train.py at the end of training, into SAVE/export)")
    return cases


@pytest.mark.parametrize("case", ["truncated", "garbage", "badjson", "badyaml", "otherwidth", "unknownfield",
                                  "notokenizer", "missing", "incomplete"])
def test_a_broken_export_is_named_with_the_way_out(exports, capsys, tmp_path, case):
    path, message = _broken_exports(exports, tmp_path)[case]
    for module, prog, argv in ((evaluate, "evaluate.py", ["--split", "valid"]),
                               (generate, "generate.py", ["--prompt", "the"])):
        rc, out, err = run_main(module, ["--model", path] + argv, capsys)
        assert rc == 2 and one_line_error(err, prog, message), (prog, err)
        assert "pretrain/export.py" not in err
        if case == "badjson":  # the run folder is recorded in export.json itself
            assert "rerunning the training command (pretrain/train.py ... --save RUN)" in err, err
        elif case not in ("missing", "incomplete"):
            assert f"rerunning the training command (pretrain/train.py ... --save {exports['dir'] / 'run'})" in err
            assert "resumes from the last checkpoint and exports at the end" in err


def test_truncated_export_from_the_command_line(exports, tmp_path):
    """As a user sees it: exit status 2, the last line names the file, no traceback, for both commands."""
    path, message = _broken_exports(exports, tmp_path)["truncated"]
    for script, argv in (("evaluate.py", ["--split", "valid", "--max-steps", "2"]),
                         ("generate.py", ["--prompt", "the", "--max-new-tokens", "3"])):
        r = subprocess.run([PY, os.path.join(ROOT, "pretrain", script), "--model", str(path)] + argv, cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ")
        assert message in r.stderr


def test_evaluate_data_errors_and_result(exports, capsys, tmp_path):
    rc, _, err = run_main(evaluate, ["--model", exports["xl"], "--data-path", tmp_path / "nope", "--split", "valid"],
                          capsys)
    assert rc == 2 and one_line_error(err, "evaluate.py", f"--data-path {tmp_path / 'nope'}: "), err
    moved = tmp_path / "moved"
    shutil.copytree(exports["xl"], moved)
    meta = json.loads((moved / "export.json").read_text())
    meta["data"] = {"train": str(tmp_path / "gone_train"), "valid": str(tmp_path / "gone_valid")}
    (moved / "export.json").write_text(json.dumps(meta))
    rc, _, err = run_main(evaluate, ["--model", moved, "--split", "valid"], capsys)
    assert rc == 2 and one_line_error(err, "evaluate.py", "the data the model was trained on: "), err
    assert "(give the dataset with --data-path)" in err

    out = tmp_path / "res" / "valid.json"
    rc, stdout, err = run_main(evaluate, ["--model", exports["xl"], "--split", "valid", "--batch-size", "2",
                                          "--output", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["protocol"] == "train" and res["mem_len"] == 8 and res["tgt_len"] == 8 and "bpc" in res
    assert f"valid | protocol train (tgt_len 8, mem_len 8, clamp_len -1, same_length False, streams 2) | " \
           f"{res['scored_tokens']} scored tokens" in stdout
    assert "\r" not in err  # no progress bar off a terminal
    rc, _, err = run_main(evaluate, ["--model", exports["xl"], "--split", "valid", "--output",
                                     exports["data"] + "_valid.bin" + "/x.json"], capsys)
    assert rc == 2 and one_line_error(err, "evaluate.py", "is a file, not a folder"), err


# ---------------------------------------------------------------------------------------------- plot
def test_plot_options_and_bad_runs(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 3.0 / s}) + "\n"
                                               for s in range(1, 6)))
    for argv, message in ((["--smooth", "1"], "argument --smooth: must be a number in [0, 1) (0 = none), got '1'"),
                          (["--smooth", "-0.5"], "argument --smooth: must be a number in [0, 1)"),
                          (["--labels", "a", "b"], "--labels: 2 names for 1 runs; give one per run")):
        rc, _, err = run_main(plot, [run, "-o", tmp_path / "p.png"] + argv, capsys)
        assert rc == 2 and one_line_error(err, "plot.py", message), err
    rc, _, err = run_main(plot, [tmp_path / "nope", "-o", tmp_path / "p.png"], capsys)
    assert rc == 2 and one_line_error(err, "plot.py", "no metrics file"), err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2}\n[1, 2]\n')
    rc, _, err = run_main(plot, [bad, "-o", tmp_path / "p.png"], capsys)
    assert rc == 2 and one_line_error(err, "plot.py", "metrics.jsonl:2: not a metrics record"), err
    rc, _, err = run_main(plot, [run, "-o", run / "metrics.jsonl" / "p.png"], capsys)
    assert rc == 2 and one_line_error(err, "plot.py", "is a file, not a folder"), err
    rc, _, err = run_main(plot, [run, "--metric", "bpc", "-o", tmp_path / "p.png"], capsys)
    assert rc == 2 and one_line_error(err, "plot.py", "no 'bpc' values"), err
    rc, out, err = run_main(plot, [run, run, "--labels", "memory", "none", "--title", "t", "-o",
                                   tmp_path / "new" / "p.png"], capsys)
    assert rc == 0, err
    assert (tmp_path / "new" / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "new") == ["p.png"]
