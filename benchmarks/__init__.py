"""fastkd's benchmark suite (pytest-benchmark) and its report tool (``python -m benchmarks.report``)."""
