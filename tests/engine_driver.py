"""Runs training scenarios inside one process group and writes what happened as JSON (for the engine tests).

    torchrun --nproc_per_node 2 tests/engine_driver.py --scenario resume --out r.json -- <train.py options>

Scenarios:
* ``resume``: for each ZeRO stage: an uninterrupted run of ``--train-iters`` steps; a run that stops at
  ``--stop-at`` (``--exit-interval``: it saves and exits); a run resumed from that checkpoint.  Records the
  losses of each, the final memory states and, with data parallelism, which stream stripes each rank read.
* ``losses``: one run; records the losses.
* ``skip``: a run of 2 steps whose step 2 has a non-finite loss (fault injection) and a run of 1 step: the
  skipped step must leave weights and memory exactly as they were.
* ``lr_resume``: 3 steps at ``--lr 1e-3`` on a cosine schedule that ends at step 3, then two resumes of that
  checkpoint: one with ``--lr 1e-9`` (constant), one with ``--train-iters 6`` (the schedule extended past its
  end); records the largest change of the fp32 master weights in the first update after each resume.
* ``state``: for each ZeRO stage one run saving to ``z{stage}{precision}_{--tag}``, resumed from
  ``z{--source-zero or stage}{--source-precision or precision}_{--source}`` when ``--source`` is given (under
  whatever layout this launch has); writes the full fp32 weights and Adam moments (gathered over every rank) right
  after the start (``<save>.start.pt``) and at the end (``<save>.final.pt``), and records the validation loss at
  both points, the losses, the full-head memory sums and the consumed tokens.  With ``--zero3-linear`` every run of
  the launch computes ``torch.nn.functional.linear`` as a ZeRO-3 engine does (DeepSpeed's
  ``zero3_linear_wrap``, which a ZeRO-3 engine installs for the rest of its process): a ZeRO 0-2 run then
  computes what ZeRO-3 computes from the same state.
* ``stops``: an uninterrupted run of 6 steps, then for every stop kind (``--kinds``: exit interval, SIGTERM,
  SIGUSR1, SIGUSR2 -- sent by the last rank to itself --, the wall-time guard, the end of a shorter run) at a
  step that is a save-interval step (``on``) and one that is not (``between``): a run that stops there and the
  same command without the stop, which resumes.  Records for each run the losses, the final weights (a hash per rank), memory
  sums and stream position, every checkpoint saved (tag and meta.json's reason) and where the resume started.
* ``curriculum``: an uninterrupted run (``train.curriculum`` among the options) saving every step, then for each
  step of ``--resume-points`` a run resumed from a copy of that step's checkpoint alone; records for each the
  losses, weights, memory sums, stream and curriculum position, as ``stops`` does; then the message that refuses
  the uninterrupted run's last checkpoint to a run without the curriculum, and a checkpoint written without one
  to the curriculum.
* ``aux``: one step with the mechanism's auxiliary loss patched to ``1000 * sum(embedding weights)``, with
  ``train.aux_loss_weight`` 1 and 0; records the logged losses and the change of the embedding weights.
* ``grads``: one optimizer step per layout of ``--layouts`` (a JSON list of ``{"name", "zero", "args"}``, the
  args added to the common ones), with the auxiliary loss ``0.5 * mean(h ** 2)`` added (``patch_aux_mean_square``):
  records the step's logged loss, auxiliary loss, scored targets and gradient norm, and (ZeRO-0) the gradient the
  optimizer received, written by the first rank to ``<workdir>/<name>.grad.pt``.
Every run is a fresh ``Trainer`` (model, DeepSpeed engine, streams, states); the process group and the
megatron-core parallel state are kept between runs, which is what lets one launch cover several runs.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import gc
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")


def masters(tr):
    """This rank's fp32 master weights (complete across ZeRO partitions), flattened into one vector."""
    import torch
    from pretrain.engine.export import _fp32_local
    return torch.cat([t.flatten() for t in _fp32_local(tr.engine, tr.model).values()])


def patch_aux(tr, scale=1000.0):
    """Make the mechanism return an auxiliary loss ``scale * sum(first embedding table)``."""
    mech = tr.model.stack
    plain = mech.forward
    weight = tr.model.embedding.tables[0].weight

    def forward(*args, **kwargs):
        h, state, aux = plain(*args, **kwargs)
        extra = scale * weight.float().sum()
        return h, state, extra if aux is None else aux + extra
    mech.forward = forward


