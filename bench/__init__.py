"""moeflow benchmarks (never run as tests). ``python -m bench`` runs every module in ``MODULES``;
each has a ``main(argv)`` and writes its tables under ``bench/results/``."""

MODULES = [
    "bench.kernels",
    "bench.model",
    "bench.moe_decode",
    "bench.prep",
]
