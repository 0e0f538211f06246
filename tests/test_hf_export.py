"""The Hugging Face export (``pretrain/export_hf.py``, docs/huggingface.md) and the lm-evaluation-harness model:

* for every registered mechanism (each of its test configs) and the hybrids of test_mixers.py, the exported
  directory loaded with ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`` in fp64 gives the
  project model's log-probabilities over several segments with the memory carried;
* its ``generate()`` gives ``pretrain/generate.py``'s greedy tokens under each decode policy (segment, window,
  token);
* save -> load -> save is byte-identical, and the directory loads and runs in a fresh interpreter where the
  project, megatron-core and DeepSpeed cannot be imported;
* the tokenizer files encode as the project's tokenizers (bytes, characters, words);
* lm-evaluation-harness on a local YAML task gives ``pretrain/evaluate.py``'s perplexity;
* bad input (a missing file, a foreign directory, an unsupported transformers version) gives one line naming it.

The exports are written from freshly built tiny models (no training)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import write_byte_data, write_model_export
from test_mixers import BASE, CASES

pytest.importorskip("transformers", minversion="5.0", reason="the Hugging Face export needs transformers 5")

from pretrain.hf.export import export_hf  # noqa: E402
from pretrain.model import ModelConfig, build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("tp1")
TEXT = b"the quick brown fox jumps over the lazy dog; " * 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Byte-level data without an end-of-document id (the tokenizer every export here carries)."""
    return write_byte_data(tmp_path_factory.mktemp("hfdata") / "bytes", TEXT)


def _export(tmp_path, case, data, **kw):
    """(project model in fp64, eval mode; the loaded Hugging Face model in fp64; its directory) of a test case."""
    from transformers import AutoModelForCausalLM
    cfg = ModelConfig(**{**BASE, **CASES[case], **kw})
    torch.manual_seed(0)
    model = build_model(cfg)
    exp = write_model_export(tmp_path / f"{case}-export", model, data)
    out = export_hf(exp, str(tmp_path / f"hf-{case}"), log=lambda m: None)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float64)
    return model.double().eval(), hf, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_project_model_over_carried_segments(case, tmp_path, data):
    model, hf, _ = _export(tmp_path, case, data)
    torch.manual_seed(1)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12))
    state, memory = model.init_state(2), None
    worst = 0.0
    with torch.no_grad():
        for s in range(0, 12, 4):
            out, state = model(tokens[:, s:s + 4], state, return_logits=True)
            got = hf(tokens[:, s:s + 4], memory=memory)
            memory = got.memory
            assert got.logits.dtype == torch.float64 and got.logits.shape == out.logits.shape
            worst = max(worst, (got.logits - out.logits).abs().max().item())
    print(f"max |log-prob difference| {case}: {worst:.2e}")         # shown with -s (docs/huggingface.md)
    assert worst < 1e-12, f"{case}: max |log-prob difference| {worst:.2e}"
    if any(s.uses_memory for s in model.cfg.layer_specs()):
        fresh = hf(tokens[:, 8:12]).logits
        assert (fresh - got.logits).abs().max() > 1e-6, "sanity: the carried memory mattered"


GEN = [("xl-0", 5), ("lamemo-3", 5), ("hybrid-rmt-delta-xl", 5), ("xl-2", 0), ("fast_weight-24", 0),
       ("hybrid-delta-nocarry", 0)]


@pytest.mark.parametrize("case, mem_len", GEN, ids=[c for c, _ in GEN])
def test_greedy_generation_equals_generate_py(case, mem_len, tmp_path, data):
    from pretrain.generate import generate
    model, hf, _ = _export(tmp_path, case, data, mem_len=mem_len, init_std=0.3)
    policy = model.decode_policy_for(mem_len)
    assert hf.decode_policy_for(mem_len) == policy
    for length in (2, 6):
        prompt = torch.randint(0, BASE["vocab_size"], (length,), generator=torch.Generator().manual_seed(4)).tolist()
        want = generate(model, prompt, max_new_tokens=11, temperature=0.0, top_k=0, top_p=1.0, generator=None,
                        mem_len=mem_len, segment_len=model.cfg.tgt_len)
        got = hf.generate(torch.tensor([prompt, prompt]), max_new_tokens=11)
        assert got[0].tolist() == prompt + want and got[1].tolist() == prompt + want, f"{policy}, prompt {length}"


def _files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n))}


def test_save_load_save_is_byte_identical(tmp_path, data):
    from transformers import AutoModelForCausalLM
    _, hf, out = _export(tmp_path, "hybrid-xl-lamemo2", data)
    first = tmp_path / "again"
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).save_pretrained(first)
    AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True).save_pretrained(tmp_path / "twice")
    a, b, c = _files(out), _files(first), _files(tmp_path / "twice")
    assert b == c
    assert "model.safetensors" in b and "config.json" in b and "generation_config.json" in b
    assert {k: v for k, v in a.items() if k in b} == b, "the export is what save_pretrained writes"


