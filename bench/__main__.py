"""Run every benchmark module listed in ``bench.MODULES`` (each module's ``main([])``), in order."""

from __future__ import annotations

import importlib
import sys
import time

from bench import MODULES


def main() -> int:
    failed = []
    for name in MODULES:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(name).main([])
        except Exception as exc:  # keep going: one broken benchmark must not hide the others
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
        print(f"== {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
