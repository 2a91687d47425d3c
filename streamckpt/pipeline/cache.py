"""Where the index cache lived; it is now in :mod:`streamckpt.pipeline.index`.

Kept only until the last importers (the save pipeline, a storage test, a benchmark script)
import from there.
"""

from streamckpt.pipeline.index import INDEX_CACHE, IndexCache, clear_index_cache

__all__ = ["INDEX_CACHE", "IndexCache", "clear_index_cache"]
