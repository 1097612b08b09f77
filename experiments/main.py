"""Launcher: python -m experiments.main --config=experiments/configs/<name>.py --workdir=DIR

Every config field can be overridden, e.g. --config.lista_train.steps=1000 --config.seeds=3.
Relaunching with the same workdir resumes each job from its latest good checkpoint; SIGTERM or
Ctrl-C saves a checkpoint and exits cleanly. See experiments/runner.py for the outputs.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/quick.py",
                                          "Experiment config file (one get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (required): checkpoints, metrics, results.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    sys.exit("workdir: missing; pass --workdir=DIR (checkpoints, metrics and results go there)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = _CONFIG.value
  from l2o_jax import distributed, train
  from experiments import runner
  # Both must happen before JAX starts its backends, which validation's device count does.
  try:
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      distributed.set_cpu_devices(runner.cpu_device_count(config, _WORKDIR.value))
    multihost_kwargs = runner.multihost_kwargs(config)
  except runner.ConfigError as e:
    sys.exit(f"config error: {e}")
  distributed.initialize(config.multihost, **multihost_kwargs)
  try:
    runner.validate(config)
  except runner.ConfigError as e:
    sys.exit(f"config error: {e}")
  import jax
  log = print if jax.process_index() == 0 else (lambda *_, **__: None)   # one process logs
  try:
    out = runner.run(config, _WORKDIR.value, log=lambda m: log(m, flush=True))
  except runner.ConfigError as e:
    sys.exit(f"config error: {e}")
  except train.NonFiniteLossError as e:
    sys.exit(f"training stopped: {e}")
  if out is None:
    sys.exit(0)


def _parse_flags(argv):
  """absl's flag parsing, with a misspelt --config.FIELD reported as a config error instead of
  ml_collections' AttributeError traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    inner = e.args[0] if e.args else e
    while isinstance(inner, (AttributeError, KeyError)) and inner.args:
      inner = inner.args[0]
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"config error: no such config field: {str(inner).strip()} (overrides given: "
             f"{', '.join(overrides) or 'none'})".replace("\n", " "))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
