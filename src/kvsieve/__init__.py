"""kvsieve: long-context LLM inference with a small KV cache, on HuggingFace transformers.

```python
import kvsieve
model, tok = kvsieve.load_model()                      # embedded default: SmolLM2-135M-Instruct
m = kvsieve.method("snapkv", budget=0.2)
out = kvsieve.generate(model, tok, prompt, method=m, max_new_tokens=32)
out.text, out.tokens, out.stats
ctx = kvsieve.compress(model, tok, document, method=m)  # one context compressed once ...
ctx.generate(question, max_new_tokens=32)               # ... many questions, each on a copy of it
cache = kvsieve.SieveCache(model, m)                    # also: model.generate(past_key_values=cache)
```
"""

from kvsieve.budget import Budget
from kvsieve.cache import SieveCache, UnsupportedModelError
from kvsieve.generate import CompressedContext, GenerationOutput, GenerationStats, compress, generate
from kvsieve.methods import Method, MethodInfo, method, methods
from kvsieve.methods.base import PromptLayout

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a model and its tokenizer; see `kvsieve.models.load_model`."""
    from kvsieve.models import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = [
    "Budget",
    "CompressedContext",
    "GenerationOutput",
    "GenerationStats",
    "Method",
    "MethodInfo",
    "PromptLayout",
    "SieveCache",
    "UnsupportedModelError",
    "__version__",
    "compress",
    "generate",
    "load_model",
    "method",
    "methods",
]
