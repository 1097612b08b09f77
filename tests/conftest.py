import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
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
