"""The model equals a plain reference written from the equations (pretrain/model/reference.py): outputs,
memory states and gradients, over several segments, for every attention type and the main options.

The reference keeps a growing memory (as the original code) instead of a fixed buffer with valid counts,
indexes relative distances explicitly instead of through a strided view, and builds masks from the
definitions, so agreement checks the realignment, the look-ahead windows and masks, the state update and
the backward pass.  fp64 weights; the loss is fp32 by design (megatron's cross entropy), hence the
tolerances on log-probabilities and gradients."""
import pytest
import torch

from pretrain.model import ModelConfig, build_model, weights
from pretrain.model.reference import ReferenceLM

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=37, dropout=0.0)


pytestmark = pytest.mark.usefixtures("tp1")


def _detach(mem):
    if mem is None:
        return None
    if isinstance(mem, dict):
        return {k: _detach(v) for k, v in mem.items()}
    if isinstance(mem, list):
        return [_detach(t) for t in mem]
    return mem.detach()


def _state_error(cfg, st, mem):
    """Max difference between the model's state and the reference memory on the valid slots; every entry of
    the reference must be in the state and vice versa (flags and counts aside)."""
    M = st.mem_len
    err = 0.0
    keys = {k for k in st.keys() if st[k].is_floating_point()}
    ref_keys = {f"layers.{l}.{k}" for l, d in enumerate(mem["layers"]) for k, t in d.items()
                if t.is_floating_point()} | set(mem) - {"layers"}
    assert keys == ref_keys, f"state entries {sorted(keys)} != reference {sorted(ref_keys)}"
    for b in range(st.batch_size):
        v = int(st["valid"][b])
        for l, d in enumerate(mem["layers"]):
            for k, ref in d.items():
                if not ref.is_floating_point():                  # counts: they place the entries below
                    continue
                t = st[f"layers.{l}.{k}"]
                if k == "mem":                                   # [B, M, d]
                    e = t[b, M - v:] - ref[b]
                elif k == "attn":                                # [H, B, M, dh] vs [B, m, H, dh]
                    e = t[:, b, M - v:].transpose(0, 1) - ref[b]
                elif k == "lse":                                 # [H, B, M] vs [B, H, m]
                    e = t[:, b, M - v:] - ref[b]
                elif f"layers.{l}.{k}_valid" in st:              # [B, S, d] with its own count: the last ones
                    n = int(st[f"layers.{l}.{k}_valid"][b])
                    e = t[b, t.shape[1] - n:] - ref[b]
                else:                                            # fast weights: no positions
                    e = t[b] - ref[b]
                err = max(err, e.abs().max().item() if e.numel() else 0.0)
        for k in set(mem) - {"layers"}:                         # stack-level entries (RMT tokens, slots)
            e = st[k].select(st.batch_dims[k], b) - mem[k][b]
            err = max(err, e.abs().max().item() if e.numel() else 0.0)
    return err


def compare(cfg, n, m, segs=3, clamp=-1, same=False, detach=True, batch=2, seed=0):
    """``segs`` segments of ``n`` tokens (``n`` may be a list of lengths) with memory length ``m``."""
    lengths = list(n) if isinstance(n, (list, tuple)) else [n] * segs
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    model.train()                                   # dropout is 0: train mode exercises the training paths
    favor = {}
    for layer in model.stack.layers:                # FAVOR+ redraws in training: compare with its fixed draw
        if getattr(layer.mixer, "feature_map", None) == "favor":
            model.eval()
            favor[layer.mixer.index] = layer.mixer._favor_projection(torch.device("cpu"), torch.float64)
    full = {k: v.clone().requires_grad_(True) for k, v in model.gather_full_state_dict().items()}
    ref = ReferenceLM(cfg, full, favor_projections=favor)
    tok = torch.randint(0, cfg.vocab_size, (batch, sum(lengths) + 1))
    state, mem = model.init_state(batch, mem_len=m), None
    loss, ref_loss = 0.0, 0.0
    start = 0
    for s, n in enumerate(lengths):
        x, y = tok[:, start:start + n], tok[:, start + 1:start + n + 1]
        start += n
        out, state = model(x, state, y, clamp_len=clamp, same_length=same, detach_state=detach,
                           return_logits=True)
        nll, lp, mem = ref.segment(x, y, mem, m, clamp, same)
        if detach:
            mem = _detach(mem)
        assert (out.logits - lp).abs().max().item() < 2e-6, f"log-probs differ in segment {s}"
        assert (out.nll - nll).abs().max().item() < 2e-6, f"nll differs in segment {s}"
        assert _state_error(cfg, state, mem) < 1e-12, f"memory state differs after segment {s}"
        loss = loss + out.nll.sum()
        ref_loss = ref_loss + nll.sum()
    loss.backward()
    ref_loss.backward()
    grads = weights.gather_full(model, grads=True)
    for name, w in full.items():
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        assert torch.allclose(grads[name], g, atol=2e-5, rtol=1e-4), f"gradient of {name} differs"


