"""User documentation: every public name has a docstring, and the API reference
(docs/api.md) names every public operator and module (so neither can silently fall
behind the API)."""
import importlib
import inspect
import pathlib

import pytest

import pyvit_ops

# Everything a user reaches from pyvit_ops, pyvit_ops.nn, patch_timm and info, plus the
# references and the backend-choice module the documentation points to.
MODULES = [
    "pyvit_ops", "pyvit_ops.nn", "pyvit_ops.nn.attention", "pyvit_ops.nn.elsa",
    "pyvit_ops.nn.pooling", "pyvit_ops.nn.window_attention", "pyvit_ops.nn._timm", "pyvit_ops.patch",
    "pyvit_ops.nn.eva", "pyvit_ops.nn.maxvit", "pyvit_ops.nn.cait", "pyvit_ops.nn.twins", "pyvit_ops.nn.spatial_reduction",
    "pyvit_ops.testing.coverage",
    "pyvit_ops.info", "pyvit_ops.check", "pyvit_ops._backend", "pyvit_ops.capabilities",
    *(f"pyvit_ops.{pkg}.{op}" for pkg in ("ops", "reference") for op in (
        "scaled_dot_product_attention", "window_attention", "elsa_attention", "avg_pool2d",
        "talking_heads_attention")),
]

API_REFERENCE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _public_callables(module):
    """(qualified name, object) of the public functions and classes defined in
    ``module`` and of the public methods those classes define themselves."""
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if obj.__module__ != module.__name__:
            continue  # imported from elsewhere: checked where it is defined
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                func = member.__func__ if isinstance(member, (classmethod, staticmethod)) \
                    else member
                if not attr.startswith("_") and inspect.isfunction(func):
                    yield f"{module.__name__}.{name}.{attr}", func


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_docstrings(module_name):
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), f"{module_name}: no module docstring"
    missing = [name for name, obj in _public_callables(module)
               if not (obj.__doc__ or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"


def test_api_reference_names_the_public_api():
    text = API_REFERENCE.read_text()
    wanted = [f"pyvit_ops.{n}" for n in pyvit_ops.__all__ if n != "nn"]
    wanted += [f"`{n}`" for n in pyvit_ops.nn.__all__]  # rows of the modules table
    missing = [w for w in wanted if w not in text]
    assert not missing, f"docs/api.md does not mention: {missing}"
