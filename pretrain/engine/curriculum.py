"""A curriculum over the training data and the BPTT depth (``train.curriculum``): stages trained one after another.

The Recurrent Memory Transformer and BABILong train recurrent memory on examples of 1, 2, 4, ... segments, moving
on when the shorter task is learnt.  A stage says what it trains on (``data``: a dataset prefix, e.g. the synthetic
task made with shorter examples; the run's training split by default), how many segments a micro-batch unrolls
(``bptt_segments``) and when it ends: after ``steps`` optimizer steps, or when the mean training loss over its
last ``window`` steps (finite steps that score targets) falls below ``loss`` (at the latest after ``max_steps``).
The last stage runs to ``train.iters``.

``Curriculum`` holds the resolved stages (each stage's training split opened and checked against the run's
tokenizer at start-up) and the position: the stage, the step it started at and its loss window.  That position
is plain data, saved in the checkpoint's ``meta.json`` (the same on every rank: the step's loss is all-reduced)
and restored before the stage's stream is built; the stream's position within the stage is the checkpoint's
``stream`` part as without a curriculum.  The end condition is checked after every step, before the step's
checkpoint, so a checkpoint written at a stage switch already holds the new stage (its stream at its start, fresh
memory) and a resume from any step continues as the uninterrupted run does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from pretrain.config_base import ConfigError

FORMAT = "memtrain.curriculum/1"


@dataclass
class Stage:
    """A stage of the curriculum, resolved: its training split ``prefix`` with its ``DataInfo``, BPTT depth ``k``,
    end condition, and the segments per example of its data (synthetic tasks; None otherwise)."""
    index: int
    prefix: str
    data: Any                     # DataInfo of the stage's training split
    k: int
    steps: Optional[int]
    loss: Optional[float]
    window: int
    max_steps: Optional[int]
    segments_per_example: Optional[float]

    @property
    def last(self) -> bool:
        return self.steps is None and self.loss is None

    def describe_end(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps"
        if self.loss is not None:
            cap = f", at most {self.max_steps} steps" if self.max_steps is not None else ""
            return f"mean loss of {self.window} steps < {self.loss:g}{cap}"
        return "train.iters"


def segments_per_example(meta: Mapping[str, Any], segment_len: int) -> Optional[float]:
    """A synthetic task's padded example length over the segment length (an int when it divides); None for data
    without fixed-length examples (no ``task`` field in its ``.json``)."""
    task = meta.get("task")
    if not isinstance(task, Mapping) or not isinstance(task.get("padded_len"), int):
        return None
    n = task["padded_len"]
    return n // segment_len if n % segment_len == 0 else n / segment_len


def _fmt_spe(v: Optional[float]) -> str:
    return "n/a" if v is None else (str(v) if isinstance(v, int) else f"{v:.2f}")


def _same_tokenizer(a, b) -> bool:
    from data_tools.tokenization import TokenizerError, tokenizer_fingerprint
    try:
        return tokenizer_fingerprint(a.tokenizer, os.path.dirname(os.path.abspath(a.prefixes["train"]))) == \
            tokenizer_fingerprint(b.tokenizer, os.path.dirname(os.path.abspath(b.prefixes["train"])))
    except (TokenizerError, ValueError):
        return False


def resolve_stages(cfg, run_data, segment_len: int) -> List[Stage]:
    """The stages of ``cfg.train.curriculum`` with their data opened and checked: the prefix exists (``P_train``
    when there is one, else ``P``), every file opens, the vocabulary size and tokenizer are the run's, the token
    ids fit.  ConfigError naming ``train.curriculum[i].data`` otherwise."""
    from pretrain.engine.data import check_token_ids, load_data_info, resolve_splits
    stages = []
    for i, st in enumerate(cfg.train.curriculum):
        field = f"train.curriculum[{i}].data"
        if st.data is None:
            prefix, data = run_data.prefixes["train"], run_data
        else:
            try:
                prefix = resolve_splits(st.data)["train"]
                data = load_data_info(f"train={prefix}")
                check_token_ids(data)
            except ConfigError as e:
                raise ConfigError(field, str(e).split(": ", 1)[-1]) from None
            if data.vocab_size != run_data.vocab_size or not _same_tokenizer(data, run_data):
                raise ConfigError(field, f"{prefix}.json: vocab_size {data.vocab_size} and tokenizer "
                                         f"{data.tokenizer.get('type')!r} differ from {run_data.prefixes['train']}"
                                         f".json's (vocab_size {run_data.vocab_size}): every stage must use the "
                                         f"run's tokenizer")
        stages.append(Stage(index=i, prefix=prefix, data=data, k=st.bptt_segments or cfg.train.bptt_segments,
                            steps=st.steps, loss=st.loss, window=st.window, max_steps=st.max_steps,
                            segments_per_example=segments_per_example(data.meta, segment_len)))
    return stages


class Curriculum:
    """The stages and where the run is: ``stage`` (index), ``start`` (the step the stage started after) and
    ``losses`` (the stage's last ``window`` step losses, oldest first)."""

    def __init__(self, stages: List[Stage]):
        self.stages = stages
        self.stage = 0
        self.start = 0
        self.losses: List[float] = []

    @property
    def current(self) -> Stage:
        return self.stages[self.stage]

    # ------------------------------------------------------------------------------------------------ steps
    def observe(self, rec: Mapping[str, Any]) -> None:
        """Record a step's loss for a loss stage (finite steps that score targets only)."""
        st = self.current
        if st.loss is None or not rec["finite"] or not rec["scored"]:
            return
        self.losses.append(float(rec["loss"]))
        del self.losses[:-st.window]

    def mean_loss(self) -> Optional[float]:
        return sum(self.losses) / len(self.losses) if self.losses else None

    def due(self, step: int) -> Optional[str]:
        """Why the current stage ends after ``step`` (a reason for the log), or None."""
        st = self.current
        done = step - self.start
        if st.steps is not None and done >= st.steps:
            return f"{st.steps} steps"
        if st.loss is not None:
            if len(self.losses) >= st.window and self.mean_loss() < st.loss:
                return f"mean loss {self.mean_loss():.4f} of the last {st.window} steps < {st.loss:g}"
            if st.max_steps is not None and done >= st.max_steps:
                return f"max_steps {st.max_steps} (mean loss {_fmt_loss(self.mean_loss())}, threshold {st.loss:g})"
        return None

    def advance(self, step: int) -> None:
        self.stage += 1
        self.start = step
        self.losses = []

    def record(self, step: int, reason: str) -> Dict[str, Any]:
        """The metrics.jsonl record of entering the current stage."""
        st = self.current
        return {"kind": "curriculum", "stage": st.index, "step": step, "segments_per_example":
                st.segments_per_example, "bptt_segments": st.k, "data": st.prefix, "end": st.describe_end(),
                "reason": reason}

    def describe(self) -> str:
        st = self.current
        return (f"curriculum stage {st.index + 1}/{len(self.stages)}: {st.prefix}, "
                f"{_fmt_spe(st.segments_per_example)} segments per example, bptt_segments {st.k}, until "
                f"{st.describe_end()}")

    # ------------------------------------------------------------------------------------------------ saving
    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON data (meta.json): the stage, its start, its loss window, and what the stage trains on."""
        st = self.current
        return {"format": FORMAT, "stage": self.stage, "stages": len(self.stages), "start": self.start,
                "losses": list(self.losses), "data": st.prefix, "bptt_segments": st.k}

    def load_state_dict(self, sd: Optional[Mapping[str, Any]], where: str) -> None:
        """Continue at the saved position; ConfigError on ``train.curriculum`` when ``where`` (a checkpoint) was
        written without a curriculum or at a stage this curriculum does not have."""
        if sd is None:
            raise ConfigError("train.curriculum", f"{where} was written without a curriculum: resume it without "
                                                  f"train.curriculum, or start the curriculum in another --save "
                                                  f"directory")
        if sd.get("format") != FORMAT:
            raise ConfigError("train.curriculum", f"{where}: curriculum state of format {sd.get('format')!r}, "
                                                  f"expected {FORMAT!r}")
        stage = int(sd["stage"])
        if stage >= len(self.stages):
            raise ConfigError("train.curriculum", f"{where} was written in stage {stage + 1} of {sd.get('stages')}; "
                                                  f"this curriculum has {len(self.stages)}")
        self.stage, self.start, self.losses = stage, int(sd["start"]), [float(x) for x in sd["losses"]]


def _fmt_loss(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def check_no_curriculum(meta: Mapping[str, Any], where: str) -> None:
    """A run without a curriculum cannot continue a checkpoint written inside one (its stream is the stage's)."""
    if meta.get("curriculum") is not None:
        cur = meta["curriculum"]
        raise ConfigError("train.curriculum", f"{where} was written in stage {cur.get('stage', 0) + 1} of a "
                                              f"curriculum ({cur.get('data')}): resume it with the same "
                                              f"train.curriculum")


def build(cfg, run_data, segment_len: int) -> Optional[Curriculum]:
    """The run's curriculum (None without ``train.curriculum``)."""
    if cfg.train.curriculum is None:
        return None
    return Curriculum(resolve_stages(cfg, run_data, segment_len))
