"""Small generic utilities shared by the CLIs and the training code (EDM's dnnlib, rewritten)."""

from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path']
