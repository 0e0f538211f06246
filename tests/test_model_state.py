"""The memory state as a value: row resets, save/load, detach control, head splitting, clear errors."""
import io

import pytest
import torch

from pretrain.model import MemoryState, ModelConfig, build_model

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0,
            tgt_len=4, mem_len=6)


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    return build_model(ModelConfig(**{**BASE, **kw})).double().eval()


def _feed(model, state, tokens, n=4):
    outs = []
    for s in range(0, tokens.shape[1], n):
        out, state = model(tokens[:, s:s + n], state, return_logits=True)
        outs.append(out.logits)
    return outs, state


@pytest.mark.parametrize("attn_type", [0, 3])
def test_reset_rows_restart_from_the_initial_state(attn_type):
    model = _model(attn_type=attn_type)
    torch.manual_seed(0)
    history, nxt = torch.randint(0, 31, (3, 8)), torch.randint(0, 31, (3, 4))
    _, state = _feed(model, model.init_state(3), history)
    rows = torch.tensor([True, False, True])
    reset = model.reset_state(state, rows)
    for k in state.keys():
        t, init = reset[k], model.init_state(3)[k]
        bd = state.batch_dims[k]
        assert torch.equal(t.index_select(bd, torch.tensor([0, 2])), init.index_select(bd, torch.tensor([0, 2])))
        assert torch.equal(t.index_select(bd, torch.tensor([1])), state[k].index_select(bd, torch.tensor([1])))
    out, _ = model(nxt, reset, return_logits=True)
    fresh, _ = model(nxt, model.init_state(3), return_logits=True)
    kept, _ = model(nxt, state, return_logits=True)
    assert torch.equal(out.logits[rows], fresh.logits[rows])
    assert torch.equal(out.logits[~rows], kept.logits[~rows])
    assert (out.logits[rows] - kept.logits[rows]).abs().max() > 1e-9, "sanity: the memory mattered"


def test_reset_uses_the_mechanisms_initial_state():
    """Whatever the mechanism's initial state is (e.g. learned), reset rows get exactly that."""
    model = _model(attn_type=3)
    learned = torch.nn.Parameter(torch.randn(16, dtype=torch.float64))
    plain = model.stack.initial_state

    def initial_state(batch_size, mem_len, device, dtype):
        st = plain(batch_size, mem_len, device, dtype)
        return st.replace(**{"layers.0.mem": st["layers.0.mem"] + learned})
    model.stack.initial_state = initial_state
    _, state = _feed(model, model.init_state(2), torch.randint(0, 31, (2, 8)))
    reset = model.reset_state(state, torch.tensor([False, True]))
    assert torch.equal(reset["layers.0.mem"][1], learned.detach().expand(6, 16))
    assert torch.equal(reset["layers.0.mem"][0], state["layers.0.mem"][0])
    assert reset["layers.0.mem"].requires_grad, "a learned initial state stays in the graph"


@pytest.mark.parametrize("attn_type", [0, 33])
def test_save_and_load_round_trip(attn_type):
    model = _model(attn_type=attn_type)
    tokens = torch.randint(0, 31, (2, 12))
    _, state = _feed(model, model.init_state(2), tokens[:, :8])
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = MemoryState.from_state_dict(torch.load(buf))
    assert loaded.equal(state) and loaded.batch_dims == state.batch_dims and loaded.head_dims == state.head_dims
    a, _ = model(tokens[:, 8:], state, return_logits=True)
    b, _ = model(tokens[:, 8:], loaded, return_logits=True)
    assert torch.equal(a.logits, b.logits)


def test_state_dict_errors_are_clear():
    with pytest.raises(ValueError, match="not a memory state"):
        MemoryState.from_state_dict({"tensors": {}})
    model = _model(attn_type=0)
    sd = model.init_state(2).state_dict()
    del sd["head_dims"]
    with pytest.raises(ValueError, match="head_dims"):
        MemoryState.from_state_dict(sd)


def test_wrong_state_is_rejected():
    xl, lamemo = _model(attn_type=0), _model(attn_type=3)
    tokens = torch.randint(0, 31, (2, 4))
    with pytest.raises(ValueError, match="rows"):
        xl(tokens, xl.init_state(3))
    with pytest.raises(ValueError, match="mechanism"):
        xl(tokens, lamemo.init_state(2))
    with pytest.raises(ValueError, match="shard"):
        lamemo(tokens, lamemo.init_state(2).tp_split(0, 2))
    with pytest.raises(ValueError, match="shape"):
        xl.reset_state(xl.init_state(2), torch.tensor([True]))


@pytest.mark.parametrize("attn_type", [0, 3])
def test_detach_control(attn_type):
    """detach_state=True cuts gradients at the segment boundary; False lets the next segment's loss reach
    the previous segment (seen on embedding rows of tokens that only occur in the first segment)."""
    model = _model(attn_type=attn_type, tie_weight=False)
    first = torch.full((2, 4), 30)
    second = torch.randint(0, 20, (2, 4))
    grads = {}
    for detach in (True, False):
        model.zero_grad()
        _, state = model(first, model.init_state(2), detach_state=detach)
        assert all(t.requires_grad != detach for k, t in state.tensors.items() if t.is_floating_point())
        out, _ = model(second, state, second)
        out.nll.sum().backward()
        grads[detach] = model.embedding.tables[0].weight.grad[30].abs().sum().item()
    assert grads[True] == 0.0
    assert grads[False] > 0.0


def test_head_split_and_join():
    model = _model(attn_type=3, n_head=4, d_head=4)
    _, state = _feed(model, model.init_state(2), torch.randint(0, 31, (2, 8)))
    parts = [state.tp_split(r, 2) for r in range(2)]
    for k in state.keys():
        hd = state.head_dims[k]
        if hd is None:
            assert all(torch.equal(p[k], state[k]) for p in parts)
        else:
            assert parts[0][k].shape[hd] == state[k].shape[hd] // 2
            assert torch.equal(torch.cat([p[k] for p in parts], hd), state[k])
    with pytest.raises(ValueError, match="full state"):
        parts[0].tp_split(0, 2)


def test_select_rows_and_detach_to():
    model = _model(attn_type=3)
    _, state = _feed(model, model.init_state(3), torch.randint(0, 31, (3, 8)))
    sub = state.select_rows(torch.tensor([False, True, True]))
    assert sub.batch_size == 2 and torch.equal(sub["layers.1.attn"], state["layers.1.attn"][:, 1:])
    assert state.detach().to("cpu").equal(state)
