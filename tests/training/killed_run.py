"""Run by test_recipe_runs.py: `astrea-train` (its `main`, ARGS as on the command line) in this process, killed
with SIGKILL (no exception, no clean-up) right after the Trainer has saved checkpoint STEP of stage STAGE.

    python killed_run.py STAGE STEP ARGS...
"""

import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from astrea.training import cli, pipeline

stage, step, *argv = sys.argv[1:]


class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == stage and state.global_step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)


run = pipeline.run
pipeline.run = lambda recipe, phases, resume=False, callbacks=None: run(recipe, phases, resume, [Kill()])
sys.exit(cli.main(argv))
