"""PyTorch MACNN: the reference network that ``bench/compare_torch.py`` times against dkd-jax.

Written from the README's architecture table (not ported from any repository): the same layers,
padding, pooling, head fusion and initialisation as :class:`dkd_jax.models.MACNN`, in PyTorch's
native NCHW layout. Inputs are ``[batch, freq, time]`` features (a channel axis is added here).

* conv 10×2 pad (4, 0) and conv 2×8 pad (0, 3), 1→8 each, BatchNorm, ReLU, concatenated → 16;
* conv 3×3 pad 1 → 32, 48 (each followed by a 2×2 max-pool), 64, 80; BatchNorm, ReLU each;
* head fusion: 1×1 convs Q, K, V 80 → heads·d (the heads stacked on the channel axis),
  ``O_i = softmax_d(Q_i ⊙ K_i) ⊙ V_i``; ReLU; mean over heads and positions → ``[batch, d]``;
* linear d → classes.

BatchNorm is PyTorch's own (momentum 0.1, eps 1e-5; the running variance is updated with the
unbiased batch variance, Flax's with the biased one). Initialisation is PyTorch's default for
``Conv2d``/``Linear`` (kaiming-uniform a=√5 kernels, ``U(±1/√fan_in)`` biases), which is what
dkd-jax's ``init_scheme="pytorch"`` reproduces.

Also here: the weight port from Flax variables (:func:`load_flax_variables`) and back
(:func:`flax_variables`), the DKD loss in PyTorch (:func:`dkd_loss`, the same log-space formulas
as :func:`dkd_jax.losses.dkd_loss`), and the three timed operations: :func:`ce_step`,
:func:`dkd_step` (frozen teacher in eval mode + student forward/backward + Adam) and
:func:`predict`. The optimiser is ``torch.optim.Adam(weight_decay=...)`` (coupled L2), which is
what dkd-jax's ``create_optimizer`` builds with optax.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TorchMACNN",
    "build",
    "ce_step",
    "dkd_loss",
    "dkd_step",
    "flax_variables",
    "kd_ramp",
    "load_flax_variables",
    "make_optimizer",
    "predict",
]

#: The Flax presets (dkd_jax.models.MODEL_PRESETS, head fusion): heads × channels per head.
PRESETS = {"student": (4, 64), "teacher": (8, 256), "tiny": (2, 8)}
_FIRST = {"conv1a": ((10, 2), (4, 0)), "conv1b": ((2, 8), (0, 3))}
_STAGES = (("conv2", 16, 32, True), ("conv3", 32, 48, True), ("conv4", 48, 64, False))
_STAGES += (("conv5", 64, 80, False),)
_BN_MOMENTUM = 0.1
_BN_EPS = 1e-5

#: Names the forward's pieces for ``torch.profiler`` (``bench/profile_step.py``), with the
#: names that dkd-jax's HLO metadata gives the same pieces. Outside a profile a scope costs
#: about a microsecond; 20 per forward against steps of milliseconds.
_scope = torch.profiler.record_function


class TorchMACNN(nn.Module):
    """Head-fusion MACNN in PyTorch (NCHW).

    Args:
      num_classes: output classes.
      heads: attention heads h.
      hidden: channels per head d (also the embedding size).
    """

    def __init__(self, num_classes: int = 4, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        for name, (kernel, padding) in _FIRST.items():
            self.add_module(name, nn.Conv2d(1, 8, kernel, padding=padding))
            self.add_module("bn" + name[4:], nn.BatchNorm2d(8, _BN_EPS, _BN_MOMENTUM))
        for name, cin, cout, _ in _STAGES:
            self.add_module(name, nn.Conv2d(cin, cout, 3, padding=1))
            self.add_module("bn" + name[4:], nn.BatchNorm2d(cout, _BN_EPS, _BN_MOMENTUM))
        self.query = nn.Conv2d(80, heads * hidden, 1)
        self.key = nn.Conv2d(80, heads * hidden, 1)
        self.value = nn.Conv2d(80, heads * hidden, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def _block(self, x: torch.Tensor, name: str) -> torch.Tensor:
        bn_name = "bn" + name[4:]
        with _scope(name):
            x = getattr(self, name)(x)
        with _scope(bn_name):
            x = getattr(self, bn_name)(x)
        with _scope("relu"):
            return F.relu(x)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[batch, freq, time]`` features → ``[batch, num_classes]`` logits."""
        x = features.unsqueeze(1)
        first = [self._block(x, "conv1a"), self._block(x, "conv1b")]
        with _scope("concatenate"):
            x = torch.cat(first, dim=1)
        for name, _, _, pool in _STAGES:
            x = self._block(x, name)
            if pool:
                with _scope("max_pool"):
                    x = F.max_pool2d(x, 2)
        b, _, h, w = x.shape
        shape = (b, self.heads, self.hidden, h, w)
        with _scope("head_fusion"):
            q, k, v = (proj(x).view(shape) for proj in (self.query, self.key, self.value))
            heads = torch.softmax(q * k, dim=2) * v
        with _scope("embedding"):
            embedding = F.relu(heads).mean(dim=(1, 3, 4))
        with _scope("classifier"):
            return self.classifier(embedding)


