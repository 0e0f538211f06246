"""The training loop: DeepSpeed steps with memory carried across steps, exact resume, evaluation, logging.

One optimizer step = ``grad_accum`` micro-batches.  Micro-batch ``slot`` of step ``t`` continues the text of
micro-batch ``slot`` of step ``t-1`` (the ordered stream guarantees it), so each slot keeps its own memory
state: reset at document boundaries when ``data.reset_memory``, detached at segment boundaries (truncated
backprop) or carried with gradients through ``train.bptt_segments`` segments.  A micro-batch whose loss is
not finite on any rank poisons the step: the update is skipped (see ``ds_setup``) and every slot keeps the
state it had before the step.

Checkpoints hold, per rank, every slot's memory state, the stream position and the RNG states next to
DeepSpeed's files, so a resumed run reproduces the uninterrupted one (bit for bit in fp32 on CPU).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from data_tools.streams import EvalStream, OrderedStream
from pretrain.config_base import ConfigError, to_dict
from pretrain.engine import checkpoint as ckpt
from pretrain.engine import dist as pdist
from pretrain.engine.data import load_data_info, summarize_loss
from pretrain.engine.ds_setup import (build_optimizer, grad_norm, load_ds_config, precision_of, reconcile,
                                      zero_stage)
from pretrain.engine.metrics import MetricsWriter, format_console, peak_memory_gb, peak_tflops
from pretrain.engine.run_config import RunConfig, parse_args, save_resolved
from pretrain.engine.schedule import LRScheduler
from pretrain.engine.signals import StopRequest

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE = 0, 2, 3


def log(msg: str, rank: int = 0) -> None:
    """Print on the first rank (through tqdm when a progress bar is active)."""
    if rank != 0:
        return
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
    except ImportError:
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


class Trainer:
    def __init__(self, cfg: RunConfig, ds_path: Optional[str]):
        self.cfg = cfg
        ds_raw = load_ds_config(ds_path)
        self.data = load_data_info(cfg.data.path)  # before any process starts talking: fail fast
        set_threads(cfg)
        self.info = pdist.initialize()
        from pretrain.model import parallel
        parallel.initialize(cfg.parallel.tp)
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.rank = self.info.rank
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.device = self.info.device

        # the vocabulary size comes from the data
        if cfg.model.vocab_size != self.data.vocab_size:
            log(f"model.vocab_size {cfg.model.vocab_size} -> {self.data.vocab_size} (from "
                f"{self.data.prefixes['train']}.json)", self.rank)
            cfg.model.vocab_size = self.data.vocab_size
        from pretrain.config_base import validate
        validate(cfg)
        self.ds_config, self.micro, self.accum = reconcile(ds_raw, cfg, self.dp_size, ds_path)
        self.dtype = precision_of(self.ds_config)
        # DeepSpeed reports no gradient norm for plain fp32 data parallelism: the trainer measures it
        self.own_grad_norm = zero_stage(self.ds_config) == 0 and self.dtype == torch.float32
        self.last_grad_norm: Optional[float] = None
        self.seg_len = cfg.model.tgt_len
        self.k = cfg.train.bptt_segments

        # model, optimizer, schedule, DeepSpeed; --seed governs the weights too (as in Megatron)
        cfg.model.seed = cfg.train.seed
        torch.manual_seed(cfg.train.seed)
        from pretrain.model import build_model
        self.model = build_model(cfg.model)
        if cfg.train.init_from:
            from pretrain.engine.export import load_weights_into
            load_weights_into(self.model, cfg.train.init_from)
        # dropout differs across data-parallel ranks and agrees across tensor-parallel ranks
        parallel.seed_rng(cfg.train.seed + 1000 * self.dp_rank)
        if zero_stage(self.ds_config) == 3:
            self._declare_zero3_units()
        optimizer = build_optimizer(self.model, cfg, self.ds_config)
        total = cfg.optim.decay_iters or cfg.train.iters
        o = cfg.optim
        sched = lambda opt: LRScheduler(opt, lr=o.lr, min_lr=o.min_lr, warmup=o.warmup_iters, total=total,
                                        style=o.schedule, wsd_decay=o.wsd_decay, wsd_shape=o.wsd_shape)
        import deepspeed
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=sched, config=self.ds_config,
            model_parameters=[p for p in self.model.parameters() if p.requires_grad] if optimizer is None else None,
            mpu=parallel.MpuAdapter())
        if cfg.model.checkpoint_activations and self.tp_size > 1:
            self._use_deepspeed_checkpointing(parallel)

        # streams and one memory state per accumulation slot
        self.stream = OrderedStream(self.data.prefixes["train"], dp_rank=self.dp_rank, dp_size=self.dp_size,
                                    micro_batch=self.micro, grad_accum=self.accum,
                                    seq_len=self.seg_len * self.k, seed=cfg.train.seed, roll=cfg.data.roll,
                                    align=cfg.data.align, pad_id=self.data.pad_id)
        self.states = [self._fresh_state() for _ in range(self.accum)]
        self.step = 0
        self.consumed_tokens = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.history: List[Dict[str, Any]] = []  # per step of this process: step, loss, finite

        self.run_dir = cfg.checkpoint.save
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.dp_rank, self.tp_rank,
                                           self.dp_size, self.tp_size, self.rank)
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, cfg.log.tensorboard,
                                     {"enabled": cfg.log.wandb, "project": cfg.log.wandb_project,
                                      "mode": cfg.log.wandb_mode}, to_dict(cfg))
        if self.rank == 0 and self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            save_resolved(cfg, os.path.join(self.run_dir, "config.yaml"))
            with open(os.path.join(self.run_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=2)
        self.peak, self.peak_src = peak_tflops(self.dtype, cfg.log.peak_tflops)
        n = self.seg_len
        self.flops_per_step = 3 * self.model.flops(self.micro, n, cfg.model.mem_len) * self.accum * self.k
        self.tokens_per_step = self.micro * self.accum * self.dp_size * n * self.k
        nparams = sum(p.numel() for p in self.model.parameters())
        log(f"run: world {self.info.world_size} (data-parallel {self.dp_size} x tensor-parallel {self.tp_size}), "
            f"ZeRO-{zero_stage(self.ds_config)}, {str(self.dtype).replace('torch.', '')}, "
            f"{nparams * self.tp_size / 1e6:.2f}M parameters, micro-batch {self.micro} x accumulation "
            f"{self.accum}, segment {n} x {self.k}, memory {cfg.model.mem_len}, attn_type {cfg.model.attn_type}; "
            f"{self.stream.steps_per_epoch} steps per epoch; peak {self.peak:.2f} TFLOP/s ({self.peak_src})",
            self.rank)
        # last, so that nothing after it draws from the restored random generators
        self._maybe_resume()
        self._batches = iter(self.stream)  # continues from the stream's (possibly restored) position

    # ------------------------------------------------------------------------------------------------ set-up
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

    def _fresh_state(self):
        return self.model.init_state(self.micro, device=self.device)

    def _maybe_resume(self) -> None:
        cfg = self.cfg
        load_dir = cfg.checkpoint.load
        if load_dir is None and self.run_dir and ckpt.read_latest(self.run_dir):
            load_dir = self.run_dir
        if load_dir is None:
            return
        if ckpt.read_latest(load_dir) is None:
            raise ConfigError("checkpoint.load", f"{load_dir}: no checkpoint ('latest' file) to resume from")
        res = self.ckpt.load(self.engine, load_dir, load_optimizer=cfg.checkpoint.load_optim)
        meta, rs = res["meta"], res["rank_state"]
        self.step = int(meta["step"])
        self.consumed_tokens = int(meta.get("consumed_tokens", 0))
        self.nonfinite_total = int(meta.get("nonfinite_total", 0))
        if rs is not None:
            info = self.stream.load_state_dict(rs["stream"], policy=cfg.data.resume_policy)
            from pretrain.model import MemoryState
            if not info["reset_memory"] and len(rs["memory"]) == self.accum:
                self.states = [MemoryState.from_state_dict(d).to(self.device) for d in rs["memory"]]
            ckpt.set_rng_state(rs["rng"])
            log(info["message"], self.rank)
        else:
            # the data-parallel layout changed: map the stream position by policy, memory starts afresh
            any_rank = self.ckpt.load_rank_states(load_dir, res["tag"], 0)
            info = self.stream.load_state_dict(any_rank[0]["stream"], policy=cfg.data.resume_policy)
            log(info["message"], self.rank)
        log(f"resumed from {load_dir}/{res['tag']} at step {self.step}", self.rank)

    # ------------------------------------------------------------------------------------------------ steps
    def _micro_step(self, mb, slot: int, inject_nan: bool):
        """Forward + backward of one micro-batch; returns (nll sum, scored tokens, finite everywhere)."""
        cfg, dev = self.cfg, self.device
        state = self.states[slot]
        if cfg.data.reset_memory and mb.reset.any():
            state = self.model.reset_state(state, torch.from_numpy(mb.reset).to(dev))
        tokens = torch.from_numpy(mb.tokens).to(dev)
        targets = torch.from_numpy(mb.targets).to(dev)
        mask = torch.from_numpy(mb.loss_mask).to(dev)
        n = self.seg_len
        nll_sum = torch.zeros((), dtype=torch.float32, device=dev)
        st = state
        for j in range(self.k):
            sl = slice(j * n, (j + 1) * n)
            out, st = self.engine(tokens[:, sl], st, targets[:, sl], detach_state=(j == self.k - 1))
            nll_sum = nll_sum + (out.nll.float() * mask[:, sl]).sum()
        count = float(mask.sum())
        loss = nll_sum / max(count, 1.0)
        if inject_nan:
            loss = loss * float("nan")
        finite = pdist.all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) == 0.0
        if not finite:
            # make sure the update is skipped whatever produced the bad loss: every gradient non-finite
            loss = loss * float("nan")
        self.engine.backward(loss)
        if self.own_grad_norm and slot == self.accum - 1:  # averaged over data-parallel ranks, not yet clipped
            self.last_grad_norm = grad_norm(self.model, self.ps.get_tensor_model_parallel_group())
        self.engine.step()
        if finite:
            self.states[slot] = st.detach()
        return float(nll_sum.detach()), count, finite

    def train_step(self) -> Dict[str, Any]:
        t0 = time.time()
        batches = next(self._batches)
        inject = (self.step + 1) in self.cfg.debug.inject_nonfinite and self.rank == 0  # logged, 1-based
        backup = list(self.states)
        nll, count, finite = 0.0, 0.0, True
        for slot, mb in enumerate(batches):
            s, c, ok = self._micro_step(mb, slot, inject and slot == 0)
            nll, count, finite = nll + s, count + c, finite and ok
        if not finite:
            self.states = backup  # the step is skipped: no slot moves on with a poisoned state
        nll, count = pdist.all_reduce_sum([nll, count], self.dp_group)
        self.step += 1
        self.consumed_tokens += self.tokens_per_step
        if finite:
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
        rec = {"step": self.step, "loss": nll / max(count, 1.0) if finite else float("nan"), "finite": finite,
               "seconds": time.time() - t0, "scored": count, "nll_sum": nll, "grad_norm": self._grad_norm()}
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self, split: str, max_steps: int) -> Optional[Dict[str, Any]]:
        if not self.data.has(split):
            return None
        from pretrain.engine.evaluation import streamed_eval
        cfg, e = self.cfg, self.cfg.eval
        if e.protocol == "sliding":
            raise ConfigError("eval.protocol", "the sliding protocol runs in pretrain/evaluate.py, not during training")
        tgt = e.tgt_len or cfg.model.tgt_len
        num_streams = 1 if e.protocol == "carry" else e.micro_batch
        stream = EvalStream(self.data.prefixes[split], seq_len=tgt, num_streams=num_streams,
                                 dp_rank=self.dp_rank, dp_size=self.dp_size, align=cfg.data.align,
                                 pad_id=self.data.pad_id)
        xl = e.protocol == "xl"
        self.engine.eval()
        try:
            res = streamed_eval(
                lambda t, s, y, **kw: self.engine(t, s, y, **kw), self.model, stream, device=self.device,
                mem_len=(e.mem_len if xl else None), clamp_len=(e.clamp_len if xl else None),
                same_length=(e.same_length if xl else None), reset_memory=cfg.data.reset_memory,
                max_steps=max_steps, group=self.dp_group,
                accuracy=e.accuracy if e.accuracy is not None else "loss_mask" in self.data.meta)
        finally:
            self.engine.train()
        rec = {"kind": "eval", "split": split, "step": self.step, "protocol": e.protocol,
               "tokens": int(res["tokens"]), **summarize_loss(res["loss"], self.data.metric)}
        if "accuracy" in res:
            rec["accuracy"] = res["accuracy"]
        return rec

    # ------------------------------------------------------------------------------------------------ save
    def _all_finite(self) -> bool:
        bad = 0.0
        for p in self.model.parameters():
            data = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if data.numel() and not torch.isfinite(data).all():
                bad = 1.0
                break
        for st in self.states:
            for k in st.keys():
                if st[k].is_floating_point() and not torch.isfinite(st[k]).all():
                    bad = 1.0
        return pdist.all_reduce_max(bad) == 0.0

    def save(self, reason: str) -> Optional[str]:
        if not self.run_dir:
            return None
        if not self._all_finite():
            log(f"checkpoint at step {self.step} NOT written ({reason}): non-finite weights or memory", self.rank)
            return None
        rank_state = {"stream": self.stream.state_dict(), "memory": [s.state_dict() for s in self.states]}
        meta = {"consumed_tokens": self.consumed_tokens, "nonfinite_total": self.nonfinite_total,
                "reason": reason, "micro_batch": self.micro, "grad_accum": self.accum,
                "attn_type": self.cfg.model.attn_type, "dtype": str(self.dtype)}
        tag = self.ckpt.save(self.engine, self.step, rank_state, meta)
        log(f"saved checkpoint {self.run_dir}/{tag} ({reason})", self.rank)
        return tag

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> int:
        cfg = self.cfg
        stop = StopRequest(exit_duration_mins=cfg.train.exit_duration_mins or None) if cfg.train.exit_on_signal \
            else StopRequest(signals=(), exit_duration_mins=cfg.train.exit_duration_mins or None)
        bar = None
        if self.rank == 0 and cfg.log.progress and cfg.train.iters > self.step:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.iters, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0)
        window = {"nll": 0.0, "scored": 0.0, "seconds": 0.0, "steps": 0, "skipped": 0}
        code = EXIT_OK
        try:
            while self.step < cfg.train.iters:
                r = self.train_step()
                window["seconds"] += r["seconds"]
                window["steps"] += 1
                if r["finite"]:
                    window["nll"] += r["nll_sum"]
                    window["scored"] += r["scored"]
                else:
                    window["skipped"] += 1
                    log(f"step {self.step}: non-finite loss, update skipped ({self.nonfinite_run} in a row, "
                        f"{self.nonfinite_total} in total)", self.rank)
                if bar is not None:
                    bar.update(1)
                    if window["scored"]:
                        bar.set_postfix(loss=f"{window['nll'] / window['scored']:.4f}")
                if self.nonfinite_run >= cfg.train.max_nonfinite:
                    log(f"stopping: {self.nonfinite_run} non-finite steps in a row (train.max_nonfinite); the last "
                        f"checkpoint is the last good state", self.rank)
                    code = EXIT_NONFINITE
                    break
                if self.step % cfg.log.interval == 0 or self.step == cfg.train.iters:
                    self._log_window(window)
                    window = {"nll": 0.0, "scored": 0.0, "seconds": 0.0, "steps": 0, "skipped": 0}
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.iters:
                    self._eval_and_log("valid", cfg.eval.iters)
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 \
                        and self.step < cfg.train.iters:
                    self.save("interval")
                reason = stop.should_stop()
                if reason is None and cfg.train.exit_interval and self.step % cfg.train.exit_interval == 0 \
                        and self.step < cfg.train.iters:
                    reason = f"exit interval {cfg.train.exit_interval}"
                if reason is not None:
                    log(f"stopping at step {self.step}: {reason}", self.rank)
                    self.save(reason)
                    return EXIT_OK
            if code == EXIT_OK:
                self.save("end")
                for split in cfg.eval.final_splits:
                    self._eval_and_log(split, 0)
                if cfg.checkpoint.export and self.run_dir:
                    from pretrain.engine.export import export_from_engine
                    out = export_from_engine(self, os.path.join(self.run_dir, "export"))
                    if out:
                        log(f"exported consolidated model to {out}", self.rank)
            return code
        finally:
            if bar is not None:
                bar.close()
            stop.restore()

    def _log_window(self, w: Dict[str, float]) -> None:
        steps = max(w["steps"], 1)
        dt = max(w["seconds"], 1e-9)
        rec = {"kind": "train", "step": self.step, "total": self.cfg.train.iters,
               "loss": w["nll"] / w["scored"] if w["scored"] else float("nan"),  # per scored token
               "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": self._grad_norm(),
               "tokens_per_s": self.tokens_per_step * steps / dt,
               "step_seconds": dt / steps,
               "consumed_tokens": self.consumed_tokens,
               "skipped": int(w["skipped"])}
        achieved = self.flops_per_step * steps / dt / 1e12
        rec["tflops"] = achieved
        rec["mfu"] = achieved / self.peak if self.peak else 0.0
        rec["peak_mem_gb"] = peak_memory_gb()
        if self.rank == 0:
            self.metrics.write(rec)
            log(format_console(rec), self.rank)

    def _grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping (None after a skipped step)."""
        g = self.last_grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
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
        self.metrics.close()


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
        if trainer.rank == 0 and trainer.run_dir:
            log(f"done: logs {trainer.run_dir}/metrics.jsonl, TensorBoard {trainer.run_dir}/tensorboard, "
                f"checkpoints {trainer.run_dir}/iter_*, plot with: python pretrain/plot.py {trainer.run_dir}",
                trainer.rank)
        return code
    except ConfigError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if trainer is not None:
            trainer.close()
            del trainer
        pdist.teardown()
