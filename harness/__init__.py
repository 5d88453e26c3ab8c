"""The run scaffolding of the launchers, above ``util/`` and ``dataloaders/`` (it may import both; neither imports it).

One module per concern:

* ``harness.errors`` -- ``UserError``, ``run`` (one-line errors, rank 0), ``ArgumentParser``, ``require``;
* ``harness.flags`` -- the shared flag groups (run, schedule, data + loader, distributed), dead-flag warnings;
* ``harness.devices`` -- ``setup`` (process group, device, seed, threads, workers), ``build_optimizer`` (AdamW + AMP);
* ``harness.output`` -- ``prepare_output`` (folder, lock, cleanup), ``save_run_config``, ``record_raster_dtype``,
  ``resolve_data_config``;
* ``harness.checkpoints`` -- resume (``find_resume``, ``read_checkpoint``, ``restore_training_state``), the
  crash-consistent ``CheckpointKeeper``, ``load_resumed_weights``;
* ``harness.run_control`` -- the output folder's ``run.lock`` and ``StopRequest`` (SIGTERM/SIGUSR1, exit 75);
* ``harness.pretrained`` -- what a launcher starting from pretrained weights starts from (``read_start``);
* ``harness.skeleton`` -- the training-run skeleton (``TrainingRun``, ``start_optimizer``, ``evaluate_only``).

The names below are the ones launchers use (every public name of the former ``util/harness.py`` among them);
``import harness`` then ``harness.run(main, parser)``.
"""
from harness.run_control import EXIT_PREEMPTED, LATEST, LockRefused, StopRequest, release_output_lock
from harness.errors import (DEBUG_ENV, ArgumentParser, UserError, check_positive, debug_enabled, report_error,
                            require, run)
from harness.flags import (add_data_args, add_distributed_args, add_loader_args, add_run_args, add_schedule_args,
                           explicit_flags, warn_dead_flags)
from harness.devices import (build_optimizer, default_num_workers, limit_cpu_threads, local_processes, resolve_device,
                             seed_everything, setup, usable_cores, wrap_ddp)
from harness.checkpoints import (OLD_ASIDE, VERIFIED, CheckpointKeeper, checkpoint_kind, checkpoint_writer,
                                 find_resume, load_resumed_weights, nothing_left, read_checkpoint,
                                 remove_stale_temp_files, restore_training_state, rng_state, set_rng_state,
                                 state_is_finite)
from harness.output import (check_writable, make_folder, open_log_writer, prepare_output, record_raster_dtype,
                            resolve_data_config, save_run_config)
from harness.skeleton import TrainingRun, evaluate_only, start_optimizer, stop_preempted, training_run

__all__ = [
    "EXIT_PREEMPTED", "LATEST", "LockRefused", "StopRequest", "release_output_lock",
    "DEBUG_ENV", "ArgumentParser", "UserError", "check_positive", "debug_enabled", "report_error", "require", "run",
    "add_data_args", "add_distributed_args", "add_loader_args", "add_run_args", "add_schedule_args",
    "explicit_flags", "warn_dead_flags",
    "build_optimizer", "default_num_workers", "limit_cpu_threads", "local_processes", "resolve_device",
    "seed_everything", "setup", "usable_cores", "wrap_ddp",
    "OLD_ASIDE", "VERIFIED", "CheckpointKeeper", "checkpoint_kind", "checkpoint_writer", "find_resume",
    "load_resumed_weights", "nothing_left", "read_checkpoint", "remove_stale_temp_files", "restore_training_state",
    "rng_state", "set_rng_state", "state_is_finite",
    "check_writable", "make_folder", "open_log_writer", "prepare_output", "record_raster_dtype",
    "resolve_data_config", "save_run_config",
    "TrainingRun", "evaluate_only", "start_optimizer", "stop_preempted", "training_run",
]
