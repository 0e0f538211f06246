"""A memtrain memory LM for Hugging Face ``transformers``: ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` on a directory written by ``pretrain/export_hf.py``.

This file is a template of the memtrain project, copied unchanged into the model directory.  The mathematics is
not written here: the sibling files ``memtrain_model_reference.py`` (the project's ``pretrain/model/reference.py``),
``memtrain_model_mechanisms_<name>_reference.py`` (every mechanism's fp64 reference) and ``memtrain_decoding.py``
(the decoding loop of ``pretrain/generate.py``) are copies of the project's own files, imports rewritten, and the
project's tests hold its trained model equal to them.  Only ``torch`` and ``transformers`` are imported.

The memory is explicit, as in the project (``model(tokens, state) -> (output, new_state)``)::

    out = model(input_ids)                          # a fresh stream (no memory)
    out = model(next_ids, memory=out.memory)        # the next segment, the memory carried

``memory``: None for a fresh stream, else the ``memory`` of the previous call: ``{"layers": [one dict per
layer], <stack-level entries>}`` of fp64 tensors with the batch first (the structure is documented in
``memtrain_model_reference.py``).  Text is meant to be read in segments of the training length
(``config.segment_length``) with the memory carried, as in training; ``generate`` does so.

Computation is in float64 whatever the parameters' dtype (the references are written in fp64); the logits are
returned in the parameters' dtype.  They are log-probabilities (the adaptive softmax's full distribution).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_memtrain import MemTrainConfig
from .memtrain_decoding import generate as decode
from .memtrain_hooks import HOOKS
from .memtrain_model_reference import ReferenceLM


@dataclass
class MemTrainOutput(ModelOutput):
    """``loss``: mean next-token cross-entropy over the segment (with ``labels``; positions 0..N-2 predict
    labels 1..N-1, -100 ignored); ``logits``: [B, N, V] log-probabilities; ``memory``: the memory after the
    segment (pass it to the next call)."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    memory: Optional[Dict[str, Any]] = None


class _Spec:
    """One layer's mixer, as ``pretrain.model.spec.LayerSpec`` (read from config.json)."""

    def __init__(self, d):
        self.index, self.code, self.mechanism, self.variant = d["index"], d["code"], d["mechanism"], d["variant"]
        self.settings = dict(d.get("settings") or {})

    @property
    def uses_memory(self) -> bool:
        return bool(self.settings.get("memory", False))


class _Section:
    """A mechanism's config section: its fields, and its methods the references call as the values they had at
    export (``section_calls``)."""

    def __init__(self, fields, calls):
        self.__dict__.update(fields)
        for name, value in calls.items():
            setattr(self, name, lambda *args, _v=value: tuple(_v) if isinstance(_v, list) else _v)


class _ModelConfig:
    """What the references read of the project's ``ModelConfig``: its fields, ``layer_specs()`` and
    ``absolute_positions()``, from config.json."""

    def __init__(self, config: MemTrainConfig):
        for k, v in config.memtrain.items():
            setattr(self, k, _Section(v, config.section_calls.get(k, {})) if isinstance(v, dict) else v)
        self._specs = [_Spec(d) for d in config.layer_specs]
        self._absolute = config.absolute_positions

    def layer_specs(self) -> List[_Spec]:
        return self._specs

    def absolute_positions(self) -> bool:
        return self._absolute


def _detached(x):
    """``x`` (a memory: dicts and lists of tensors) with every tensor detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x


class _Node(nn.Module):
    """A plain container: the weights keep the project's names (``stack.layers.0.mixer.attn.qkv.weight``)."""


def _child(root: nn.Module, path: List[str]) -> nn.Module:
    for part in path:
        if part not in root._modules:
            root.add_module(part, _Node())
        root = root._modules[part]
    return root


class MemTrainPreTrainedModel(PreTrainedModel):
    config_class = MemTrainConfig
    base_model_prefix = "memtrain"
    _supports_param_buffer_assignment = False

    def _init_weights(self, module):
        """Every tensor comes from model.safetensors: nothing to initialise."""


class _Runner:
    """The project model's interface that ``memtrain_decoding.generate`` drives, over this model."""

    class State:
        def __init__(self, memory, mem_len):
            self.memory, self.mem_len = memory, mem_len

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self, model, mem_len):
        self.model, self.mem_len = model, mem_len

    def init_state(self, batch_size, mem_len=None, device=None):
        return self.State(None, self.mem_len if mem_len is None else mem_len)

    def decode_policy_for(self, mem_len):
        return self.model.decode_policy_for(mem_len)

    def __call__(self, tokens, state, clamp_len=None, return_logits=False):
        out = self.model(tokens, memory=state.memory, mem_len=state.mem_len, clamp_len=clamp_len)
        return self.Out(out.logits), self.State(out.memory, state.mem_len)


