"""The configuration of a memtrain memory LM exported for Hugging Face ``transformers`` (``pretrain/export_hf.py``).

This file is a template of the memtrain project: the exporter copies it, unchanged, into the model directory,
where ``AutoConfig.from_pretrained(DIR, trust_remote_code=True)`` loads it.  It imports only ``transformers``.

Fields (besides ``PretrainedConfig``'s): ``memtrain`` (the project's model config, ``model.yaml`` as a mapping),
``layer_specs`` (every layer's mixer: index, attn_type code, mechanism, variant, settings), ``stack_memories``
(the stack-level memories on, in order), ``absolute_positions``, ``section_calls`` (the values of the config
sections' methods the references call, evaluated at export), ``decode_policies`` (how ``generate`` feeds the
model: with no memory and with one), ``weight_shapes`` (name -> shape of every tensor of ``model.safetensors``),
``favor_layers`` (layers with a fixed FAVOR+ projection), ``eval`` (the run's evaluation settings).
"""
from transformers import PretrainedConfig


class MemTrainConfig(PretrainedConfig):
    model_type = "memtrain"

    def __init__(self, memtrain=None, layer_specs=None, stack_memories=None, absolute_positions=False,
                 section_calls=None, decode_policies=None, weight_shapes=None, favor_layers=None, eval=None,
                 **kwargs):
        self.memtrain = dict(memtrain or {})
        self.layer_specs = list(layer_specs or [])
        self.stack_memories = list(stack_memories or [])
        self.absolute_positions = bool(absolute_positions)
        self.section_calls = dict(section_calls or {})
        self.decode_policies = dict(decode_policies or {})
        self.weight_shapes = dict(weight_shapes or {})
        self.favor_layers = list(favor_layers or [])
        self.eval = dict(eval or {})
        kwargs.setdefault("vocab_size", self.memtrain.get("vocab_size"))
        super().__init__(**kwargs)

    @property
    def segment_length(self) -> int:
        """The training segment length (``tgt_len``): the length ``generate`` and the evaluation read text in."""
        return int(self.memtrain.get("tgt_len", 0))

    @property
    def mem_len(self) -> int:
        """The training memory length (positions the XL-style caches keep)."""
        return int(self.memtrain.get("mem_len", 0))
