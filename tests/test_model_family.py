"""The model-family protocol (``pretrain/model/family.py``): the decoder LM and MemBART both implement it with
compatible signatures, the shared members (``family_base.py``) behave alike for both, and MemBART's module paths of
the earlier layout (``pretrain/model/membart*.py``) give the same objects as the package ``pretrain/model/membart/``."""
import importlib
import inspect
import io
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from pretrain.model import ModelConfig, build_model, parallel, registry
from pretrain.model.family import ModelFamily
from pretrain.model.lm import MemoryLM
from pretrain.model.membart import MemBart, MemBartConfig, build_membart
from pretrain.model.state import MemoryState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0, tgt_len=4, mem_len=6)
BART = dict(vocab_size=53, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=40,
            dropout=0.0, tgt_len=20, init_std=0.2, num_slots=3)
MEMBERS = {"cfg", "checkpoint_fn", "decode_policy", "init_state", "reset_state", "check_state", "forward",
           "gather_full_state_dict", "load_full_state_dict", "sharding_units", "flops"}


@pytest.fixture(scope="module", autouse=True)
def _tp1():
    parallel.initialize(1)


def _lm(**kw):
    return build_model(ModelConfig(**{**LM, **kw})).double().eval()


def _membart(**kw):
    return build_membart(MemBartConfig(**{**BART, **kw})).double().eval()


BUILDERS = {"decoder": _lm, "membart": _membart}


