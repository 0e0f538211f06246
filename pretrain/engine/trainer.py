"""The training loop: DeepSpeed steps with memory carried across steps, exact resume, evaluation, logging.

The model family (``family.py``: the decoder LMs, or MemBART's encoder-decoder) decides the model, its streams and
its batch class; the loop below is the same for both.  One optimizer step = ``grad_accum`` micro-batches.  Each
micro-batch becomes a ``Batch`` (``batch.py``: the
model's inputs, the segments of the unroll, the loss mask, the reset flags) and runs through its slot's memory
(``MemorySlots``, ``memory_slots.py``: one memory state per accumulation slot, reset at document starts, unrolled
over ``train.bptt_segments`` segments, committed, rolled back after a non-finite step).  The loss of a step is the
NLL per scored target of the global batch (every micro-batch, data-parallel rank and segment: the scored targets
are counted and all-reduced before the forward, and each micro-batch's loss is scaled so that DeepSpeed's
averaging over accumulation steps and ranks gives exactly that gradient; ``_loss_scale``) plus
``train.aux_loss_weight`` times the mechanism's auxiliary loss averaged over the global batch's micro-batches,
when it has one; so the gradient does not depend on how the rows are split (docs/training.md, "The loss of a step
and gradient accumulation").  A micro-batch whose loss is not finite on any rank poisons the step: the update is
skipped (see ``ds_setup``) and every slot keeps the state it had before the step.

Start-up checks everything it can before it writes or loads anything: the data (every split's files and token
ids, ``data.py``), the configuration, and the checkpoint to resume from (chosen, verified and compared with this
run, ``resume.py``).  A run that stops on one of those leaves the run directory as it found it.

Checkpoints hold DeepSpeed's files and, per rank, the named parts ``memory`` (``MemorySlots``), ``stream`` (the
ordered stream's position) and ``rng`` (the random generators), so a resumed run reproduces the uninterrupted one
(bit for bit in fp32 on CPU).  The learning-rate schedule is a function of the number of applied updates
(``meta.json``'s ``lr_step``) and of this run's options, so a resumed run follows its own schedule from its first
update, with or without the optimizer state (``--no-load-optim``).

With ``train.curriculum`` (``curriculum.py``) the run trains stage after stage, each with its data and BPTT depth;
a stage ends after a step (by its step count or a loss threshold) with a new stream from the stage's start, fresh
memory states and the stage's depth, before that step's checkpoint, whose ``meta.json`` records the stage.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from data_tools.streams import StreamStateError
from pretrain.config_base import ConfigError, to_dict
from pretrain.engine import checkpoint as ckpt
from pretrain.engine import curriculum
from pretrain.engine import dist as pdist
from pretrain.engine import resume as rs
from pretrain.engine.family import family_for
from pretrain.engine.data import check_token_ids, load_data_info, summarize_loss, token_id_bounds
from pretrain.engine.ds_setup import (build_optimizer, engine_config, load_ds_config, precision_of, reconcile,
                                      zero_stage)
from pretrain.engine.memory_slots import MemoryLayoutError, MemorySlots
from pretrain.engine.metrics import MetricsWriter, Progress, format_console, peak_memory_gb, peak_tflops
from pretrain.engine.run_config import RunConfig, parse_args, save_resolved
from pretrain.engine.schedule import LRScheduler
from pretrain.engine.signals import StopRequest

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE = 0, 2, 3


class LossScale(NamedTuple):
    """How the micro-batch losses of one step are scaled (``Trainer._loss_scale``): ``scored`` the scored targets
    of the global batch (N); ``nll_div`` what each micro-batch's NLL sum is divided by (``N / (gas * R)``, 1 when
    N is 0); ``aux_mul`` the factor of its auxiliary-loss term besides ``train.aux_loss_weight`` (``R / dp``: 1
    unless DeepSpeed sums gradients over the ranks)."""
    scored: float
    nll_div: float
    aux_mul: float


_progress: Optional[Progress] = None  # the active progress display of this process (log() prints around it)


def log(msg: str, rank: int = 0) -> None:
    """Print a line on the first rank (above the progress bar when one is shown)."""
    if rank != 0:
        return
    if _progress is not None:
        _progress.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)
    sys.stdout.flush()


def set_threads(cfg: RunConfig) -> None:
    if torch.cuda.is_available():
        return
    n = cfg.train.threads
    if n <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
        n = max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class Trainer:
    def __init__(self, cfg: RunConfig, ds_path: Optional[str]):
        """Everything a run needs, checked before anything is written: data, process groups, the model family and
        its streams, the checkpoint to resume from, the model, the DeepSpeed engine, the memory states; then the
        run directory.  ``ConfigError`` (one line naming the field or flag) for bad settings or data."""
        self.cfg = cfg
        ds_raw = load_ds_config(ds_path)
        self.data = load_data_info(cfg.data.path)  # every split opened and checked, before any process talks
        set_threads(cfg)
        from pretrain.model import parallel
        self._init_parallel(parallel)
        self._init_family(ds_raw, ds_path)
        self._open_streams_and_plan()
        self._build_model(parallel)
        self._build_engine(parallel)
        self._init_step_state()
        rng_state = self._resume(self.plan) if self.plan is not None else None
        self._open_run_dir()
        # last, so that nothing after it draws from the restored random generators
        if rng_state is not None:
            self.rng.load_state_dict(rng_state)
        self._batches = iter(self.stream)  # continues from the stream's (possibly restored) position

    def _init_parallel(self, parallel) -> None:
        """Process groups (DeepSpeed's world, megatron-core's tensor- and data-parallel groups) and this rank's
        place in them."""
        self.info = pdist.initialize()
        parallel.initialize(self.cfg.parallel.tp)
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.rank = self.info.rank
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.device = self.info.device

    def _init_family(self, ds_raw, ds_path: Optional[str]) -> None:
        """The model family, the vocabulary it adopts from the data, the validated config and DeepSpeed config,
        precision, ZeRO stage, segment length and BPTT depth."""
        cfg = self.cfg
        # the model family (decoder LM or MemBART): streams, batches, model, export
        self.family = family_for(cfg)
        # the vocabulary size comes from the data (a decoder LM's) or must hold it (MemBART's); every split's token
        # ids must fit it (measured on the first rank, shared by all)
        self.family.adopt_vocab(self.data, lambda m: log(m, self.rank))
        self._check_token_ids()
        from pretrain.config_base import validate
        validate(cfg)
        self.ds_config, self.micro, self.accum = reconcile(ds_raw, cfg, self.dp_size, ds_path)
        self.dtype = precision_of(self.ds_config)
        self.zero = zero_stage(self.ds_config)
        self.seg_len = self.family.segment_len
        self.k = cfg.train.bptt_segments
        # the curriculum's stages (train.curriculum), their data checked now; the stage comes with the resume
        self.curriculum = curriculum.build(cfg, self.data, self.seg_len)
        if self.curriculum is not None:   # a fresh run starts at stage 0's depth (a resume: at its stage's)
            self.k = self.curriculum.current.k
        if cfg.eval.protocol == "sliding":
            raise ConfigError("eval.protocol", "the sliding protocol runs in pretrain/evaluate.py, not during training")
        self.family.check()

    def _open_streams_and_plan(self) -> None:
        """The checkpoint to resume from (chosen and verified; with a curriculum it decides the stage), the
        training and evaluation streams (built, and so checked, now, not at the first evaluation), then the
        checkpoint compared with this run, all before anything is loaded."""
        cfg = self.cfg
        self.run_dir = cfg.checkpoint.save
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.dp_rank, self.tp_rank,
                                           self.dp_size, self.tp_size, self.rank)
        plan = self._select_checkpoint()
        if plan is not None and self.curriculum is not None:
            self.curriculum.load_state_dict(plan.meta.get("curriculum"), plan.where)
            self.k = self.curriculum.current.k
        elif plan is not None:
            curriculum.check_no_curriculum(plan.meta, plan.where)
        self.stream = self._open_train_stream()
        if self.curriculum is not None:   # every other stage's stream is built (and so checked) now as well
            for st in self.curriculum.stages:
                if st.index != self.curriculum.stage:
                    self._open_train_stream(st)
        self.eval_streams = self._open_eval_streams()
        if plan is not None:   # compared with this run (the stage's BPTT depth) before anything is loaded
            rs.check_resumable(plan, self.layout(), cfg.data.resume_policy)
            rs.check_reshardable(plan)
        self.plan = plan

    def _open_train_stream(self, stage: Optional[curriculum.Stage] = None):
        """The training stream, from its start: over the training split, or over the data of curriculum stage
        ``stage`` (default: the current one) at its BPTT depth."""
        if self.curriculum is None:
            return self._open(lambda: self.family.train_stream(
                self.data.prefixes["train"], self.data, self.dp_rank, self.dp_size, self.micro, self.accum, self.k),
                "train")
        st = stage or self.curriculum.current
        try:
            return self.family.train_stream(st.prefix, st.data, self.dp_rank, self.dp_size, self.micro, self.accum,
                                            st.k)
        except ValueError as e:
            raise ConfigError(f"train.curriculum[{st.index}].data", f"{st.prefix}: {e}") from None

    def _build_model(self, parallel) -> None:
        """The model, with the weights of the checkpoint's model checked against it (and converted when the layout
        changed) or the initial weights loaded; the dropout generators seeded per data-parallel rank."""
        cfg = self.cfg
        # model, optimizer, schedule, DeepSpeed; --seed governs the weights and every generator a checkpoint
        # records (Python's, numpy's, torch's, as Megatron's _set_random_seed), so that the checkpoint of a resumed
        # run holds what the uninterrupted run's holds
        cfg.model.seed = cfg.train.seed
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.model = self.family.build_model()
        self.universal_dir: Optional[str] = None
        if self.plan is not None:
            rs.check_model(self.plan, to_dict(cfg.model), cfg.model.mechanism_name, self.param_shapes(),
                           defaults=to_dict(type(cfg.model)()))
            if rs.needs_reshard(self.plan):
                self.universal_dir = self._convert(self.plan)
        elif cfg.train.init_from:
            self.family.load_init(self.model, cfg.train.init_from)
        # dropout differs across data-parallel ranks and agrees across tensor-parallel ranks
        parallel.seed_rng(cfg.train.seed + 1000 * self.dp_rank)
        if self.zero == 3:
            self._declare_zero3_units()

    def _build_engine(self, parallel) -> None:
        """Optimizer, learning-rate schedule and the DeepSpeed engine around the model."""
        cfg = self.cfg
        optimizer = build_optimizer(self.model, cfg, self.ds_config, self.ps.get_tensor_model_parallel_group())
        names = {id(p): n for n, p in self.model.named_parameters()}
        # the parameters of each group of the client optimizer, in order (a ZeRO-0 checkpoint's optimizer state is
        # indexed by position; resharding it needs the names); DeepSpeed drops empty groups
        self.optimizer_param_names = None if optimizer is None else \
            [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups if g["params"]]
        total = cfg.optim.decay_iters or cfg.train.iters
        o = cfg.optim
        sched = lambda opt: LRScheduler(opt, lr=o.lr, min_lr=o.min_lr, warmup=o.warmup_iters, total=total,
                                        style=o.schedule, wsd_decay=o.wsd_decay, wsd_shape=o.wsd_shape)
        import deepspeed
        # a ZeRO-3 engine replaces torch.nn.functional.linear for the rest of the process (DeepSpeed's
        # memory-efficient linear, which rounds before adding the bias in bf16); close() puts it back
        self._functional_linear = torch.nn.functional.linear
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=sched, config=engine_config(self.ds_config),
            model_parameters=[p for p in self.model.parameters() if p.requires_grad] if optimizer is None else None,
            mpu=parallel.MpuAdapter())
        if self.dp_size == 1 and self.zero == 0 and self.dtype == torch.float32:
            # one data-parallel rank: nothing to average, but DeepSpeed would still copy every gradient into a
            # flat bucket and back after each backward
            self.engine.enable_backward_allreduce = False
        if cfg.model.checkpoint_activations and self.tp_size > 1:
            self._use_deepspeed_checkpointing(parallel)

    def _init_step_state(self) -> None:
        """The memory states of the accumulation slots, the counters of a fresh run and the per-step FLOPs and
        tokens (a resume then overwrites the counters)."""
        cfg = self.cfg
        self.memory = MemorySlots(self.model, self.accum, self.micro, self.device, reset_memory=cfg.data.reset_memory,
                                  bptt_segments=self.k)
        self.rng = ckpt.RNGState()
        self.step = 0
        self.consumed_tokens = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.history: List[Dict[str, Any]] = []  # per step of this process: step, loss, finite

        self.peak, self.peak_src = peak_tflops(self.dtype, cfg.log.peak_tflops)
        self._set_step_rates()
        self.resume_record: Optional[Dict[str, Any]] = None
        self.saved_step: Optional[int] = None   # the step this run's run directory already holds a checkpoint of
        self.stopped: Optional[str] = None      # why train() stopped before train.iters (signal, guard, interval)

    def _set_step_rates(self) -> None:
        """FLOPs and tokens of one optimizer step at the current BPTT depth ``k``."""
        n = self.seg_len
        self.flops_per_step = 3 * self.model.flops(self.micro, n, self.family.mem_len) * self.accum * self.k
        self.tokens_per_step = self.micro * self.accum * self.dp_size * n * self.k

    def _open_run_dir(self) -> None:
        """Nothing failed: only now is the run directory written (resolved config, DeepSpeed config), the metrics
        writer opened and the run's layout logged."""
        cfg = self.cfg
        if self.rank == 0 and self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            save_resolved(cfg, os.path.join(self.run_dir, "config.yaml"))
            tmp = os.path.join(self.run_dir, f"ds_config.json.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(self.ds_config, f, indent=2)
            os.replace(tmp, os.path.join(self.run_dir, "ds_config.json"))
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, cfg.log.tensorboard,
                                     {"enabled": cfg.log.wandb, "project": cfg.log.wandb_project,
                                      "mode": cfg.log.wandb_mode}, to_dict(cfg))
        if self.resume_record is not None and self.rank == 0:
            self.metrics.write(self.resume_record)
        nparams = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: partitioned
        log(f"run: world {self.info.world_size} (data-parallel {self.dp_size} x tensor-parallel {self.tp_size}), "
            f"ZeRO-{self.zero}, {precision_name(self.dtype)}, "
            f"{nparams * self.tp_size / 1e6:.2f}M parameters, micro-batch {self.micro} x accumulation "
            f"{self.accum}, {self.family.describe(self.k)}; "
            f"{self.stream.steps_per_epoch} steps per epoch; peak {self.peak:.2f} TFLOP/s ({self.peak_src})",
            self.rank)
        if self.curriculum is not None:
            log(f"{self.curriculum.describe()}" + (f" (since step {self.curriculum.start})" if self.step else ""),
                self.rank)
            if self.plan is None and self.rank == 0:
                self.metrics.write(self.curriculum.record(self.step, "start"))

    # ------------------------------------------------------------------------------------------------ set-up
    def _check_token_ids(self) -> None:
        """Every split's largest token id against the vocabulary (scanned on the first rank, agreed by all)."""
        splits = list(self.data.prefixes)
        bounds = token_id_bounds(self.data) if self.rank == 0 else {s: -1 for s in splits}
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(bounds[s]) for s in splits], dtype=torch.float64,
                             device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            bounds = {s: int(v) for s, v in zip(splits, t.cpu().tolist())}
        check_token_ids(self.data, bounds)

    def _open(self, build, split: str):
        """A stream over ``split``; ConfigError naming the dataset when it cannot serve this run."""
        try:
            return build()
        except ValueError as e:
            raise ConfigError("data.path", f"{split} split: {e}") from None

    def _open_eval_streams(self) -> Dict[str, Any]:
        e = self.cfg.eval
        splits = set(e.final_splits) | ({"valid"} if e.interval else set())
        out = {}
        for split in sorted(splits):
            if self.data.has(split):
                out[split] = self._open(lambda s=split: self.family.eval_stream(
                    self.data.prefixes[s], self.data, self.dp_rank, self.dp_size), split)
        return out

    def _declare_zero3_units(self) -> None:
        """ZeRO-3 gathers a module's own parameters while its forward runs.  The model's layers read their
        weights directly (not through their sub-modules' forward) and borrow some from other modules (tied
        weights, shared position biases), so every parameter a unit uses is registered with the unit: it is
        gathered for the unit's forward and backward and released after."""
        import deepspeed
        for module, extra in self.model.sharding_units():
            for p in {id(p): p for p in list(module.parameters()) + list(extra)}.values():
                deepspeed.zero.register_external_parameter(module, p)

    def _use_deepspeed_checkpointing(self, parallel) -> None:
        import deepspeed
        deepspeed.checkpointing.configure(parallel.MpuAdapter(), partition_activations=False)
        self.model.checkpoint_fn = deepspeed.checkpointing.checkpoint

    def param_shapes(self) -> Dict[str, List[int]]:
        """Full (all tensor-parallel shards together) shape of every parameter, by name."""
        from pretrain.model.weights import described_parameters, full_shape
        return {name: list(full_shape(p, meta, self.tp_size))
                for name, (p, meta) in described_parameters(self.model).items()}

    def layout(self) -> rs.RunLayout:
        return rs.RunLayout(dp_size=self.dp_size, tp_size=self.tp_size, zero_stage=self.zero,
                            precision=precision_name(self.dtype), micro_batch=self.micro, grad_accum=self.accum,
                            segment_len=self.seg_len, bptt_segments=self.k)

    # ------------------------------------------------------------------------------------------------ resume
    def _select_checkpoint(self) -> Optional[rs.ResumePlan]:
        """The checkpoint to resume from, chosen and verified (not yet compared with this run), or None."""
        cfg = self.cfg
        load_dir = rs.resolve_load_dir(cfg.checkpoint.load, self.run_dir)
        if load_dir is None:
            return None
        return rs.select_checkpoint(load_dir, self.ckpt, self.dp_rank, self.tp_rank, self.dp_size, self.tp_size,
                                    agree=ckpt._agree_any, log=lambda m: log(m, self.rank))

    def _convert(self, plan: rs.ResumePlan) -> str:
        """The layout-free copy of the checkpoint (``reshard.convert``), written once by the first rank while the
        others wait; every rank raises the same CheckpointError when it fails."""
        from pretrain.engine import reshard
        from pretrain.model.weights import described_parameters
        udir = reshard.universal_dir(plan.load_dir, plan.tag)
        error = None
        if self.rank == 0:
            fresh = not reshard.is_complete(udir)
            t0 = time.time()
            try:
                specs = {name: meta.shard for name, (p, meta) in described_parameters(self.model).items()}
                reshard.convert(plan.load_dir, plan.tag, plan.meta, specs)
                if fresh:
                    log(f"resume: {rs.describe_layout_change(plan)}: wrote the layout-free copy {udir} "
                        f"({time.time() - t0:.1f} s)", self.rank)
            except ckpt.CheckpointError as e:
                error = e
        if ckpt._agree_any(error is not None):
            raise error if error is not None else ckpt.CheckpointError(
                f"cannot reshard {plan.where} (the first rank failed; see its message)")
        return udir

    def _resume(self, plan: rs.ResumePlan) -> Optional[Dict[str, Any]]:
        """Load the checkpoint ``plan`` chose; returns the random-generator state to restore last (or None)."""
        cfg, meta = self.cfg, plan.meta
        if self.universal_dir is not None:
            from pretrain.engine import reshard
            reshard.load_into(self.engine, self.model, self.universal_dir, load_optimizer=cfg.checkpoint.load_optim)
            self.engine.global_steps = plan.step
            self.engine.global_samples = plan.step * self.micro * self.accum * self.dp_size
            self.engine.skipped_steps = int(meta.get("nonfinite_total", 0))
            what = "weights and optimizer state" if cfg.checkpoint.load_optim else "weights"
            log(f"resume: {rs.describe_layout_change(plan)}: {what} resharded from {self.universal_dir}", self.rank)
        else:
            try:
                path, _ = self.engine.load_checkpoint(plan.load_dir, tag=plan.tag,
                                                      load_optimizer_states=cfg.checkpoint.load_optim,
                                                      load_lr_scheduler_states=False)
            except Exception as e:
                raise ckpt.CheckpointError(f"cannot load {plan.where}: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:200]} (delete {plan.where} to resume from the "
                                           f"previous checkpoint)") from None
            if path is None:
                raise ckpt.CheckpointError(f"DeepSpeed found nothing to load in {plan.where}")
        self.step = plan.step
        if self.run_dir and os.path.realpath(plan.load_dir) == os.path.realpath(self.run_dir):
            self.saved_step = plan.step
        self.consumed_tokens = int(meta.get("consumed_tokens", 0))
        self.nonfinite_total = int(meta.get("nonfinite_total", 0))
        # the schedule follows this run's options from the update the checkpoint stopped at, whatever the optimizer
        # state (DeepSpeed's ZeRO optimizers restore the rate stored with their param groups after the scheduler)
        lr_step = int(meta.get("lr_step", self.step - self.nonfinite_total))
        self.scheduler.load_state_dict({"last_step": lr_step})
        kept = []
        rng_state = None
        parts = plan.rank_parts
        stream_state = parts["stream"] if parts is not None else plan.stream_parts
        try:
            info = self.stream.load_state_dict(stream_state, policy=cfg.data.resume_policy)
        except StreamStateError as e:
            data_field = "data.path" if self.curriculum is None else \
                f"train.curriculum[{self.curriculum.stage}].data"
            raise ConfigError("data.resume_policy" if "layout" in str(e) else data_field, str(e)) from None
        log(info["message"], self.rank)
        reset = []
        if info["reset_memory"]:
            reset.append("memory states (the stream layout changed)")
        elif parts is not None or plan.tp_parts is not None:
            saved = parts["memory"] if parts is not None else [p["memory"] for p in plan.tp_parts]
            try:
                self.memory.load_state_dict(saved)
                kept.append("memory states" + (" (joined and re-split by head)" if parts is None else ""))
            except MemoryLayoutError as e:
                reset.append(f"memory states ({e})")
        if parts is not None:
            rng_state = parts["rng"]
            kept.append("random generators")
        else:
            # other ranks, other streams: fresh generators, seeded by rank and step (not the first step's masks again)
            from pretrain.model import parallel
            seed = (cfg.train.seed + 1000 * self.dp_rank + 1_000_003 * self.step) % 2 ** 31
            parallel.seed_rng(seed)
            rng_state = {"python": random.Random(seed).getstate(), "numpy": np.random.RandomState(seed).get_state(),
                         "torch": torch.get_rng_state(), **({"model_parallel": ckpt._mp_rng_tracker().get_states()}
                                                            if ckpt._mp_rng_tracker() is not None else {})}
            reset.append("random generators (seeded for the new layout)")
        log(f"resumed from {plan.where} at step {self.step}; kept: {', '.join(['weights'] + kept)}"
            f"{'; reset: ' + ', '.join(reset) if reset else ''}", self.rank)
        # what the resume did, for metrics.jsonl (written once the run directory may be written)
        self.resume_record = {
            "kind": "resume", "step": self.step, "from": plan.where, "consumed_tokens": self.consumed_tokens,
            "changes": {k: list(v) for k, v in plan.changes.items()}, "resharded": self.universal_dir is not None,
            "stream": {"policy": info["policy"], "step": info["step"], "epoch": info["epoch"],
                       "changed": {k: list(v) for k, v in info["changed"].items()}},
            "kept": kept, "reset": reset}
        return rng_state

    # ------------------------------------------------------------------------------------------------ steps
    def _loss_scale(self, batches: List[Any]) -> Tuple[List[Any], LossScale]:
        """The step's batches normalised over the global batch, and the factors of their losses.

        The scored targets of every loss group (``Batch.loss_counts``) are summed over this rank's micro-batches
        and, with one all-reduce, over the data-parallel group: ``N`` scored targets in the global batch (every
        micro-batch, every rank, every segment of the unroll).  DeepSpeed turns the micro-batch losses ``L_i``
        into the gradient ``(1 / (gas * R)) * sum_i dL_i`` (sum over the step's micro-batches ``i`` on every rank):
        ``engine.backward`` divides each loss by ``gas``, the gradient reduction divides by ``R``, the data-parallel
        size (``dp``) when it averages (DeepSpeed's default, ZeRO 0-3 alike), 1 when it sums
        (``gradient_allreduce_op: sum``) or does not run (one rank).  With
        ``L_i = S_i / (N / (gas * R)) + w * a_i * R / dp`` (``S_i`` the micro-batch's NLL sum over its scored
        targets, ``a_i`` its auxiliary loss averaged over the unroll's segments, ``w`` = ``train.aux_loss_weight``)
        the gradient is that of ``sum_i S_i / N + w * mean_i a_i``: the NLL per scored target of the global
        batch, plus the auxiliary loss averaged over the global batch's micro-batches (all of which have the same
        rows and segments), whatever the split into micro-batches, ranks and (for the NLL) segments.  Megatron's
        ``calculate_per_token_loss`` gets the same by summing gradients and scaling them by ``1 / N`` after the
        reduction; the counts are known here before any forward (the step's micro-batches are fetched together),
        so the losses are scaled instead.  When every micro-batch scores the same count ``c`` (plain LM data),
        ``N / (gas * R) = c`` exactly and the loss is ``S_i / c`` as without any normalisation."""
        local = torch.stack([b.loss_counts() for b in batches]).sum(0).cpu()
        counts = pdist.all_reduce_sum(local.tolist(), self.dp_group)
        batches = [b.normalize_over(counts) for b in batches]
        total = float(sum(counts))
        gas = self.engine.gradient_accumulation_steps()
        reduced = self.dp_size if getattr(self.engine, "gradient_average", True) else 1
        return batches, LossScale(scored=total, nll_div=total / (gas * reduced) if total > 0 else 1.0,
                                  aux_mul=reduced / self.dp_size)

    def _micro_step(self, batch, slot: int, inject_nan: bool, scale: LossScale):
        """Forward + backward of one micro-batch (a ``Batch`` normalised by ``_loss_scale``, whose ``scale`` it
        takes); returns (nll sum over its scored targets, aux loss averaged over its segments or None, finite
        everywhere)."""
        if self.cfg.train.mrbp:
            return self._micro_step_replay(batch, slot, inject_nan, scale)
        outs = self.memory.unroll(slot, batch, self.engine)
        nll_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        aux = []
        for seg, out in outs:
            nll_sum = nll_sum + seg.masked_nll_sum(out.nll)
            if out.aux_loss is not None:
                aux.append(out.aux_loss.float())
        loss = nll_sum / scale.nll_div
        aux_mean = torch.stack(aux).mean() if aux else None  # per segment, averaged over the unroll
        if aux_mean is not None and self.cfg.train.aux_loss_weight:
            loss = loss + (self.cfg.train.aux_loss_weight * scale.aux_mul) * aux_mean
        if inject_nan:
            loss = loss * float("nan")
        # a bad loss poisons every gradient, so the optimizer (which checks the gradient norm) skips the update on
        # every rank; no host synchronisation here: the step's finiteness is settled once, in train_step
        finite = torch.isfinite(loss.detach())
        loss = loss * torch.where(finite, 1.0, float("nan"))
        self.engine.backward(loss)
        self.engine.step()
        self.memory.commit(slot)   # undone by end_step when the step turns out not finite
        return nll_sum.detach(), (None if aux_mean is None else aux_mean.detach()), finite

    def _micro_step_replay(self, batch, slot: int, inject_nan: bool, scale: LossScale):
        """``_micro_step`` by memory replay backpropagation (``train.mrbp``; MemorySlots.replay_forward): the k
        segments forward without a graph, then one ``engine.backward`` per segment, last first, each carrying the
        state gradient to the segment before.  Only the last call is a gradient-accumulation boundary (gradients
        of the others are not reduced across ranks yet).  Each segment's loss is its share of ``_micro_step``'s
        (``S_seg / nll_div + w * aux_mul * a_seg / k``), so the gradients are the same."""
        replay = self.memory.replay_forward(slot, batch, self.engine)
        k = len(replay.segs)
        w = self.cfg.train.aux_loss_weight * scale.aux_mul
        nll_sum = sum(float(seg.masked_nll_sum(out.nll)) for seg, out in replay.outs)
        auxes = [float(out.aux_loss) for _, out in replay.outs if out.aux_loss is not None]
        aux_mean = sum(auxes) / len(auxes) if auxes else None
        value = nll_sum / scale.nll_div + (w * aux_mean if aux_mean is not None and w else 0.0)
        if inject_nan:
            value = float("nan")
        finite = pdist.all_reduce_max(0.0 if math.isfinite(value) else 1.0) == 0.0
        poison = 1.0 if finite else float("nan")     # a bad step: every gradient non-finite, the update skipped

        def loss_fn(seg, out):
            loss = seg.masked_nll_sum(out.nll) / scale.nll_div
            if out.aux_loss is not None and w:
                loss = loss + w * out.aux_loss.float() / k
            return loss * poison

        gas = self.engine.gradient_accumulation_steps()

        def backward_fn(loss, last: bool):
            if not last:
                self.engine.set_gradient_accumulation_boundary(False)
            try:
                self.engine.backward(loss)
            finally:
                if not last:
                    self.engine._is_gradient_accumulation_boundary = None   # back to DeepSpeed's own count
            scale_ = getattr(self.engine.optimizer, "cur_scale", None) or 1.0  # fp16 loss scale (1: fp32, bf16)
            return gas / float(scale_)

        replay.backward(loss_fn, backward_fn)
        self.engine.step()
        if finite:
            self.memory.commit(slot)
        return nll_sum, aux_mean, finite

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step over the accumulation slots.  The step's micro-batches are fetched together, their
        scored targets counted over the data-parallel group (``_loss_scale``: the loss is per scored target of the
        global batch), then each runs forward and backward.  The losses and finiteness flags of the micro-batches
        stay tensors until the end, where one all-reduce over the data-parallel group (no other host
        synchronisation than the optimizer's) gives the step's loss (NLL sum / scored targets of the global
        batch) and whether it was finite everywhere."""
        t0 = time.time()
        batches, scale = self._loss_scale([self.family.make_batch(mb, self.device) for mb in next(self._batches)])
        inject = (self.step + 1) in self.cfg.debug.inject_nonfinite and self.rank == 0  # logged, 1-based
        self.memory.begin_step()
        nll, aux_sum, aux_n, bad = [], [], 0, []
        for slot, batch in enumerate(batches):
            s, a, ok = self._micro_step(batch, slot, inject and slot == 0, scale)
            nll.append(torch.as_tensor(s, dtype=torch.float64))
            bad.append(torch.as_tensor(not ok if isinstance(ok, bool) else ~ok, dtype=torch.float64))
            if a is not None:
                aux_sum.append(torch.as_tensor(a, dtype=torch.float64))
                aux_n += 1
        local = torch.stack([torch.stack(nll).sum().cpu(),
                             (torch.stack(aux_sum).sum().cpu() if aux_sum else torch.zeros((), dtype=torch.float64)),
                             torch.tensor(float(aux_n), dtype=torch.float64), torch.stack(bad).sum().cpu()])
        nll, aux_sum, aux_n, bad = pdist.all_reduce_sum(local, self.dp_group)
        count = scale.scored
        if self.tp_size > 1:   # the tensor-parallel ranks of a row compute one loss; agree all the same
            bad = pdist.all_reduce_max(bad)
        finite = bad == 0
        self.memory.end_step(finite)  # a skipped step: no slot moves on with a poisoned state
        self.step += 1
        self.consumed_tokens += self.tokens_per_step
        if finite:
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
        rec = {"step": self.step, "loss": nll / max(count, 1.0) if finite else float("nan"), "finite": finite,
               "seconds": time.time() - t0, "scored": count, "nll_sum": nll, "grad_norm": self._grad_norm(),
               "aux_loss": (aux_sum / aux_n if finite else float("nan")) if aux_n else None}
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self, split: str, max_steps: int) -> Optional[Dict[str, Any]]:
        stream = self.eval_streams.get(split)
        if stream is None:
            return None
        from pretrain.engine.evaluation import streamed_eval
        cfg, e = self.cfg, self.cfg.eval
        xl = e.protocol == "xl"
        self.engine.eval()
        try:
            res = streamed_eval(
                lambda t, s, y, **kw: self.engine(t, s, y, **kw), self.model, stream, device=self.device,
                mem_len=(e.mem_len if xl else None), clamp_len=(e.clamp_len if xl else None),
                same_length=(e.same_length if xl else None), reset_memory=cfg.data.reset_memory,
                max_steps=max_steps, group=self.dp_group,
                accuracy=e.accuracy if e.accuracy is not None else "loss_mask" in self.data.meta,
                make_batch=lambda mb, dev: self.family.make_batch(mb, dev, training=False))
        finally:
            self.engine.train()
        rec = {"kind": "eval", "split": split, "step": self.step, "protocol": e.protocol,
               "tokens": int(res["tokens"]), **summarize_loss(res["loss"], self.data.metric)}
        if "accuracy" in res:
            rec["accuracy"] = res["accuracy"]
        if "groups" in res:    # per group of rows (MemBART: per turn / time step of the episode)
            rec["per_step"] = {str(g): summarize_loss(v["loss"], self.data.metric) | {"tokens": int(v["tokens"])}
                               for g, v in sorted(res["groups"].items())}
        return rec

    # ------------------------------------------------------------------------------------------------ save
    def _all_finite(self) -> bool:
        bad = 0.0
        for p in self.model.parameters():
            data = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if data.numel() and not torch.isfinite(data).all():
                bad = 1.0
                break
        if not self.memory.all_finite():
            bad = 1.0
        return pdist.all_reduce_max(bad) == 0.0

    def checkpoint_meta(self, reason: str) -> Dict[str, Any]:
        """What ``meta.json`` records besides the step: counters, the schedule step, this run's layout, the model
        (config, mechanism, full parameter shapes), for a resume to check before it loads anything."""
        layout = self.layout()
        return {"consumed_tokens": self.consumed_tokens, "nonfinite_total": self.nonfinite_total,
                "lr_step": int(self.scheduler.last_step), "reason": reason,
                "dp_size": layout.dp_size, "tp_size": layout.tp_size, "zero_stage": layout.zero_stage,
                "precision": layout.precision, "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum,
                "segment_len": layout.segment_len, "bptt_segments": layout.bptt_segments,
                "attn_type": getattr(self.cfg.model, "attn_type", None), "mechanism": self.cfg.model.mechanism_name,
                "dtype": str(self.dtype), "model": to_dict(self.cfg.model), "params": self.param_shapes(),
                "optimizer_params": self.optimizer_param_names,
                **({} if self.curriculum is None else {"curriculum": self.curriculum.state_dict()})}

    def save(self, reason: str) -> Optional[str]:
        """Checkpoint this step (collective), at most once: a step already saved by this run, or the checkpoint of
        the run directory this run resumed from, is not written again (``reason`` joins every reason that met at
        the step, e.g. ``interval + signal SIGTERM``).  Returns the tag, or None when nothing could be written
        (no run directory, or non-finite weights or memory)."""
        if not self.run_dir:
            return None
        tag = ckpt.tag_for(self.step)
        if self.saved_step == self.step:
            log(f"checkpoint {self.run_dir}/{tag} already holds step {self.step}; not written again ({reason})",
                self.rank)
            return tag
        if not self._all_finite():
            log(f"checkpoint at step {self.step} NOT written ({reason}): non-finite weights or memory", self.rank)
            return None
        parts = {"memory": self.memory, "stream": self.stream, "rng": self.rng}
        d = self.cfg.debug
        self.ckpt.kill_at = d.kill_in_save if d.kill_in_save and self.step == d.kill_in_save_step else None
        tag = self.ckpt.save(self.engine, self.step, parts, self.checkpoint_meta(reason))
        self.saved_step = self.step
        log(f"saved checkpoint {self.run_dir}/{tag} ({reason})", self.rank)
        return tag

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> int:
        global _progress
        cfg = self.cfg
        stop = StopRequest(exit_duration_mins=cfg.train.exit_duration_mins or None) if cfg.train.exit_on_signal \
            else StopRequest(signals=(), exit_duration_mins=cfg.train.exit_duration_mins or None)
        bar = None
        if self.rank == 0 and cfg.log.progress and cfg.train.iters > self.step:
            bar = _progress = Progress(cfg.train.iters, initial=self.step, desc="train", file=sys.stderr,
                                       every_seconds=cfg.log.progress_seconds, every_steps=cfg.log.progress_steps)
        window = self._new_window()
        code = EXIT_OK
        try:
            while self.step < cfg.train.iters:
                r = self.train_step()
                window["steps"] += 1
                if r["finite"]:
                    window["nll"] += r["nll_sum"]
                    window["scored"] += r["scored"]
                    if r["aux_loss"] is not None:
                        window["aux"] += r["aux_loss"]
                        window["aux_steps"] += 1
                else:
                    window["skipped"] += 1
                    log(f"step {self.step}: non-finite loss, update skipped ({self.nonfinite_run} in a row, "
                        f"{self.nonfinite_total} in total)", self.rank)
                if bar is not None:
                    bar.update(1, **({"loss": f"{window['nll'] / window['scored']:.4f}"} if window["scored"] else {}))
                if self.nonfinite_run >= cfg.train.max_nonfinite:
                    log(f"stopping: {self.nonfinite_run} non-finite steps in a row (train.max_nonfinite); the last "
                        f"checkpoint is the last good state", self.rank)
                    code = EXIT_NONFINITE
                    break
                # a curriculum stage that ends with this step: its last log window is written now (a window
                # never spans two stages) and the next stage starts before this step's checkpoint
                stage_end = None
                if self.curriculum is not None:
                    self.curriculum.observe(r)
                    stage_end = self.curriculum.due(self.step)
                if self.step % cfg.log.interval == 0 or self.step == cfg.train.iters or stage_end is not None:
                    window["seconds"] = time.perf_counter() - window["start"] - window["excluded"]
                    self._log_window(window)
                    window = self._new_window()
                t_aside = time.perf_counter()   # evaluation and checkpoints are not training steps' time
                if stage_end is not None:
                    self._next_stage(stage_end)
                last = self.step >= cfg.train.iters
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and not last:
                    self._eval_and_log("valid", cfg.eval.iters)
                self._debug_signal(stop)
                # every reason to checkpoint this step, saved once: the interval, a stop (signal, wall-time guard,
                # exit interval) and the end of training may meet at one step
                reasons = []
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    reasons.append("interval")
                stop_reason = stop.should_stop()
                if stop_reason is None and cfg.train.exit_interval and self.step % cfg.train.exit_interval == 0 \
                        and not last:
                    stop_reason = f"exit interval {cfg.train.exit_interval}"
                if last:
                    reasons = ["end"] + [r for r in reasons if r != "interval"]
                if stop_reason is not None:
                    reasons.append(stop_reason)
                    log(f"stopping at step {self.step}: {stop_reason}", self.rank)
                if reasons:
                    self.save(" + ".join(reasons))
                window["excluded"] += time.perf_counter() - t_aside
                if stop_reason is not None:
                    self.stopped = stop_reason
                    return EXIT_OK
            if bar is not None:
                bar.close()
                bar = _progress = None
            if code == EXIT_OK:
                self.save("end")   # not written again when the last step saved it (or the run resumed there)
                for split in cfg.eval.final_splits:
                    self._eval_and_log(split, 0)
                if cfg.checkpoint.export and self.run_dir:
                    out = self.family.export(self, os.path.join(self.run_dir, "export"))
                    if out:
                        log(f"exported consolidated model to {out}", self.rank)
            return code
        finally:
            if bar is not None:
                bar.close()
            _progress = None
            stop.restore()

    def _next_stage(self, reason: str) -> None:
        """Move to the next curriculum stage after this step: its stream from its start, every memory state fresh,
        its BPTT depth (memory slots, FLOPs and tokens per step); logged and recorded in metrics.jsonl."""
        cur = self.curriculum
        ended = cur.current.index
        cur.advance(self.step)
        self.k = cur.current.k
        self.memory = MemorySlots(self.model, self.accum, self.micro, self.device,
                                  reset_memory=self.cfg.data.reset_memory, bptt_segments=self.k)
        self.stream = self._open_train_stream()
        self._batches = iter(self.stream)
        self._set_step_rates()
        log(f"step {self.step}: curriculum stage {ended + 1} ends ({reason}); {cur.describe()}; memory states "
            f"reset", self.rank)
        if self.rank == 0:
            self.metrics.write(cur.record(self.step, reason))

    def _debug_signal(self, stop: StopRequest) -> None:
        """Fault injection for the tests (``debug.signal_at``): this rank sends itself the signal at the end of the
        step, as a scheduler would (the handler sets the flag; the stop is agreed by every rank)."""
        d = self.cfg.debug
        if self.step in d.signal_at and self.rank == d.signal_rank:
            os.kill(os.getpid(), getattr(signal, d.signal))

    @staticmethod
    def _new_window() -> Dict[str, float]:
        """Sums over the steps between two log lines; ``seconds`` is the wall clock between them (everything a
        training step costs: data, forward, backward, optimizer, logging), less evaluation and checkpoints."""
        return {"nll": 0.0, "scored": 0.0, "seconds": 0.0, "steps": 0, "skipped": 0, "aux": 0.0, "aux_steps": 0,
                "start": time.perf_counter(), "excluded": 0.0}

    def _log_window(self, w: Dict[str, float]) -> None:
        steps = max(w["steps"], 1)
        dt = max(w["seconds"], 1e-9)
        rec = {"kind": "train", "step": self.step, "total": self.cfg.train.iters,
               # per scored token; null for a window without any (a loss mask scoring nothing: no loss to report)
               "loss": w["nll"] / w["scored"] if w["scored"] else None,
               "scored": int(w["scored"]),
               "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": self._grad_norm(),
               "tokens_per_s": self.tokens_per_step * steps / dt,
               "step_seconds": dt / steps,
               "consumed_tokens": self.consumed_tokens,
               "skipped": int(w["skipped"])}
        if self.curriculum is not None:
            rec["stage"] = self.curriculum.current.index   # the stage the window's steps trained in
        if w["aux_steps"]:
            rec["aux_loss"] = w["aux"] / w["aux_steps"]  # the mechanism's auxiliary loss, before its weight
        achieved = self.flops_per_step * steps / dt / 1e12
        rec["tflops"] = achieved
        rec["mfu"] = achieved / self.peak if self.peak else 0.0
        rec["peak_mem_gb"] = peak_memory_gb()
        if self.rank == 0:
            self.metrics.write(rec)
            log(format_console(rec), self.rank)

    def _grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping (None after a skipped step)."""
        g = self.engine.get_global_grad_norm()   # measured by DeepSpeed's optimizer, or by GuardedAdamW
        if g is None:
            return None
        g = float(g)
        return g if math.isfinite(g) and g >= 0 else None

    def _eval_and_log(self, split: str, max_steps: int) -> None:
        rec = self.evaluate(split, max_steps)
        if rec is None:
            return
        if self.rank == 0:
            self.metrics.write(rec)
            metric = "bpc" if "bpc" in rec else "ppl"
            acc = f" | accuracy {rec['accuracy']:.4f}" if "accuracy" in rec else ""
            log(f"eval {split} @ step {self.step} ({rec['protocol']} protocol, {rec['tokens']} tokens): loss "
                f"{rec['loss']:.4f} | {metric} {rec[metric]:.4f}{acc}", self.rank)

    def close(self) -> None:
        """Close the metrics writers and undo what the engine changed in this process (torch's ``linear`` after
        ZeRO-3), so that a later run or evaluation in the same process computes as it would alone."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        linear = getattr(self, "_functional_linear", None)
        if linear is not None and torch.nn.functional.linear is not linear:
            torch.nn.functional.linear = linear


def run(argv: Optional[List[str]] = None) -> int:
    try:
        cfg, args = parse_args(argv, description="Train a memory-augmented transformer LM with DeepSpeed.")
    except ConfigError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return EXIT_CONFIG
    ds_path = args.ds_config or args.deepspeed_config
    trainer = None
    try:
        trainer = Trainer(cfg, ds_path)
        code = trainer.train()
        if trainer.rank == 0 and trainer.run_dir and trainer.stopped is not None:
            log(f"stopped at step {trainer.step} of {cfg.train.iters} ({trainer.stopped}): checkpoint "
                f"{trainer.run_dir}/{ckpt.tag_for(trainer.step)}; run the same command again to resume",
                trainer.rank)
        elif trainer.rank == 0 and trainer.run_dir:
            log(f"done: logs {trainer.run_dir}/metrics.jsonl, TensorBoard {trainer.run_dir}/tensorboard, "
                f"checkpoints {trainer.run_dir}/iter_*, plot with: python pretrain/plot.py {trainer.run_dir}",
                trainer.rank)
        return code
    except (ConfigError, ckpt.CheckpointError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        if e.filename is None:
            raise
        print(f"train.py: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if trainer is not None:
            trainer.close()
            del trainer
        pdist.teardown()
