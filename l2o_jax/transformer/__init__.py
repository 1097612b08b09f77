"""The paper's Transformer: embedding (eq. 4.2), forward pass (Definitions 3.1-3.3), the
explicit LISTA-VM construction (Theorem 4.1, Appendix C), read-outs (Definitions 4.1, 4.2,
Corollary E.1), the trainable Small TF and the training objectives of section 6.
GPT-2 lives in `l2o_jax.transformer.gpt2` (imported lazily by `objectives`)."""
from l2o_jax.transformer.embedding import embed, beta_slot, model_dim
from l2o_jax.transformer.construction import construct_lista_vm_transformer
from l2o_jax.transformer.readout import (linear_readout, query_readout, query_dagger_readout,
                                         query_dagger_matrix, x_tilde)
from l2o_jax.transformer.small_tf import (transformer_forward, small_tf_init, small_tf_predict,
                                          small_tf_from_construction, readout_kind, SmallTF)
from l2o_jax.transformer.objectives import make_objective, predict, evaluate, init_params

__all__ = [
    "embed", "beta_slot", "model_dim",
    "construct_lista_vm_transformer",
    "linear_readout", "query_readout", "query_dagger_readout", "query_dagger_matrix", "x_tilde",
    "transformer_forward", "small_tf_init", "small_tf_predict", "small_tf_from_construction",
    "readout_kind", "SmallTF",
    "make_objective", "predict", "evaluate", "init_params",
]
