"""Building blocks shared by the mechanisms (``pretrain/model/mechanisms/``) and the model around them; a
mechanism imports from here, never from another mechanism.

* ``linear.py``: tensor-parallel linear layers (``column_parallel`` / ``row_parallel``, their products
  ``column_linear`` / ``row_linear``) and parameters with a head dimension (``head_param``);
* ``norm.py``: ``layer_norm``;
* ``ffn.py``: ``FeedForward``, the position-wise block after every mixer;
* ``attention.py``: ``AttentionProjections``, ``RelBiases`` and the shared-or-own bias choice
  (``layer_biases``), the head-major attention arithmetic (``position_scores``, ``masked_scores``, ``attend``);
* ``rel_attention.py``: the wiring of the fused relative-attention op (``attention_path``, ``xl_frame``);
* ``memory.py``: FIFO memories of past positions (``keep_last``);
* ``recurrent.py``: ``RecurrentMixer``, the base of the mixers with a recurrent state carried across segments
  (its config section, the output projection with residual and norm, ``carries``).

Causal, look-ahead and document masks and the position embeddings are in ``pretrain/model/positions.py``.
"""
