"""Every technique, one module each; importing this package registers them all."""

import importlib
import logging
import pkgutil

# On import, bitsandbytes' CPU backend tries to fetch an optional kernel from a model hub (never
# reachable offline) and warns on every `import surgery`; the portable kernel it falls back to is
# the one the quantize obligations check.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")
