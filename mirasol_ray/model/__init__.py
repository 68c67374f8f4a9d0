"""Mirasol3B in pure PyTorch (no Ray). Public API in :mod:`mirasol_ray.model.mirasol`: ``Mirasol``,
``build_model``, ``model_state``, ``load_model``, ``param_breakdown``; config in :mod:`mirasol_ray.model.config`.

Kept import-free so that loading a config (driver side) does not import torch.
"""
