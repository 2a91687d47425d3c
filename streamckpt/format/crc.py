"""CRC-32C and TensorFlow's masking of stored checksums.

Every checksum TensorFlow stores (block trailers, tensor payloads, string length sums) is the
*masked* CRC-32C: a CRC of data that itself holds CRCs would otherwise be weak.
"""

from __future__ import annotations

import importlib.machinery
import sys
from types import ModuleType

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _load_crc32c() -> ModuleType:
    """The ``crc32c`` package's compiled module, loaded without the package's ``__init__``.

    That ``__init__`` imports ``importlib.metadata`` for its ``__version__`` (about 60 ms of a
    cold start that is otherwise ~200 ms: issue 15.1); the compiled module is all we call.
    Where the package is laid out otherwise, or is already imported, the package is used.
    The loader is driven by hand, not through ``importlib.util`` (whose import alone took
    about 1.2 ms of the ~10 ms that streamckpt's own read path costs).
    """
    if "crc32c" not in sys.modules:
        finder = importlib.machinery.PathFinder
        spec = finder.find_spec("crc32c")  # finds, does not run, the package
        locations = None if spec is None else spec.submodule_search_locations
        if locations is not None:
            name = "crc32c._crc32c"
            found = finder.find_spec(name, list(locations))
            loader = None if found is None else found.loader
            if found is not None and isinstance(loader, importlib.machinery.ExtensionFileLoader):
                module = sys.modules.get(name)
                if module is None:
                    module = loader.create_module(found)
                    loader.exec_module(module)
                if hasattr(module, "crc32c"):
                    sys.modules.setdefault(name, module)
                    return module
    import crc32c as crc32c_package

    return crc32c_package


_crc32c = _load_crc32c()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, extending ``crc`` (the CRC of what came before)."""
    return int(_crc32c.crc32c(data, crc))


def mask(crc: int) -> int:
    """Rotate right by 15 bits and add a constant, as TensorFlow stores CRCs."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    rotated = (masked - _MASK_DELTA) & _U32
    return ((rotated >> 17) | (rotated << 15)) & _U32
