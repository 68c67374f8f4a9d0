"""Mirasol3B in pure PyTorch: the architecture, its losses and decoding. Imports only torch, einops, the model's
config (:class:`mirasol_ray.config.ModelConfig`) and itself: no Ray, no data libraries, no storage.

Public API in :mod:`mirasol_ray.model.mirasol`: ``Mirasol``, ``build_model``, ``param_breakdown``; pretrained
timm / transformers tensors converted in :mod:`mirasol_ray.model.pretrained`. Reading weight files and checkpoints
is the training layer's (:mod:`mirasol_ray.train.weights`, :mod:`mirasol_ray.train.checkpoint`).
"""
