"""MemBART through pretrain/train.py: rollouts of time steps with MemBART's loss weights, exact resume in two
data-parallel processes under ZeRO-2 (losses and memory states bit for bit), tensor parallelism 2 = 1 through the
engine, dialogue fine-tuning with per-turn evaluation, the Hugging Face-format export, and the configuration's
errors."""
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_engine_train import ENV, PY, driver

MEMBART = ["--config", "membart_tiny", "--model.d_model", "32", "--model.encoder_ffn_dim", "64",
           "--model.decoder_ffn_dim", "64", "--model.num_slots", "4", "--model.tgt_len", "16",
           "--model.dropout", "0.0", "--train.bptt_segments", "3", "--micro-batch-size", "2",
           "--train.grad_accum", "2", "--log.progress", "false", "--log.interval", "1",
           "--checkpoint.export", "false", "--eval.final_splits", "[]", "--log.tensorboard", "false"]


def _corpus(path, docs=160, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while dogs ran over hills and rivers under bright skies".split()
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(8, 90))))}) + "\n")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("membart_text")
    _corpus(out / "docs.jsonl")
    prefix = str(out / "docs")
    subprocess.run([PY, os.path.join(ROOT, "data_tools", "preprocess.py"), "--input", str(out / "docs.jsonl"),
                    "--tokenizer", "bytes", "--append-eod", "--split", "90,10", "--output-prefix", prefix,
                    "--no-progress"], check=True, capture_output=True, timeout=120, env=ENV)
    return prefix


def test_rollout_weights_and_the_weighted_loss():
    from pretrain.engine.batch import Seq2SeqBatch, rollout_weights
    w = rollout_weights(3)
    assert w == pytest.approx([2 / 14, 4 / 14, 8 / 14]) and rollout_weights(2, "uniform") == [0.5, 0.5]
    assert rollout_weights(4, "tokens") is None
    with pytest.raises(ValueError, match="unknown loss weighting"):
        rollout_weights(2, "linear")
    # the engine's sum(segment masked_nll_sum) / num_scored is sum_t w_t mean_t
    B, W, H = 2, 5, 3
    mask = torch.ones(B, H * W)
    mask[0, 3:5] = 0
    mask[1, 9:15] = 0
    batch = Seq2SeqBatch(tokens=torch.zeros(B, H * W, dtype=torch.long), targets=torch.zeros(B, H * W, dtype=torch.long),
                         loss_mask=mask, reset=torch.zeros(B, dtype=torch.bool),
                         source_mask=torch.ones(B, H * W, dtype=torch.bool), step_resets=torch.zeros(B, H, dtype=torch.bool),
                         step_in_episode=torch.zeros(B, H, dtype=torch.long), step_weights=w)
    nll = torch.rand(B, H * W)
    got = sum(seg.masked_nll_sum(nll[:, j * W:(j + 1) * W]) for j, seg in enumerate(batch.segments(H)))
    got = got / batch.num_scored()
    means = [(nll[:, j * W:(j + 1) * W] * mask[:, j * W:(j + 1) * W]).sum() / mask[:, j * W:(j + 1) * W].sum()
             for j in range(H)]
    assert float(got) == pytest.approx(float(sum(wj * m for wj, m in zip(w, means))), rel=1e-6)
    with pytest.raises(ValueError, match="train.bptt_segments"):
        batch.segment(0, 2)
    with pytest.raises(ValueError, match="one step at a time"):
        batch.model_inputs()
    seg = batch.segment(1, 3)
    assert set(seg.model_inputs()) == {"tokens", "targets", "attention_mask", "reset"}


def test_weighted_rollout_loss_is_the_same_however_the_rows_are_split():
    """With MemBART's step weights the loss is sum_j w_j * mean_j, mean_j step j's mean NLL over the scored targets
    of the whole global batch: micro-batches (or ranks) normalised over the global counts (``loss_counts`` summed,
    ``normalize_over``) add up, through the engine's sum / C, to the same loss for every split of the rows, with a
    micro-batch that scores nothing at step 0 and one that scores nothing at all.  Each part normalised over its
    own counts (as before) gives another loss."""
    import dataclasses
    from pretrain.engine.batch import Seq2SeqBatch, rollout_weights
    B, W, H = 4, 5, 3
    w = rollout_weights(H)
    mask = torch.ones(B, H * W)
    mask[0, :W] = 0             # rows 0 and 1: nothing scored at step 0
    mask[1, :W + 2] = 0
    mask[2, 2 * W + 1:] = 0
    mask[3] = 0                 # row 3: nothing scored
    nll = torch.rand(B, H * W, generator=torch.Generator().manual_seed(0)) * 4

    def part(rows):
        z = lambda dt: torch.zeros(len(rows), H * W, dtype=dt)  # noqa: E731
        return Seq2SeqBatch(tokens=z(torch.long), targets=z(torch.long), loss_mask=mask[rows], reset=torch.zeros(
            len(rows), dtype=torch.bool), source_mask=z(torch.bool) | True, step_resets=torch.zeros(
            len(rows), H, dtype=torch.bool), step_in_episode=torch.zeros(len(rows), H, dtype=torch.long),
            step_weights=w)

    def summed(parts, global_counts):
        counts = torch.stack([p.loss_counts() for _, p in parts]).sum(0).tolist()
        total = 0.0
        for rows, p in parts:
            q = p.normalize_over(counts) if global_counts else p
            s = sum(float(seg.masked_nll_sum(nll[rows][:, j * W:(j + 1) * W]))
                    for j, seg in enumerate(q.segments(H)))
            total += s / sum(counts) if global_counts else s / p.num_scored() / len(parts)
        return total

    cols = [slice(j * W, (j + 1) * W) for j in range(H)]
    ref = float(sum(wj * (nll[:, c] * mask[:, c]).sum() / mask[:, c].sum() for wj, c in zip(w, cols)))
    splits = [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0], [1], [2], [3]]]
    for split in splits:
        parts = [(rows, part(rows)) for rows in split]
        assert part(split[0]).loss_counts().shape == (H,)
        assert summed(parts, True) == pytest.approx(ref, rel=1e-6), split
    # normalised per part, the loss depends on the split
    parts = [(rows, part(rows)) for rows in [[0, 1], [2, 3]]]
    assert abs(summed(parts, False) - ref) > 1e-2 * ref
    # without step weights: one group, every scored target alike, nothing to normalise
    plain = dataclasses.replace(part([0, 1, 2, 3]), step_weights=None)
    assert plain.loss_counts().tolist() == [float(mask.sum())] and plain.normalize_over([1.0]) is plain


