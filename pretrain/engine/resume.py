"""Which checkpoint a run resumes from, and whether this run can use it: decided before anything is loaded.

``select_checkpoint`` picks the checkpoint: the newest complete and intact one (never an older one while a newer
complete one is intact; ``latest`` only explains, and the log says why a newer one was passed over).  Intact means every file has the size recorded when it was written and this
rank's per-rank file (or the files it needs) can be read; the ranks agree, so one corrupt file anywhere makes
every rank move on to the previous checkpoint.

``compare`` holds the checkpoint's ``meta.json`` against this run: what must match (the model's architecture
and parameter shapes), what a resume maps (data-parallel and tensor-parallel sizes, ZeRO stage, precision:
the weights and optimizer state are resharded; see ``reshard.py``), and what the data stream maps by
``data.resume_policy`` (micro-batch, accumulation, segment length, data-parallel size).  A change that cannot
be followed is a one-line ``ConfigError`` naming the setting, both values and the option that resolves it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from pretrain.config_base import ConfigError
from pretrain.engine import checkpoint as ckpt

# Model settings a resumed run may change: they do not change the parameters (regularisation, lengths,
# initialisation of a model that is loaded anyway, recomputation).  Every other model field is architecture.
RUNTIME_MODEL_FIELDS = frozenset({
    "dropout", "dropatt", "tgt_len", "mem_len", "clamp_len", "same_length", "init", "init_std", "init_range",
    "proj_init_std", "seed", "checkpoint_activations"})

PRECISION_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
                   "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclasses.dataclass
class RunLayout:
    """What a checkpoint records about the run that wrote it, and what a resume compares (``meta.json``)."""
    dp_size: int
    tp_size: int
    zero_stage: int
    precision: str          # fp32 | bf16 | fp16
    micro_batch: int
    grad_accum: int
    segment_len: int        # model.tgt_len
    bptt_segments: int

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "RunLayout":
        """The layout in ``meta.json``; fields a version-1 checkpoint lacks are None."""
        prec = meta.get("precision") or PRECISION_NAMES.get(str(meta.get("dtype")))
        return cls(dp_size=meta.get("dp_size"), tp_size=meta.get("tp_size"), zero_stage=meta.get("zero_stage"),
                   precision=prec, micro_batch=meta.get("micro_batch"), grad_accum=meta.get("grad_accum"),
                   segment_len=meta.get("segment_len"), bptt_segments=meta.get("bptt_segments"))

    def describe_engine(self) -> str:
        return f"ZeRO-{self.zero_stage} {self.precision}"


@dataclasses.dataclass
class ResumePlan:
    """The checkpoint chosen and what loading it takes.

    ``rank_parts``: this rank's saved per-rank parts when the layout lets it use them directly, else None.
    ``tp_parts``: with a changed tensor-parallel size and an unchanged data-parallel size, the parts of every
    tensor-parallel rank of this data-parallel rank in the saving run (memory states are joined and re-split).
    ``stream_parts``: a saved stream state (every rank's is the same position) for a changed layout.
    ``changes``: name -> (saved, now) for every setting that differs; ``notes``: what selection skipped and why.
    """
    load_dir: str
    tag: str
    meta: Dict[str, Any]
    saved: RunLayout
    rank_parts: Optional[Dict[str, Any]] = None
    tp_parts: Optional[List[Dict[str, Any]]] = None
    stream_parts: Optional[Dict[str, Any]] = None
    changes: Dict[str, Tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def where(self) -> str:
        return os.path.join(self.load_dir, self.tag)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def changed(self, *names: str) -> bool:
        return any(n in self.changes for n in names)


def resolve_load_dir(load: Optional[str], save: Optional[str]) -> Optional[str]:
    """The directory to resume from: ``--load`` (which must hold a checkpoint), else ``--save`` when it holds
    one, else None (a fresh run)."""
    if load is not None:
        if not ckpt.has_checkpoint(load):
            raise ConfigError("checkpoint.load", f"{load}: no checkpoint to resume from (no 'latest' file and no "
                                                 f"complete iter_* directory)")
        return load
    if save and ckpt.has_checkpoint(save):
        return save
    return None


def rank_files_needed(saved: RunLayout, dp_rank: int, tp_rank: int, dp_size: int, tp_size: int
                      ) -> List[Tuple[int, int]]:
    """The per-rank files (dp, tp) of the saving run that this rank reads."""
    if saved.dp_size in (None, dp_size) and saved.tp_size in (None, tp_size):
        return [(dp_rank, tp_rank)]
    if saved.dp_size == dp_size:  # tensor-parallel size changed: every head shard of this data-parallel rank
        return [(dp_rank, t) for t in range(saved.tp_size)]
    return [(0, 0)]  # data-parallel size changed: the stream position (the same in every rank's file)


def select_checkpoint(load_dir: str, manager: ckpt.CheckpointManager, dp_rank: int, tp_rank: int, dp_size: int,
                      tp_size: int, agree: Callable[[bool], bool], log: Callable[[str], None]) -> ResumePlan:
    """The newest usable checkpoint in ``load_dir`` (collective: every rank calls it; ``agree(flag)`` is True on
    every rank when ``flag`` is on any).  Logs each checkpoint passed over and why; ConfigError when none is
    usable."""
    tags, notes = ckpt.candidates(load_dir)
    rejected = list(notes)
    for tag in tags:
        problem = None
        meta = None
        try:
            meta = ckpt.read_meta(load_dir, tag)
            problem = ckpt.verify(load_dir, tag, meta)
        except ckpt.CheckpointError as e:
            problem = str(e)
        parts: Dict[Tuple[int, int], Dict[str, Any]] = {}
        if problem is None:
            saved = RunLayout.from_meta(meta)
            try:
                for d, t in rank_files_needed(saved, dp_rank, tp_rank, dp_size, tp_size):
                    parts[(d, t)] = manager.load_rank_state(load_dir, tag, d, t)
            except ckpt.CheckpointError as e:
                problem = str(e)
        if agree(problem is not None):
            rejected.append(f"{tag}: {problem or 'a per-rank file another rank reads is unreadable'}")
            continue
        plan = ResumePlan(load_dir, tag, meta, saved, notes=rejected)
        if len(parts) == 1 and (dp_rank, tp_rank) in parts and saved.dp_size in (None, dp_size) \
                and saved.tp_size in (None, tp_size):
            plan.rank_parts = parts[(dp_rank, tp_rank)]
        elif saved.dp_size == dp_size:
            plan.tp_parts = [parts[(dp_rank, t)] for t in range(saved.tp_size)]
            plan.stream_parts = plan.tp_parts[0].get("stream")
        else:
            plan.stream_parts = parts[(0, 0)].get("stream")
        if rejected:
            behind = all(r.endswith(f"({ckpt.LATEST_BEHIND})") for r in rejected)
            log(f"resume: {'; '.join(rejected)}; {'resuming from' if behind else 'falling back to'} {tag}, the newest "
                f"complete checkpoint")
        return plan
    if not tags and not rejected:
        raise ConfigError("checkpoint.load", f"{load_dir}: no complete checkpoint to resume from")
    raise ConfigError("checkpoint.load", f"no usable checkpoint in {load_dir}: {'; '.join(rejected)} (restore the "
                                         f"files, or resume from a copy with --load DIR)")


# ---------------------------------------------------------------------------------------------------- compare
def with_defaults(saved: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """``saved`` with every field it lacks taken from ``defaults``, in nested sections too: a checkpoint written
    before a field or a mechanism's section existed holds a model with that field at its default (a new field's
    default keeps the behaviour of the code that had none)."""
    out = dict(defaults)
    for k, v in saved.items():
        d = defaults.get(k)
        out[k] = with_defaults(v, d) if isinstance(v, Mapping) and isinstance(d, Mapping) else v
    return out


def model_differences(saved: Mapping[str, Any], now: Mapping[str, Any],
                      defaults: Optional[Mapping[str, Any]] = None) -> List[str]:
    """``model.FIELD saved -> now`` for every architecture field (all but ``RUNTIME_MODEL_FIELDS``) that differs;
    fields ``saved`` lacks are compared at their value in ``defaults`` (the model class's defaults) when given."""
    if defaults is not None:
        saved = with_defaults(saved, defaults)
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in RUNTIME_MODEL_FIELDS or k == "mechanism":
            continue
        if saved.get(k) != now.get(k):
            out.append((k, saved.get(k), now.get(k)))
    return [f"model.{k} {a!r}, this run has {b!r}" for k, a, b in out]


def check_model(plan: ResumePlan, model_cfg: Mapping[str, Any], mechanism: str,
                param_shapes: Mapping[str, List[int]], defaults: Optional[Mapping[str, Any]] = None) -> None:
    """ConfigError when the checkpoint holds another model: its architecture fields or its parameters' full
    shapes differ from this run's (checked before anything is loaded).  ``defaults``: the model class's default
    fields, for a checkpoint written before some of them existed (see ``with_defaults``)."""
    meta = plan.meta
    saved_shapes = meta.get("params")
    saved_cfg = meta.get("model")
    diffs = model_differences(saved_cfg, model_cfg, defaults) if isinstance(saved_cfg, Mapping) else []
    if meta.get("mechanism") not in (None, mechanism):
        diffs.insert(0, f"memory mechanism {meta['mechanism']!r}, this run has {mechanism!r}")
    if isinstance(saved_shapes, Mapping):
        now = {k: list(v) for k, v in param_shapes.items()}
        saved = {k: list(v) for k, v in saved_shapes.items()}
        if now != saved and not diffs:
            names = sorted(set(now) ^ set(saved)) or [k for k in sorted(now) if now[k] != saved.get(k)]
            k = names[0]
            diffs.append(f"parameter {k} of shape {saved.get(k)}, this run has {now.get(k)}")
    if diffs:
        config = os.path.join(plan.load_dir, "config.yaml")
        raise ConfigError("checkpoint.load", f"{plan.where} was saved with {'; '.join(diffs[:3])}"
                                             f"{' (and more)' if len(diffs) > 3 else ''}: resume with the saved model "
                                             f"settings ({config}), or train this model in another --save directory")


def compare_layout(plan: ResumePlan, now: RunLayout) -> Dict[str, Tuple[Any, Any]]:
    """name -> (saved, now) for every layout field that differs (fields a version-1 checkpoint lacks are
    skipped)."""
    changes = {}
    for f in dataclasses.fields(RunLayout):
        a, b = getattr(plan.saved, f.name), getattr(now, f.name)
        if a is not None and a != b:
            changes[f.name] = (a, b)
    plan.changes = changes
    return changes


STREAM_FIELDS = ("dp_size", "micro_batch", "grad_accum", "segment_len", "bptt_segments")
STREAM_WORDS = {"dp_size": "data-parallel size", "micro_batch": "micro-batch", "grad_accum": "gradient accumulation",
                "segment_len": "segment length (model.tgt_len)", "bptt_segments": "train.bptt_segments",
                "tp_size": "tensor-parallel size", "zero_stage": "ZeRO stage", "precision": "precision"}


def describe_changes(changes: Mapping[str, Tuple[Any, Any]], names) -> str:
    """``micro-batch 2 (this run: 4), data-parallel size 2 (this run: 1)``."""
    return ", ".join(f"{STREAM_WORDS[n]} {changes[n][0]} (this run: {changes[n][1]})" for n in names if n in changes)


def check_resumable(plan: ResumePlan, now: RunLayout, resume_policy: str) -> None:
    """ConfigError for a layout change this run cannot follow: a changed stream layout needs a
    ``data.resume_policy`` other than ``error``."""
    changes = compare_layout(plan, now)
    stream = [n for n in STREAM_FIELDS if n in changes]
    if stream and resume_policy == "error":
        raise ConfigError(
            "data.resume_policy", f"{plan.where} was written with {describe_changes(changes, stream)}: the data "
                                  f"stream layout changes; pass --data.resume_policy restart_epoch (start epoch "
                                  f"{_epoch_of(plan)} over) or proportional (continue it at the same fraction); "
                                  f"either starts every memory state afresh")


def _epoch_of(plan: ResumePlan) -> str:
    st = plan.stream_parts or (plan.rank_parts or {}).get("stream") or {}
    return str(st.get("epoch", "?"))


RESHARD_FIELDS = ("dp_size", "tp_size", "zero_stage", "precision")


def needs_reshard(plan: ResumePlan) -> bool:
    """Whether DeepSpeed's files of the checkpoint cannot be loaded as they are: the data-parallel size (under
    ZeRO 1-3, whose optimizer files are per data-parallel rank), the tensor-parallel size, the ZeRO stage or the
    precision changed.  Under ZeRO-0 a changed data-parallel size alone needs nothing (its files hold full
    tensors), but the layout-free path serves it as well and is the one path tested for every change."""
    return plan.changed(*RESHARD_FIELDS)


def check_reshardable(plan: ResumePlan) -> None:
    """ConfigError when the checkpoint's layout changed but it predates the records resharding needs."""
    if not needs_reshard(plan):
        return
    if plan.saved.zero_stage is None or plan.saved.precision is None:
        raise ConfigError("checkpoint.load", f"{plan.where} was written by an older version that did not record its "
                                             f"ZeRO stage and precision, so it cannot be resharded for "
                                             f"{describe_changes(plan.changes, RESHARD_FIELDS)}: resume it with its "
                                             f"own layout")


def describe_layout_change(plan: ResumePlan) -> str:
    """``data-parallel size 2 (this run: 1), ZeRO stage 1 (this run: 3)`` for the fields resharding follows."""
    return describe_changes(plan.changes, RESHARD_FIELDS)
