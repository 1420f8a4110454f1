"""One run's machinery: the LightningModule, the checks before any work, the trainer, loggers, the run directory,
checkpoints and resume, faults, sweeps and launching; `locality.train` reads it top to bottom."""
