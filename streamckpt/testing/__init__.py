"""Tools for testing code that uses streamckpt, and streamckpt itself.

``servers`` starts real object-store servers (fake-gcs-server, moto, SeaweedFS) on 127.0.0.1
and stops them on exit; ``faultproxy`` sits between a client and such a server and injects
the faults a real network produces (error statuses, resets, stalls, slow links). The test
suite and the benchmarks both use them. Nothing here is imported by the library itself; the
servers need the ``test`` extra.
"""
