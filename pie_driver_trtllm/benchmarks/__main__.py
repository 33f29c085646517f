"""`python -m pie_driver_trtllm.benchmarks`: the same command as `pie-driver-trtllm bench`."""

import sys

from pie_driver_trtllm.benchmarks.cli import main

main(sys.argv[1:])