def memory_full(tr):
    """Per slot, the sum of every entry of the full-head memory state (tensor-parallel shards gathered)."""
    return [{k: float(st[k].double().sum()) for k in st.keys()} for st in (s.tp_gather() for s in tr.memory.states)]


def weights_hash(tr):
    """sha256 of this rank's parameters (every tensor's bytes, in order)."""
    import hashlib
    h = hashlib.sha256()
    for _, p in sorted(tr.model.named_parameters()):
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record_saves(tr, extra):
    """Wrap the checkpoint manager's save: every save of the run as [tag, meta.json's reason]."""
    saves = extra.setdefault("saves", [])
    plain = tr.ckpt.save

    def save(engine, step, parts, meta):
        tag = plain(engine, step, parts, meta)
        saves.append([tag, meta["reason"]])
        return tag
    tr.ckpt.save = save


def one_run(argv, ds_config, hook=None):
    from pretrain.engine.run_config import parse_args
    from pretrain.engine.trainer import Trainer
    cfg, _ = parse_args(argv)
    tr = Trainer(cfg, ds_config)
    extra = {}
    if hook == "stops":
        record_saves(tr, extra)
        extra["resumed_from"] = None if tr.resume_record is None else tr.resume_record["from"]
    if hook == "masters":
        before = masters(tr)
    elif hook == "state":
        from pretrain.engine.reshard import full_state
        extra["valid_start"] = tr.evaluate("valid", 0)["loss"]
        extra["step_start"] = tr.step
        extra["tokens_start"] = tr.consumed_tokens
        extra["memory_start"] = memory_full(tr)
        extra["memory_fresh_start"] = all(st.equal(tr.memory._fresh()) for st in tr.memory.states)
        st = full_state(tr.engine, tr.model)
        if tr.rank == 0:
            import torch
            torch.save(st, tr.run_dir + ".start.pt")
    elif hook == "aux":
        patch_aux(tr)
        emb = tr.model.embedding.tables[0].weight
        before = emb.detach().clone()
        extra["aux_expected"] = 1000.0 * float(emb.detach().float().sum())
    code = tr.train()
    if hook == "masters":
        extra["first_update"] = float((masters(tr) - before).abs().max())
        extra["lrs"] = [float(tr.scheduler.get_last_lr()[0])]
    elif hook == "state":
        from pretrain.engine.reshard import full_state
        extra["valid_final"] = tr.evaluate("valid", 0)["loss"]
        extra["tokens_final"] = tr.consumed_tokens
        extra["memory_final"] = memory_full(tr)
        st = full_state(tr.engine, tr.model)
        if tr.rank == 0:
            import torch
            torch.save(st, tr.run_dir + ".final.pt")
    elif hook == "stops":
        extra.update(weights=weights_hash(tr), stream=tr.stream.state_dict(), stopped=tr.stopped,
                     curriculum=None if getattr(tr, "curriculum", None) is None else tr.curriculum.state_dict(),
                     bptt_segments=tr.k, memory_k=tr.memory.k)
    elif hook == "aux":
        delta = (tr.model.embedding.tables[0].weight.detach() - before).flatten()
        extra.update(emb_delta_max=float(delta.max()), emb_delta_min=float(delta.min()),
                     aux_losses=[h["aux_loss"] for h in tr.history], lr=float(tr.cfg.optim.lr))
    out = {"code": code, "losses": [h["loss"] for h in tr.history], "steps": [h["step"] for h in tr.history],
           "finite": [h["finite"] for h in tr.history], "final_step": tr.step,
           "grad_norms": [h["grad_norm"] for h in tr.history],
           "memory": [{k: s[k].float().sum().item() for k in s.keys()} for s in tr.memory.states],
           "dp_rank": tr.dp_rank, "dp_size": tr.dp_size, "tp_rank": tr.tp_rank, "tp_size": tr.tp_size,
           "stripes": [[int(tr.stream.begin[tr.stream.stripe(slot, row)]) for row in range(tr.micro)]
                       for slot in range(tr.accum)],
           "first_tokens": tr.stream.get(0, 0).tokens[:, :4].tolist(),
           "skipped_by_deepspeed": int(tr.engine.skipped_steps),
           "params_finite": bool(tr._all_finite()),
           "param_sum": float(sum(p.detach().double().sum() for p in tr.model.parameters()
                                  if not hasattr(p, "ds_tensor"))), **extra}
    tr.close()
    del tr
    gc.collect()
    return out


