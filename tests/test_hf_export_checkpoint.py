"""The Hugging Face export of a tensor-parallel DeepSpeed checkpoint (``pretrain/export_hf.py --model SAVE``): its
shards joined by ``reshard.convert`` give the same directory as the export the trainer wrote at the end of the same
run (gathered by the engine).  Apart from test_hf_export.py because it trains (2 gloo processes, 2 steps)."""
import pytest
import torch

from test_engine_reshard import TINY, launch
from conftest import copy_task

pytest.importorskip("transformers", minversion="5.0", reason="the Hugging Face export needs transformers 5")


def test_a_tensor_parallel_checkpoint_exports_as_the_trainers_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.hf.export import export_hf
    data = copy_task(tmp_path / "copy", train_size=300, eval_size=40)
    args = ["--data-path", data] + TINY + ["--eval.micro_batch", "2", "--tensor-model-parallel-size", "2",
                                           "--train-iters", "2"]
    args[args.index("--checkpoint.export") + 1] = "true"           # the trainer's own export, to compare with
    launch(2, tmp_path, "0", "fp32", "src", args)
    run = tmp_path / "z0fp32_src"
    from_ckpt = export_hf(str(run), str(tmp_path / "hf-ckpt"), log=lambda m: None)
    from_export = export_hf(str(run / "export"), str(tmp_path / "hf-export"), log=lambda m: None)
    a = AutoModelForCausalLM.from_pretrained(from_ckpt, trust_remote_code=True, dtype=torch.float64)
    b = AutoModelForCausalLM.from_pretrained(from_export, trust_remote_code=True, dtype=torch.float64)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tokens = torch.randint(0, a.config.vocab_size, (1, 16))
    assert torch.equal(a(tokens).logits, b(tokens).logits)
