"""l2o_jax: learning-to-optimize and in-context sparse recovery in JAX.

Reference implementation of "On the Learn-to-Optimize Capabilities of Transformers in
In-Context Sparse Recovery" (ICLR 2025). Pure functions of one instance; vmap over batches.
"""
from l2o_jax.tasks import Task, sample_tasks, support_mask
from l2o_jax.ops import soft_threshold, masked_relu_attention, relu_mlp, causal_mask
from l2o_jax.solvers import ista, fista, lasso, best_subset, duality_gap, lasso_objective, lipschitz, LassoInfo
from l2o_jax.metrics import prediction_error, label_error, beta_nmse_db, per_prompt_length, batched

__all__ = [
    "Task", "sample_tasks", "support_mask",
    "soft_threshold", "masked_relu_attention", "relu_mlp", "causal_mask",
    "ista", "fista", "lasso", "best_subset", "duality_gap", "lasso_objective", "lipschitz", "LassoInfo",
    "prediction_error", "label_error", "beta_nmse_db", "per_prompt_length", "batched",
]
