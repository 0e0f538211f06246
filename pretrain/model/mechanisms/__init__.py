"""One folder per memory mechanism, discovered by ``pretrain/model/registry.py``.

Each folder ``<name>/`` holds:

* ``__init__.py`` (no torch): ``MECHANISMS``, its ``Mechanism`` declaration(s) (``pretrain.model.spec``), and the
  config section class of its options (``model.<section>``);
* the implementation, a ``pretrain.model.mixer.Mixer`` (per-layer token mixer) or ``StackMemory`` (stack-level
  memory) subclass, named by the declaration's ``implementation``;
* ``reference.py``: its fp64 reference from the equations, named by ``reference`` (run by
  ``pretrain/model/reference.py``);
* ``README.md``: what it computes, its state, its options, its sources.

A mechanism imports shared building blocks from ``pretrain/model/modules/``, never from another mechanism.
"""
