"""PNG of tokens/s against batch size (driver and in-process engine) from an overhead.json.

    python benchmarks/plot_overhead.py bench-out/overhead.json docs/bench-overhead-cpu.png
"""

import sys

from pie_driver_trtllm.benchmarks.plot import plot_overhead

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(plot_overhead(sys.argv[1], sys.argv[2]))
