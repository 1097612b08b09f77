"""How often the 12-block Small TF meets exploding batches, under a few optimiser and loss settings.

  python -m experiments.small_tf_stability                       # every variant, 3,000 steps each
  python -m experiments.small_tf_stability --variants=lr1e-4,lr3e-5 --steps=3000 --out=stab.jsonl
  python -m experiments.small_tf_stability --variants=lr1e-4,drop1e3 --seeds=3   # 3 runs each
  python -m experiments.small_tf_stability --init_scores   # first-block scores at initialisation

The paper's Small TF (section 6: 12 blocks of Definition 3.3, 4 heads, D = 42, query loss) has no
LayerNorm and its ReLU attention is cubic in the tokens, so a few prompts can blow the forward pass
up (BUILD_NOTES, "Training stability"). A variant changes the optimiser or, for drop_*, leaves
each step's exploding prompts out of its loss, or, for clip*, caps every attention weight
ReLU(score) at a constant (a departure from the paper's model: each block's attention becomes
linear in the tokens for large ones; training and test both use the capped model). Each trains from the same initialisation on the
same batches (query loss, batch 64, global-norm clip 1, linear warm-up then a constant rate, the
early phase of the paper's 10^6-step run, where a cosine schedule has barely decayed) with
non-finite steps skipped, and reports per 500 steps (--window): the median batch loss, the largest finite
one, how many steps were skipped, how many had a non-finite loss and how many a loss above 100 (the
trivial predictor scores ~3); then the query prediction error on a fixed test set: mean, median, how
many prompts give a non-finite or > 1e3 error, and where those prompts rank among all test
prompts by norm (`bad_norm_percentiles`). One JSON line per variant and seed (stdout and
--out; --seeds=S trains seeds 0..S-1 together, each with its own initialisation and batches, so
that one seed's luck does not rank the variants); a variant stopped by a window of only
non-finite steps reports the step and the next one runs.
"""
from __future__ import annotations

import json
import time
from typing import NamedTuple

from absl import app, flags


class Variant(NamedTuple):
  """lr, Adam b2, weight decay (AdamW) and warm-up steps of the optimiser. drop_above: None trains
  on every prompt; a number leaves out of each step's loss the prompts whose query loss is
  non-finite or above it (`drop_exploding_prompts`), inf only the non-finite ones. score_clip:
  None is the paper's ReLU attention; a number caps each attention weight at it
  (`ops.attention_weights`; the launcher's `tf.small_tf_score_clip`)."""
  lr: float
  b2: float = 0.999
  weight_decay: float = 0.0
  warmup: int = 1000
  drop_above: float | None = None
  score_clip: float | None = None


VARIANTS = {
    "lr1e-4": Variant(1e-4),     # the presets' setting
    "lr3e-5": Variant(3e-5),
    "lr1e-5": Variant(1e-5),
    "b2_0.95": Variant(1e-4, b2=0.95),
    "wd0.1": Variant(1e-4, weight_decay=0.1),
    "warm3000": Variant(1e-4, warmup=3000),
    "drop_nonfinite": Variant(1e-4, drop_above=float("inf")),
    "drop1e3": Variant(1e-4, drop_above=1e3),
    "clip100": Variant(1e-4, score_clip=100.0),   # ~3.4x the largest first-block score at init (29.6)
    "clip10": Variant(1e-4, score_clip=10.0),     # below their 99.9th percentile (13.1; --init_scores)
}

_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"variants to run, from {sorted(VARIANTS)}")
_STEPS = flags.DEFINE_integer("steps", 3000, "training steps per variant (a multiple of --window)")
_WINDOW = flags.DEFINE_integer("window", 500, "steps per reported window (and per jit call)")
_TEST_TASKS = flags.DEFINE_integer("test_tasks", 4096, "test prompts (fixed seed 12345)")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 12, "Small TF blocks K (paper: 12)")
_BATCH = flags.DEFINE_integer("batch", 64, "instances per step (paper: 64)")
_D = flags.DEFINE_integer("d", 20, "dimension of beta* (paper: 20; N = 10, S = 3)")
_SEEDS = flags.DEFINE_integer("seeds", 1, "seeds 0..S-1 per variant (initialisation and batches), "
                              "trained together in one program; one JSON line per seed")
