"""Tensor-parallel size 2 equals size 1 (two gloo processes, one launch for every case).

For each variant the same config is run here at TP = 1 and in two spawned processes at TP = 2: three
segments forward and backward.  The TP = 2 model must start from the same full weights (initialisation is
layout-independent) and give the same losses, full-vocabulary log-probabilities, consolidated gradients
and (gathered) memory states.  States also move between layouts: the TP = 1 state after two segments,
split by head, continues on TP = 2 exactly as on TP = 1; a TP = 2 state gathered and split again is
unchanged.  With dropout on, the replicated activations (hence the losses) agree across ranks, and
activation checkpointing replays the per-rank dropout streams (same losses and gradients)."""
import gc
import os
import tempfile

import pytest
import torch

from conftest import free_port, spawn_tp2
from test_mixers import CASES as MATRIX
from pretrain.model import MemoryState, ModelConfig, build_model, parallel, weights

BASE = dict(n_layer=2, d_model=16, n_head=4, d_head=4, d_inner=24, vocab_size=41, dropout=0.0,
            tgt_len=5, mem_len=5)
# every registered mixer (the registry's test configs) and the hybrids of the test matrix, plus the options
CASES = {case: {k: v for k, v in kw.items() if k != "mem_len"} | ({"mem_len": 0} if kw.get("mem_len") == 0 else {})
         for case, kw in MATRIX.items()}
CASES.update({
    "xl-preln-untied-bptt": dict(attn_type=0, pre_lnorm=True, untie_r=True, bptt=True),
    "lamemo-preln-untied": dict(attn_type=3, pre_lnorm=True, untie_r=True),
    "delta-preln-bptt": dict(attn_type=26, mem_len=0, pre_lnorm=True, bptt=True),
    "adaptive-div2": dict(attn_type=3, adaptive=True, cutoffs=[10, 21], div_val=2),
    "adaptive-untied": dict(attn_type=0, adaptive=True, cutoffs=[11], tie_weight=False, tie_projs=False,
                            d_embed=8),
})
SEGMENTS = 3


def _cfg(case):
    kw = {**BASE, **CASES[case]}
    kw.pop("bptt", None)
    return ModelConfig(**kw)


def _tokens():
    return torch.randint(0, BASE["vocab_size"], (3, 5 * SEGMENTS + 1), generator=torch.Generator().manual_seed(7))


def _run(case, start_state=None, first_segment=0):
    """Segments ``first_segment``.. of the case, forward + backward; the results to compare."""
    cfg = _cfg(case)
    model = build_model(cfg).double()
    model.train()
    torch.manual_seed(11)        # FAVOR+ redraws its projection from the default generator in training
    tok = _tokens()
    state = start_state or model.init_state(3)
    detach = not CASES[case].get("bptt", False)
    res = {"weights": model.gather_full_state_dict(), "nll": [], "states": [], "aux": []}
    loss = 0.0
    for s in range(first_segment, SEGMENTS):
        out, state = model(tok[:, 5 * s:5 * s + 5], state, tok[:, 5 * s + 1:5 * s + 6], detach_state=detach,
                           return_logits=True)
        loss = loss + out.nll.sum()
        if out.aux_loss is not None:             # an auxiliary loss (Compressive's reconstruction) and its gradient
            loss = loss + out.aux_loss
            res["aux"].append(out.aux_loss.detach().reshape(1))
        res["nll"].append(out.nll.detach())
        res["states"].append(state.tp_gather().detach().state_dict())
    loss.backward()
    res["logits"] = out.logits
    res["grads"] = weights.gather_full(model, grads=True)
    res["final_state"] = state
    return res


def _dropout_run(checkpoint):
    """Two segments with dropout everywhere (replicated and split regions), same seed; ``checkpoint``:
    None (no recomputation), "default", or "reentrant" (torch's reentrant checkpoint, which like DeepSpeed's
    knows nothing of the tensor-parallel generators)."""
    parallel.seed_rng(11)
    cfg = ModelConfig(**{**BASE, "attn_type": 3, "dropout": 0.2, "dropatt": 0.1,
                         "checkpoint_activations": checkpoint is not None})
    model = build_model(cfg).double().train()
    if checkpoint == "reentrant":
        model.checkpoint_fn = lambda fn, *args: torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=True)
    tok = _tokens()
    out1, state = model(tok[:, :5], model.init_state(3), tok[:, 1:6])
    out2, _ = model(tok[:, 5:10], state, tok[:, 6:11])
    (out1.nll.sum() + out2.nll.sum()).backward()
    return torch.stack([out1.nll.detach(), out2.nll.detach()]), weights.gather_full(model, grads=True)