def build(preset: str, num_classes: int = 4) -> TorchMACNN:
    """A :class:`TorchMACNN` of a dkd-jax head-fusion preset: student, teacher or tiny."""
    if preset not in PRESETS:
        raise ValueError(f"torch_macnn: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    heads, hidden = PRESETS[preset]
    return TorchMACNN(num_classes, heads, hidden)


# --------------------------------------------------------------------------------------------
# Weight port. Flax: conv kernels HWIO, DenseGeneral kernels [80, h, d] + biases [h, d], Dense
# kernels [in, out]; BatchNorm scale/bias + batch_stats mean/var. PyTorch: OIHW, [out, in].
# --------------------------------------------------------------------------------------------


def _same(a):
    return a


def _conv_to_torch(kernel):  # HWIO -> OIHW
    return kernel.transpose(3, 2, 0, 1)


def _conv_to_flax(weight):  # OIHW -> HWIO
    return weight.transpose(2, 3, 1, 0)


def _pairs(model: TorchMACNN):
    """(flax collection, flax path, torch tensor, to_torch, to_flax) for every variable."""
    for name in (*_FIRST, *(s[0] for s in _STAGES)):
        layer, bn_name = getattr(model, name), "bn" + name[4:]
        bn = getattr(model, bn_name)
        yield "params", (name, "kernel"), layer.weight, _conv_to_torch, _conv_to_flax
        yield "params", (name, "bias"), layer.bias, _same, _same
        yield "params", (bn_name, "scale"), bn.weight, _same, _same
        yield "params", (bn_name, "bias"), bn.bias, _same, _same
        yield "batch_stats", (bn_name, "mean"), bn.running_mean, _same, _same
        yield "batch_stats", (bn_name, "var"), bn.running_var, _same, _same
    heads = (model.heads, model.hidden)
    width = model.heads * model.hidden

    def proj_to_torch(kernel):  # [80, h, d] -> [h·d, 80, 1, 1]
        return kernel.reshape(80, width).T[:, :, None, None]

    def proj_to_flax(weight):
        return weight[:, :, 0, 0].T.reshape(80, *heads)

    def bias_to_torch(bias):  # [h, d] -> [h·d]
        return bias.reshape(width)

    def bias_to_flax(bias):
        return bias.reshape(heads)

    for name in ("query", "key", "value"):
        layer = getattr(model, name)
        yield "params", ("head_fusion", name, "kernel"), layer.weight, proj_to_torch, proj_to_flax
        yield "params", ("head_fusion", name, "bias"), layer.bias, bias_to_torch, bias_to_flax
    fc = model.classifier
    yield "params", ("classifier", "kernel"), fc.weight, np.transpose, np.transpose
    yield "params", ("classifier", "bias"), fc.bias, _same, _same


def load_flax_variables(model: TorchMACNN, variables: dict) -> TorchMACNN:
    """Copies Flax MACNN variables ``{"params", "batch_stats"}`` (arrays, host or device) into
    ``model`` in place and returns it. Raises ValueError naming the first mismatching entry."""
    with torch.no_grad():
        for collection, path, tensor, to_torch, to_flax in _pairs(model):
            node = variables[collection]
            for key in path:
                node = node[key]
            value = np.asarray(node, np.float32)
            want = to_flax(tensor.detach().cpu().numpy()).shape
            if value.shape != want:
                raise ValueError(
                    f"torch_macnn: {collection}/{'/'.join(path)} has shape {value.shape}; this "
                    f"PyTorch model needs {want} (another preset?)"
                )
            tensor.copy_(torch.from_numpy(np.array(to_torch(value))).to(tensor.device))
    return model


def flax_variables(model: TorchMACNN) -> dict:
    """The model's variables in Flax's structure and layouts, as float32 NumPy arrays."""
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for collection, path, tensor, _, to_flax in _pairs(model):
        node = out[collection]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(to_flax(tensor.detach().cpu().numpy()))
    return out


# --------------------------------------------------------------------------------------------
# Loss, optimiser, the timed operations
# --------------------------------------------------------------------------------------------


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    keep = keep & (p > 0)
    return torch.where(keep, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _split_log_probs(z: torch.Tensor, target: torch.Tensor):
    """(log [p_t, 1 − p_t] [B, 2], log of the softmax over the non-target classes [B, C])."""
    lse = torch.logsumexp(z, -1)
    others = z.masked_fill(target, float("-inf"))
    lse_others = torch.logsumexp(others, -1)
    binary = torch.stack([(z * target).sum(-1) - lse, lse_others - lse], -1)
    non_target = torch.where(target, torch.zeros_like(z), z - lse_others[:, None])
    return binary, non_target


def dkd_loss(student, teacher, labels, *, alpha=1.0, beta=8.0, temperature=4.0) -> torch.Tensor:
    """Per-example ``T²·(alpha·TCKD + beta·NCKD)`` ([batch]); the teacher gets no gradient.

    TCKD is the KL of the binary (target, rest) distributions, NCKD the KL of the distributions
    over the non-target classes, both of ``softmax(z / T)`` and computed from logsumexps.
    """
    target = F.one_hot(labels, student.shape[-1]).bool()
    bin_t, non_t = _split_log_probs(teacher.detach().float() / temperature, target)
    bin_s, non_s = _split_log_probs(student.float() / temperature, target)
    tckd = _kl(bin_t, bin_s, torch.ones_like(bin_t, dtype=torch.bool))
    nckd = _kl(non_t, non_s, ~target)
    return temperature**2 * (alpha * tckd + beta * nckd)


def kd_ramp(step: int, warmup_epochs: float, steps_per_epoch: int) -> float:
    """min(epoch / warmup_epochs, 1) with the 1-based epoch of ``step`` (1 when warm-up is 0)."""
    if warmup_epochs <= 0:
        return 1.0
    return min((step // steps_per_epoch + 1) / warmup_epochs, 1.0)


def make_optimizer(model: nn.Module, *, lr=1e-3, weight_decay=1e-6, b1=0.9, b2=0.999, eps=1e-8):
    """Adam with coupled L2 (the gradient gets ``weight_decay·param`` before the moments)."""
    return torch.optim.Adam(
        model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay
    )


def ce_step(model, optimizer, features, labels) -> torch.Tensor:
    """One cross-entropy training step (train-mode BatchNorm); returns the detached mean loss."""
    model.train()
    logits = model(features)
    with _scope("loss"):
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def dkd_step(
    student, teacher, optimizer, features, labels, *, ramp, ce_weight=1.0, **dkd
) -> torch.Tensor:
    """One distillation step: the frozen teacher's forward (eval-mode BatchNorm, no graph), the
    student's forward/backward on ``ce_weight·CE + ramp·DKD`` (batch means) and an Adam update.
    ``dkd`` holds alpha, beta, temperature. Returns the detached mean loss."""
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(features)
    student.train()
    logits = student(features)
    loss = ce_weight * F.cross_entropy(logits, labels)
    loss = loss + ramp * dkd_loss(logits, teacher_logits, labels, **dkd).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def predict(model, features) -> torch.Tensor:
    """Eval-mode logits (running BatchNorm statistics), without autograd."""
    model.eval()
    with torch.inference_mode():
        return model(features)
