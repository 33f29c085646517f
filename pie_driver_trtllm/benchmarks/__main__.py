"""`python -m pie_driver_trtllm.benchmarks`: the same workloads as `pie-driver-trtllm bench`."""

import sys

from pie_driver_trtllm.benchmarks.cli import main

sys.exit(main(sys.argv[1:]))
