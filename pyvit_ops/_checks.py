"""Input validation shared by every operator: errors name the argument, the
expected and the received value."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name, t, *, ndim=None, min_ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_features(name, t, ndim, features, layout):
    """A float ``ndim``-D tensor whose last dim has ``features`` entries (a module's
    input, e.g. layout "(B, N, C)")."""
    check_tensor(name, t, ndim=ndim)
    if t.shape[-1] != features:
        raise ValueError(f"{name}: expected shape {layout} with C = {features}, got "
                         f"{tuple(t.shape)}")


def check_int(name, value, minimum, *, odd=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name}: expected an odd size (a window centred on its pixel), "
                         f"got {value}")


def odd_pair(name, value):
    """``pair(name, value)`` of odd sizes >= 1 (a window centred on its pixel)."""
    sizes = pair(name, value)
    for size in sizes:
        check_int(name, size, 1, odd=True)
    return sizes


def check_module(name, module, expected, attributes):
    """A module with the ``attributes`` that ``from_timm`` reads (``expected`` names the
    class it wraps, for the message)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{name}: expected a {expected} module, got {type(module).__name__}")
    missing = [a for a in attributes if not hasattr(module, a)]
    if missing:
        raise TypeError(f"{name}: expected a {expected} module, got {type(module).__name__} "
                        f"(no {', '.join(missing)})")


def check_shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_same(attribute, error, tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if getattr(t, attribute) != getattr(first, attribute):
            raise error(f"{name}: expected {attribute} {getattr(first, attribute)} (as "
                        f"{first_name}), got {getattr(t, attribute)}")


def check_same_device(**tensors):
    _check_same("device", ValueError, tensors)


def check_same_dtype(**tensors):
    _check_same("dtype", TypeError, tensors)


def pair(name, value):
    """An int or an (h, w) pair of ints, as torch's pooling arguments."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got bool")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
