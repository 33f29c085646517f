"""The CUDA stack reservation shrunk while asleep, against a stand-in for the driver API (libcuda)."""

from __future__ import annotations

import ctypes

import pytest

from pie_driver_trtllm.engines.reference import local_memory
from pie_driver_trtllm.engines.reference.local_memory import SMALLEST, LocalMemory


class FakeDriver:
    """cuCtxGetLimit / cuCtxSetLimit of one context; `fail_above` makes a larger reservation fail."""

    def __init__(self, stack: int) -> None:
        self.stack = stack
        self.fail_above: int | None = None
        self.fail_status = local_memory.OUT_OF_MEMORY

    def cuCtxGetLimit(self, out: object, limit: int) -> int:
        assert limit == local_memory.STACK_SIZE
        ctypes.cast(out, ctypes.POINTER(ctypes.c_size_t))[0] = self.stack
        return 0

    def cuCtxSetLimit(self, limit: int, value: ctypes.c_size_t) -> int:
        if self.fail_above is not None and value.value > self.fail_above:
            return self.fail_status
        self.stack = value.value
        return 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    driver = FakeDriver(stack=4096)
    monkeypatch.setattr(local_memory, "_driver", lambda: driver)
    return driver


def test_asleep_the_stack_is_smallest_and_waking_restores_it(fake: FakeDriver) -> None:
    memory = LocalMemory()
    memory.shrink()
    assert fake.stack == SMALLEST
    memory.shrink()  # a deeper sleep: still the size of before the first shrink is kept
    memory.restore()
    assert fake.stack == 4096
    memory.restore()  # nothing saved: nothing changes
    assert fake.stack == 4096


def test_a_launch_that_grew_the_stack_while_asleep_is_shrunk_again_by_a_deeper_sleep(fake: FakeDriver) -> None:
    memory = LocalMemory()
    memory.shrink()  # level 1
    fake.stack = 2048  # a kernel launched while asleep (moving the weights out, say) grew it again
    memory.shrink()  # level 2
    assert fake.stack == SMALLEST
    memory.restore()
    assert fake.stack == 4096  # the larger of the two


def test_a_restore_without_room_says_so_and_a_later_one_succeeds(fake: FakeDriver) -> None:
    memory = LocalMemory()
    memory.shrink()
    fake.fail_above = 1024
    with pytest.raises(MemoryError, match="short of memory"):
        memory.restore()
    assert fake.stack == SMALLEST
    fake.fail_above = None
    memory.restore()
    assert fake.stack == 4096


def test_without_the_driver_api_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_memory, "_driver", lambda: None)
    memory = LocalMemory()
    memory.shrink()
    memory.restore()


def test_a_restore_that_fails_otherwise_names_the_cuda_error(fake: FakeDriver) -> None:
    memory = LocalMemory()
    memory.shrink()
    fake.fail_above, fake.fail_status = 1024, 201  # CUDA_ERROR_INVALID_CONTEXT
    with pytest.raises(MemoryError, match="CUDA error 201"):
        memory.restore()
