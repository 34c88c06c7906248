"""chest_mnist.cli's quick exit: what it skips, and what it must not."""

import gc

from chest_mnist.cli import freeze_for_exit


def test_freeze_for_exit_finalizes_the_garbage_before_it_freezes_the_rest():
    """A cycle that only a collection frees (a file's last buffer, say) is finalized by the call,
    as the interpreter's exit would have; what is still alive is frozen (the exit's collections
    skip it)."""
    finalized = []

    class Node:
        def __del__(self):
            finalized.append(self)

    enabled = gc.isenabled()
    gc.disable()  # nothing collects the cycle before the call does
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = Node()
        del a, b
        assert finalized == []
        freeze_for_exit()
        assert len(finalized) == 2 and alive not in finalized
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on
        if enabled:
            gc.enable()
