"""l2o_jax: learning-to-optimize and in-context sparse recovery in JAX.

Reference implementation of "On the Learn-to-Optimize Capabilities of Transformers in
In-Context Sparse Recovery" (ICLR 2025). Pure functions of one instance; vmap over batches.

Submodules: tasks, ops, solvers, metrics, lista, transformer (and transformer.gpt2), train,
checkpoint, distributed.
"""
from l2o_jax.tasks import Task, sample_tasks, support_mask
from l2o_jax.ops import soft_threshold, masked_relu_attention, relu_mlp, causal_mask
from l2o_jax.solvers import ista, fista, lasso, lasso_batch, lasso_implicit, best_subset, duality_gap, lasso_objective, lipschitz, LassoInfo
from l2o_jax.metrics import (prediction_error, prediction_errors, median_error, mean_interval, median_prediction_error, label_error,
                             beta_nmse_db, per_prompt_length, batched)
from l2o_jax import lista
from l2o_jax.lista import lista_vm, lista_vm_ss, lista_vm_init
from l2o_jax import transformer
from l2o_jax.transformer import (embed, beta_slot, transformer_forward, construct_lista_vm_transformer,
                                 linear_readout, query_readout, query_dagger_readout,
                                 small_tf_init, small_tf_predict, small_tf_from_construction, SmallTF)

__all__ = [
    "Task", "sample_tasks", "support_mask",
    "soft_threshold", "masked_relu_attention", "relu_mlp", "causal_mask",
    "ista", "fista", "lasso", "lasso_batch", "lasso_implicit", "best_subset", "duality_gap", "lasso_objective", "lipschitz", "LassoInfo",
    "prediction_error", "prediction_errors", "median_error", "mean_interval", "median_prediction_error", "label_error", "beta_nmse_db", "per_prompt_length", "batched",
    "lista", "lista_vm", "lista_vm_ss", "lista_vm_init",
    "transformer", "embed", "beta_slot", "transformer_forward", "construct_lista_vm_transformer",
    "linear_readout", "query_readout", "query_dagger_readout",
    "small_tf_init", "small_tf_predict", "small_tf_from_construction", "SmallTF",
]
