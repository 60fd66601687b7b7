"""``userfaultfd_read`` of 7.3's ``tools/testing/selftests/mm/hmm-tests.c``: a device READ
through ``HMM_DMIRROR_READ_UNLOCKED`` (``hmm_range_fault_unlocked_timeout()`` with no
timeout) of pages that only a userfaultfd handler thread can fill.

The test's two pthreads are simulated threads of the test process under a
:class:`~hmmsim.kernel.sched.Scheduler` (default schedule): the handler thread (``poll()``
on the userfaultfd and on a stop eventfd, ``read()`` of one message, ``UFFDIO_COPY`` of a
page of 0xAB) and the test itself, whose READ sleeps in ``handle_userfault()`` until the
handler answered. The stop eventfd is a flag the handler's poll also waits on (eventfd
itself is not modelled)."""

from __future__ import annotations

from ..drivers.test_hmm_uapi import HMM_DMIRROR_READ_UNLOCKED
from ..kernel.sched import Scheduler
from ..kernel.userfaultfd import (
    O_CLOEXEC,
    O_NONBLOCK,
    UFFD_API,
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
)
from ..kernel.userfaultfd import userfaultfd_read as uffd_read
from .harness import (
    ASSERT_EQ,
    ASSERT_GE,
    ASSERT_NE,
    SKIP,
    TEST_F,
    FixtureState,
    Variant,
)
from .hmm_tests import HmmBuffer, hmm_buffer_free, hmm_dmirror_cmd, malloc

__all__ = ()


@TEST_F("hmm", "userfaultfd_read")
def userfaultfd_read(self: FixtureState, variant: Variant) -> None:
    p = self.proc
    task = p.task
    sys = p.system
    npages = 4
    size = npages << self.page_shift
    # Create userfaultfd
    uffd = new_userfaultfd(task, O_CLOEXEC | O_NONBLOCK)
    if uffd < 0:
        SKIP("userfaultfd not available")
    api = UffdioApi(api=UFFD_API, features=0)
    ret = task.ioctl(uffd, UFFDIO_API, api)
    ASSERT_EQ(ret, 0)
    buffer = HmmBuffer(fd=-1, size=size)
    buffer.mirror = malloc(p, size)
    ASSERT_NE(buffer.mirror, 0)
    # Create anonymous mapping
    buffer.ptr = p.mmap(size, "rw")
    # Register the region with userfaultfd
    reg = UffdioRegister(UffdioRange(buffer.ptr, size), UFFDIO_REGISTER_MODE_MISSING)
    ret = task.ioctl(uffd, UFFDIO_REGISTER, reg)
    ASSERT_EQ(ret, 0)
    # Set up the handler thread
    stop = [False]   # the stop eventfd
    stop_fd = 0
    ASSERT_GE(stop_fd, 0)
    page_buffer = malloc(p, self.page_size)
    ASSERT_NE(page_buffer, 0)
    f = task.fget(uffd)
    assert f is not None

    def uffd_handler_thread() -> None:
        while True:
            sys.ls.wait_event(lambda: stop[0] or userfaultfd_poll(f), "poll(uffd, stop_fd)")
            if stop[0]:
                break
            msg = uffd_read(f)  # read(args->uffd, &msg, sizeof(msg))
            if isinstance(msg, int):
                break
            if msg.event != UFFD_EVENT_PAGEFAULT:
                break
            # Fill the page with a known pattern
            p.write(page_buffer, b"\xab" * self.page_size)
            copy = UffdioCopy(dst=msg.address & ~(self.page_size - 1), src=page_buffer,
                              len=self.page_size, mode=0, copy=0)
            if task.ioctl(uffd, UFFDIO_COPY, copy) < 0:
                break

    def test_body() -> None:
        # Use the unlocked read path which allows the mmap lock to be dropped during the
        # fault, enabling userfaultfd resolution.
        ret = hmm_dmirror_cmd(p, self.fd, HMM_DMIRROR_READ_UNLOCKED, buffer, npages)
        ASSERT_EQ(ret, 0)
        ASSERT_EQ(buffer.cpages, npages)
        # Verify the device read the data filled by the uffd handler
        data = p.read(buffer.mirror, size)
        for i in range(size):
            ASSERT_EQ(data[i], 0xAB)
        stop[0] = True      # write(stop_fd, &stop, sizeof(stop))
        thread.join()       # pthread_join(thread, NULL)

    with Scheduler(sys) as sched:
        thread = sched.spawn(uffd_handler_thread, name="hmm-tests", task=task)  # pthread_create
        sched.spawn(test_body, thread=task.thread)
        sched.run()
    p.munmap(page_buffer, self.page_size)
    ASSERT_EQ(task.close_fd(uffd), 0)
    hmm_buffer_free(p, buffer)