_OUT = flags.DEFINE_string("out", "", "also append the JSON lines to this file")
_INIT_SCORES = flags.DEFINE_bool("init_scores", False, "only print the percentiles of the first "
                                 "block's ReLU scores of seed 0's initial model on its first batch "
                                 "(what the clip variants' caps were chosen from), then exit")

SCORE_PERCENTILES = (50, 90, 99, 99.9, 100)


def window_stats(losses, window: int, skipped=None):
  """Per `window` steps of one seed's losses: median, largest finite, non-finite and > 100 counts,
  and with `skipped` (that seed's skipped steps per window) those counts too: a step is also
  skipped when its loss is finite but its gradient is not."""
  import numpy as np
  out = []
  for k, i in enumerate(range(0, len(losses) - window + 1, window)):
    w = losses[i:i + window]
    finite = w[np.isfinite(w)]
    out.append({"step": i + window, "median": float(np.median(finite)) if finite.size else None,
                "max_finite": float(finite.max()) if finite.size else None,
                "nonfinite": int((~np.isfinite(w)).sum()), "over_100": int((finite > 100).sum())})
    if skipped is not None:
      out[-1]["skipped"] = int(skipped[k])
  return out


def exploding_norm_percentiles(norms, errors, above: float = 1e3) -> list[float]:
  """Where the prompts with a non-finite or > `above` error sit among all prompts by norm: the
  fraction of prompts smaller than each, sorted (near 1: the exploding prompts are the largest)."""
  import numpy as np
  norms, errors = np.asarray(norms), np.asarray(errors)
  return sorted(round(float((norms < v).mean()), 4) for v in norms[~(errors <= above)])


def query_errors(params, task, score_clip=None):
  """(B,) squared query errors of a Small TF on a batch of tasks, through the training
  objective's own query path (`small_tf._predict_query_batch`), with its attention weights capped
  at `score_clip` unless None."""
  from l2o_jax.transformer import small_tf as stf
  pred = stf._predict_query_batch(params, task.X, task.y, task.x_query, score_clip=score_clip)
  return (task.y_query - pred) ** 2


