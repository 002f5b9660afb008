"""Devices: the device spec (`kvsieve.models.devices`), the one-line error where CUDA is missing, and every
registered method's per-layer state created on its layer's own device.

The state audit needs no second device. The cache is built and fed with torch's default device set to ``meta``,
so that any tensor a policy creates without naming a device (``device=keys.device``, or ``device="cpu"`` for
state kept on the host on purpose) lands on ``meta``: the forward then fails where it mixes it with real tensors,
or the tensor stays in the policy's state, where a walk of every layer's policy finds it. On a model split over
GPUs, a tensor created without a device lands on the default device, not on its layer's; this finds each one.
What it cannot see on one device: state that layers on different GPUs share (ActQKV's pooled activation
statistics, in ``LayerInfo.shared``) must follow the layer that uses it; docs/architecture.md lists what waits for
a run on two GPUs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvsieve
from helpers import random_ids, tiny_llama_for, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver, cache_kwargs
from kvsieve.methods.base import LayerPolicy, Method, Phase
from kvsieve.models.devices import check_device, check_device_map, device_map_for, parse_device
from test_conformance import NAMES, build, prompt_length

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

CHUNK, N_DECODE = 40, 3


def tensors_in(obj, path: str = "policy", seen: set[int] | None = None):
    """Every tensor and generator reachable from ``obj`` through attributes, dicts and sequences: (path, device)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, type | torch.nn.Module | Method):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor | torch.Generator):
        yield path, obj.device
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple | set | frozenset):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = list(getattr(obj, "__dict__", {})) + [
            s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ()) if hasattr(obj, s)
        ]
        items = ((name, getattr(obj, name)) for name in names)
    else:
        return
    for key, value in items:
        yield from tensors_in(value, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key!r}]", seen)


def run_on_meta_default(model, method, n_prompt: int) -> SieveCache:
    """Build the cache and feed it (chunked prompt, a question chunk, decode steps) with ``meta`` as torch's default
    device; the inputs name their device, as the driver's do."""
    cpu = torch.device("cpu")
    context, question = random_ids(n_prompt), random_ids(5, seed=3)
    pieces = [context[i : i + CHUNK] for i in range(0, len(context), CHUNK)]
    phases = [Phase.PREFILL] * (len(pieces) - 1) + [Phase.PREFILL_LAST]
    pieces += [question] + [[7]] * N_DECODE
    phases += [Phase.DECODE] * (1 + N_DECODE)
    with torch.inference_mode(), torch.device("meta"):
        cache = SieveCache(model, method)
        for piece, phase in zip(pieces, phases):
            with cache.forward_as(phase):
                model(input_ids=torch.tensor([piece], device=cpu), logits_to_keep=1, **cache_kwargs(model, cache))
    return cache


def misplaced_state(cache: SieveCache) -> list[str]:
    """Per layer: every tensor of its policy that is not on the device of the layer's keys."""
    wrong = []
    for index, layer in enumerate(cache.layers):
        device = layer.device  # of the keys the layer received (`SieveLayer.lazy_initialization`)
        found = list(tensors_in(layer.policy, f"layer {index}"))
        assert found, f"layer {index}: the walk found no tensor in the policy"
        wrong += [f"{path} on {where} (keys on {device})" for path, where in found if where != device]
    return wrong


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("name", NAMES)
def test_every_method_creates_its_state_on_its_layers_device(model, name):
    method = build(name, 32)
    cache = run_on_meta_default(model, method, prompt_length(method))
    assert misplaced_state(cache) == []


class _CarelessPolicy(LayerPolicy):
    def update(self, key, value, first_position, phase):
        self.steps = torch.zeros(1)  # no device: the default one
        return super().update(key, value, first_position, phase)


@dataclasses.dataclass
class _Careless(Method):
    """A method whose policy creates a tensor without naming its device: the audit must catch it."""

    name = "test-careless-device"
    policy = _CarelessPolicy


def test_the_audit_catches_a_tensor_created_without_a_device(model):
    cache = run_on_meta_default(model, _Careless(), 24)
    wrong = misplaced_state(cache)
    assert len(wrong) == len(cache.layers) and all(".steps on meta" in w for w in wrong), wrong


# ------------------------------------------------------------------------------------------------ device specs
def test_device_specs_parse_to_their_canonical_form():
    assert [parse_device(s) for s in ("cpu", " CUDA ", "cuda:1", "auto", torch.device("cuda", 2))] == [
        "cpu",
        "cuda",
        "cuda:1",
        "auto",
        "cuda:2",
    ]
    for bad in ("gpu", "cuda:", "cuda:x", "mps", "", None, 0):
        with pytest.raises(ValueError, match=r"^--device must be cpu, cuda, cuda:N or auto; got "):
            parse_device(bad, "--device")


def test_cpu_and_auto_without_cuda_load_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_map_for("cpu") is None
    assert device_map_for("auto") is None


def test_auto_with_cuda_splits_the_model_and_cuda_n_is_passed_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_map_for("auto") == "auto"
    assert device_map_for("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"^--device cuda:2 names CUDA device 2, but there are 2 \(0-1\)$"):
        check_device("cuda:2", "--device")


def test_cuda_without_cuda_is_one_line_naming_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as option:
        check_device("cuda", "--device")
    assert str(option.value).startswith("--device cuda asks for a CUDA device, but CUDA is not available (torch ")
    assert str(option.value).endswith("; use --device cpu or --device auto") and "\n" not in str(option.value)
    with pytest.raises(ValueError, match=r"^device='cuda:0' asks for a CUDA device.*use device='cpu' or 'auto'$"):
        check_device("cuda:0")
    with pytest.raises(ValueError, match=r"^device_map=\{'': 0\} asks for a CUDA device, but CUDA is not available"):
        check_device_map({"": 0})
    check_device_map({"": "cpu"})  # no CUDA named: nothing to check


def test_the_driver_waits_for_every_gpu_of_a_split_model_and_for_none_on_the_cpu(model):
    assert Driver(model, SieveCache(model, kvsieve.method("full"))).cuda_devices == []


def test_ray_workers_load_on_the_gpu_they_reserved_unless_the_sweep_asks_for_the_cpu():
    from kvsieve.eval.distributed import worker_device

    assert [worker_device(d, gpus=2) for d in ("auto", "cuda", "cuda:1", "cpu")] == ["cuda", "cuda", "cuda", "cpu"]
    assert [worker_device(d, gpus=0) for d in ("auto", "cpu")] == ["cpu", "cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of device_map='auto'")
def test_device_map_auto_without_gpus_loads_on_the_cpu_and_runs_a_method(smollm2_tokenizer, tmp_path):
    tiny_llama_for(smollm2_tokenizer, 512).save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = kvsieve.load_model(tmp_path, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    out = kvsieve.generate(model, tokenizer, "The pass key is 31415. " * 8, method="snapkv", max_new_tokens=2)
    assert out.stats.new_tokens == 2
