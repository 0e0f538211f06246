"""The attention-utilisation analysis: exact profiles on a model whose attention is uniform by construction,
and the command end to end on an export (JSON and plot, two models in one figure, clear errors)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.analyze_attention import AttentionProfile, analyse
from pretrain.config_base import to_dict
from pretrain.model import ModelConfig, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=256, dropout=0.0, tgt_len=4)


pytestmark = pytest.mark.usefixtures("tp1")


def _uniform(model):
    """Zero every attention projection and position bias: all scores are 0, attention is uniform over the
    visible keys."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn." in name or "biases" in name or name.endswith((".u", ".r_emb", ".r_bias")):
                p.zero_()
    return model


@pytest.mark.parametrize("attn_type", [0, 3])
def test_uniform_attention_gives_the_analytic_profile(attn_type):
    """With a full memory of M positions, query i sees M + i + 1 keys, each with probability 1/(M + i + 1)."""
    M, N, B = 6, 4, 2
    model = _uniform(build_model(ModelConfig(attn_type=attn_type, mem_len=M, **BASE)).double().eval())
    tokens = torch.randint(0, 256, (B, 3 * N))
    prof = AttentionProfile()
    state = model.init_state(B)
    for s in range(2):                                         # fill the memory (M <= 2 N)
        _, state = model(tokens[:, s * N:(s + 1) * N], state)
    model.stack.recorder = prof.record
    model(tokens[:, 2 * N:], state)
    model.stack.recorder = None
    res = prof.summary()
    assert [l["layer"] for l in res["layers"]] == [0, 1]
    mean_prob = np.zeros(M + N)
    mass = np.zeros(M + N)
    for d in range(M + N):
        qs = [i for i in range(N) if d <= M + i]
        mean_prob[d] = np.mean([1 / (M + i + 1) for i in qs])
        mass[d] = sum(1 / (M + i + 1) for i in qs) / N
    share = sum(M / (M + i + 1) for i in range(N)) / N
    for layer in res["layers"]:
        assert np.allclose(layer["mean_prob"], mean_prob, atol=1e-12)
        assert np.allclose(layer["mass"], mass, atol=1e-12)
        assert abs(sum(layer["mass"]) - 1) < 1e-12
        assert abs(layer["memory_share"] - share) < 1e-12


def _export(tmp_path, name, **kw):
    from data_tools.indexed import IndexedDatasetWriter
    from data_tools.metadata import write_metadata
    from data_tools.tokenization import ByteTokenizer
    from pretrain.engine.export import write_export
    prefix = str(tmp_path / "data")
    if not os.path.exists(prefix + ".bin"):
        data = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, dtype=np.uint8).astype(np.uint16)
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_documents(data, np.array([len(data)]))
        spec = ByteTokenizer().save(prefix)
        write_metadata(prefix, {"format": "MMIDIDX", "dtype": "uint16", "vocab_size": 256, "eod_id": None,
                                "pad_id": None, "tokenizer": spec, "documents": 1, "sequences": 1,
                                "tokens": len(data), "producer": "test"})
    cfg = ModelConfig(**{**BASE, **kw})
    model = build_model(cfg)
    meta = {"step": 0, "metric": "bpc", "data": {"train": prefix, "valid": prefix}, "vocab_size": 256,
            "eod_id": None, "pad_id": None, "eval": {}}
    return write_export(str(tmp_path / name / "export"), model.gather_full_state_dict(), to_dict(cfg), prefix, meta)


def test_the_command_writes_json_and_a_plot_for_several_models(tmp_path):
    xl = _export(tmp_path, "xl", attn_type=0, mem_len=8)
    lamemo = _export(tmp_path, "lamemo", attn_type=3, mem_len=8)
    hybrid = _export(tmp_path, "hybrid", layers="delta,xl", mem_len=8)
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    r = subprocess.run([sys.executable, "pretrain/analyze_attention.py", "--model", xl, "--model", lamemo,
                        "--model", hybrid, "--max-steps", "5", "--batch-size", "2", "--output", str(out),
                        "--plot", str(png)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["models"]
    assert [m["label"] for m in res] == ["xl", "lamemo", "hybrid"]
    assert [len(m["layers"]) for m in res] == [2, 2, 1]          # the delta-rule layer has no attention
    for m in res:
        for layer in m["layers"]:
            assert abs(sum(layer["mass"]) - 1) < 1e-6 and 0 < layer["memory_share"] < 1
    assert png.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "pretrain/analyze_attention.py", "--model", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nothing" in bad.stderr and "export" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, "pretrain/analyze_attention.py", "--model", xl, "--max-steps", "-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--max-steps" in bad.stderr
