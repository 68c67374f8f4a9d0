"""mirasol-ray: Mirasol3B-style multimodal autoregressive models on Ray."""
__version__ = "0.1.0"
