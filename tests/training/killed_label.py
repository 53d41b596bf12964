"""Run by test_labeller.py: `astrea-data label` (ARGS as on the command line) in this process, killed with SIGKILL
(no clean-up) right after it has written its STEP-th batch.

    python killed_label.py STEP ARGS...
"""

import os
import signal
import sys

from astrea.training import labeller

step, *argv = sys.argv[1:]
written = []
write = labeller.write_batch


def write_then_die(handle, entries):
    write(handle, entries)
    written.append(len(entries))
    if len(written) == int(step):
        os.kill(os.getpid(), signal.SIGKILL)


labeller.write_batch = write_then_die
sys.exit(labeller.main(argv))