@pytest.mark.parametrize("attn_type", [0, 1, 3, 31, 32, 33])
@pytest.mark.parametrize("n,m", [(5, 5), (3, 7), (6, 4)])
def test_memory_variants_match_reference(attn_type, n, m):
    compare(ModelConfig(attn_type=attn_type, tgt_len=n, mem_len=m, **BASE), n, m)


def test_absolute_positions_match_reference():
    compare(ModelConfig(attn_type=2, tgt_len=6, mem_len=0, **BASE), 6, 0, segs=2)


@pytest.mark.parametrize("attn_type", [0, 1, 3, 31, 33])
def test_eval_protocol_options_match_reference(attn_type):
    """clamp_len, same_length, generation-style N = 1 with a longer memory."""
    cfg = ModelConfig(attn_type=attn_type, tgt_len=4, mem_len=6, **BASE)
    compare(cfg, 4, 6, clamp=3)
    compare(cfg, 4, 6, same=True)
    compare(cfg, 1, 5, segs=7)


@pytest.mark.parametrize("attn_type", [0, 1, 3, 33])
def test_varying_segment_lengths_match_reference(attn_type):
    """Evaluation / generation change N between segments; memories partly filled (fewer valid positions
    than the segment length) use LaMemo's window over the shorter memory."""
    compare(ModelConfig(attn_type=attn_type, tgt_len=4, mem_len=6, **BASE), [2, 5, 3, 1, 6], 6)


@pytest.mark.parametrize("attn_type", [0, 3])
def test_pre_ln_untied_biases_match_reference(attn_type):
    cfg = ModelConfig(attn_type=attn_type, tgt_len=4, mem_len=4, pre_lnorm=True, untie_r=True, **BASE)
    compare(cfg, 4, 4)


@pytest.mark.parametrize("attn_type", [0, 32])
def test_backprop_through_state_matches_reference(attn_type):
    """detach_state=False: the loss of later segments reaches earlier ones through the memory."""
    compare(ModelConfig(attn_type=attn_type, tgt_len=4, mem_len=5, **BASE), 4, 5, detach=False)


@pytest.mark.parametrize("extra", [
    dict(adaptive=True, cutoffs=[8, 20], div_val=1),
    dict(adaptive=True, cutoffs=[8, 20], div_val=2),
    dict(adaptive=True, cutoffs=[8, 20], div_val=2, tie_weight=False, tie_projs=False),
    dict(adaptive=True, cutoffs=[8], d_embed=8),
    dict(d_embed=8, tie_weight=False),
], ids=["div1", "div2", "untied", "proj", "plain-proj"])
def test_embeddings_and_softmax_match_reference(extra):
    compare(ModelConfig(attn_type=3, tgt_len=4, mem_len=4, **{**BASE, **extra}), 4, 4, segs=2)


@pytest.mark.parametrize("rmt", [dict(num_mem_tokens=3), dict(num_mem_tokens=2, read_mem_from_cache=True),
                                 dict(num_mem_tokens=2, mem_at_end=False, read_mem_from_cache=True)],
                         ids=["k3", "k2-cache", "k2-read-only"])
@pytest.mark.parametrize("attn_type", [0, 1])
def test_rmt_matches_reference(attn_type, rmt):
    """RMT memory tokens (with the XL cache): varying segment lengths (evaluation, generation), clamped
    distances, pre-LN with per-layer biases, and backpropagation through the carried memory."""
    cfg = ModelConfig(attn_type=attn_type, tgt_len=4, mem_len=6, rmt=rmt, **BASE)
    compare(cfg, [2, 5, 3, 1, 6], 6)
    compare(cfg, 4, 6, clamp=3, detach=False)
    compare(ModelConfig(attn_type=attn_type, tgt_len=4, mem_len=0, rmt=rmt, pre_lnorm=True, untie_r=True,
                        **BASE), 4, 0, detach=False)
