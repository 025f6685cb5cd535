"""Model files: our plain-dict checkpoint format that ``torch.load(weights_only=True)`` reads
(``ours``: make, save, strip, load, rebuild a model), official YOLOv9 ``.pt`` files read through a
restricted unpickler that never runs code (``official``), torchvision ImageNet backbone weights mapped
onto our student blocks (``backbone``), and ``python -m utils.checkpoint convert`` (``cli``). It may
import ``utils.core`` and ``models`` (it rebuilds models from their yaml), nothing else in ``utils``.
"""
