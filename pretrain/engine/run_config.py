"""The run configuration: model, data, training, optimizer, evaluation, checkpoints, logging, parallelism.

A preset YAML (``pretrain/configs/<name>.yaml`` or any path) gives the starting values; command-line options
override single fields.  Every leaf field is an option ``--section.field VALUE``; Megatron's names work where
they overlap (``--train-iters``, ``--data-path``, ``--save``, ``--load``, ...; see ``ALIASES``).  ``validate``
runs once at start-up and names the offending field.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from pretrain.config_base import (F, ConfigError, check_at_least, field_paths, from_dict, load_preset, set_field,
                                  to_dict, validate)
from pretrain.model.membart.config import MemBartConfig
from pretrain.model.model_config import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class DataConfig:
    path: Optional[str] = F(None, "dataset prefix from preprocess (PREFIX uses PREFIX_train/_valid/_test when "
                                  "they exist), or 'train=P1,valid=P2,test=P3'")
    roll: bool = F(False, "rotate every stream by a seeded random offset each epoch (LaMemo's --roll)")
    reset_memory: bool = F(False, "reset a row's memory when a document starts in its segment")
    align: str = F("token", "stripe alignment: 'token' (equal token stripes) or 'document' (stripes start at "
                            "documents; for fixed-length synthetic examples)")
    resume_policy: str = F("error", "when the data-parallel layout differs on resume: error, restart_epoch "
                                    "or proportional (memory states are reset in the latter two)")

    def validate(self):
        if self.align not in ("token", "document"):
            raise ConfigError("align", f"must be 'token' or 'document', got {self.align!r}")
        if self.resume_policy not in ("error", "restart_epoch", "proportional"):
            raise ConfigError("resume_policy", f"must be error, restart_epoch or proportional, "
                                               f"got {self.resume_policy!r}")


@dataclass
class CurriculumStage:
    """One stage of ``train.curriculum``: what the stage trains on, how deep it backpropagates, when it ends."""
    data: Optional[str] = F(None, "dataset prefix of this stage's training data (PREFIX uses PREFIX_train when it "
                                  "exists; default: the training split of data.path), e.g. the task made with "
                                  "fewer segments per example; same tokenizer as data.path")
    bptt_segments: Optional[int] = F(None, "segments unrolled per micro-batch in this stage (default: "
                                           "train.bptt_segments)")
    steps: Optional[int] = F(None, "the stage ends after this many optimizer steps")
    loss: Optional[float] = F(None, "the stage ends when the mean training loss over its last `window` steps is "
                                    "below this")
    window: int = F(10, "loss: steps averaged (finite steps that score targets)")
    max_steps: Optional[int] = F(None, "loss: end the stage after this many steps at the latest")

    def validate(self):
        if self.steps is not None and self.loss is not None:
            raise ConfigError("steps", "give steps or loss, not both")
        for name in ("bptt_segments", "steps", "window", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(name, f"must be >= 1, got {v}")
        if self.loss is not None and not (math.isfinite(self.loss) and self.loss > 0):
            raise ConfigError("loss", f"must be a finite number > 0, got {self.loss}")
        if self.max_steps is not None and self.loss is None:
            raise ConfigError("max_steps", "caps a loss stage; give loss (or steps instead of max_steps)")
        if self.data is not None and not self.data.strip():
            raise ConfigError("data", "must be a dataset prefix, got an empty string")


@dataclass
class TrainConfig:
    iters: int = F(1000, "optimizer steps to train (Megatron: --train-iters)")
    micro_batch: Optional[int] = F(None, "rows per micro-batch per data-parallel rank (default: the DeepSpeed "
                                         "config's train_micro_batch_size_per_gpu, else 8)")
    grad_accum: Optional[int] = F(None, "micro-batches per optimizer step; each slot keeps its own memory state "
                                        "(default: the DeepSpeed config's gradient_accumulation_steps, else 1)")
    seed: int = F(1234, "random seed (weights, dropout, data roll)")
    bptt_segments: int = F(1, "segments unrolled per micro-batch with gradients flowing through the memory "
                              "(1 = truncated backprop at every segment boundary)")
    max_nonfinite: int = F(5, "stop after this many steps in a row with a non-finite loss (each is skipped)")
    exit_duration_mins: float = F(0.0, "save and exit after this many minutes (0 = no limit)")
    exit_interval: int = F(0, "save and exit when the step is a multiple of this (0 = never; Megatron's "
                              "--exit-interval)")
    exit_on_signal: bool = F(True, "save and exit on SIGTERM / SIGUSR1 / SIGUSR2")
    threads: int = F(0, "torch CPU threads per process (0 = cores / processes on this node)")
    mrbp: bool = F(False, "backpropagate through the bptt_segments by memory replay (MemBART's MRBP): forward "
                          "them without a graph, then recompute and backpropagate one segment at a time, last "
                          "first (the activation memory of one segment, about one forward pass more)")
    aux_loss_weight: float = F(1.0, "weight of a memory mechanism's auxiliary loss added to the LM loss (the "
                                    "mechanism may scale it already; evaluation reports the LM loss alone)")
    init_from: Optional[str] = F(None, "start from an exported model directory (weights only)")
    curriculum: Optional[List[CurriculumStage]] = F(
        None, "stages trained one after the other, each a mapping {data, bptt_segments, steps | loss (window, "
              "max_steps)}; every stage but the last ends after `steps` steps or when the mean loss of its last "
              "`window` steps is below `loss`, the last runs to train.iters (docs/training.md, Curricula); on the "
              "command line a YAML list: '[{data: d/copy1, steps: 100}, {data: d/copy2, loss: 0.5}, {}]'")

    def validate(self):
        if self.curriculum is not None:
            self._validate_curriculum()
        if self.iters < 0:
            raise ConfigError("iters", f"must be >= 0, got {self.iters}")
        for name in ("micro_batch", "grad_accum"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(name, f"must be >= 1, got {v}")
        if self.bptt_segments < 1:
            raise ConfigError("bptt_segments", f"must be >= 1, got {self.bptt_segments}")
        if self.exit_interval < 0:
            raise ConfigError("exit_interval", f"must be >= 0, got {self.exit_interval}")
        if self.max_nonfinite < 1:
            raise ConfigError("max_nonfinite", f"must be >= 1, got {self.max_nonfinite}")
        if not self.aux_loss_weight >= 0:
            raise ConfigError("aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")

    def _validate_curriculum(self):
        stages = self.curriculum
        if not stages:
            raise ConfigError("curriculum", "an empty list; give at least one stage, or leave it null (no "
                                            "curriculum)")
        for i, st in enumerate(stages):
            where = f"curriculum[{i}]"
            try:
                st.validate()
            except ConfigError as e:
                raise ConfigError(f"{where}.{e.field}", str(e).split(": ", 1)[-1]) from None
            last = i == len(stages) - 1
            if not last and st.steps is None and st.loss is None:
                raise ConfigError(where, "needs an end: steps N or loss X (only the last stage runs to "
                                         "train.iters)")
            if last and (st.steps is not None or st.loss is not None):
                raise ConfigError(where, "the last stage runs to train.iters: it takes no steps or loss (add a "
                                         "stage after it)")


@dataclass
class OptimConfig:
    lr: float = F(2.5e-4, "peak learning rate (AdamW)")
    min_lr: float = F(0.0, "final learning rate of the decay")
    schedule: str = F("cosine", "decay after warmup: cosine, linear, constant or wsd (warmup-stable-decay)")
    warmup_iters: int = F(0, "linear warmup steps")
    decay_iters: Optional[int] = F(None, "steps over which the rate decays (default: train.iters)")
    wsd_decay: float = F(0.1, "wsd: fraction of decay_iters spent decaying")
    wsd_shape: str = F("linear", "wsd: decay shape (linear, cosine, 1-sqrt)")
    weight_decay: float = F(0.0, "AdamW weight decay (not applied to biases, norms and embeddings' biases)")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.999, "AdamW beta2")
    eps: float = F(1e-8, "AdamW epsilon")
    clip_grad: float = F(0.25, "clip the global gradient norm to this value (0 = off)")

    def validate(self):
        if self.schedule not in ("cosine", "linear", "constant", "wsd"):
            raise ConfigError("schedule", f"must be cosine, linear, constant or wsd, got {self.schedule!r}")
        if self.wsd_shape not in ("linear", "cosine", "1-sqrt"):
            raise ConfigError("wsd_shape", f"must be linear, cosine or 1-sqrt, got {self.wsd_shape!r}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_iters < 0:
            raise ConfigError("warmup_iters", f"must be >= 0, got {self.warmup_iters}")
        if not 0 < self.wsd_decay <= 1:
            raise ConfigError("wsd_decay", f"must be in (0, 1], got {self.wsd_decay}")
        if self.clip_grad < 0:
            raise ConfigError("clip_grad", f"must be >= 0, got {self.clip_grad}")


@dataclass
class EvalConfig:
    interval: int = F(0, "evaluate on the validation split every this many steps (0 = only at the end)")
    iters: int = F(0, "segments per stream per evaluation (0 = the whole split)")
    micro_batch: int = F(1, "evaluation streams per data-parallel rank")
    protocol: str = F("train", "train (training lengths), xl (eval tgt_len/mem_len/clamp_len/same_length "
                               "below), carry (one stream, state carried), sliding (window, no memory)")
    tgt_len: Optional[int] = F(None, "evaluation segment length (default: model.tgt_len)")
    mem_len: Optional[int] = F(None, "evaluation memory length (default: model.mem_len)")
    clamp_len: Optional[int] = F(None, "evaluation clamp_len (default: model.clamp_len)")
    same_length: Optional[bool] = F(None, "evaluation same_length (default: model.same_length)")
    final_splits: List[str] = F(["valid"], "splits evaluated after training")
    accuracy: Optional[bool] = F(None, "also report next-token accuracy on scored tokens (default: when the "
                                       "dataset marks answer tokens, e.g. the synthetic tasks)")

    def validate(self):
        if self.protocol not in ("train", "xl", "carry", "sliding"):
            raise ConfigError("protocol", f"must be train, xl, carry or sliding, got {self.protocol!r}")
        if self.interval < 0 or self.iters < 0 or self.micro_batch < 1:
            raise ConfigError("interval", "interval and iters must be >= 0 and micro_batch >= 1")
        for s in self.final_splits:
            if s not in ("train", "valid", "test"):
                raise ConfigError("final_splits", f"unknown split {s!r} (train, valid, test)")


@dataclass
class CheckpointConfig:
    save: Optional[str] = F(None, "run directory: checkpoints, metrics.jsonl, TensorBoard, config, export")
    load: Optional[str] = F(None, "resume from the latest checkpoint in this directory (default: --save's, "
                                  "when it has one)")
    interval: int = F(0, "save every this many steps (0 = only at the end and on signals)")
    keep_last: int = F(2, "complete checkpoints to keep (older ones are deleted)")
    load_optim: bool = F(True, "also restore optimizer and scheduler state when resuming")
    export: bool = F(True, "write a consolidated fp32 model (safetensors + config + tokenizer) at the end")

    def validate(self):
        check_at_least(self, interval=0, keep_last=1)


@dataclass
class LogConfig:
    interval: int = F(10, "log every this many steps")
    tensorboard: bool = F(True, "write TensorBoard event files under SAVE/tensorboard")
    wandb: bool = F(False, "log to Weights & Biases")
    wandb_project: str = F("memtrain", "W&B project")
    wandb_mode: str = F("offline", "W&B mode: offline (default; sync later with `wandb sync`) or online")
    peak_tflops: float = F(0.0, "peak TFLOP/s per device for MFU (0 = datasheet on GPU, measured GEMM on CPU)")
    progress: bool = F(True, "progress with ETA on the first rank: a bar on a terminal, periodic lines otherwise "
                             "(Slurm logs, pipes, files)")
    progress_seconds: float = F(60.0, "without a terminal: a progress line every this many seconds (0 = by steps "
                                      "only)")
    progress_steps: int = F(0, "without a terminal: a progress line every this many steps as well (0 = by time "
                               "only)")

    def validate(self):
        if self.interval < 1:
            raise ConfigError("interval", f"must be >= 1, got {self.interval}")
        if self.progress_seconds < 0 or self.progress_steps < 0:
            raise ConfigError("progress_seconds", "progress_seconds and progress_steps must be >= 0")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError("wandb_mode", f"must be offline, online or disabled, got {self.wandb_mode!r}")


@dataclass
class ParallelConfig:
    tp: int = F(1, "tensor-parallel size (heads are split across these ranks)")

    def validate(self):
        if self.tp < 1:
            raise ConfigError("tp", f"must be >= 1, got {self.tp}")


@dataclass
class DebugConfig:
    inject_nonfinite: List[int] = F([], "fault injection: steps whose loss is made NaN on the first rank (tests the "
                                        "non-finite guard)")
    signal_at: List[int] = F([], "fault injection: steps at whose end rank debug.signal_rank sends itself "
                                 "debug.signal (tests preemption)")
    signal: str = F("SIGTERM", "the signal of debug.signal_at: SIGTERM, SIGUSR1 or SIGUSR2")
    signal_rank: int = F(0, "the global rank that receives debug.signal_at's signal")
    kill_in_save: str = F("", "fault injection: die by SIGKILL inside the save of step debug.kill_in_save_step, at "
                              "start | rank_files | meta | latest (tests interrupted saves)")
    kill_in_save_step: int = F(0, "the step of debug.kill_in_save")

    def validate(self):
        if self.signal not in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
            raise ConfigError("signal", f"must be SIGTERM, SIGUSR1 or SIGUSR2, got {self.signal!r}")
        if self.kill_in_save not in ("", "start", "rank_files", "meta", "latest"):
            raise ConfigError("kill_in_save", f"must be start, rank_files, meta or latest, got {self.kill_in_save!r}")


@dataclass
class Seq2SeqConfig:
    """How an encoder-decoder with a memory (MemBART, ``model.arch: membart``) is fed and scored: one time step per
    segment, ``train.bptt_segments`` steps per rollout (MemBART's ``time_horizon``), gradients through the memory
    inside a rollout (docs/membart.md)."""
    task: str = F("denoising", "denoising (BART's text infilling of document chunks) or dialogue (history -> "
                               "response, data from data_tools/dialogue.py)")
    mask_ratio: float = F(0.3, "denoising: fraction of each step's tokens masked (rounded up)")
    poisson_lambda: float = F(3.0, "denoising: mean span length (Poisson), each span one <mask>")
    random_ratio: float = F(0.0, "denoising: fraction of the masks replaced by a random data token (BART: 0.1)")
    permute_sentences: bool = F(False, "denoising: shuffle the sentences of a step before masking")
    sentence_end_ids: List[int] = F([], "denoising: token ids that end a sentence (for permute_sentences)")
    history_turns: int = F(0, "dialogue: earlier turns in the source (0 = all, cut from the left to model.tgt_len)")
    loss_weights: str = F("exponential", "weights of the rollout's steps: exponential (MemBART's 2^t / sum 2^s), "
                                         "uniform (each step's mean alike), tokens (every scored token alike)")
    reset_every_step: bool = F(False, "forget the memory before every step (the no-memory baseline of a comparison)")

    def validate(self):
        if self.task not in ("denoising", "dialogue"):
            raise ConfigError("task", f"must be denoising or dialogue, got {self.task!r}")
        if self.loss_weights not in ("exponential", "uniform", "tokens"):
            raise ConfigError("loss_weights", f"must be exponential, uniform or tokens, got {self.loss_weights!r}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ConfigError("mask_ratio", f"must be in [0, 1], got {self.mask_ratio}")
        if self.poisson_lambda <= 0:
            raise ConfigError("poisson_lambda", f"must be > 0, got {self.poisson_lambda}")
        if not 0.0 <= self.random_ratio <= 1.0:
            raise ConfigError("random_ratio", f"must be in [0, 1], got {self.random_ratio}")
        if self.permute_sentences and not self.sentence_end_ids:
            raise ConfigError("sentence_end_ids", "permute_sentences needs the token ids that end a sentence")
        if self.history_turns < 0:
            raise ConfigError("history_turns", f"must be >= 0, got {self.history_turns}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass
class Seq2SeqRunConfig(RunConfig):
    """The run configuration of an encoder-decoder with a memory: ``model`` is a ``MemBartConfig`` and the
    ``seq2seq`` section says how time steps are made and scored."""
    model: MemBartConfig = field(default_factory=MemBartConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)


def run_config_class(arch: Optional[str]) -> type:
    """The run configuration class of a model family (``model.arch``: ``decoder``, the default, or ``membart``)."""
    if arch in (None, "decoder"):
        return RunConfig
    if arch == "membart":
        return Seq2SeqRunConfig
    raise ConfigError("model.arch", f"unknown model family {arch!r} (decoder, membart)")


# Megatron-LM's option names (and a few common ones) -> config fields.
ALIASES = {
    "data-path": "data.path",
    "save": "checkpoint.save",
    "load": "checkpoint.load",
    "train-iters": "train.iters",
    "eval-interval": "eval.interval",
    "eval-iters": "eval.iters",
    "save-interval": "checkpoint.interval",
    "log-interval": "log.interval",
    "seed": "train.seed",
    "tensor-model-parallel-size": "parallel.tp",
    "micro-batch-size": "train.micro_batch",
    "lr": "optim.lr",
    "min-lr": "optim.min_lr",
    "lr-decay-style": "optim.schedule",
    "lr-warmup-iters": "optim.warmup_iters",
    "lr-decay-iters": "optim.decay_iters",
    "weight-decay": "optim.weight_decay",
    "clip-grad": "optim.clip_grad",
    "adam-beta1": "optim.beta1",
    "adam-beta2": "optim.beta2",
    "adam-eps": "optim.eps",
    "exit-duration-in-mins": "train.exit_duration_mins",
    "exit-duration-mins": "train.exit_duration_mins",
    "exit-interval": "train.exit_interval",
    "seq-length": "model.tgt_len",
    "mem-length": "model.mem_len",
    "init-from": "train.init_from",
}
# Megatron's switches that take no value.
SWITCHES = {
    "recompute-activations": ("model.checkpoint_activations", True),
    "checkpoint-activations": ("model.checkpoint_activations", True),
    "no-load-optim": ("checkpoint.load_optim", False),
    "exit-signal-handler": ("train.exit_on_signal", True),
    "wandb": ("log.wandb", True),
    "roll": ("data.roll", True),
}


def preset_path(name: str) -> str:
    """A preset name (``lamemo_tiny``) or a path to a YAML file."""
    if os.path.isfile(name):
        return name
    cand = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if os.path.isfile(cand):
        return cand
    avail = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError("config", f"{name!r} is neither a file nor a preset (presets: {', '.join(avail)})")


def _fmt_default(v) -> str:
    return "null" if v is None else json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


class _Parser(argparse.ArgumentParser):
    """One-line errors with a suggestion instead of the full (long) usage."""

    def error(self, message: str):
        import difflib
        import sys
        hint = ""
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()[0]
            known = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(bad, known, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            message = f"unknown option {bad}{hint}"
        print(f"{self.prog}: error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def build_parser(description: str, cls: type = RunConfig) -> argparse.ArgumentParser:
    p = _Parser(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None,
                   help="preset name in pretrain/configs or a YAML file (default: none; built-in defaults)")
    g.add_argument("--ds_config", "--ds-config", dest="ds_config", default=None,
                   help="DeepSpeed JSON config (ds_configs/...; default: ZeRO-0 fp32)")
    g.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's convention (always on)")
    g.add_argument("--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed's name for --ds_config")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    meg = p.add_argument_group("Megatron-style names (aliases of the fields below)")
    for name, target in ALIASES.items():
        meg.add_argument(f"--{name}", dest=f"alias::{target}", default=argparse.SUPPRESS, metavar="V",
                         help=f"= --{target}")
    for name, (target, value) in SWITCHES.items():
        meg.add_argument(f"--{name}", dest=f"switch::{target}", action="store_const", const=value,
                         default=argparse.SUPPRESS, help=f"= --{target} {_fmt_default(value)}")
    for section in (f.name for f in dataclasses.fields(cls)):
        sub = p.add_argument_group(f"{section} fields")
        for path, (ftp, default, help_text) in field_paths(_section_type(section, cls), section).items():
            sub.add_argument(f"--{path}", dest=f"field::{path}", default=argparse.SUPPRESS, metavar="V",
                             help=f"{help_text} (default: {_fmt_default(default)})")
    return p


def _section_type(section: str, cls: type = RunConfig):
    import typing
    return typing.get_type_hints(cls)[section]


def resolve(args: argparse.Namespace, argv_order: Sequence[str], cls: Optional[type] = None) -> RunConfig:
    """Preset, then command-line overrides in the order given; validated.  ``cls``: the run configuration class
    (default: the one of the preset's ``model.arch``)."""
    data: Dict[str, Any] = load_preset(preset_path(args.config), preset_path) if args.config else {}
    if cls is None:
        cls = run_config_class((data.get("model") or {}).get("arch"))
    if cls is RunConfig and isinstance(data.get("model"), dict) and data["model"].get("arch") == "decoder":
        data = {**data, "model": {k: v for k, v in data["model"].items() if k != "arch"}}
    cfg = from_dict(cls, data)
    overrides = [(key.split("::", 1)[1], value) for key, value in vars(args).items() if "::" in key]

    def last_mention(target: str) -> int:
        """Position of the last command-line token that sets ``target`` (so the last one wins)."""
        found = -1
        for i, tok in enumerate(argv_order):
            name = tok.split("=", 1)[0].lstrip("-")
            if name == target or ALIASES.get(name) == target or SWITCHES.get(name, ("",))[0] == target:
                found = i
        return found

    for target, value in sorted(overrides, key=lambda tv: last_mention(tv[0])):
        set_field(cfg, target, value)
    checked = as_the_data_decides(cfg)
    if checked is not None:
        validate(checked)
    return cfg


def as_the_data_decides(cfg: RunConfig) -> Optional[RunConfig]:
    """A copy of ``cfg`` with the values the data decides put in, for validation: the decoder LM's vocabulary size
    is the tokenizer's (``family.adopt_vocab``, from the training split's ``.json``), so a check that depends on it
    (adaptive-softmax cutoffs inside the vocabulary, ...) holds the data's value, as the trainer does at start-up,
    not the preset's.  ``cfg`` itself when it names no data; None when its data cannot be read: the trainer
    reports the data first and then validates everything."""
    if not cfg.data.path:
        return cfg
    from pretrain.engine.data import load_data_info
    from pretrain.engine.family import family_for
    try:
        data = load_data_info(cfg.data.path)
    except (ConfigError, OSError, ValueError):
        return None
    out = copy.deepcopy(cfg)
    family_for(out).adopt_vocab(data, lambda message: None)
    return out


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "") -> tuple:
    """(RunConfig, argparse namespace).  ConfigError for an invalid config."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    cls = run_config_class(_arch_of(argv))
    parser = build_parser(description, cls)
    args = parser.parse_args(argv)
    return resolve(args, argv, cls), args


def _arch_of(argv: Sequence[str]) -> Optional[str]:
    """The model family a command line asks for: ``--model.arch`` if given, else the ``--config`` preset's."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--model.arch", dest="arch", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.arch is not None:
        return known.arch
    if known.config is None:
        return None
    data = load_preset(preset_path(known.config), preset_path)
    return (data.get("model") or {}).get("arch")


def save_resolved(cfg: RunConfig, path: str) -> None:
    import yaml
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