def _protocol_methods():
    return {n: v for n, v in vars(ModelFamily).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_the_protocol_names_the_members():
    members = set(_protocol_methods()) | set(ModelFamily.__annotations__) | \
        {n for n, v in vars(ModelFamily).items() if isinstance(v, property)}
    assert members == MEMBERS
    for name in MEMBERS - set(ModelFamily.__annotations__):
        member = vars(ModelFamily)[name]
        assert (member.fget if isinstance(member, property) else member).__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_models_satisfy_the_protocol(family):
    model = BUILDERS[family]()
    assert isinstance(model, ModelFamily)
    assert isinstance(model.decode_policy, str)
    assert callable(model.checkpoint_fn) and model.cfg is not None
    assert not isinstance(object(), ModelFamily)


def _annotation(a):
    return None if a is inspect.Parameter.empty else re.sub(r"[\"'\s]", "", str(a))


@pytest.mark.parametrize("cls", [MemoryLM, MemBart], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(_protocol_methods()))
def test_signatures_match_the_protocol(cls, name):
    """Every call the protocol allows is a call the implementation accepts, with the same meaning: the protocol's
    positional parameters first and in order, its keyword parameters by name, the same defaults, the same
    annotations (an implementation may also take None); any extra parameter of the implementation is optional."""
    proto = inspect.signature(_protocol_methods()[name])
    impl = inspect.signature(getattr(cls, name))
    P, E = inspect.Parameter, inspect.Parameter.empty
    pp = [p for p in proto.parameters.values() if p.kind == P.POSITIONAL_OR_KEYWORD]
    ip = [p for p in impl.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    assert [p.name for p in ip[:len(pp)]] == [p.name for p in pp], f"{cls.__name__}.{name}{impl} vs {proto}"
    for p in proto.parameters.values():
        if p.kind == P.VAR_KEYWORD:
            continue
        q = impl.parameters.get(p.name)
        assert q is not None and q.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY, P.POSITIONAL_ONLY), \
            f"{cls.__name__}.{name} has no parameter {p.name!r}"
        if p.default is not E:
            assert q.default == p.default, f"{cls.__name__}.{name}: default of {p.name!r}"
        a, b = _annotation(p.annotation), _annotation(q.annotation)
        if a and b:
            assert b in (a, f"Optional[{a}]"), f"{cls.__name__}.{name}: {p.name!r} is {b}, the protocol's {a}"
    for q in impl.parameters.values():
        if q.name not in proto.parameters and q.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            assert q.default is not E, f"{cls.__name__}.{name}: extra parameter {q.name!r} must be optional"
    a, b = _annotation(proto.return_annotation), _annotation(impl.return_annotation)
    if a and b:
        assert a == b, f"{cls.__name__}.{name} returns {b}, the protocol {a}"


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_reset_check_and_weights_alike(family):
    """The shared members: a reset row equals a fresh state's row, the others are kept; state checks refuse another
    family's state, a wrong batch size and a non-state; the consolidated weights round-trip."""
    model = BUILDERS[family]()
    torch.manual_seed(0)
    state = model.init_state(3)
    state = state.replace(**{k: torch.randn_like(t) if t.is_floating_point() else t + 1
                             for k, t in state.tensors.items()})
    rows = torch.tensor([True, False, True])
    reset, fresh = model.reset_state(state, rows), model.init_state(3)
    for k, t in state.tensors.items():
        bd = state.batch_dims[k]
        assert torch.equal(reset[k].index_select(bd, torch.tensor([0, 2])),
                           fresh[k].to(t.dtype).index_select(bd, torch.tensor([0, 2])))
        assert torch.equal(reset[k].index_select(bd, torch.tensor([1])), t.index_select(bd, torch.tensor([1])))
    model.check_state(state, 3)
    with pytest.raises(ValueError, match="rows"):
        model.check_state(state, 2)
    with pytest.raises(TypeError, match="MemoryState"):
        model.check_state({}, 3)
    with pytest.raises(ValueError, match="rows has shape"):
        model.reset_state(state, torch.tensor([True]))
    other = BUILDERS["membart" if family == "decoder" else "decoder"]().init_state(3)
    with pytest.raises(ValueError, match="mechanism layout"):
        model.check_state(other, 3)
    full = model.gather_full_state_dict()
    twin = BUILDERS[family]()
    twin.load_full_state_dict(full)
    assert all(torch.equal(full[k], v) for k, v in twin.gather_full_state_dict().items())
    assert model.flops(2, 4) > 0
    assert sum(len(list(m.parameters())) for m, _ in model.sharding_units()) > 0


def test_membart_state_without_its_slots_is_refused():
    model = _membart()
    bare = MemoryState("membart", 0, {"other": torch.zeros(2, 1)}, {"other": 0}, {"other": None})
    with pytest.raises(ValueError, match="mechanism layout"):
        model.check_state(bare, 2)


# ------------------------------------------------------------------------------------------- old module paths
MOVED = [("pretrain.model.membart_config", "pretrain.model.membart.config"),
         ("pretrain.model.membart_weights", "pretrain.model.membart.weights"),
         ("pretrain.model.membart_generate", "pretrain.model.membart.generate")]


@pytest.mark.parametrize("old,new", MOVED)
def test_old_module_paths_are_the_new_modules(old, new):
    module = importlib.import_module(new)
    assert importlib.import_module(old) is module
    assert module.__name__ == new and module.__spec__.name == new
    public = [n for n in vars(module) if not n.startswith("_") and not inspect.ismodule(getattr(module, n))]
    for name in public:
        assert registry.load(f"{old}:{name}") is getattr(module, name)


def test_old_membart_module_names_come_from_the_package():
    """``pretrain.model.membart`` was the model's module: every name it defined is still there (first use)."""
    import pretrain.model.membart as package
    from pretrain.model.membart import model
    defined = [n for n, v in vars(model).items() if getattr(v, "__module__", None) == model.__name__
               or n.isupper()]
    assert {"MemBart", "build_membart", "STATE_KEY", "ACTIVATION_FNS", "EncoderOutput"} <= set(defined)
    for name in defined:
        assert getattr(package, name) is getattr(model, name)
    assert registry.load("pretrain.model.membart:build_membart") is build_membart
    assert package.weights is importlib.import_module("pretrain.model.membart.weights")
    with pytest.raises(AttributeError):
        package.no_such_name


def test_pickles_that_name_the_old_paths_load():
    cfg = MemBartConfig(**BART)
    buf = io.BytesIO()
    torch.save({"cfg": cfg}, buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=False)["cfg"] == cfg
    old = pickle.dumps(cfg, protocol=2).replace(b"pretrain.model.membart.config", b"pretrain.model.membart_config")
    assert b"membart_config" in old
    loaded = pickle.loads(old)
    assert type(loaded) is MemBartConfig and loaded == cfg


def test_light_modules_import_without_torch():
    code = ("import sys; import pretrain.model.family, pretrain.model.membart, pretrain.model.membart_config; "
            "from pretrain.model.membart import load_membart_config; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True)
    assert out.stdout.strip() == "False"
