"""Methods: one file per method, registered by name. ``kvsieve.method(name, **params)`` builds one."""

from kvsieve.methods import actqkv, full, h2o, infllm, nacl, pyramidkv, refreshkv, snapkv, streamingllm  # noqa: F401  (registration)
from kvsieve.methods.base import (
    AttentionCall,
    LayerInfo,
    LayerPolicy,
    Method,
    MethodInfo,
    Phase,
    method,
    methods,
    register,
    register_preset,
)

__all__ = [
    "AttentionCall",
    "LayerInfo",
    "LayerPolicy",
    "Method",
    "MethodInfo",
    "Phase",
    "method",
    "methods",
    "register",
    "register_preset",
]
