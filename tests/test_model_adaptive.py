"""Adaptive input / softmax: normalised log-probabilities, the loss consistent with them, tied weights and
projections shared (one parameter), WikiText-103-style clusters."""
import pytest
import torch

from pretrain.model import ModelConfig, build_model

BASE = dict(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=53, dropout=0.0,
            tgt_len=5, mem_len=5, attn_type=0)
CASES = {
    "plain": dict(),
    "div1": dict(adaptive=True, cutoffs=[10, 30]),
    "div2": dict(adaptive=True, cutoffs=[10, 30], div_val=2),
    "div2-untied": dict(adaptive=True, cutoffs=[10, 30], div_val=2, tie_weight=False, tie_projs=False),
    "proj": dict(adaptive=True, cutoffs=[7], d_embed=8),
}


pytestmark = pytest.mark.usefixtures("tp1")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_log_probs_normalise_and_match_the_loss(case):
    model = build_model(ModelConfig(**{**BASE, **CASES[case]})).double().eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, 53, (3, 5))
    targets = torch.arange(15).view(3, 5) * 7 % 53       # targets in every cluster
    out, _ = model(tokens, model.init_state(3), targets, return_logits=True)
    assert out.logits.shape == (3, 5, 53)
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64), atol=1e-12)
    want = -out.logits.gather(-1, targets[..., None]).squeeze(-1)
    assert out.nll.dtype == torch.float32
    assert torch.allclose(out.nll.double(), want, atol=1e-5)


def test_tied_weights_and_projections_are_shared():
    cfg = ModelConfig(**{**BASE, **CASES["div2"]})
    model = build_model(cfg)
    emb, sm = model.embedding, model.softmax
    assert torch.equal(sm.weight(0)[:10], emb.tables[0].weight), "head = shortlist table + cluster rows"
    for i in (1, 2):
        assert sm.weight(i) is emb.tables[i].weight
        assert sm.proj(i) is emb.proj(i), "tail projections tied (tie_projs)"
    assert sm.proj(0) is not emb.proj(0), "the head projection is never tied"
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters())), "each tied parameter listed once"
    assert not any(n.startswith("softmax.out_weights") for n in names)
    # one parameter, two uses: its gradient holds the input and the output contributions
    out, _ = model(torch.tensor([[40, 41, 42, 43, 44]]), model.init_state(1), torch.tensor([[1, 2, 3, 31, 32]]))
    out.nll.sum().backward()
    g = emb.tables[2].weight.grad
    assert g[40 - 30].abs().sum() > 0 and g[0].abs().sum() > 0     # looked-up row, and every output row


def test_cluster_sizes_and_widths():
    cfg = ModelConfig(**{**BASE, "vocab_size": 267735, "d_model": 64, "n_head": 2, "d_head": 16,
                         "adaptive": True, "cutoffs": [20000, 40000, 200000], "div_val": 4, "n_layer": 1})
    model = build_model(cfg)
    shapes = [tuple(t.weight.shape) for t in model.embedding.tables]
    assert shapes == [(20000, 64), (20000, 16), (160000, 4), (67735, 1)]
    assert tuple(model.softmax.cluster_weight.shape) == (3, 64)


def test_bad_cutoffs_are_rejected():
    from pretrain.config_base import ConfigError
    with pytest.raises(ConfigError, match=r"cutoffs\[1\]"):
        ModelConfig(**{**BASE, "adaptive": True, "cutoffs": [10, 5]}).validate()
    with pytest.raises(ConfigError, match="cutoffs"):
        ModelConfig(**{**BASE, "cutoffs": [10]}).validate()
    with pytest.raises(ConfigError, match="div_val"):
        ModelConfig(**{**BASE, "adaptive": True, "cutoffs": [10, 20, 30, 40], "div_val": 4}).validate()
