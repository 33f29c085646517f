"""TEST DOUBLE of TensorRT-LLM 1.2.1 (`tensorrt_llm.llmapi.mpi_session`), not the real package.

A single-GPU `LLM` without `TLLM_WORKER_USE_SINGLE_PROCESS=1` runs its executor in a worker started by
mpi4py's `MPIPoolExecutor`. Before the worker takes tasks, mpi4py imports the parent's main module again
under run_name "__worker__" (mpi4py `futures/_lib.py`: `_sync_get_data` sends `__main__.__spec__.name`
or `__file__`; `import_main` runs `runpy.run_module(name, run_name="__worker__", alter_sys=True)` or
`runpy.run_path(path, run_name="__worker__")`). A main module that does real work at import (no
`if __name__ == "__main__":` guard) runs it in the worker: the worker never comes up and `LLM()` fails.

The double does that import in a real subprocess and fails `LLM()` the same way when it does not come
back alive within `WORKER_START_TIMEOUT_S`. It serves nothing itself afterwards: generation stays in
this process (see llm.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

WORKER_START_TIMEOUT_S = 60.0
_ALIVE = "mpi4py worker alive"

_BOOTSTRAP = f"""
import runpy, sys
name, path = sys.argv[1] or None, sys.argv[2] or None
sys.argv = [sys.argv[0]]  # the worker's own argv (`python -m mpi4py.futures.server`), not the parent's
if name:
    runpy.run_module(name, run_name="__worker__", alter_sys=True)
elif path:
    runpy.run_path(path, run_name="__worker__")
print({_ALIVE!r}, flush=True)
"""


def main_module_identity() -> tuple[str | None, str | None]:
    """What mpi4py sends to its workers: the main module's spec name and file."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None), getattr(main, "__file__", None)


class MpiPoolSession:
    def __init__(self, n_workers: int) -> None:
        self.n_workers = n_workers
        name, path = main_module_identity()
        try:
            done = subprocess.run([sys.executable, "-c", _BOOTSTRAP, name or "", path or ""],
                                  capture_output=True, text=True, timeout=WORKER_START_TIMEOUT_S,
                                  env=dict(os.environ), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"MPI worker did not start within {WORKER_START_TIMEOUT_S} s: re-importing the "
                               f"main module ({name or path}) under '__worker__' did not return") from None
        if done.returncode != 0 or _ALIVE not in done.stdout:
            tail = (done.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"MPI worker failed to start: re-importing the main module ({name or path}) under "
                               f"'__worker__' exited with status {done.returncode}: {tail}")

    def shutdown(self) -> None:
        pass


__all__ = ["WORKER_START_TIMEOUT_S", "MpiPoolSession", "main_module_identity"]
