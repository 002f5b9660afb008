"""kvsieve: long-context LLM inference with a small KV cache, on HuggingFace transformers.

```python
import kvsieve
model, tok = kvsieve.load_model()                      # embedded default: SmolLM2-135M-Instruct
m = kvsieve.method("snapkv", budget=0.2)
out = kvsieve.generate(model, tok, prompt, method=m, max_new_tokens=32)
out.text, out.tokens, out.stats
cache = kvsieve.SieveCache(model, m)                    # also: model.generate(past_key_values=cache)
```
"""

from kvsieve.cache import SieveCache, UnsupportedModelError
from kvsieve.generate import GenerationOutput, GenerationStats, generate
from kvsieve.methods import Method, MethodInfo, method, methods

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a model and its tokenizer; see `kvsieve.models.load_model`."""
    from kvsieve.models import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = [
    "GenerationOutput",
    "GenerationStats",
    "Method",
    "MethodInfo",
    "SieveCache",
    "UnsupportedModelError",
    "__version__",
    "generate",
    "load_model",
    "method",
    "methods",
]
