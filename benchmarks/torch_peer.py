"""The PyTorch peers timed against l2o_jax (never imported by the library or the tests).

- `gpt2_peer`: the GPT-2 in-context training step as Garg et al. 2022 (dtsip/in-context-learning,
  `models.py::TransformerModel`) and Bai et al. 2023 write it: HF `transformers.GPT2Model`
  (n_positions = 2 (N+1), dropout 0, use_cache False, the library's default attention
  implementation) between an `nn.Linear` read-in and read-out, x and y interleaved, predictions at
  the x tokens, `torch.optim.Adam`, tasks sampled in torch on the same device every step. The
  prompt stops at x_{N+1} (2N+1 tokens, as ours; Garg et al. also feed y_{N+1}, one token more).
- `small_tf_port`: our straightforward port of Small TF (12 blocks of masked ReLU attention,
  Definition 3.1, and the ReLU MLP, Definition 3.2, on the embedding of eq. 4.2, query
  read-out, Definition 4.2), batched with einsums; labelled "our port" in the results.

Each `make_*` returns `step() -> loss tensor`: one full training step (sample, forward,
backward, Adam), nothing hoisted out that a user's loop would not hoist.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def sample_tasks(batch: int, d: int, n: int, s: int, device, generator=None):
  """S-sparse beta* with a uniform support and N(0, 1) values; X, x_query ~ N(0, I)."""
  support = torch.rand(batch, d, device=device, generator=generator).argsort(dim=1)[:, :s]
  beta = torch.zeros(batch, d, device=device)
  beta.scatter_(1, support, torch.randn(batch, s, device=device, generator=generator))
  xs = torch.randn(batch, n + 1, d, device=device, generator=generator)
  ys = xs @ beta.unsqueeze(-1)
  return xs, ys.squeeze(-1)


class GPT2ICL(nn.Module):
  """Garg et al.'s TransformerModel: read-in, GPT2Model backbone, read-out."""

  def __init__(self, d: int, n_points: int, width: int = 256, num_layers: int = 12, num_heads: int = 8):
    super().__init__()
    from transformers import GPT2Config, GPT2Model
    config = GPT2Config(n_positions=2 * n_points, n_embd=width, n_layer=num_layers, n_head=num_heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    self.read_in = nn.Linear(d, width)
    self.backbone = GPT2Model(config)
    self.read_out = nn.Linear(width, 1)

  @staticmethod
  def combine(xs, ys):
    """(B, n+1, d), (B, n+1) -> (B, 2n+1, d): x_1, [y_1, 0..], ..., x_{n+1}."""
    B, points, d = xs.shape
    ys_wide = torch.cat([ys.unsqueeze(2), torch.zeros(B, points, d - 1, device=ys.device)], dim=2)
    return torch.stack([xs, ys_wide], dim=2).view(B, 2 * points, d)[:, :-1]

  def forward(self, xs, ys):
    hidden = self.backbone(inputs_embeds=self.read_in(self.combine(xs, ys))).last_hidden_state
    return self.read_out(hidden)[:, ::2, 0]


def make_gpt2_peer(*, d: int = 20, n: int = 10, s: int = 3, batch: int = 64, lr: float = 1e-4,
                   width: int = 256, num_layers: int = 12, num_heads: int = 8, device="cpu", seed: int = 0):
  """One training step of the HF GPT-2 peer; loss = mean over every prefix (Garg et al.)."""
  torch.manual_seed(seed)
  model = GPT2ICL(d, n + 1, width, num_layers, num_heads).to(device).train()
  opt = torch.optim.Adam(model.parameters(), lr=lr)

  def step():
    xs, ys = sample_tasks(batch, d, n, s, device)
    opt.zero_grad(set_to_none=True)
    loss = ((model(xs, ys) - ys) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.detach()

  step.model, step.optimizer = model, opt
  return step


class SmallTFPort(nn.Module):
  """Small TF in PyTorch: the same parameters and initialisation as `small_tf_init`."""

  def __init__(self, d: int = 20, num_layers: int = 12, num_heads: int = 4, mlp_hidden: int | None = None,
               out_scale: float = 0.1):
    super().__init__()
    D = 2 * d + 2
    Dh = 4 * D if mlp_hidden is None else mlp_hidden
    L, M = num_layers, num_heads
    self.d = d
    self.Q = nn.Parameter(torch.randn(L, M, D, D) / math.sqrt(D))
    self.K = nn.Parameter(torch.randn(L, M, D, D) / math.sqrt(D))
    self.V = nn.Parameter(torch.randn(L, M, D, D) * out_scale / math.sqrt(D * M * L))
    self.W1 = nn.Parameter(torch.randn(L, Dh, D) * math.sqrt(2.0 / D))
    self.W2 = nn.Parameter(torch.randn(L, D, Dh) * out_scale / math.sqrt(Dh * L))
    self.b = nn.Parameter(torch.zeros(L, Dh))
    self.readout = nn.Parameter(torch.randn(D, d) / math.sqrt(D * d))

  def embed(self, X, y, x_query):
    """eq. 4.2 batched: (B, D, 2N+1), tokens as columns."""
    B, N, d = X.shape
    T = 2 * N + 1
    xs = torch.cat([X.repeat_interleave(2, dim=1), x_query.unsqueeze(1)], dim=1)
    ys = torch.zeros(B, T, device=X.device)
    ys[:, 1::2] = y
    ind = (torch.arange(T, device=X.device) % 2 == 0).float().expand(B, T)
    beta = torch.zeros(B, T, d, device=X.device)
    return torch.cat([xs, ys.unsqueeze(2), beta, ind.unsqueeze(2)], dim=2).transpose(1, 2)

  def forward(self, X, y, x_query):
    H = self.embed(X, y, x_query)
    T = H.shape[-1]
    i = torch.arange(T, device=H.device)
    mask = torch.where(i[:, None] <= i[None, :], 1.0 / (i[None, :] + 1.0), torch.zeros(()))
    for k in range(self.Q.shape[0]):
      QH = torch.einsum("mef,bft->bmet", self.Q[k], H)
      KH = torch.einsum("mef,bft->bmet", self.K[k], H)
      VH = torch.einsum("mef,bft->bmet", self.V[k], H)
      weights = torch.relu(torch.einsum("bmej,bmei->bmji", KH, QH)) * mask
      H = H + torch.einsum("bmej,bmji->bei", VH, weights)
      H = H + self.W2[k] @ torch.relu(self.W1[k] @ H + self.b[k][:, None])
    Xt = torch.cat([X, x_query.unsqueeze(1)], dim=1)            # (B, N+1, d)
    return torch.einsum("bet,ef,btf->bt", H[:, :, 0::2], self.readout, Xt)


def make_small_tf_port(*, d: int = 20, n: int = 10, s: int = 3, batch: int = 64, lr: float = 1e-4,
                       num_layers: int = 12, device="cpu", seed: int = 0):
  """One training step of our Small TF port; loss at the query (the paper's)."""
  torch.manual_seed(seed)
  model = SmallTFPort(d, num_layers).to(device).train()
  opt = torch.optim.Adam(model.parameters(), lr=lr)

  def step():
    xs, ys = sample_tasks(batch, d, n, s, device)
    opt.zero_grad(set_to_none=True)
    pred = model(xs[:, :-1], ys[:, :-1], xs[:, -1])
    loss = ((pred[:, -1] - ys[:, -1]) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.detach()

  step.model, step.optimizer = model, opt
  return step


def snapshot(step):
  """Deep copies of a step's model and Adam state, for `restore`."""
  return copy.deepcopy(step.model.state_dict()), copy.deepcopy(step.optimizer.state_dict())


def restore(step, state) -> None:
  """Puts a step's model and Adam state back to a `snapshot` (copies, so it can be restored again)."""
  model_state, opt_state = state
  step.model.load_state_dict(model_state)
  step.optimizer.load_state_dict(copy.deepcopy(opt_state))


def synchronize(device) -> None:
  if str(device).startswith("cuda"):
    torch.cuda.synchronize()
