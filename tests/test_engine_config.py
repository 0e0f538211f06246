"""Run configuration, DeepSpeed reconciliation and learning-rate schedules (no processes started)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pretrain.config_base import ConfigError, field_paths
from pretrain.engine.ds_setup import GuardedAdamW, engine_config, load_ds_config, precision_of, reconcile
from pretrain.engine.run_config import RunConfig, build_parser, parse_args
from pretrain.engine.schedule import LRScheduler, lr_at


def test_megatron_names_and_field_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  n_layer: 3\n  attn_type: 3\ntrain:\n  iters: 7\noptim:\n  lr: 0.01\n")
    cfg, _ = parse_args(["--config", str(preset), "--train-iters", "50", "--model.d_model", "64",
                         "--tensor-model-parallel-size", "2", "--data-path", "d/x", "--save", "runs/a",
                         "--recompute-activations", "--lr", "1e-3", "--optim.lr", "2e-3"])
    assert cfg.model.n_layer == 3 and cfg.model.attn_type == 3          # from the preset
    assert cfg.train.iters == 50 and cfg.model.d_model == 64           # overrides
    assert cfg.parallel.tp == 2 and cfg.data.path == "d/x" and cfg.checkpoint.save == "runs/a"
    assert cfg.model.checkpoint_activations is True
    assert cfg.optim.lr == pytest.approx(2e-3)                         # the last mention wins


def test_none_on_the_command_line():
    """"none" / "null" is None for a field that takes None, and text for a string field whose value it is
    (fast_weight.positions: none, the carried fast weights' setting)."""
    cfg, _ = parse_args(["--model.fast_weight.positions", "none", "--model.fast_weight.attn_norm", "none",
                         "--model.d_embed", "null"])
    assert cfg.model.fast_weight.positions == "none"
    assert cfg.model.fast_weight.attn_norm is None and cfg.model.d_embed is None


def test_the_last_mention_wins_in_either_order():
    cfg, _ = parse_args(["--optim.lr", "2e-3", "--lr", "1e-3"])
    assert cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("argv, field", [
    (["--model.n_head", "abc"], "model.n_head"),
    (["--optim.schedule", "exponential"], "optim.schedule"),
    (["--train-iters", "-1"], "train.iters"),
    (["--data.align", "sentence"], "data.align"),
    (["--eval.final_splits", "[dev]"], "eval.final_splits"),
    (["--optim.min_lr", "1.0", "--lr", "0.1"], "optim.min_lr"),
])
def test_invalid_values_name_the_field(argv, field):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert e.value.field == field and field in str(e.value)


def test_unknown_yaml_key_names_the_field(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match="model.n_layers") as e:
        parse_args(["--config", str(preset)])
    assert "n_layer" in str(e.value)  # the valid names are listed


def test_unknown_option_exits_with_a_short_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model.nlayer", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --model.nlayer" in err and "--model.n_layer" in err and len(err.splitlines()) == 1


def test_help_documents_every_field_with_its_default():
    text = build_parser("x").format_help()
    for path, (_, default, help_text) in field_paths(RunConfig).items():
        assert f"--{path}" in text, path
        assert help_text, f"{path} has no help text"
    assert "(default: 0.00025)" in text  # optim.lr's


def _cfg(**train):
    cfg = RunConfig()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_reconcile_fills_deepspeed_from_the_run_config():
    ds, micro, accum = reconcile({"zero_optimization": {"stage": 2}}, _cfg(micro_batch=4, grad_accum=3), 2, None)
    assert (micro, accum) == (4, 3)
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.25
    ds, micro, accum = reconcile({"train_micro_batch_size_per_gpu": 5}, _cfg(), 1, None)
    assert (micro, accum) == (5, 1)  # the JSON's value when the run config leaves it unset


def test_reconcile_refuses_conflicts_and_unsupported_settings():
    with pytest.raises(ConfigError, match="train.micro_batch.*train_micro_batch_size_per_gpu=8.*a.json"):
        reconcile({"train_micro_batch_size_per_gpu": 8}, _cfg(micro_batch=4), 1, "a.json")
    with pytest.raises(ConfigError, match="train_batch_size=100"):
        reconcile({"train_batch_size": 100}, _cfg(micro_batch=4), 2, "a.json")
    with pytest.raises(ConfigError, match="optim.clip_grad"):
        reconcile({"gradient_clipping": 1.0}, _cfg(), 1, "a.json")
    with pytest.raises(ConfigError, match="scheduler"):
        reconcile({"scheduler": {"type": "WarmupLR"}}, _cfg(), 1, "a.json")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16.*GPU"):
            reconcile({"fp16": {"enabled": True}}, _cfg(), 1, "a.json")


def test_every_shipped_deepspeed_config_loads(tmp_path):
    import glob
    import os
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs")
    files = sorted(glob.glob(os.path.join(root, "*.json")))
    assert len(files) >= 13
    for f in files:
        ds = load_ds_config(f)
        dtype = precision_of(ds)
        assert ("bf16" in f) == (dtype == torch.bfloat16) and ("fp16" in f) == (dtype == torch.float16)
        assert f"zero{ds['zero_optimization']['stage']}" in os.path.basename(f)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  \"zero_optimization\": {\n")
    with pytest.raises(ConfigError, match="bad.json:3"):
        load_ds_config(str(bad))


