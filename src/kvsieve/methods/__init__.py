"""Methods: one file per method, registered by name. ``kvsieve.method(name, **params)`` builds one.

Writing a method: a `Method` dataclass (its parameters, each a `param`) and a `LayerPolicy`; an eviction method is
an `EvictionMethod` whose `PriorityEvictionPolicy` defines ``priority``, composed with ``rolling`` and a per-layer
schedule (`uniform`, `Pyramid`, or any callable). ``register`` makes it available by name; every module of this
package is imported here, so a new method's file is all it takes.
"""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):  # registration: each method's module registers it on import
    importlib.import_module(f"{__name__}.{_module.name}")
