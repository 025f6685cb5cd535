"""The data's path from disk to a batch: the data.yaml reader (``config``), label files, their checks
and cache (``labels``), the dataset, sampler and loader (``dataset``), CPU augmentation (``augment``)
and its batched GPU counterpart (``gpu_augment``), inference sources (``sources``) and the built-in
synthetic set (``synthetic``, ``python -m utils.data.synthetic``). It may import ``utils.core``,
``utils.ops`` and ``utils.convert`` (a data.yaml with a ``convert:`` block is converted on first
use), and nothing from ``models``.
"""
