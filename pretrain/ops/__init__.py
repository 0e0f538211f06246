"""Recurrence operators of the memory mechanisms, one folder per recurrence.

Each folder holds a plain step-by-step reference (``naive.py``) beside its fast paths (``chunk.py``, the
fused CUDA kernels) behind one public signature, as flash-linear-attention's ``fla/ops/<op>/`` does; tests
hold every fast path equal to the reference, gradients included.

* ``fast_weight``: the sum rule (linear attention) and the delta rule of fast-weight programmers
  (Schlag, Irie, Schmidhuber, ICML 2021), with a carried state and in-segment document resets.
* ``feature_maps``: the feature maps phi applied to keys and queries before those rules.
* ``gated_delta``: the gated delta rule of Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025) with a carried
  state and in-segment resets; on CUDA flash-linear-attention's kernel when fla-core imports.
* ``short_conv``: the short causal depthwise convolution of linear-recurrent layers, with a carried state of
  the last W - 1 inputs and in-segment resets.
* ``rel_attention``: attention with Transformer-XL relative positions over [memory ; segment] (XL's and
  LaMemo's), returning the log-sum-exp beside the output.
* ``common``: what the folders share: the compute dtype, argument checks that name the argument, the choice
  and logging of an implementation behind ``impl``, and the in-chunk document masks of the chunkwise paths.
* ``kernels``: building and loading the fused CUDA kernels of ``csrc/`` that the folders above bind as
  ``impl="fused"`` (docs/kernels.md).

Nothing here imports the model package: the model builds on the ops, not the other way round.
"""
