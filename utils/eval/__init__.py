"""Measuring a detector: the evaluation loop that runs a model or an exported back-end over a loader
and collects its outputs (``evaluator``), precision / recall / mAP and the confusion matrix
(``metrics``), COCO JSON results and pycocotools' mAP (``coco``) and the plots of curves, matrices and
batches (``plots``). It may import ``utils.core``, ``utils.ops`` and ``models`` (the head's output
helpers); the training engine and val.py call it, never the other way round.
"""