def _rollout(k=3, seed=0):
    """A Seq2SeqBatch rollout of k steps from a small document corpus written here (a reset inside the rollout)."""
    import tempfile
    from data_tools.indexed import IndexedDatasetWriter
    from data_tools.seq2seq import NoiseConfig, Seq2SeqStream, Specials
    from pretrain.engine.batch import Seq2SeqBatch, rollout_weights
    d = tempfile.mkdtemp()
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(os.path.join(d, "c"), np.uint16) as w:
        for L in (20, 7, 33, 12, 25, 9):
            w.add_document(rng.integers(3, 200, L).astype(np.uint16))
    st = Seq2SeqStream(os.path.join(d, "c"), "denoising", 8, Specials(bos=258, eos=260, pad=259),
                       NoiseConfig(mask_id=261), micro_batch=2, horizon=k, seed=seed)
    mb = next(m for m in (st.get(i) for i in range(st.steps_per_epoch)) if m.step_resets[:, 1:].any())
    return Seq2SeqBatch.from_micro_batch(mb, torch.device("cpu"), step_weights=rollout_weights(k))


def test_membart_memory_replay_backprop_equals_bptt():
    """train.mrbp for MemBART: the engine's memory replay (forward without a graph, then one step at a time, last
    first, the memory's gradient carried back) gives the gradients of plain BPTT through the rollout, with
    MemBART's step weights, a reset inside the rollout and dropout replayed, and the same final memory."""
    from pretrain.engine.memory_slots import MemorySlots
    from pretrain.model import parallel
    from pretrain.model.membart import build_membart
    from pretrain.model.membart_config import load_membart_config
    from test_engine_components import unrolled_gradients
    parallel.initialize(1)
    k = 3
    cfg = load_membart_config("membart_tiny", {"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                                               "num_slots": 4, "tgt_len": 8, "dropout": 0.2,
                                               "attention_dropout": 0.1})
    torch.manual_seed(0)
    model = build_membart(cfg).double().train()
    batch = _rollout(k)
    count = batch.num_scored()

    def loss_fn(seg, out):
        return seg.masked_nll_sum(out.nll) / count

    results = []
    for mode in ("bptt", "mrbp"):
        slots = MemorySlots(model, 1, 2, torch.device("cpu"), bptt_segments=k)
        slots.states[0] = slots.states[0].replace(**{"slots.mem": torch.randn(2, 4, 32, dtype=torch.float64,
                                                                               generator=torch.Generator().manual_seed(5))})
        grads = unrolled_gradients(slots, batch, model, loss_fn, mode)
        slots.commit(0)
        results.append((grads, slots[0]))
    (g1, s1), (g2, s2) = results
    assert s1.equal(s2, atol=1e-12)
    assert model.encoder.memory_bias.grad is not None and model.encoder.memory_bias.grad.abs().sum() > 0
    for a, c in zip(g1, g2):
        assert (a is None) == (c is None) and (a is None or torch.allclose(a, c, atol=1e-10, rtol=1e-8))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_membart_exact_resume_two_processes_zero2(text_data, tmp_path):
    res = driver(tmp_path, 2, "resume", "2", MEMBART + ["--data-path", text_data, "--train-iters", "6"],
                 timeout=540)
    for rank, r in enumerate(res):
        d = r["2"]
        full, stopped, resumed = d["full"], d["stopped"], d["resumed"]
        assert full["steps"] == [1, 2, 3, 4, 5, 6] and all(map(math.isfinite, full["losses"]))
        assert stopped["losses"] == full["losses"][:3] and resumed["steps"] == [4, 5, 6]
        assert resumed["losses"] == full["losses"][3:], (rank, resumed["losses"], full["losses"])
        assert resumed["memory"] == full["memory"] and any(v != 0 for m in full["memory"] for v in m.values())
    assert res[0]["2"]["full"]["stripes"] != res[1]["2"]["full"]["stripes"], "ranks must read different stripes"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_membart_engine_tensor_parallel_2_equals_1(text_data, tmp_path):
    args = MEMBART + ["--data-path", text_data, "--train-iters", "2", "--train.grad_accum", "1"]
    one = driver(tmp_path / "tp1", 1, "losses", "0", args)[0]["0"]["run"]
    two = driver(tmp_path / "tp2", 2, "losses", "0", args + ["--tensor-model-parallel-size", "2"])
    for r in two:
        run = r["0"]["run"]
        assert run["tp_size"] == 2 and run["dp_size"] == 1
        assert all(abs(a - b) < 1e-5 for a, b in zip(run["losses"], one["losses"])), (run["losses"], one["losses"])


