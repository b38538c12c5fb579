"""Linear probes, batched: many independent logistic regressions fitted at once, scored by ROC-AUC.

The objective is scikit-learn's ``LogisticRegression(C=C)``: ``C * sum(log-loss) + ||w||^2 / 2`` with
an unpenalised intercept, on standardised features, so results can be checked against it. All probes
are fitted together on the features' device with L-BFGS (their objectives are independent, so the
joint minimum is every probe's minimum).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Scale ``(probes, examples, width)`` features by the train split's mean and standard deviation.

    Example:
        >>> train, test = standardize(torch.tensor([[[0.0], [2.0]]]), torch.tensor([[[1.0]]]))
        >>> train.flatten().tolist(), test.flatten().tolist()
        ([-1.0, 1.0], [0.0])
    """
    mean = train.mean(dim=1, keepdim=True)
    std = train.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def fit_logistic(features: Tensor, labels: Tensor, c: float = 1.0, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """Fit one L2-regularised logistic regression per probe.

    Args:
        features: ``(probes, examples, width)``, standardised.
        labels: ``(examples,)`` of 0/1.
        c: inverse regularisation strength, as scikit-learn's ``C``.
        max_iter: L-BFGS iterations.

    Returns:
        ``(weights (probes, width), bias (probes,))``.

    Example:
        >>> x = torch.tensor([[[-2.0], [-1.0], [1.0], [2.0]]])
        >>> w, b = fit_logistic(x, torch.tensor([0, 0, 1, 1]))
        >>> bool(w[0, 0] > 0)
        True
        >>> fit_logistic(torch.full((1, 4, 1), float("nan")), torch.tensor([0, 0, 1, 1]))[0].isnan().all().item()
        True
    """
    features = features.double()
    # The probes share one L-BFGS run: a probe with NaN/Inf features would poison every other probe's
    # line search, so it is fitted on zeros and its weights are NaN (its scores, hence its AUC, are NaN).
    broken = ~torch.isfinite(features).all(dim=2).all(dim=1)
    features = torch.where(broken[:, None, None], 0.0, features)
    targets = labels.to(features).expand(features.shape[0], -1)
    params = torch.zeros(features.shape[0], features.shape[2] + 1, dtype=features.dtype, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("pnd,pd->pn", features, params[:, :-1]) + params[:, -1:]
        loss = c * F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") + 0.5 * params[:, :-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    params = params.detach().masked_fill(broken[:, None], math.nan)
    return params[:, :-1].to(torch.float32), params[:, -1].to(torch.float32)


def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """ROC-AUC of each row of ``scores`` (``(probes, examples)``) by the Mann-Whitney statistic, ties halved.

    Example:
        >>> roc_auc(torch.tensor([[0.1, 0.4, 0.35, 0.8]]), torch.tensor([0, 0, 1, 1])).tolist()
        [0.75]
    """
    positive, negative = scores[:, labels == 1], scores[:, labels == 0]
    if positive.shape[1] == 0 or negative.shape[1] == 0:
        raise ValueError("ROC-AUC needs examples of both classes.")
    greater = (positive[:, :, None] > negative[:, None, :]).float()
    ties = (positive[:, :, None] == negative[:, None, :]).float()
    auc = (greater + 0.5 * ties).mean(dim=(1, 2))
    # NaN compares False with everything: a probe with a NaN score has no AUC, not a plausible one.
    return torch.where(torch.isnan(scores).any(dim=1), math.nan, auc)


def accuracy(scores: Tensor, labels: Tensor) -> Tensor:
    """Share of examples whose logit has the label's sign, per probe.

    Example:
        >>> accuracy(torch.tensor([[-1.0, 2.0, 0.5]]), torch.tensor([0, 1, 0])).tolist()
        [0.6666666865348816]
    """
    correct = ((scores > 0).long() == labels.long()).float().mean(dim=1)
    return torch.where(torch.isnan(scores).any(dim=1), math.nan, correct)
