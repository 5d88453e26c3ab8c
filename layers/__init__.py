"""Building blocks of the Scale-MAE decoder that are shared by the reference model and its fast path.

* ``layers.common``: ``Norm2d`` (LayerNorm over the channels of an NCHW map) and ``maybe_checkpoint``.
* ``layers.fast_decoder``: an opt-in channels-last implementation of the FPN and the reconstruction heads for CPU,
  same parameters and results as the reference modules in ``models_mae.py`` (``set_fast_decoder``).
"""
