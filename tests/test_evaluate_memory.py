"""evaluate_memory.py: the loss by history length under the warm-up-from-reset protocol, against independent
computations (evaluate.py's carry protocol, a per-segment reset loop, a model without memory), RECL on a
hand-computed group, the JSON fields and the one-line errors.  Untrained tiny exports (test_commands' writer),
no training."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from data_tools.preprocess import main as preprocess_main  # noqa: E402
from pretrain import evaluate, evaluate_memory  # noqa: E402
from pretrain.engine.context import recl  # noqa: E402
from test_commands import TEXT, _char_data, _export, one_line_error, run_main  # noqa: E402

SMALL = TEXT[:4000]  # valid split: 400 characters, 50 segments of 8


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    prefix = _char_data(tmp, SMALL)
    out = {"dir": tmp, "data": prefix}
    for seed, (key, attn, mem) in enumerate((("xl", 0, 8), ("lamemo", 3, 8), ("nomem", 0, 0))):
        (tmp / key).mkdir()
        out[key] = _export(tmp / key, prefix, attn, mem, seed=seed + 1)
    return out


@pytest.fixture(scope="module")
def result(exports, tmp_path_factory):
    """One run over the XL, LaMemo and memoryless models, with JSON and plot."""
    tmp = tmp_path_factory.mktemp("memout")
    argv = ["--model", exports["xl"], "--model", exports["lamemo"], "--model", exports["nomem"],
            "--name", "xl", "--name", "lamemo", "--name", "nomem", "--split", "valid",
            "--contexts", "0,8,16,32,all", "--no-progress", "--threads", "1", "--batch-size", "16",
            "--output", tmp / "out.json", "--plot", tmp / "p" / "out.png"]
    rc = evaluate_memory.main([str(a) for a in argv])
    assert rc == 0
    return {"json": json.loads((tmp / "out.json").read_text()), "png": tmp / "p" / "out.png"}


def _bpc(res, name, c):
    m = next(m for m in res["models"] if m["name"] == name)
    return next(r["bpc"] for r in m["results"] if r["context"] == c)


def test_all_history_equals_the_carry_protocol(exports, result, capsys, tmp_path):
    for name in ("xl", "lamemo"):
        rc, _, err = run_main(evaluate, ["--model", exports[name], "--split", "valid", "--protocol", "carry",
                                         "--no-progress", "--output", tmp_path / f"{name}.json"], capsys)
        assert rc == 0, err
        carry = json.loads((tmp_path / f"{name}.json").read_text())
        assert abs(_bpc(result["json"], name, "all") - carry["bpc"]) < 1e-6
        m = next(m for m in result["json"]["models"] if m["name"] == name)
        assert m["results"][-1]["scored_tokens"] == carry["scored_tokens"]


def test_zero_history_resets_before_every_segment(exports, result):
    """c = 0 against a loop that scores each segment from a fresh state, one at a time."""
    from data_tools.indexed import IndexedDataset
    from pretrain.engine.export import load_exported
    tokens = np.asarray(IndexedDataset(exports["data"] + "_valid").tokens, dtype=np.int64)
    for name in ("xl", "lamemo"):
        model, cfg, _, _ = load_exported(exports[name], dropout=0.0, dropatt=0.0)
        N, nll, n = cfg.tgt_len, 0.0, 0
        with torch.no_grad():
            for s in range(0, len(tokens) - 1, N):
                x = torch.from_numpy(tokens[s:s + N + 1])
                inp, tgt = x[:-1], x[1:]
                L = len(tgt)
                inp = torch.nn.functional.pad(inp, (0, N - L)) if L < N else inp[:N]
                tgt = torch.nn.functional.pad(tgt, (0, N - L)) if L < N else tgt
                out, _ = model(inp[None], model.init_state(1), tgt[None])
                nll += float(out.nll[0, :L].double().sum())
                n += L
        assert abs(_bpc(result["json"], name, 0) - nll / n / math.log(2)) < 1e-6


def test_memory_helps_only_a_model_with_memory(result):
    res = result["json"]
    flat = [_bpc(res, "nomem", c) for c in (0, 8, 16, 32, "all")]
    assert max(flat) - min(flat) < 1e-6
    # XL with mem_len 8: history beyond its memory changes nothing (one layer: the memory is the last 8 tokens)
    assert abs(_bpc(res, "xl", 8) - _bpc(res, "xl", "all")) < 1e-6
    assert abs(_bpc(res, "xl", 0) - _bpc(res, "xl", 8)) > 1e-6  # untrained: a small but real difference


def test_json_fields_positions_and_plot(result):
    res = result["json"]
    assert set(evaluate_memory.FIELDS) <= set(res)
    assert res["contexts"] == [0, 8, 16, 32, "all"] and res["metric"] == "bpc"
    assert res["protocol"].startswith("warm-up from reset")
    for m in res["models"]:
        assert {"name", "model", "tgt_len", "mem_len", "decode_policy", "results"} <= set(m)
        for r in m["results"]:
            assert {"context", "loss", "bpc", "scored_tokens", "by_position"} <= set(r)
            assert len(r["by_position"]) == m["tgt_len"]
    assert set(res["recl"]["by_r"]) == {"0.1", "0.5", "1.0"} and res["recl"]["threshold"] == 0.01
    assert set(res["recl"]["by_r"]["1.0"]) == {"xl", "lamemo", "nomem"}
    assert res["recl"]["by_r"]["1.0"]["nomem"]["recl"] == 0
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recl_by_hand():
    # two models, four tokens, histories 0, 10, 20
    a = {0: np.array([4.0, 2.0, 1.0, 1.0]), 10: np.array([2.0, 2.0, 1.0, 1.0]), 20: np.array([2.0, 2.0, 1.0, 1.0])}
    b = {0: np.array([3.0, 3.0, 1.0, 1.0]), 10: np.array([3.0, 3.0, 1.0, 1.0]), 20: np.array([1.0, 1.0, 1.0, 1.0])}
    # c = 0: baseline b = [3, 2, 1, 1]; r = 1: f(0,0) = 7/4 for both.
    #   a at 10: min(b, [2,2,1,1]) = [2,2,1,1] -> 6/4; gain (e^1.75 - e^1.5)/e^1.75 = 1 - e^-0.25 = 0.221 -> on
    #   b at 10: min(b, [3,3,1,1]) = [3,2,1,1] -> 7/4; gain 0 -> RECL(b) = 0
    # c = 10: baseline [2, 2, 1, 1]; a at 20: [2,2,1,1] -> gain 0 -> RECL(a) = 10
    out = recl({"a": a, "b": b}, [0, 10, 20], r=1.0)
    assert out == {"a": {"recl": 10, "lower_bound": False}, "b": {"recl": 0, "lower_bound": False}}
    # r = 0.25: only the hardest token under the baseline (token 0, b = 3 at c = 0, 2 at c = 10)
    #   a: 0 -> 10 gains (3 -> 2), 10 -> 20: baseline 2, a stays 2: RECL 10;  b: 0 -> 10 no gain: 0
    assert recl({"a": a, "b": b}, [0, 10, 20], r=0.25) == out
    # a threshold above a's first gain (0.221) stops it at 0
    assert recl({"a": a, "b": b}, [0, 10, 20], r=1.0, threshold=0.25)["a"]["recl"] == 0
    # every step gains: a lower bound at the last history
    c = {0: np.array([3.0]), 10: np.array([2.0]), 20: np.array([1.0])}
    assert recl({"c": c}, [0, 10, 20]) == {"c": {"recl": 20, "lower_bound": True}}


def test_bad_input_names_the_flag(exports, capsys, tmp_path):
    base = ["--model", exports["xl"], "--no-progress"]
    cases = [
        (base + ["--split", "dev"], "argument --split: invalid choice"),
        (base + ["--split", "test"], "--split test: no test split"),
        (base + ["--contexts", "0,100000"], "--contexts 100000: longer than the valid stream"),
        (base + ["--contexts", "0,12"], "--contexts 12: not a multiple of the segment length"),
        (base + ["--contexts", "x"], "argument --contexts: must be token counts"),
        (base + ["--recl-r", "0"], "argument --recl-r: must be numbers in (0, 1]"),
        (["--model", tmp_path / "nope"], "--model " + str(tmp_path / "nope") + ": no such export directory"),
        (base + ["--name", "a", "--name", "b"], "--name: 2 names for 1 models"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--model", empty], "model.safetensors missing"))
    for argv, message in cases:
        rc, _, err = run_main(evaluate_memory, argv, capsys)
        assert rc == 2 and one_line_error(err, "evaluate_memory.py", message), (argv, err)
    # another tokenizer in the group
    (tmp_path / "b.txt").write_text(SMALL)
    assert preprocess_main(["--input", str(tmp_path / "b.txt"), "--tokenizer", "bytes", "--split", "90,10",
                            "--output-prefix", str(tmp_path / "data" / "b"), "--no-progress"]) == 0
    other = _export(tmp_path, str(tmp_path / "data" / "b"), 0, 8)
    capsys.readouterr()
    rc, _, err = run_main(evaluate_memory, base + ["--model", other, "--split", "valid"], capsys)
    assert rc == 2 and one_line_error(err, "evaluate_memory.py", f"--model {other}: its data's tokenizer"), err


MECHANISMS = ["fast_weight-24", "rmt-k2", "slots-51", "compressive-60", "hybrid-delta-xl", "hybrid-delta-nocarry"]


@pytest.mark.parametrize("case", MECHANISMS)
def test_protocol_for_state_carrying_mechanisms(exports, case):
    """The protocol against per-segment loops (batch of one, state reset by hand) for fast weights, RMT, slots,
    Compressive and hybrids; c = all against the evaluation loop's carry protocol."""
    from data_tools.streams import EvalStream
    from pretrain.engine.batch import Batch
    from pretrain.engine.context import context_losses
    from pretrain.engine.evaluation import streamed_eval
    from pretrain.model import ModelConfig, build_model, parallel
    from test_mixers import BASE, CASES
    if not parallel.is_initialized():
        parallel.initialize(1)
    kw = dict(CASES["hybrid-delta3-xl"], n_layer=2, layers="delta,xl") if case == "hybrid-delta-xl" else CASES[case]
    meta = json.load(open(exports["data"] + "_train.json"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**BASE, **kw, "vocab_size": meta["vocab_size"]})).double().eval()
    N = model.cfg.tgt_len
    stream = EvalStream(exports["data"] + "_valid", seq_len=N, num_streams=1)
    fwd = lambda t, s, y, **k: model(t, s, y, **k)  # noqa: E731
    res = context_losses(fwd, model, stream, [0, 2 * N, "all"], device=torch.device("cpu"), batch_size=7)
    mean = lambda r: r["nll"].sum() / r["mask"].sum()  # noqa: E731
    carry = streamed_eval(fwd, model, stream, device=torch.device("cpu"))
    assert abs(mean(res["all"]) - carry["loss"]) < 1e-6 and res["all"]["mask"].sum() == carry["tokens"]

    def one(k):
        mb = stream.get(k)
        return Batch(tokens=torch.from_numpy(mb.tokens.astype(np.int64)),
                     targets=torch.from_numpy(mb.targets.astype(np.int64)),
                     loss_mask=torch.from_numpy(mb.loss_mask.astype(np.float32)), reset=torch.zeros(1, dtype=bool))
    with torch.no_grad():
        for c in (0, 2 * N):
            nll = 0.0
            for k in range(len(stream)):
                state = model.init_state(1)
                for w in range(max(0, k - c // N), k + 1):
                    b = one(w)
                    out, state = model(b.tokens, state, b.targets)
                nll += float((out.nll.double() * b.loss_mask.double()).sum())
            assert abs(nll / res[c]["mask"].sum() - mean(res[c])) < 1e-9, c
    spread = [mean(res[c]) for c in (0, 2 * N, "all")]
    if case == "hybrid-delta-nocarry":
        assert max(spread) - min(spread) < 1e-9
    else:
        assert max(spread) - min(spread) > 1e-7


def test_max_segments_equals_max_steps(exports, capsys, tmp_path):
    rc, _, err = run_main(evaluate, ["--model", exports["xl"], "--split", "valid", "--protocol", "carry",
                                     "--max-steps", "5", "--no-progress", "--output", tmp_path / "c.json"], capsys)
    assert rc == 0, err
    rc, out, err = run_main(evaluate_memory, ["--model", exports["xl"], "--split", "valid", "--contexts", "0,all",
                                              "--max-segments", "5", "--no-progress", "--output", tmp_path / "m.json"],
                            capsys)
    assert rc == 0, err
    carry, mem = json.loads((tmp_path / "c.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    assert mem["models"][0]["results"][-1]["scored_tokens"] == carry["scored_tokens"] == 40
    assert abs(_bpc(mem, mem["models"][0]["name"], "all") - carry["bpc"]) < 1e-6
    assert mem["recl"] is None and "RECL" not in out  # one model: no group to compare with
