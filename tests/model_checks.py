"""Model runs shared by several model test files: segment-by-segment log-probabilities, a bf16 model against its
fp32 twin, a tiny preset over two segments.  The caller sets up the parallel state (the ``tp1`` fixture)."""
import torch

from pretrain.model import build_model, load_model_config


def logits_by_segment(model, tokens, n, mem_len):
    """Log-probabilities of every position, segment by segment: [B, T, V].  ``tokens`` [B, T] is fed in segments of
    ``n`` (the last one shorter where n does not divide T) from a fresh state with a memory of ``mem_len``."""
    state = model.init_state(tokens.shape[0], mem_len=mem_len)
    outs = []
    for s in range(0, tokens.shape[1], n):
        out, state = model(tokens[:, s:s + n], state, return_logits=True)
        outs.append(out.logits)
    return torch.cat(outs, 1)


def check_bf16_against_fp32(model, ref, tokens, segments, n=4):
    """Run ``model`` (bf16 parameters) and ``ref`` (the same weights in fp32) over ``segments`` segments of ``n``
    tokens of ``tokens`` [B, >= segments * n + 1] with the state carried, back-propagating the bf16 model's mean
    loss after each; assert that its per-token loss is fp32, finite and within 0.05 of the reference's.  Returns
    the final states (the bf16 model's, the reference's)."""
    st, st_ref = model.init_state(tokens.shape[0]), ref.init_state(tokens.shape[0])
    for s in range(segments):
        x, y = tokens[:, n * s:n * s + n], tokens[:, n * s + 1:n * s + n + 1]
        out, st = model(x, st, y)
        out_ref, st_ref = ref(x, st_ref, y)
        out.nll.mean().backward()
        assert out.nll.dtype == torch.float32 and torch.isfinite(out.nll).all()
        assert (out.nll - out_ref.nll).abs().max() < 0.05
    return st, st_ref


def run_tiny_preset(name):
    """Preset ``name`` with 8-token segments (and a memory of 8 where the preset has one) over 2 segments of random
    tokens (batch 2, from the default generator) with the state carried: (config, model, [per-token loss [2, 8] of
    each segment])."""
    mem = load_model_config(name).mem_len
    cfg = load_model_config(name, overrides=dict(tgt_len=8, mem_len=8 if mem else 0))
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    state = model.init_state(2)
    losses = []
    for s in range(2):
        out, state = model(tokens[:, 8 * s:8 * s + 8], state, tokens[:, 8 * s + 1:8 * s + 9])
        losses.append(out.nll)
    return cfg, model, losses