GUARD = r'''
import importlib.abc, json, sys
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pretrain", "megatron", "deepspeed", "data_tools"):
            raise ImportError(f"guard: {name} must not be imported")
sys.meta_path.insert(0, Guard())
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = torch.tensor([tok("the quick brown fox")["input_ids"]]) % config.vocab_size
out = model(ids[:, :4])
out = model(ids[:, 4:8], memory=out.memory)
new = model.generate(ids[:, :5], max_new_tokens=6)
bad = [m for m in sys.modules if m.split(".")[0] in ("pretrain", "megatron", "deepspeed", "data_tools")]
print(json.dumps({"logits": out.logits.tolist(), "generated": new.tolist(), "bad": bad,
                  "model_type": config.model_type}))
'''


def test_the_directory_loads_without_the_project(tmp_path, data):
    """A fresh interpreter, outside the checkout, no PYTHONPATH, the project's packages refused on import."""
    model, hf, out = _export(tmp_path, "hybrid-rmt-delta-xl", data)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    res = subprocess.run([sys.executable, "-c", GUARD, out], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["bad"] == [] and got["model_type"] == "memtrain"
    ids = torch.tensor([list(b"the quick brown fox")]) % BASE["vocab_size"]
    with torch.no_grad():
        first = hf(ids[:, :4])
        want = hf(ids[:, 4:8], memory=first.memory).logits
    assert torch.equal(torch.tensor(got["logits"], dtype=torch.float64), want)
    assert got["generated"] == hf.generate(ids[:, :5], max_new_tokens=6).tolist()


@pytest.mark.parametrize("kind", ["bytes", "bytes-eod", "chars", "words", "gpt2"])
def test_tokenizer_files_encode_as_the_project(kind, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from corpora import gpt2_files
    from data_tools.tokenization import ByteTokenizer, GPT2Tokenizer, WordTokenizer, build_char_vocab
    from pretrain.hf.export import tokenizer_files
    text = "Héllo wörld\nthe  quick\tfox <eod>\n\nend"
    tok = {"bytes": lambda: ByteTokenizer(), "bytes-eod": lambda: ByteTokenizer(eod=True),
           "chars": lambda: build_char_vocab(text.replace("<eod>", ""), eod="<eod>"),
           "words": lambda: WordTokenizer(["<unk>", "<eos>", "the", "quick", "fox", "end"]),
           "gpt2": lambda: GPT2Tokenizer(*gpt2_files())}[kind]()
    for name, blob in tokenizer_files(tok, tok.eod_id).items():
        (tmp_path / name).write_bytes(blob)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    sample = text if kind != "chars" else text.replace("<eod>", "")
    assert hf(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample)
    if kind in ("bytes", "bytes-eod", "chars", "gpt2"):
        assert hf.decode(tok.encode(sample)) == sample
    if tok.eod_id is not None:
        assert hf.convert_tokens_to_ids(hf.eos_token) == tok.eod_id


# ------------------------------------------------------------------------------------------ lm-evaluation-harness
TASK = """task: memtrain_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def test_lm_eval_perplexity_equals_evaluate_py(tmp_path, capsys):
    """loglikelihood_rolling over a local document, the memory carried through it in training segments, gives
    pretrain/evaluate.py's perplexity on the same text (a byte-level model: byte perplexity = token perplexity)."""
    from pretrain import evaluate
    from pretrain.hf.lm_eval_memtrain import MemTrainLM
    text = TEXT.decode()
    prefix = write_byte_data(tmp_path / "doc", TEXT, eod_first=True)       # [EOD] + the document
    cfg = ModelConfig(**{**BASE, "vocab_size": 257, "attn_type": 3, "mem_len": 5, "tgt_len": 8})
    torch.manual_seed(0)
    exp = write_model_export(tmp_path / "export", build_model(cfg), prefix)
    assert evaluate.main(["--model", exp, "--data-path", f"train={prefix},test={prefix}", "--split", "test",
                          "--protocol", "carry", "--no-progress", "--output", str(tmp_path / "eval.json")]) == 0
    capsys.readouterr()
    want = json.load(open(tmp_path / "eval.json"))
    assert want["scored_tokens"] == len(TEXT)
    out = export_hf(exp, str(tmp_path / "hf-lmeval"), log=lambda m: None)
    card = open(os.path.join(out, "README.md")).read()
    assert "| eval.json | test | carry |" in card and str(want["bpc"]) in card, "the model card shows the result"
    lm = MemTrainLM(path=out)
    got = lm.rolling(text)
    assert abs(-got / len(TEXT) - want["loss"]) < 1e-6
    # loglikelihood: the context and the continuation read in the same segments (so it is the difference of two
    # rolling scores: reading is causal); generate_until: the model's generate, cut at the stop string
    from types import SimpleNamespace as Req
    ctx, cont = text[:21], text[21:40]
    (ll, greedy), = lm.loglikelihood([Req(args=(ctx, cont))])
    assert abs(ll - (lm.rolling(ctx + cont) - lm.rolling(ctx))) < 1e-9 and isinstance(greedy, bool)
    ids = [256] + list(ctx.encode())
    new = lm.model.generate(torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
    want_text = lm.tokenizer.decode(new[:new.index(256)] if 256 in new else new)
    gen, = lm.generate_until([Req(args=(ctx, {"until": [], "max_gen_toks": 6}))])
    assert gen == want_text
    if len(want_text) >= 4:
        stop = want_text[2:4]
        gen, = lm.generate_until([Req(args=(ctx, {"until": [stop], "max_gen_toks": 6}))])
        assert gen == want_text[:want_text.index(stop)]
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install lm-eval)")
    from lm_eval.tasks import TaskManager
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(TASK.format(data=tmp_path / "doc.jsonl"))
    res = lm_eval.simple_evaluate(model=lm, tasks=["memtrain_local_ppl"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    got = res["results"]["memtrain_local_ppl"]
    ppl, bpb = got["byte_perplexity,none"], got["bits_per_byte,none"]
    assert abs(ppl - math.exp(want["loss"])) / ppl < 1e-6, (ppl, math.exp(want["loss"]))
    assert abs(bpb - want["bpc"]) < 1e-6, (bpb, want["bpc"])


# ------------------------------------------------------------------------------------------ bad input
def _run(argv, capsys):
    from pretrain import export_hf as cmd
    rc = cmd.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_line(err, text):
    return err.count("\n") == 1 and err.startswith("export_hf.py: error: ") and text in err and "Traceback" not in err


def test_bad_input_gets_one_line(tmp_path, data, capsys, monkeypatch):
    cfg = ModelConfig(**{**BASE, **CASES["xl-0"]})
    exp = write_model_export(tmp_path / "export", build_model(cfg), data)
    # a missing file of an export
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", exp, str(broken)], check=True)
    os.remove(broken / "model.safetensors")
    rc, err = _run(["--model", broken, "--output", tmp_path / "o1"], capsys)
    assert rc == 2 and _one_line(err, "model.safetensors missing"), err
    assert not (tmp_path / "o1").exists()
    # a directory of another tool (a Hugging Face model), and nothing at all
    other = tmp_path / "gpt2like"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    rc, err = _run(["--model", other, "--output", tmp_path / "o2"], capsys)
    assert rc == 2 and _one_line(err, "a Hugging Face model directory (config.json)"), err
    rc, err = _run(["--model", tmp_path / "nothing", "--output", tmp_path / "o3"], capsys)
    assert rc == 2 and _one_line(err, "no such export directory or checkpoint"), err
    # a checkpoint folder without its files
    ckpt = tmp_path / "run" / "iter_0000005" / "memtrain"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "files": {"mp_rank_00_model_states.pt": 10},
                                                "model": {}, "dp_size": 1, "tp_size": 1, "zero_stage": 0}))
    rc, err = _run(["--model", tmp_path / "run" / "iter_0000005", "--output", tmp_path / "o4"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "iter_0000005" in err and "Traceback" not in err, err
    # no transformers, or an unsupported version
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)
        rc, err = _run(["--model", exp, "--output", tmp_path / "o5"], capsys)
    assert rc == 2 and _one_line(err, "transformers is not installed: pip install 'transformers>=5,<6'"), err
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.30.2")
    rc, err = _run(["--model", exp, "--output", tmp_path / "o5"], capsys)
    assert rc == 2 and _one_line(err, "transformers 4.30.2: not supported (needs 5.x; tested with 5.24)"), err


def test_sampling_with_the_generation_config_defaults_equals_generate_py(tmp_path, data):
    """``do_sample=True`` alone: transformers 5 leaves temperature, top_k, top_p None in the generation config;
    generate() samples at temperature 1, top-k 0, top-p 1 and draws what generate.py's loop draws with them."""
    from pretrain.generate import generate
    model, hf, _ = _export(tmp_path, "xl-0", data, init_std=0.3)
    prompt = [3, 1, 4, 1, 5]
    want = generate(model, prompt, max_new_tokens=9, temperature=1.0, top_k=0, top_p=1.0,
                    generator=torch.Generator().manual_seed(7), mem_len=model.cfg.mem_len,
                    segment_len=model.cfg.tgt_len)
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=True,
                      generator=torch.Generator().manual_seed(7))
    assert got[0].tolist() == prompt + want


def test_output_is_replaced_only_when_an_earlier_export(tmp_path, data, capsys, monkeypatch):
    """``--output`` holding ``--model`` (the run directory of its export), a file or a foreign directory is refused
    with one line and left as it was; an earlier export is replaced; a failed write leaves no folder behind."""
    cfg = ModelConfig(**{**BASE, **CASES["xl-0"]})
    run = tmp_path / "run"
    exp = write_model_export(run / "export", build_model(cfg), data)
    (run / "config.yaml").write_text("data: {}\n")
    rc, err = _run(["--model", exp, "--output", run], capsys)
    assert rc == 2 and _one_line(err, "holds --model"), err
    assert sorted(os.listdir(run)) == ["config.yaml", "export"] and os.path.isfile(os.path.join(exp, "model.yaml"))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    rc, err = _run(["--model", exp, "--output", afile], capsys)
    assert rc == 2 and _one_line(err, "exists and is not a directory"), err
    assert afile.read_text() == "keep"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    rc, err = _run(["--model", exp, "--output", foreign], capsys)
    assert rc == 2 and _one_line(err, "a directory export_hf.py did not write"), err
    assert os.listdir(foreign) == ["notes.txt"]
    out = tmp_path / "hf"
    assert _run(["--model", exp, "--output", out], capsys)[0] == 0
    assert _run(["--model", exp, "--output", out], capsys)[0] == 0, "an earlier export is replaced"
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        export_hf(exp, str(tmp_path / "new" / "deep" / "hf"), log=lambda m: None)
    assert not (tmp_path / "new").exists()


def test_an_os_error_gets_one_line(tmp_path, data, capsys, monkeypatch):
    """A disk full while writing, or an --output that cannot be made: one line naming the file, no traceback,
    nothing left behind."""
    cfg = ModelConfig(**{**BASE, **CASES["xl-0"]})
    exp = write_model_export(tmp_path / "export", build_model(cfg), data)
    import safetensors.torch

    def full(tensors, filename, **kw):
        raise OSError(28, "No space left on device", filename)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc, err = _run(["--model", exp, "--output", tmp_path / "hf"], capsys)
    assert rc == 2 and _one_line(err, "model.safetensors: No space left on device"), err
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_a_membart_run_or_an_unknown_model_config_gets_one_line(tmp_path, capsys):
    """MemBART (its checkpoint's model config says arch membart; its export is config.json + export.json) and a
    checkpoint whose model config does not parse: one line naming the file, no traceback, nothing written."""
    meta = {"step": 5, "files": {"mp_rank_00_model_states.pt": 10}, "dp_size": 1, "tp_size": 1, "zero_stage": 0}
    for name, model, text in [("bart", {"arch": "membart", "encoder_layers": 2}, "a model of arch 'membart'"),
                              ("odd", {"n_layer": 2, "no_such_field": 1}, "its model config: ")]:
        ckpt = tmp_path / name / "iter_0000005" / "memtrain"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps(dict(meta, model=model)))
        (ckpt.parent / "mp_rank_00_model_states.pt").write_bytes(b"0" * 10)     # complete as meta.json says
        rc, err = _run(["--model", ckpt.parent, "--output", tmp_path / f"hf-{name}"], capsys)
        assert rc == 2 and _one_line(err, text) and "meta.json" in err, err
        assert not (tmp_path / f"hf-{name}").exists()
    export = tmp_path / "membart-export"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "bart"}')
    (export / "export.json").write_text('{"arch": "membart", "step": 5}')
    rc, err = _run(["--model", export, "--output", tmp_path / "hf-export"], capsys)
    assert rc == 2 and _one_line(err, "a model of arch 'membart'"), err


def test_the_carried_memory_is_cut_from_the_graph(tmp_path, data):
    """As the project model's state (``detach_state=True``): a loop that carries the memory in grad mode keeps
    no graph of earlier segments (it grew by every segment's activations); ``detach_memory=False`` keeps it."""
    model, hf, _ = _export(tmp_path, "lamemo-3", data)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(2))

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
        return [t for v in items for t in tensors(v)]
    out = hf(tokens, labels=tokens)
    assert out.logits.requires_grad and out.loss.requires_grad
    assert tensors(out.memory) and not any(t.requires_grad for t in tensors(out.memory))
    _, state = model(tokens, model.init_state(2))
    assert not any(t.requires_grad for t in tensors(vars(state)))
    kept = hf(tokens, detach_memory=False).memory
    assert any(t.grad_fn is not None for t in tensors(kept))
