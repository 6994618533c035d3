"""bulkmail's benchmark suite: run it with ``python benchmarks/run.py [--quick]``."""