def test_dialogue_fine_tuning_per_turn_eval_and_export(tmp_path):
    rows = [{"turns": [f"turn {i} of dialogue {d} says {'abc' * (i + 1)}" for i in range(2 + d % 4)]}
            for d in range(24)]
    for name, part in (("train", rows[:20]), ("valid", rows[20:])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n")
    prefix = str(tmp_path / "dlg")
    r = subprocess.run([PY, os.path.join(ROOT, "data_tools", "dialogue.py"), "--input",
                        f"train={tmp_path / 'train.jsonl'}", f"valid={tmp_path / 'valid.jsonl'}", "--tokenizer",
                        "bytes", "--output-prefix", prefix], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    args = MEMBART + ["--data-path", prefix, "--train-iters", "2", "--save", str(run),
                                                  "--seq2seq.task", "dialogue", "--train.bptt_segments", "2",
                                                  "--checkpoint.export", "true", "--eval.final_splits", "[valid]",
                                                  "--train.grad_accum", "1", "--model.tgt_len", "48"]
    r = subprocess.run([PY, os.path.join(ROOT, "pretrain", "train.py")] + args, capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    ev = [x for x in recs if x.get("kind") == "eval"][-1]
    turns = ev["per_step"]
    assert set(turns) >= {"0", "1"} and sum(t["tokens"] for t in turns.values()) == ev["tokens"]
    assert all(math.isfinite(t["loss"]) for t in turns.values())
    assert {"config.json", "export.json", "model.safetensors"} <= set(os.listdir(run / "export"))
    from pretrain.model import parallel
    from pretrain.model.membart_weights import load_pretrained
    parallel.initialize(1)
    model = load_pretrained(str(run / "export"))
    assert model.cfg.num_slots == 4 and model.cfg.tgt_len == 48


def test_train_config_errors(text_data):
    """The MemBART run configuration: its sections on the command line, and the errors named by field (checked in
    process: what train.py reports with exit status 2 before it writes anything)."""
    from pretrain.config_base import ConfigError
    from pretrain.engine.data import load_data_info
    from pretrain.engine.family import MemBartFamily, family_for
    from pretrain.engine.run_config import Seq2SeqRunConfig, parse_args
    args = MEMBART + ["--data-path", text_data]
    cfg, _ = parse_args(args + ["--seq2seq.mask_ratio", "0.4", "--train.mrbp", "true"])
    assert cfg.train.mrbp
    assert isinstance(cfg, Seq2SeqRunConfig) and cfg.seq2seq.mask_ratio == 0.4 and cfg.model.num_slots == 4
    assert isinstance(family_for(cfg), MemBartFamily) and family_for(cfg).segment_len == 18
    with pytest.raises(ConfigError, match="model.n_layer"):    # a decoder preset's fields are not MemBART's
        parse_args(["--config", "xl_tiny", "--model.arch", "membart"])
    for extra, field in ((["--seq2seq.loss_weights", "linear"], "seq2seq.loss_weights"),
                         (["--model.n_layer", "3"], "model.n_layer"),
                         (["--model.pad_token_id", "300"], "model.pad_token_id")):
        with pytest.raises((ConfigError, SystemExit)) as e:
            parse_args(args + extra)
        assert e.type is SystemExit or field in str(e.value), (field, e.value)
    cfg, _ = parse_args(args + ["--eval.protocol", "xl"])
    with pytest.raises(ConfigError, match="eval.protocol"):
        family_for(cfg).check()
    small = ["--model.vocab_size", "256", "--model.pad_token_id", "1", "--model.bos_token_id", "0",
             "--model.eos_token_id", "2", "--model.decoder_start_token_id", "2", "--model.forced_eos_token_id", "2",
             "--model.mask_token_id", "3"]
    with pytest.raises(ConfigError, match="257 ids, more than the model's 256"):   # at parse time, with the data
        parse_args(args + small)
    cfg, _ = parse_args(MEMBART + small)                                           # and by the family at start-up
    with pytest.raises(ConfigError, match="257 ids, more than the model's 256"):
        family_for(cfg).adopt_vocab(load_data_info(text_data), print)
