"""Wrapping a timm module without copying it."""
from torch import nn

from pyvit_ops import _checks


def share(cls, module, expected, parts, backend, **attributes):
    """A ``cls`` instance holding ``module``'s ``parts`` themselves (the same submodules
    and parameters, so state_dict keys and optimizers carry over), plus ``attributes``;
    ``cls.__init__`` does not run, so nothing is allocated. ``expected`` names the timm
    class for the error when ``module`` lacks a part."""
    _checks.check_module("module", module, expected, parts)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name in parts:
        setattr(new, name, getattr(module, name))
    for name, value in attributes.items():
        setattr(new, name, value)
    new.backend = backend
    return new