def _worker(rank, world, port, ref_path, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel.initialize(world)
    refs = torch.load(ref_path, weights_only=False)
    results = {}
    for case in CASES:
        res = _run(case)
        local = res.pop("final_state")
        again = local.tp_gather().tp_split(rank, world)
        res["regather_ok"] = again.equal(local) and (again.tp_rank, again.tp_world) == (rank, world)
        # continue the TP = 1 state after two segments on this layout
        full = MemoryState.from_state_dict(refs[case]["states"][SEGMENTS - 2])
        cont = _run(case, start_state=full.tp_split(rank, world), first_segment=SEGMENTS - 1)
        res["continued_nll"] = cont["nll"][0]
        results[case] = res
    parallel.seed_rng(5)
    with parallel.parallel_region_rng(torch.device("cpu")):
        split = torch.rand(8)
    replicated = torch.rand(8)
    nll, grads = _dropout_run(None)
    ckpt = [_dropout_run("default"), _dropout_run("reentrant")]
    results["dropout"] = dict(split_differs=not torch.equal(*parallel.all_gather(split)),
                              replicated_same=torch.equal(*parallel.all_gather(replicated)),
                              ranks_agree=all(torch.equal(t, nll) for t in parallel.all_gather(nll)),
                              checkpoint_same=all(torch.equal(nll, n) and all(
                                  torch.allclose(grads[k], g[k], atol=1e-12) for k in grads) for n, g in ckpt))
    if rank == 0:
        torch.save(results, out_path)
    gc.collect()
    parallel.destroy()


def _close(a, b, atol):
    return a.shape == b.shape and (a.numel() == 0 or (a.double() - b.double()).abs().max().item() <= atol)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensor_parallel_2_equals_1():
    parallel.initialize(1)
    refs = {}
    for case in CASES:
        r = _run(case)
        r.pop("final_state")
        refs[case] = r
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, out_path = os.path.join(tmp, "ref.pt"), os.path.join(tmp, "tp2.pt")
        torch.save(refs, ref_path)
        spawn_tp2(_worker, (2, free_port(), ref_path, out_path), timeout=240)
        tp2 = torch.load(out_path, weights_only=False)
    assert tp2["dropout"]["split_differs"], "tensor-parallel regions must draw different masks per rank"
    assert tp2["dropout"]["replicated_same"], "replicated regions must draw the same masks on every rank"
    assert tp2["dropout"]["ranks_agree"], "replicated activations differ across ranks with dropout on"
    assert tp2["dropout"]["checkpoint_same"], "recomputation did not replay the tensor-parallel dropout"
    for case, ref in refs.items():
        got = tp2[case]
        assert set(got["weights"]) == set(ref["weights"]), case
        for k in ref["weights"]:
            assert torch.equal(got["weights"][k], ref["weights"][k]), f"{case}: initial {k} depends on the layout"
        for s in range(SEGMENTS):
            assert _close(got["nll"][s], ref["nll"][s], 2e-6), f"{case}: loss of segment {s}"
            for k, t in ref["states"][s]["tensors"].items():
                assert _close(got["states"][s]["tensors"][k], t, 1e-12), f"{case}: state {k} after segment {s}"
        assert _close(got["logits"], ref["logits"], 2e-6), f"{case}: log-probabilities"
        assert len(got["aux"]) == len(ref["aux"]) and all(_close(a, b, 1e-12) for a, b in zip(got["aux"], ref["aux"])), \
            f"{case}: auxiliary loss"
        for k, g in ref["grads"].items():
            assert _close(got["grads"][k], g, 2e-6), f"{case}: gradient of {k}"
        assert got["regather_ok"], f"{case}: gather then split changed the state"
        assert _close(got["continued_nll"], ref["nll"][SEGMENTS - 1], 2e-6), f"{case}: TP1 state on TP2"
