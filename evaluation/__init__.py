"""Evaluation suites (``main_eval.py``): checkpoints x datasets x recipes, kNN and a frozen-feature probe.

* ``evaluation.suite``: the suite YAML (schema, defaults, one-line errors);
* ``evaluation.checkpoints``: checkpoints by path, URL or run folder; their architecture and weights hash;
* ``evaluation.features``: sharded feature extraction with an on-disk cache;
* ``evaluation.probe``: logistic-regression probe (C grid on a validation split, bootstrap intervals);
* ``evaluation.report``: Markdown / CSV / JSON tables, the paper-style plot, TensorBoard scalars.

It sits beside ``util/`` (not inside it) because it imports the models and the data loaders.
"""