def one_step(argv, ds_config, grad_path=None):
    """One ``train_step`` of a fresh trainer (no checkpoint, no log line); with ``grad_path`` (ZeRO-0, where the
    optimizer is the client one and every rank holds whole gradients) the first rank saves the gradient the
    optimizer is handed (after DeepSpeed's accumulation and data-parallel reduction), flattened in parameter
    order, as float64."""
    import torch
    from pretrain.engine.run_config import parse_args
    from pretrain.engine.trainer import Trainer
    cfg, _ = parse_args(argv)
    tr = Trainer(cfg, ds_config)
    patch_aux_mean_square(tr)
    seen = {}
    if grad_path is not None:
        opt = tr.engine.optimizer
        plain = opt.step

        def step(*args, **kwargs):
            seen["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double()
                                      .flatten() for p in tr.model.parameters()])
            return plain(*args, **kwargs)
        opt.step = step
    rec = tr.train_step()
    if grad_path is not None and tr.rank == 0:
        torch.save(seen["grad"], grad_path)
    out = {"loss": rec["loss"], "scored": rec["scored"], "grad_norm": rec["grad_norm"], "finite": rec["finite"],
           "aux_loss": rec["aux_loss"], "grad": grad_path if grad_path is not None else None,
           "dp_size": tr.dp_size}
    tr.close()
    del tr
    gc.collect()
    return out


