"""streamckpt's benchmarks: one package, one entry point.

    python -m benchmarks local [--quick]        # local disk, beside TF and the installed peers
    python -m benchmarks async-save [--quick]   # what a background save costs a training loop
    python -m benchmarks objectstore [--quick]  # loopback S3 / GCS servers and a slow link
    python -m benchmarks distributed [--quick]  # 4 processes x 256 MiB beside 1 x 1 GiB and DCP
    python -m benchmarks plan [--quick]         # the global planner and merge, up to 1,024 ranks
    python -m benchmarks cold-start [--quick]   # a fresh process reading one tensor; CLI startup
    python -m benchmarks table [--quick] [--table PATH]  # every measure, every tool: one table
    python -m benchmarks all --quick            # every code path of every mode but table
    python -m benchmarks MODE --help            # the method and the options of each

Layout: ``workloads`` defines each workload once, at any size; ``report`` prints the machine
and every table; ``harness`` runs children, drops files from the page cache and measures the
machine's limits. The benchmarks: ``local`` (its tools in ``peers``), ``async_save``, and
``objectstore`` (its servers and slow link in ``endpoints``, its part 1 in ``throughput``),
``distributed_save``, ``distributed_plan`` and ``cold_start``; ``table`` runs ``local``'s,
``cold_start``'s and ``harness``' measurements with every peer and prints one table.
Only public streamckpt API is used; the servers and the proxy come from
``streamckpt.testing``. Run from the repository root (children run there too).
"""
