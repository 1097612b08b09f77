import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of tiny programs and runs each a few times, so LLVM's optimisation of
# the XLA:CPU kernels dominated its run time (a jitted jax.random.normal of 2x2x10x10 floats: 2.2 s
# to compile at the default level, 0.25 s at 0; the whole suite 478 -> ~300 s on 2 cores). Every
# HLO pass still runs: only the machine-code optimisation level drops. Benchmarks, `make run` and
# users keep the default. An XLA_FLAGS already set (e.g. to debug at the default level) wins.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env() -> dict:
  """The environment for a test's child Python process: on the CPU, with this suite's XLA_FLAGS
  less any forced device count (each child sets its own), importing l2o_jax from this checkout.
  (A child run as `python tests/x.py` has tests/ first on its path, so without PYTHONPATH it
  imported whatever l2o_jax the environment has installed: from another checkout sharing the
  virtual environment, the parent and the child tested different code.)"""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONPATH=path)


@pytest.fixture
def child_env():
  return _child_env()


@pytest.fixture
def run_processes():
  """run(argvs, timeout=300) -> [(returncode, stdout, stderr)]: starts one Python process per
  argv (the arguments after the interpreter; "{port}" becomes a free local port, for a
  jax.distributed coordinator) in the repository, on the CPU, and waits for all of them.
  The first to fail stops the others at once: a process waiting in a collective for a crashed
  peer would otherwise hang until the timeout (returncode None means killed at the timeout)."""
  def run(argvs, timeout=300):
    with socket.socket() as sock:
      sock.bind(("localhost", 0))
      port = str(sock.getsockname()[1])
    env = _child_env()
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in argvs]
    procs, timed_out = [], False
    try:
      for argv, (out, err) in zip(argvs, files):
        procs.append(subprocess.Popen([sys.executable] + [a.replace("{port}", port) for a in argv],
                                      cwd=REPO, env=env, stdout=out, stderr=err, text=True))
      deadline = time.monotonic() + timeout
      while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
        if time.monotonic() > deadline:
          timed_out = True
          break
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    results = []
    for p, (out, err) in zip(procs, files):
      out.seek(0)
      err.seek(0)
      results.append((None if timed_out else p.returncode, out.read(), err.read()))
      out.close()
      err.close()
    return results

  return run
