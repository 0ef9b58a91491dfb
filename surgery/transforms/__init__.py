"""Every technique, one module each; :func:`register_all` registers them all."""

import functools
import importlib
import logging
import pkgutil

# On import (quantize imports it when it first quantises), bitsandbytes' CPU backend tries to fetch
# an optional kernel from a model hub (never reachable offline) and warns; the portable kernel it
# falls back to is the one the quantize obligations check.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@functools.cache
def register_all() -> None:
    """Import every transform module (each registers itself). Not done when this package is imported:
    the registry lives here, and a transform's registration consults the anchor kinds, which use it."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "registry":
            importlib.import_module(f"{__name__}.{info.name}")
