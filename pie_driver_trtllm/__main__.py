import os
import sys


def run() -> None:
    import zmq

    from pie_driver_trtllm.serving.driver import main

    code = main()
    zmq.Context.instance().destroy(linger=1000)  # the last replies go out before the process does
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: it took over a second in native library destructors, and a wedged engine
    # thread must not delay (or crash) an exit the host asked for. Everything of ours is closed by now.
    os._exit(code)


# TensorRT-LLM's MPI worker (mpi4py's MPIPoolExecutor) imports the parent's main module again under
# run_name "__worker__"; that import must not start a second driver.
if __name__ == "__main__":
    run()