def patch_aux_mean_square(tr, scale=0.5):
    """Make the mechanism return the auxiliary loss ``scale * mean(h ** 2)`` over its segment's output (rows,
    positions, width): a per-segment mean over every row and position, which depends on the weights through every
    row (a real one, Compressive's reconstruction loss, is a mean over the positions that compressed)."""
    mech = tr.model.stack
    plain = mech.forward

    def forward(*args, **kwargs):
        h, state, aux = plain(*args, **kwargs)
        extra = scale * h.float().pow(2).mean()
        return h, state, extra if aux is None else aux + extra
    mech.forward = forward


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", choices=["resume", "losses", "skip", "lr_resume", "aux", "state", "stops", "grads",
                                            "curriculum"],
                   required=True)
    p.add_argument("--kinds", default="exit_interval,SIGTERM,SIGUSR1,SIGUSR2,walltime,end",
                   help="stops: comma-separated stop kinds")
    p.add_argument("--layouts", default="[]", help="grads: JSON list of {name, zero, args}")
    p.add_argument("--tag", default="run")
    p.add_argument("--source", default=None)
    p.add_argument("--source-zero", default=None)
    p.add_argument("--source-precision", default=None)
    p.add_argument("--zero", default="0", help="comma-separated ZeRO stages")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--zero3-linear", action="store_true",
                   help="every run uses DeepSpeed's ZeRO-3 replacement of torch.nn.functional.linear")
    p.add_argument("--stop-at", type=int, default=3)
    p.add_argument("--resume-points", default="1", help="curriculum: comma-separated steps to resume from")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rest = [a for a in args.rest if a != "--"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import torch.distributed as dist
    if args.zero3_linear:
        import torch.nn.functional as F
        from deepspeed.runtime.zero.linear import zero3_linear_wrap
        F.linear = zero3_linear_wrap
    results = {}
    if args.scenario == "grads":
        for lay in json.loads(args.layouts):
            ds = os.path.join(root, "ds_configs", f"zero{lay['zero']}_{args.precision}.json")
            grad = os.path.join(args.workdir, f"{lay['name']}.grad.pt") if int(lay["zero"]) == 0 else None
            results[lay["name"]] = one_step(rest + lay["args"], ds, grad)
    for stage in ([] if args.scenario == "grads" else [int(s) for s in args.zero.split(",")]):
        ds = os.path.join(root, "ds_configs", f"zero{stage}_{args.precision}.json")
        base = os.path.join(args.workdir, f"z{stage}")
        if args.scenario == "losses":
            results[stage] = {"run": one_run(rest + ["--save", base + "_run"], ds)}
            continue
        if args.scenario == "skip":
            results[stage] = {
                "poisoned": one_run(rest + ["--save", base + "_poisoned", "--train-iters", "2",
                                            "--debug.inject_nonfinite", "[2]"], ds),
                "short": one_run(rest + ["--save", base + "_short", "--train-iters", "1"], ds)}
            continue
        if args.scenario == "lr_resume":
            first = rest + ["--lr", "1e-3", "--optim.schedule", "cosine"]
            one_run(first + ["--save", base + "_a", "--train-iters", "3"], ds)
            results[stage] = {
                "lower_lr": one_run(rest + ["--load", base + "_a", "--save", base + "_b", "--train-iters", "4",
                                            "--lr", "1e-9", "--optim.schedule", "constant"], ds, hook="masters"),
                "extended": one_run(first + ["--load", base + "_a", "--save", base + "_c", "--train-iters", "6",
                                             "--exit-interval", "4"],
                                    ds, hook="masters")}
            continue
        if args.scenario == "state":
            save = os.path.join(args.workdir, f"z{stage}{args.precision}_{args.tag}")
            load = []
            if args.source:
                src = f"z{args.source_zero or stage}{args.source_precision or args.precision}_{args.source}"
                load = ["--load", os.path.join(args.workdir, src)]
            results[stage] = one_run(rest + ["--save", save] + load, ds, hook="state")
            continue
        if args.scenario == "stops":
            results[stage] = {"full": one_run(rest + ["--save", base + "_full", "--train-iters", "6"], ds,
                                              hook="stops")}
            last = str(dist.get_world_size() - 1 if dist.is_initialized() else 0)
            for kind in args.kinds.split(","):
                at = 1 if kind == "walltime" else 3     # the wall-time guard trips at the first step's check
                stop = {"exit_interval": ["--exit-interval", str(at)],
                        "walltime": ["--exit-duration-in-mins", "1e-9"],
                        "end": ["--train-iters", str(at)]}.get(
                    kind, ["--debug.signal_at", f"[{at}]", "--debug.signal", kind, "--debug.signal_rank", last])
                for where, interval in (("on", at), ("between", 2)):
                    save = f"{base}_{kind}_{where}"
                    common = rest + ["--save", save, "--save-interval", str(interval), "--train-iters", "6"]
                    results[stage][f"{kind}_{where}"] = {"at": at, "interval": interval,
                                                         "stopped": one_run(common + stop, ds, hook="stops"),
                                                         "resumed": one_run(common, ds, hook="stops")}
            continue
        if args.scenario == "curriculum":
            every = ["--save-interval", "1", "--checkpoint.keep_last", "100"]
            full = base + "_full"
            results[stage] = {"full": one_run(rest + every + ["--save", full], ds, hook="stops")}
            for at in (int(s) for s in args.resume_points.split(",")):
                save = f"{base}_from{at}"
                if not dist.is_initialized() or dist.get_rank() == 0:
                    import shutil
                    tag = f"iter_{at:07d}"
                    shutil.copytree(os.path.join(full, tag), os.path.join(save, tag))
                    with open(os.path.join(save, "latest"), "w") as f:
                        f.write(tag)
                if dist.is_initialized():
                    dist.barrier()
                results[stage][str(at)] = one_run(rest + every + ["--save", save], ds, hook="stops")
            # resuming across a curriculum and none is refused before anything is written or loaded
            from pretrain.config_base import ConfigError
            plain = [a for i, a in enumerate(rest) if "--train.curriculum" not in (a, rest[i - 1] if i else None)]

            def refused(argv):
                try:
                    one_run(argv, ds)
                except ConfigError as e:
                    return str(e)
            results[stage]["refused_without"] = refused(plain + ["--save", full])
            one_run(plain + ["--save", base + "_plain", "--train-iters", "1"], ds)
            results[stage]["refused_with"] = refused(rest + ["--save", base + "_plain"])
            continue
        if args.scenario == "aux":
            results[stage] = {w: one_run(rest + ["--save", f"{base}_aux{w}", "--train-iters", "1",
                                                 "--train.aux_loss_weight", w], ds, hook="aux") for w in ("1", "0")}
            continue
        full = one_run(rest + ["--save", base + "_full"], ds)
        stopped = one_run(rest + ["--save", base + "_resumed", "--exit-interval", str(args.stop_at)], ds)
        resumed = one_run(rest + ["--save", base + "_resumed"], ds)
        results[stage] = {"full": full, "stopped": stopped, "resumed": resumed}
    rank = dist.get_rank() if dist.is_initialized() else 0
    gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, results)
    else:
        gathered = [results]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    from pretrain.engine.dist import teardown
    teardown()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