class MemTrainForCausalLM(MemTrainPreTrainedModel, GenerationMixin):
    """The decoder-only memory LM (module docstring).  ``generate`` is its own (the project's decoding loop);
    GenerationMixin gives it the generation config that ``from_pretrained`` / ``save_pretrained`` handle."""

    def __init__(self, config: MemTrainConfig):
        super().__init__(config)
        for name, shape in config.weight_shapes.items():
            *path, leaf = name.split(".")
            _child(self, path).register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
        self.model_config = _ModelConfig(config)
        self.post_init()

    # -- the reference ----------------------------------------------------------------------------------------
    def _reference(self) -> ReferenceLM:
        weights = {name: p for name, p in self.named_parameters() if not name.startswith("favor_projection.")}
        favor = {l: self.get_parameter(f"favor_projection.{l}") for l in self.config.favor_layers}
        return ReferenceLM(self.model_config, weights, favor_projections=favor, hooks=HOOKS,
                           stack_memories=self.config.stack_memories)

    def decode_policy_for(self, mem_len: int) -> str:
        """How ``generate`` feeds the model with a memory of ``mem_len`` positions: ``"segment"``, ``"window"`` or
        ``"token"`` (the project's ``MemoryLM.decode_policy_for``, evaluated at export).  ValueError for a memory
        length the model cannot use."""
        policy = self.config.decode_policies.get("0" if mem_len == 0 else "positive")
        if mem_len < 0 or policy is None:
            raise ValueError(f"mem_len {mem_len}: this model cannot run with it (training used "
                             f"{self.config.mem_len})")
        return policy

    def _run(self, input_ids, memory, mem_len, clamp_len, same_length):
        """(float64 log-probabilities [B, N, V], new memory) of one segment; None settings: training's."""
        cfg = self.config.memtrain
        mem_len = cfg["mem_len"] if mem_len is None else mem_len
        self.decode_policy_for(mem_len)            # refuses a memory length the model cannot use
        clamp_len = cfg.get("clamp_len", -1) if clamp_len is None else clamp_len
        clamp_len = -1 if clamp_len is None else clamp_len
        same_length = bool(cfg.get("same_length", False)) if same_length is None else same_length
        _, logprobs, new = self._reference().segment(input_ids, input_ids, memory, mem_len, clamp_len, same_length)
        return logprobs, new

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, memory: Optional[Dict[str, Any]] = None,
                labels: Optional[torch.LongTensor] = None, mem_len: Optional[int] = None,
                clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
                attention_mask: Optional[torch.Tensor] = None, detach_memory: bool = True,
                **kwargs) -> MemTrainOutput:
        """One segment: ``input_ids`` [B, N] int64 after ``memory`` (None: a fresh stream).  ``mem_len``,
        ``clamp_len``, ``same_length``: the evaluation protocol's settings (default: training's).  The returned
        memory is cut from the autograd graph (truncated backprop, the project model's ``detach_state=True``: a
        loop carrying it keeps no graph of earlier segments); ``detach_memory=False`` keeps it in.  Returns
        ``MemTrainOutput``.  ``attention_mask`` must be all ones (no padding: rows are separate streams);
        ValueError otherwise, and for a ``mem_len`` the model cannot use."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padding is not supported (every row is one stream of real tokens)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(torch.long)
        logprobs, new = self._run(input_ids, memory, mem_len, clamp_len, same_length)
        if detach_memory:
            new = _detached(new)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(logprobs[:, :-1].reshape(-1, logprobs.shape[-1]),
                                          labels[:, 1:].reshape(-1).to(torch.long), ignore_index=-100)
        dtype = next(self.parameters()).dtype
        return MemTrainOutput(loss=loss, logits=logprobs.to(dtype), memory=new)

    # -- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 20, do_sample: Optional[bool] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 mem_len: Optional[int] = None, segment_length: Optional[int] = None, clamp_len: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, attention_mask: Optional[torch.Tensor] = None,
                 **unused) -> torch.LongTensor:
        """Continue every row of ``input_ids`` [B, P] by up to ``max_new_tokens`` tokens, exactly as
        ``pretrain/generate.py`` does (the same loop, ``memtrain_decoding.generate``): the memory carried from
        segment to segment of ``segment_length`` (default: training's) as in training, the partial segment
        re-read for every new token (or a sliding window, or one token at a time, by ``decode_policy_for``).
        Greedy unless ``do_sample`` (then ``temperature``, ``top_k``, ``top_p`` as in ``generate.py``, drawn
        from ``generator``; a setting not given comes from the generation config, else temperature 1,
        top_k 0, top_p 1: transformers' defaults; ``generate.py``'s command line has ``--top-p 0.95``); a row
        stops after ``eos_token_id`` (default: the generation config's) and is padded with ``pad_token_id``
        (default: the EOS id, else 0).  Returns [B, P + new] int64.
        ValueError for padding in ``attention_mask``; ``sample_next``'s for bad sampling settings.  Other arguments
        are ignored."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padding is not supported (give rows of real tokens; lengths may differ "
                             "only if generated one call per row)")
        gc = self.generation_config
        do_sample = gc.do_sample if do_sample is None else do_sample
        if temperature is None:         # transformers 5 leaves unset sampling fields None (its default is 1)
            temperature = 1.0 if gc.temperature is None else gc.temperature
        temperature = temperature if do_sample else 0.0
        top_k = (gc.top_k or 0) if top_k is None else top_k
        top_p = (gc.top_p or 1.0) if top_p is None else top_p
        eos = gc.eos_token_id if eos_token_id is None else eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
        runner = _Runner(self, self.config.mem_len if mem_len is None else mem_len)
        rows = []
        for row in input_ids.tolist():
            new = decode(runner, row, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=generator, mem_len=runner.mem_len,
                         segment_len=segment_length or self.config.segment_length, clamp_len=clamp_len, eod_id=eos,
                         device=input_ids.device)
            rows.append(row + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=input_ids.device)
