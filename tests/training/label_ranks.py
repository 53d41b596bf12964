"""Run by test_labeller.py under `torchrun --standalone --nproc_per_node 2`: `astrea-data label` (ARGS as on the
command line) in each process.

    python label_ranks.py ARGS...
"""

import sys

from astrea.training import labeller

sys.exit(labeller.main(sys.argv[1:]))
