"""Dask as the engine for large training sets (``--scheduler``; ``docs/distributed.md``).

- :mod:`mlipuq.distributed.scheduler`: ``--scheduler`` values to a ``distributed.Client``
  (:func:`client_for`).
- :mod:`mlipuq.distributed.chunked`: row-chunked ``.npy`` arrays with a manifest.
- :mod:`mlipuq.distributed.ltau`: LTAU's distributions, p_i, sharded index and search.
- :mod:`mlipuq.distributed.doptimality`: two-level MaxVol and gamma by row chunks.
- :mod:`mlipuq.distributed.descriptors`: model outputs computed by the workers, chunked
  on disk.
"""

from mlipuq.distributed.scheduler import SPEC_HELP, client_for, parse_scheduler

__all__ = ["SPEC_HELP", "client_for", "parse_scheduler"]