def initial_score_percentiles(params, task, percentiles=SCORE_PERCENTILES) -> list[float]:
  """Percentiles of the first block's attention weights ReLU(score) (Definition 3.1, before the
  1/i mask) over every causal (query i, key j <= i) pair, head and prompt of `task`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from l2o_jax.transformer import small_tf as stf
  H = stf._embed_rows(task.X, task.y, task.x_query)                  # (B, T, D)
  first = jax.tree_util.tree_map(lambda x: x[0], params["body"])
  A_s, _ = stf._head_stacks(first["attn"])
  B, T, D = H.shape
  G = (H @ A_s).reshape(B, T, -1, D)                                 # A_m h_i
  scores = jax.nn.relu(jnp.einsum("bimd,bjd->bimj", G, H))
  causal = np.tril(np.ones((T, T), bool))[None, :, None, :]
  return [float(v) for v in np.percentile(np.asarray(scores)[np.broadcast_to(causal, scores.shape)], percentiles)]


def drop_exploding_prompts(objective, drop_above: float, score_clip=None):
  """`objective` (Small TF, query loss) with each batch's exploding prompts left out of the loss.

  A gradient-free forward pass finds the prompts whose query loss is non-finite or above
  `drop_above`; the loss is the mean over the others. Masking the loss alone would not do: an
  inf activation times a zero cotangent is NaN in the backward pass, so the dropped prompts'
  inputs are zeroed too (the all-zero prompt runs finite). A batch with nothing dropped gives the
  plain loss. Costs one more forward pass per step (BUILD_NOTES: 3,000 steps in 142–146 s against
  135–139 s with one seed, 466 s against 379 s with three)."""
  import jax
  import jax.numpy as jnp

  def loss(params, task):
    err = jax.lax.stop_gradient(query_errors(params, task, score_clip))
    keep = jnp.isfinite(err) & (err <= drop_above)
    kept = lambda a: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a))
    masked = task._replace(X=kept(task.X), y=kept(task.y), x_query=kept(task.x_query))
    return jnp.sum(jnp.where(keep, query_errors(params, masked, score_clip), 0.0)) / jnp.maximum(keep.sum(), 1)

  return objective._replace(loss=loss)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"variants: unknown {unknown}; allowed: {sorted(VARIANTS)}")
  window = _WINDOW.value
  if window < 1 or _STEPS.value < window or _STEPS.value % window:
    raise app.UsageError(f"steps: expected a positive multiple of --window={window}, got {_STEPS.value}")
  if _SEEDS.value < 1:
    raise app.UsageError(f"seeds: expected >= 1, got {_SEEDS.value}")
  seeds = list(range(_SEEDS.value))
  if _INIT_SCORES.value:
    import jax
    from l2o_jax import train
    from l2o_jax.transformer import make_objective
    objective = make_objective("small_tf", d=_D.value, batch=_BATCH.value, num_layers=_NUM_LAYERS.value)
    state = train.init_state(objective, train.make_optimizer(1e-4), 0)   # seed 0, as in training
    batch = objective.sample(jax.random.fold_in(state.key, 0))           # its step-0 batch
    print(json.dumps({"percentiles": list(SCORE_PERCENTILES),
                      "first_block_relu_scores": initial_score_percentiles(state.params, batch)}))
    return
  from l2o_jax import distributed
  distributed.set_cpu_devices(distributed.auto_cpu_devices((_BATCH.value,)))
  import jax
  import numpy as np
  from l2o_jax import sample_tasks, train
  from l2o_jax.metrics import median_error
  from l2o_jax.transformer import make_objective

  mesh = distributed.data_mesh()

  def objective_for(v: Variant):
    objective = make_objective("small_tf", d=_D.value, batch=_BATCH.value, num_layers=_NUM_LAYERS.value,
                               score_clip=v.score_clip)
    if v.drop_above is not None:
      objective = drop_exploding_prompts(objective, v.drop_above, v.score_clip)
    return distributed.data_parallel(objective, mesh) if mesh.devices.size > 1 else objective

  place = (lambda s: distributed.replicate(s, mesh)) if mesh.devices.size > 1 else None
  test = jax.jit(lambda k: sample_tasks(k, _TEST_TASKS.value, d=_D.value, n=10, s=3))(jax.random.key(12345))
  # per-prompt query errors in one call (inference only: 2^16 prompts fit in memory)
  norms = np.sqrt(sum(np.sum(np.square(np.asarray(a)).reshape(_TEST_TASKS.value, -1), axis=1)
                     for a in (test.X, test.y, test.x_query)))   # each prompt's Frobenius norm
  squared_errors = jax.jit(query_errors, static_argnums=2)

  for name in _VARIANTS.value:
    t0 = time.time()
    v = VARIANTS[name]
    row = {"variant": name, **v._asdict(), "steps": _STEPS.value}
    skips = []   # per window: (S,) skipped steps of each seed
    try:
      optimizer = train.make_optimizer(v.lr, clip_norm=1.0, warmup_steps=v.warmup, b2=v.b2,
                                       weight_decay=v.weight_decay)
      fit = train.fit(objective_for(v), optimizer, _STEPS.value, seeds=seeds,
                      steps_per_call=window, place=place, log_fn=None, skip_nonfinite=True,
                      eval_every=window,
                      on_chunk=lambda step, state, m: skips.append(
                          np.asarray(m["skipped"]).reshape(len(seeds), -1).sum(axis=1)))
    except train.NonFiniteLossError as e:   # a window of only bad steps: report it, go on
      _emit({**row, "stopped_at_step": e.step, "error": str(e), "seconds": round(time.time() - t0)})
      continue
    skips = np.stack(skips, axis=1)   # (S, windows)
    for i, seed in enumerate(seeds):
      params = jax.tree_util.tree_map(lambda x: x[i], fit.state.params)
      err = np.asarray(squared_errors(params, test, v.score_clip))
      finite = err[np.isfinite(err)]
      _emit({**row, "seed": seed, "skipped": int(skips[i].sum()), "test_mean": float(err.mean()),
             "test_median": float(median_error(err)),
             "test_nonfinite": int((~np.isfinite(err)).sum()), "test_over_1e3": int((finite > 1e3).sum()),
             "bad_norm_percentiles": exploding_norm_percentiles(norms, err),
             "windows": window_stats(np.asarray(fit.losses[i]), window, skips[i]),
             "seconds": round(time.time() - t0)})


def _emit(row: dict) -> None:
  line = json.dumps(row)
  print(line, flush=True)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
