"""The model families the engine trains, and what differs between them outside the training loop.

The loop (``trainer.py``), the memory slots (``memory_slots.py``) and the evaluation (``evaluation.py``) are the same
for every family; a family says how its model is built and initialised, which streams feed it, how a stream's
micro-batch becomes a ``Batch`` (the model's inputs), how many positions a segment has, and how its weights are
exported:

* ``DecoderFamily``: the decoder-only memory LMs (``ModelConfig``): ordered token streams, ``Batch``;
* ``MemBartFamily``: MemBART (``MemBartConfig``, ``model.arch: membart``): time steps of documents or dialogues
  (``data_tools/seq2seq.py``), one ``Seq2SeqBatch`` rollout of ``train.bptt_segments`` steps per micro-batch with
  MemBART's step weights, per-turn evaluation groups, Hugging Face-format export.

``family_for(cfg)`` picks one from the run configuration.  What the engine calls on the model itself, whatever
its family, is ``pretrain.model.family.ModelFamily``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import torch

from pretrain.config_base import ConfigError
from pretrain.engine.batch import Batch, Seq2SeqBatch, rollout_weights


class DecoderFamily:
    """The decoder-only memory LMs (``pretrain/model/lm.py``)."""
    name = "decoder"

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def segment_len(self) -> int:
        """Positions of one segment of the unroll."""
        return self.cfg.model.tgt_len

    @property
    def mem_len(self) -> int:
        return self.cfg.model.mem_len

    def adopt_vocab(self, data, log: Callable[[str], None]) -> None:
        """The vocabulary size comes from the data (the tokenizer's)."""
        m = self.cfg.model
        if m.vocab_size != data.vocab_size:
            log(f"model.vocab_size {m.vocab_size} -> {data.vocab_size} (from {data.prefixes['train']}.json)")
            m.vocab_size = data.vocab_size

    def check(self) -> None:
        """ConfigError for settings the family cannot serve (checked at start-up)."""

    def build_model(self):
        from pretrain.model import build_model
        return build_model(self.cfg.model)

    def load_init(self, model, path: str) -> None:
        from pretrain.engine.export import load_weights_into
        load_weights_into(model, path)

    def train_stream(self, prefix: str, data, dp_rank: int, dp_size: int, micro: int, accum: int, k: int):
        from data_tools.streams import OrderedStream
        c = self.cfg
        return OrderedStream(prefix, dp_rank=dp_rank, dp_size=dp_size, micro_batch=micro, grad_accum=accum,
                             seq_len=self.segment_len * k, seed=c.train.seed, roll=c.data.roll, align=c.data.align,
                             pad_id=data.pad_id)

    def eval_stream(self, prefix: str, data, dp_rank: int, dp_size: int):
        from data_tools.streams import EvalStream
        c, e = self.cfg, self.cfg.eval
        return EvalStream(prefix, seq_len=e.tgt_len or c.model.tgt_len,
                          num_streams=1 if e.protocol == "carry" else e.micro_batch, dp_rank=dp_rank,
                          dp_size=dp_size, align=c.data.align, pad_id=data.pad_id)

    def make_batch(self, mb: Any, device: torch.device, training: bool = True) -> Batch:
        """The batch of a stream's micro-batch (``training``: for the training loop, else for evaluation)."""
        return Batch.from_micro_batch(mb, device, reset_memory=self.cfg.data.reset_memory)

    def describe(self, k: int) -> str:
        m = self.cfg.model
        return f"segment {m.tgt_len} x {k}, memory {m.mem_len}, attn_type {m.attn_type}"

    def export(self, trainer, out_dir: str) -> Optional[str]:
        from pretrain.engine.export import export_from_engine
        return export_from_engine(trainer, out_dir)


class MemBartFamily(DecoderFamily):
    """MemBART (``pretrain/model/membart/``): one time step per segment, a rollout of ``train.bptt_segments``
    steps per micro-batch, MemBART's loss weights (``seq2seq.loss_weights``), the memory reset at episode starts
    as a model input (``Seq2SeqBatch``)."""
    name = "membart"

    @property
    def segment_len(self) -> int:
        """Positions of one time step: the step's tokens plus BOS and EOS (source and target alike)."""
        return self.cfg.model.max_source_len

    @property
    def mem_len(self) -> int:
        return 0

    def adopt_vocab(self, data, log: Callable[[str], None]) -> None:
        """The model's vocabulary is its own (its special tokens sit where the preset puts them); the data's ids must
        fit below it."""
        m = self.cfg.model
        if data.vocab_size > m.vocab_size:
            raise ConfigError("model.vocab_size", f"{data.prefixes['train']}.json: the data's tokenizer has "
                                                  f"{data.vocab_size} ids, more than the model's {m.vocab_size}")

    def check(self) -> None:
        c = self.cfg
        if c.eval.protocol not in ("train", "carry"):
            raise ConfigError("eval.protocol", f"MemBART evaluates time steps with the memory carried: train or carry, "
                                               f"not {c.eval.protocol!r}")
        if c.model.mask_token_id is None and c.seq2seq.task == "denoising":
            raise ConfigError("model.mask_token_id", "the denoising task needs the <mask> token's id")

    def build_model(self):
        from pretrain.model.membart.model import build_membart
        return build_membart(self.cfg.model)

    def load_init(self, model, path: str) -> None:
        """A Hugging Face BART / MemBART directory or weights file, or an export of this engine (the same format):
        the memory keeps its init when the weights have none (a BART checkpoint).  A directory's config.json must
        agree with the model's config on every field that changes the numerics (``check_hf_config``; ConfigError
        naming the field otherwise)."""
        from pretrain.model.membart.weights import check_hf_config, load_hf_weights, read_state_dict, weights_file
        check_hf_config(path, model.cfg)
        sd = read_state_dict(path)
        bart_into_membart = model.num_slots > 0 and not any("memory_bias" in k for k in sd)
        load_hf_weights(model, sd, strict=not bart_into_membart, source=weights_file(path))

    def _streams_kw(self, data) -> Dict[str, Any]:
        from data_tools.seq2seq import NoiseConfig, Specials
        m, s = self.cfg.model, self.cfg.seq2seq
        noise = None
        if s.task == "denoising":
            noise = NoiseConfig(mask_id=m.mask_token_id, mask_ratio=s.mask_ratio, poisson_lambda=s.poisson_lambda,
                                random_ratio=s.random_ratio, random_low=0, random_high=data.vocab_size,
                                permute_sentences=s.permute_sentences, sentence_end_ids=tuple(s.sentence_end_ids))
        return dict(task=s.task, step_len=m.tgt_len, noise=noise, history_turns=s.history_turns,
                    specials=Specials(bos=m.bos_token_id, eos=m.eos_token_id, pad=m.pad_token_id),
                    vocab_size=m.vocab_size)

    def train_stream(self, prefix, data, dp_rank, dp_size, micro, accum, k):
        from data_tools.seq2seq import Seq2SeqStream
        return Seq2SeqStream(prefix, dp_rank=dp_rank, dp_size=dp_size, micro_batch=micro, grad_accum=accum,
                             seed=self.cfg.train.seed, horizon=k, **self._streams_kw(data))

    def eval_stream(self, prefix, data, dp_rank, dp_size):
        from data_tools.seq2seq import Seq2SeqEvalStream
        e = self.cfg.eval
        return Seq2SeqEvalStream(prefix, num_streams=1 if e.protocol == "carry" else e.micro_batch, dp_rank=dp_rank,
                                 dp_size=dp_size, seed=self.cfg.train.seed, **self._streams_kw(data))

    def make_batch(self, mb: Any, device: torch.device, training: bool = True) -> Seq2SeqBatch:
        s = self.cfg.seq2seq
        weights = rollout_weights(mb.horizon, s.loss_weights) if training else None
        return Seq2SeqBatch.from_micro_batch(mb, device, step_weights=weights, reset_every_step=s.reset_every_step)

    def describe(self, k: int) -> str:
        m = self.cfg.model
        return (f"MemBART {m.encoder_layers}+{m.decoder_layers} layers, {m.num_slots} memory slots, time steps of "
                f"{m.tgt_len} tokens x rollout {k} ({self.cfg.seq2seq.task}, {self.cfg.seq2seq.loss_weights} weights)")

    def export(self, trainer, out_dir: str) -> Optional[str]:
        """The fp32 weights in Hugging Face / MemBART format (``config.json`` + ``model.safetensors``, loadable with
        ``membart.weights.load_pretrained``) plus ``export.json`` and the tokenizer."""
        import json
        from data_tools.cli import staged_dir
        from pretrain.engine.export import _fp32_local
        from pretrain.model.membart.model import build_membart
        from pretrain.model.membart.weights import save_pretrained
        from data_tools.tokenization import load_tokenizer
        local = _fp32_local(trainer.engine, trainer.model)
        twin = build_membart(self.cfg.model).float()
        params = dict(twin.named_parameters())
        for name, t in local.items():
            params[name].data.copy_(t.to(params[name].dtype))
        tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
        save_pretrained(twin, tmp, write=trainer.rank == 0)    # a collective (tensor-parallel gather)
        if trainer.rank != 0:
            return None
        with staged_dir(tmp, out_dir):
            tok = load_tokenizer(trainer.data.prefixes["train"])
            meta = {"step": trainer.step, "source": os.path.abspath(trainer.run_dir) if trainer.run_dir else None,
                    "metric": trainer.data.metric, "data": trainer.data.prefixes, "arch": "membart",
                    "tokenizer": tok.save(os.path.join(tmp, "tokenizer"))}
            with open(os.path.join(tmp, "export.json"), "w") as f:
                json.dump(meta, f, indent=2)
        return out_dir


def family_for(cfg) -> DecoderFamily:
    """The family of a run configuration (by its model config's class)."""
    from pretrain.model.membart.config import MemBartConfig
    return MemBartFamily(cfg) if isinstance(cfg.model, MemBartConfig) else DecoderFamily(cfg)
