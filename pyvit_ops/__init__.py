"""pyvit_ops (integration in progress: public names are added once every op module exists)."""
__version__ = "0.1.0"

import torch  # noqa: F401  (loads libc10 before the CUDA extension is imported)
