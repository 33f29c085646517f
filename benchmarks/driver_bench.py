"""All of issue 7's workloads (transport, overhead, lookahead, history, codec); see pie_driver_trtllm.bench.

    python benchmarks/driver_bench.py --size tiny --device cpu --out bench-out --plot bench-out/overhead.png
"""

import sys

from pie_driver_trtllm.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
