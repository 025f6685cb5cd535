"""Training: the Trainer and its epoch loop (``trainer``), what a run is built from before its first
step (``setup``: hyp files, the model, resume, the teacher), the command-line flags of train.py and
train_distill.py (``args``), the optimizer, nominal batch and learning-rate schedule (``optim``), the
weight average (``ema``), the training step the Trainer and benchmarks/train_speed.py share
(``step``) and results.csv / TensorBoard (``run_logger``). It may import every part
below it: ``utils.core``, ``utils.ops``, ``utils.data``, ``utils.distill``, ``utils.loss``,
``utils.eval``, ``utils.checkpoint`` and ``models``; not ``utils.export`` or ``utils.convert``.
"""
