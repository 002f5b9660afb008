"""Methods: one file per method, registered by name. ``kvsieve.method(name, **params)`` builds one.

Writing a method: a `Method` dataclass (its parameters, each a `param`) and a `LayerPolicy`; an eviction method is
an `EvictionMethod` whose `PriorityEvictionPolicy` defines ``priority``, composed with ``rolling`` and a per-layer
schedule (`uniform`, `Pyramid`, or any callable). ``register`` makes it available by name.
"""

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
    param,
    register,
    register_preset,
    unregister,
)
from kvsieve.methods.eviction import PROTECTED, EvictionMethod, PriorityEvictionPolicy
from kvsieve.methods.schedules import LayerSchedule, Pyramid, uniform

__all__ = [
    "PROTECTED",
    "AttentionCall",
    "EvictionMethod",
    "LayerInfo",
    "LayerPolicy",
    "LayerSchedule",
    "Method",
    "MethodInfo",
    "Phase",
    "PriorityEvictionPolicy",
    "Pyramid",
    "method",
    "methods",
    "param",
    "register",
    "register_preset",
    "uniform",
    "unregister",
]