def test_guarded_adamw_skips_non_finite_updates():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and opt.skipped == 1 and torch.equal(p.data, torch.ones(3)) and p.grad is None
    assert not opt.state  # no moment was touched
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.overflow and (p.data < 1).all()
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert opt.overflow and opt.skipped == 2 and opt._global_grad_norm == float("inf")


def test_deepspeed_clips_only_where_the_client_optimizer_does_not():
    """ZeRO-0 fp32 with the client optimizer: GuardedAdamW clips, DeepSpeed gets gradient_clipping 0 (no second
    clipping); every other layout keeps DeepSpeed's clipping; the run's own config (saved beside checkpoints) keeps
    the user's value."""
    z0 = {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.25}
    assert engine_config(z0)["gradient_clipping"] == 0.0 and z0["gradient_clipping"] == 0.25
    for ds in ({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.25},
               {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}, "gradient_clipping": 0.25},
               {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW"}, "gradient_clipping": 0.25}):
        assert engine_config(ds)["gradient_clipping"] == 0.25


@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
def test_guarded_adamw_clips_and_updates_as_clip_grad_norm_then_adamw(clip):
    """Its one pass (norm, clipping, fused AdamW) gives the parameters of torch's clip_grad_norm_ followed by
    AdamW, over several steps and two parameter groups, and reports the norm before clipping."""
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    opt = GuardedAdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}],
                       clip_grad=clip, **kw)
    opt_ref = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}],
                                **kw)
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip else float("inf"))
        opt.step()
        opt_ref.step()
        assert not opt.overflow and opt._global_grad_norm == pytest.approx(float(norm), rel=1e-6)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_then_follow_their_shape(style):
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110, style=style, wsd_decay=0.2)
    assert [lr_at(s, **kw) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, **kw) == pytest.approx(1.0)
    end = lr_at(110, **kw)
    assert end == pytest.approx(1.0 if style == "constant" else 0.1)
    mid = lr_at(60, **kw)
    expect = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.55, "constant": 1.0,
              "wsd": 1.0}[style]
    assert mid == pytest.approx(expect)
    if style == "wsd":
        assert lr_at(88, **kw) == pytest.approx(1.0) and lr_at(99, **kw) == pytest.approx(0.55)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # never increases after warmup


def test_scheduler_state_round_trips_and_resumes_exactly():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    a = LRScheduler(opt, lr=1.0, min_lr=0.0, warmup=3, total=20, style="cosine")
    for _ in range(7):
        a.step()
    sd = a.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    b = LRScheduler(opt2, lr=1.0, min_lr=0.0, warmup=3, total=20, style="cosine")
    b.load_state_dict(sd)
    for _ in range(5):
        assert a.get_last_lr() == b.get_last_lr() and opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
        a.step()
        b.step()
    with pytest.raises(ValueError, match="unknown schedule"):
        LRScheduler(opt, lr=1.0, min_lr=0.0, warmup=0, total=5, style="step")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_cpu_allocator_tuning_applies_once_and_can_be_turned_off():
    code = "from pretrain.runtime import tune_cpu_allocator as t; print(t(), t())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, MEMTRAIN_MALLOC_TUNING="0"))
    assert on.stdout.split() == ["True", "True"], on.stderr
    assert off.stdout.split() == ["False", "False"], off.stderr


def test_slurm_variables_map_to_torch_distributed(monkeypatch):
    from pretrain.engine import dist as pdist
    assert pdist._first_slurm_host("node[003-005,007],gpu1") == "node003"
    assert pdist._first_slurm_host("gpu7") == "gpu7"
    # a private copy of the environment: what the mapping writes must not reach later tests of this process
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM")}
    env.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="node[12-13]",
               SLURM_JOB_ID="4242")
    monkeypatch.setattr(os, "environ", env)
    pdist.map_slurm_env()  # a batch script without srun: no step, stays one process
    assert "RANK" not in env
    env["SLURM_STEP_NUM_TASKS"] = "8"
    pdist.map_slurm_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "node12" and env["MASTER_PORT"] == str(20000 + 4242)
    # a launcher's variables win: nothing is overwritten
    env.update(RANK="0", SLURM_PROCID="3")
    pdist.map_slurm_env()
    assert env["RANK"] == "0"


def test_checks_on_values_the_data_decides_use_the_datas_values(tmp_path):
    """The decoder LM's vocabulary is the data's: adaptive-softmax cutoffs are checked against it, not against the
    preset's vocab_size (xl_tiny: 256), at parse time as at start-up."""
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in range(700)) + "\n")
    prefix = str(tmp_path / "words")
    subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "preprocess.py"), "--input", str(text),
                    "--tokenizer", "words", "--output-prefix", prefix, "--no-progress"], check=True,
                   capture_output=True, timeout=120)
    base = ["--config", "xl_tiny", "--data-path", prefix, "--model.adaptive", "true"]
    cfg, _ = parse_args(base + ["--model.cutoffs", "[300,600]"])
    assert cfg.model.cutoffs == [300, 600] and cfg.model.vocab_size == 256   # the trainer adopts the data's
    with pytest.raises(ConfigError, match=r"inside \(0, vocab_size=70\d\)") as e:
        parse_args(base + ["--model.cutoffs", "[300,2000]"])
    assert e.value.field == "model.cutoffs[1]"
