"""What train_net.py uses, for reuse in your own entry points: start-up checks (defaults.py), the
trainer (train_loop.py) and its hooks (hooks.py), launching also on CPU-only machines (launch.py),
run records (run_record.py) and studies of configs over seeds through submitit (study.py)."""

from .defaults import (
    PRETRAINED_ENV,
    OutputDirGuard,
    OutputDirLock,
    StartupError,
    build_config,
    check_inputs,
    check_output_dir,
    resolve_allocation,
    resolve_weights,
    setup,
)
from .hooks import MetricsWriter, RNGStates
from .launch import launch_any
from .run_record import RunRecordError, load_run, write_run_record
from .study import StudyError, TrainRun, launch_study, load_manifest, plan_study, write_statistics
from .train_loop import Trainer, TrainingDivergedError, evaluate
