"""Shared test settings (CPU DeepSpeed, offline wandb, JIT extensions cached inside the checkout) and the fixtures
and helpers several test files use: the single-process parallel state, the copy task's data, spawned TP = 2 workers."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_ext"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def shared_path(*parts, why=None):
    """A file under ../shared/data, or skip the test with the reason (a user's clone has no ../shared); ``why``
    says what the file is and why the repository does not ship it (corpora/README.md lists what it ships)."""
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"{p} not present ({why or 'reference data lives outside the repository'})")
    return p


def stacked(state, name):
    """State entry ``name`` of every layer that has one (``layers.<i>.<name>``), stacked along a new dim 0."""
    keys = sorted((k for k in state.keys() if k.startswith("layers.") and k.split(".", 2)[2] == name),
                  key=lambda k: int(k.split(".")[1]))
    return torch.stack([state[k] for k in keys])


def free_port() -> int:
    """A rendezvous port for processes a test starts (``pretrain.engine.dist.free_port``: outside the ephemeral
    range, never the same twice in this process)."""
    from pretrain.engine.dist import free_port as pick
    return pick()


@pytest.fixture(scope="module")
def tp1():
    """torch.distributed and megatron-core's parallel state for one process (tensor-parallel size 1); a module
    that builds models asks for it with ``pytestmark = pytest.mark.usefixtures("tp1")``.  Setting it up again is a
    no-op, so the generators are seeded by the first module that does."""
    from pretrain.model import parallel
    parallel.initialize(1)


def copy_task(prefix, train_size: int, eval_size: int, seed: int = 3) -> str:
    """Write the synthetic copy task (a sequence of 8 symbols to repeat, every example padded to a multiple of 8
    tokens, the segment length of the engine tests) with ``data_tools/synthetic.py``: ``train_size`` training and
    ``eval_size`` validation and test examples at ``<prefix>_{train,valid,test}``.  Returns ``prefix`` as a string;
    raises CalledProcessError if the tool fails."""
    prefix = str(prefix)
    subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "synthetic.py"), "copy", "--length", "8",
                    "--segment-multiple", "8", "--train-size", str(train_size), "--valid-size", str(eval_size),
                    "--test-size", str(eval_size), "--seed", str(seed), "--output-prefix", prefix],
                   check=True, capture_output=True, timeout=120)
    return prefix


def spawn_tp2(worker, args, timeout: float):
    """Run ``worker(rank, *args)`` in 2 spawned processes and wait for both; after ``timeout`` seconds kill them and
    fail the test.  A worker's exception is raised here (torch.multiprocessing's ProcessRaisedException)."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("TP = 2 workers timed out")


def write_byte_data(prefix, data: bytes, eod_first: bool = False) -> str:
    """A one-document byte-level dataset at ``prefix`` (``.bin``/``.idx`` and its metadata): the bytes of ``data``,
    after an end-of-document id (256; the tokenizer then has one) with ``eod_first``.  Returns ``prefix``."""
    import numpy as np

    from data_tools.indexed import IndexedDatasetWriter
    from data_tools.metadata import write_metadata
    from data_tools.tokenization import ByteTokenizer
    prefix = str(prefix)
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    if eod_first:
        tokens = np.concatenate([np.array([256], np.uint16), tokens])
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(tokens, np.array([len(tokens)]))
    tok = ByteTokenizer(eod=eod_first)
    write_metadata(prefix, {"format": "MMIDIDX", "dtype": "uint16", "vocab_size": tok.vocab_size,
                            "eod_id": tok.eod_id, "pad_id": None, "tokenizer": tok.save(prefix), "documents": 1,
                            "sequences": 1, "tokens": len(tokens), "producer": "test"})
    return prefix


def write_model_export(out, model, data_prefix, **meta) -> str:
    """An export directory of ``model`` (``pretrain.engine.export.write_export``: its consolidated weights, config
    and the tokenizer of the data at ``data_prefix``), as training writes one.  Returns its path."""
    import json as _json

    from pretrain.config_base import to_dict
    from pretrain.engine.export import write_export
    info = _json.load(open(data_prefix + ".json")) if os.path.exists(data_prefix + ".json") else {}
    meta = {"step": 0, "source": None, "metric": "bpc", "data": {"train": data_prefix, "test": data_prefix},
            "vocab_size": model.cfg.vocab_size, "eod_id": info.get("eod_id"), "pad_id": info.get("pad_id"),
            "eval": {}, **meta}
    return write_export(str(out), model.gather_full_state_dict(), to_dict(model.cfg), data_prefix, meta)
