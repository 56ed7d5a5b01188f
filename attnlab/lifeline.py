"""Child processes that end with their parent: a killed parent (kill -9 cannot be caught, so it cannot stop its
children itself) must not leave a child training, decoding or holding a lock it passed down.

``stop_with_parent()`` starts a thread that watches the parent pid and, once this process has been re-parented
(its parent died), sends SIGTERM to this process, or to its whole process group when it leads one (a bench worker
started in its own session, so the image-decoding processes it forked go with it).
"""
import os
import signal
import threading
import time


def stop_with_parent(parent_pid: int | None = None, every_s: float = 1.0) -> None:
    """Watch ``parent_pid`` (default: the current parent) every ``every_s`` seconds; SIGTERM this process (its
    group, when it leads one) once that is no longer its parent."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        me = os.getpid()
        if hasattr(os, "killpg") and os.getpgid(0) == me:
            os.killpg(me, signal.SIGTERM)
        else:
            os.kill(me, signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
