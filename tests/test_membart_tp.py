"""MemBART at tensor-parallel size 2 equals size 1 (two gloo processes): the same initial full weights, losses,
log-probabilities, memory states over three steps carried with backpropagation through them, consolidated
gradients, generated tokens, and Hugging Face-format weights written from the sharded model; with the token table
tied (BART) and untied (three vocabulary-parallel tables: encoder, decoder, output layer)."""
import gc
import os
import tempfile

import pytest
import torch

from conftest import free_port, spawn_tp2
from pretrain.model import parallel, weights
from pretrain.model.membart import STATE_KEY, build_membart
from pretrain.model.membart_config import MemBartConfig
from pretrain.model.membart_weights import read_state_dict, save_pretrained

CFG = dict(vocab_size=53, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=40,
           dropout=0.0, tgt_len=20, init_std=0.2, num_slots=3)
STEPS = 3


def _run(export_dir=None, tie=True):
    model = build_membart(MemBartConfig(**CFG, tie_word_embeddings=tie)).double().train()
    g = torch.Generator().manual_seed(3)
    state = model.init_state(2)
    res = {"weights": model.gather_full_state_dict(), "nll": [], "states": []}
    loss = 0.0
    for step in range(STEPS):
        src = torch.randint(3, 53, (2, 8), generator=g)
        src[1, 6:] = 1
        tgt = torch.randint(3, 53, (2, 6), generator=g)
        out, state = model(src, state, tgt, reset=torch.tensor([step == 2, False]), detach_state=False,
                           return_logits=True)
        loss = loss + out.nll.sum()
        res["nll"].append(out.nll.detach())
        res["states"].append(state[STATE_KEY].detach().clone())
    loss.backward()
    res["logits"] = out.logits
    res["grads"] = weights.gather_full(model, grads=True)
    res["tokens"] = model.generate(out.encoder, num_beams=2, max_length=8)
    res["sampled"] = model.generate(out.encoder, do_sample=True, top_p=0.9, max_length=8,
                                    generator=torch.Generator().manual_seed(4))
    if export_dir is not None:
        save_pretrained(model, export_dir)
    return res


def _worker(rank, world, port, out_path, export_dir, tie):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel.initialize(world)
    res = _run(export_dir, tie)
    if rank == 0:
        torch.save(res, out_path)
    gc.collect()
    parallel.destroy()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_membart_tensor_parallel_2_equals_1(tie):
    parallel.initialize(1)
    with tempfile.TemporaryDirectory() as tmp:
        ref = _run(os.path.join(tmp, "tp1"), tie)
        out_path = os.path.join(tmp, "tp2.pt")
        spawn_tp2(_worker, (2, free_port(), out_path, os.path.join(tmp, "tp2"), tie), timeout=180)
        got = torch.load(out_path, weights_only=False)
        files = [read_state_dict(os.path.join(tmp, d)) for d in ("tp1", "tp2")]
    assert set(got["weights"]) == set(ref["weights"])
    for k, t in ref["weights"].items():
        assert torch.equal(got["weights"][k], t), f"initial {k} depends on the layout"
    for s in range(STEPS):
        assert (got["nll"][s] - ref["nll"][s]).abs().max() < 2e-6, f"loss of step {s}"
        assert (got["states"][s] - ref["states"][s]).abs().max() < 1e-12, f"memory after step {s}"
    assert (got["logits"] - ref["logits"]).abs().max() < 1e-12
    for k, g in ref["grads"].items():
        assert (got["grads"][k] - g).abs().max() < 2e-6, f"gradient of {k}"
    assert ref["grads"]["encoder.memory_bias"].abs().sum() > 0
    tables = ("shared.weight",) if tie else ("encoder_embed_tokens.weight", "decoder_embed_tokens.weight",
                                             "lm_head.weight")
    assert all(ref["grads"][t].abs().sum() > 0 for t in tables), "every token table is trained"
    assert torch.equal(got["tokens"], ref["tokens"]) and torch.equal(got["sampled"], ref["sampled"])
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
