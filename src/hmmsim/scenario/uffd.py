"""The scenario command ``uffd NAME OFF NPAGES SEED`` (scenario.md): register pages with a
new userfaultfd in MISSING mode and start a handler thread of the process that answers every
fault with ``UFFDIO_COPY`` of the page of pattern SEED, as the reference runner's
``uffd_thread()`` does (a failed COPY is ignored; the thread lives as long as the process).

Once a scenario has a handler thread, every later command runs as a simulated thread under
one :class:`~hmmsim.kernel.sched.Scheduler` (default schedule), so a fault that sleeps in
``handle_userfault()`` lets the handler run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..kernel.cpu import copy_to_user
from ..kernel.mmap import MAP_ANONYMOUS, MAP_PRIVATE
from ..kernel.page_types import PAGE_SHIFT, PAGE_SIZE
from ..kernel.sched import Scheduler
from ..kernel.task import Task, vm_mmap
from ..kernel.userfaultfd import (
    O_CLOEXEC,
    O_NONBLOCK,
    UFFD_EVENT_PAGEFAULT,
    UFFDIO_API,
    UFFDIO_COPY,
    UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_MISSING,
    UffdioApi,
    UffdioCopy,
    UffdioRange,
    UffdioRegister,
    new_userfaultfd,
    userfaultfd_poll,
    userfaultfd_read,
)
from ..kernel.vma import PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from ..kernel.system import System

__all__ = ("ScenarioThreads",)

Pattern = Callable[[int, int, int], np.ndarray]


class ScenarioThreads:
    """The simulated threads of a scenario: none until the first ``uffd``; then a
    scheduler that runs each command as its process's thread, beside the handlers."""

    def __init__(self, sys: "System") -> None:
        self.sys = sys
        self.sched: Scheduler | None = None

    def run(self, task: Task, body: Callable[[], Any]) -> Any:
        """Run one command: directly, or as *task*'s thread under the scheduler."""
        if self.sched is None:
            return body()
        t = self.sched.spawn(body, thread=task.thread)
        self.sched.run()
        return t.result

    def close(self) -> None:
        """The scenario ended: unwind the handler threads."""
        if self.sched is not None:
            self.sched.__exit__(None, None, None)
            self.sched = None

    def uffd(self, task: Task, addr: int, npages: int, base: int, seed: int, pattern: Pattern) -> int:
        """``uffd``: userfaultfd(O_CLOEXEC | O_NONBLOCK), UFFDIO_API, UFFDIO_REGISTER of
        ``[addr, addr + npages pages)`` in MISSING mode, then the handler thread. Returns
        0 or the -errno of the call that failed (the fd is closed then)."""
        fd = new_userfaultfd(task, O_CLOEXEC | O_NONBLOCK)
        if fd < 0:
            return fd
        ret = task.ioctl(fd, UFFDIO_API, UffdioApi())
        if not ret:
            ret = task.ioctl(fd, UFFDIO_REGISTER, UffdioRegister(UffdioRange(addr, npages << PAGE_SHIFT),
                                                                 UFFDIO_REGISTER_MODE_MISSING))
        if ret:
            task.close_fd(fd)
            return ret
        # the handler's page buffer (the runner's aligned_alloc(PAGE)): one page of its own
        page = vm_mmap(task.mm, None, 0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        if page < 0:
            return page
        f = task.fget(fd)
        assert f is not None

        def handler() -> None:
            while True:
                self.sys.ls.wait_event(lambda: userfaultfd_poll(f), "poll(userfaultfd)")
                msg = userfaultfd_read(f)
                if isinstance(msg, int) or msg.event != UFFD_EVENT_PAGEFAULT:
                    continue
                a = msg.address & ~(PAGE_SIZE - 1)
                copy_to_user(task.mm, page, pattern(seed, ((a - base) >> PAGE_SHIFT) << 10, PAGE_SIZE // 4))
                task.ioctl(fd, UFFDIO_COPY, UffdioCopy(dst=a, src=page, len=PAGE_SIZE))

        if self.sched is None:
            self.sched = Scheduler(self.sys)
            self.sched.__enter__()
        self.sched.spawn(handler, name="uffd", task=task, daemon=True)
        return 0
