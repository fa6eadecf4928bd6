"""Losses of the upstream DERM model (paper §3.1): per-task BCE plus an in-batch sampled softmax
between the user and Pin towers, with a trainable temperature and the logQ sampling-bias
correction of Yi et al. 2019.

Glossary (every shape below uses it):

- B: batch size (rows; each row is one (user, target Pin) impression)
- E: embedding width of the user and Pin tower outputs (the two must match)
- T: number of supervised tasks (label columns, e.g. click, good_click)
- H: number of hash buckets of the frequency estimator

Why our own code: TorchRec and PyTorch have BCE but no in-batch sampled softmax with logQ
correction, and no streaming frequency estimator. The paper names both (§3.1, citing PinnerFormer
and CLIP for the loss and Yi et al. 2019 for the correction) without giving details, so the
details follow the cited works and are written out in each class.

Layout: :class:`FrequencyEstimator` (Yi et al. 2019, Algorithm 2) estimates how often each Pin
appears in a batch; :class:`SampledSoftmaxLoss` is the contrastive loss given log Q;
:class:`MultiTaskBCE` is the supervised part; :class:`DERMLoss` composes the three and owns the
order "update the estimator, then read it". No module here knows about ranks: cross-rank
consistency of the estimator comes from a ``gather`` callable that ``sharding/`` injects.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

DeviceLike = Union[str, torch.device, None]


class FrequencyEstimator(nn.Module):
    r"""Streaming estimate of the probability that a Pin appears in a training batch.

    Yi et al. 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
    Recommendations", Algorithm 2. Each id is hashed to a bucket ``h = id mod H``; per bucket the
    module keeps the step it was last seen, ``A[h]``, and an exponential moving average of the
    number of steps between two sightings, ``B[h]``. One call of :meth:`update` is one step
    ``t`` (one global batch). For every bucket hit at step ``t``::

        B[h] <- (1 - alpha) * B[h] + alpha * (t - A[h])      (first sighting: B[h] <- t)
        A[h] <- t

    and the estimated probability of appearing in a batch is ``p(id) = 1 / B[h]``, in (0, 1]
    because every gap is at least one step.

    Choices beyond the paper, and why:

    - **First sighting.** Steps count from 1, so ``A[h] == 0`` means "never seen". A first
      sighting at step ``t`` sets ``B[h] = t`` (the gap since the start) instead of averaging
      it into ``B[h] = 0``: starting from 0 would make every new Pin look frequent for ~1/alpha
      sightings, while the first arrival time of an item with per-step probability p has mean
      1/p, so it is an unbiased first guess.
    - **Unseen buckets** read ``p = 1 / (step + 1)``: the value the bucket would get if it were
      seen in the next batch, i.e. the most frequent it can be given that it has not appeared yet.
      It is finite for every id, and 1 on a fresh module (log Q = 0: no correction before any
      data). In training, :class:`DERMLoss` updates before it reads, so only eval reads this.
    - **Duplicates** within one step count once per bucket: every copy of a bucket computes its
      new value from the same old ``A[h]``, ``B[h]`` and ``t``, so all copies write identical
      values and the scatter is deterministic without a ``torch.unique`` (which would add a
      host sync on GPU). Two ids that share a bucket also count once: hashing over-estimates
      the frequency of colliding rare ids, which a larger ``num_buckets`` reduces.

    All state is in persistent buffers (``step``, ``last_step``, ``gap``), so ``state_dict`` and
    distributed checkpoints carry it; zero-filled buffers are the correct fresh state, so a module
    built on ``meta`` and materialised with zeros (as ``DistributedModelParallel`` does) is ready.
    Memory: 12 bytes per bucket (12 MiB at the default 2**20).

    Args:
        num_buckets (int): H, the number of hash buckets.
        alpha (float): EMA rate in (0, 1]; larger forgets faster (Yi et al. use 0.01-0.1;
            0.05 remembers ~20 sightings of a Pin).
        gather (Optional[Callable[[Tensor], Tensor]]): applied to the ids in :meth:`update`,
            default None (identity). ``sharding/`` injects an all-gather so that every rank
            updates with the global batch and all ranks hold identical state; it must return
            the same concatenation, in the same order, on every rank.
        device (Optional[torch.device]): where the buffers live (``meta`` allowed).

    Example::

        >>> est = FrequencyEstimator(num_buckets=16, alpha=0.5)
        >>> est.update(torch.tensor([3, 3, 5]))  # step 1: both first seen
        >>> est.update(torch.tensor([3]))        # step 2: Pin 3 again after 1 step
        >>> est.probability(torch.tensor([3, 5, 7])).tolist()  # 7 unseen: 1 / (2 + 1)
        [1.0, 1.0, 0.3333333432674408]
    """

    def __init__(
        self,
        num_buckets: int = 2**20,
        alpha: float = 0.05,
        gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        device: DeviceLike = None,
    ) -> None:
        super().__init__()
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.num_buckets = num_buckets
        self.alpha = alpha
        self.gather = gather
        # int64 steps: exact for any run length; float32 gaps: relative precision is all we need.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("last_step", torch.zeros(num_buckets, dtype=torch.int64, device=device))
        self.register_buffer("gap", torch.zeros(num_buckets, dtype=torch.float32, device=device))

    def reset_parameters(self) -> None:
        """Forget everything: the state of a fresh module."""
        for buf in (self.step, self.last_step, self.gap):
            buf.zero_()

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """Advance one step and record that ``ids`` (after ``gather``) appeared in it.

        Args:
            ids (Tensor): [N] int64 Pin ids of this step's batch; duplicates count once.
        """
        if self.gather is not None:
            ids = self.gather(ids)
        self.step += 1
        h = torch.remainder(ids, self.num_buckets)
        last = self.last_step[h]
        elapsed = (self.step - last).to(self.gap.dtype)
        ema = (1.0 - self.alpha) * self.gap[h] + self.alpha * elapsed
        # Duplicates of h all computed the same value (see class docstring), so index_put_
        # without accumulate is deterministic whichever copy lands last.
        self.gap.index_put_((h,), torch.where(last > 0, ema, elapsed))
        self.last_step.index_put_((h,), self.step.expand_as(h))

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated probability that each id appears in a batch.

        Args:
            ids (Tensor): [N] int64 Pin ids.

        Returns:
            Tensor: [N] float32 in (0, 1]; ``1 / (step + 1)`` for ids whose bucket was never seen.
        """
        h = torch.remainder(ids, self.num_buckets)
        # clamp: a gap is >= 1 by construction; this only guards against a corrupt state.
        seen_p = self.gap[h].clamp(min=1.0).reciprocal()
        unseen_p = (self.step + 1).to(seen_p.dtype).reciprocal()
        return torch.where(self.last_step[h] > 0, seen_p, unseen_p)

    def log_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """``log(probability(ids))``: [N] float32, <= 0 and finite (the log Q of the loss)."""
        return self.probability(ids).log()

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, alpha={self.alpha}, gather={self.gather is not None}"


def _compute_logits(
    user: torch.Tensor,
    pin: torch.Tensor,
    pin_ids: torch.Tensor,
    inv_temperature: torch.Tensor,
    log_q: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In-batch logits ``s_ij = <u_i, v_j> / tau - log Q(j)``, accidental hits set to ``-inf``.

    Args:
        user (Tensor): [B, E] user embeddings u_i.
        pin (Tensor): [B, E] Pin embeddings v_j.
        pin_ids (Tensor): [B] int64 Pin ids; column j != i with ``pin_ids[j] == pin_ids[i]``
            is an accidental hit (the same Pin as row i's positive) and is masked.
        inv_temperature (Tensor): scalar 1 / tau.
        log_q (Optional[Tensor]): [B] log Q(j) of each column's Pin; None: no correction.
        rows (Optional[Tensor]): [R] int64, the users i to score (default: all B, R = B).

    Returns:
        Tensor: [R, B] logits, row r = user ``rows[r]``, column j = Pin j; the positive
        (r, ``rows[r]``) is never masked.
    """
    if rows is None:
        rows = torch.arange(user.shape[0], device=user.device)
    logits = (user.index_select(0, rows) @ pin.t()) * inv_temperature  # [R, B]
    if log_q is not None:
        # Column-wise (Yi et al. 2019, eq. 3): Pin j's correction is the same for every user.
        logits = logits - log_q.unsqueeze(0)
    columns = torch.arange(pin_ids.shape[0], device=pin_ids.device)
    # Same Pin, but not the row's own positive, which is never its own negative.
    hits = (pin_ids.index_select(0, rows).unsqueeze(1) == pin_ids.unsqueeze(0)) & (rows.unsqueeze(1) != columns)  # [R, B]
    return logits.masked_fill(hits, float("-inf"))


@torch.fx.wrap
def _scored_rows(positive: torch.Tensor, all_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to score, [R] int64, and which of them are positive, [R] bool.

    Only positive rows enter the loss. On CPU, score just those (R = |P|, about the click rate
    times B) rather than all B: the [B, B] logits and their softmax were most of the loss's cost.
    On CUDA the full matrix is cheap, and selecting by a mask would make the host wait for the
    device, so all B rows are scored and the mask applied after. (Wrapped for torch.fx: a leaf
    call, since tracing cannot branch on the device or the data.) ``all_rows``: score all B
    anyway (the reference path of ``bench/bench_train.py``).
    """
    if positive.device.type == "cpu" and not all_rows:
        rows = positive.nonzero().squeeze(1)
        return rows, torch.ones_like(rows, dtype=torch.bool)
    return torch.arange(positive.numel(), device=positive.device), positive


class SampledSoftmaxLoss(nn.Module):
    r"""In-batch sampled softmax between user and Pin embeddings over positive pairs (paper §3.1),
    with a trainable temperature (CLIP, Radford et al. 2021) and the logQ sampling-bias
    correction (Yi et al. 2019).

    The paper's formula lost its symbols in extraction; written out, with
    P = the rows whose ``positive`` is true (the user engaged with the Pin: click or conversion),
    u_i, v_j the user and Pin tower outputs of rows i and j, tau the temperature, and Q(j) the
    estimated probability that Pin j is in a batch (:class:`FrequencyEstimator`)::

        s_ij = <u_i, v_j> / tau - log Q(j)          for i in P, j = 1..B (all Pins of the batch)
        L    = -(1 / |P|) * sum_{i in P} log( exp(s_ii) / sum_{j valid for i} exp(s_ij) )

    A column j is valid for row i unless ``j != i`` and Pin j is the same Pin as Pin i (an
    "accidental hit"): such columns get ``s_ij = -inf``, so a Pin is never its own negative. In-batch
    negatives are sampled in proportion to how often Pins are served, so popular Pins would be
    over-punished; subtracting log Q(j) from every column (the positive included) corrects the
    sampled softmax towards the full one. The negatives of a positive row are the Pins of *all*
    B rows, positive or not, so the estimator must count all B Pins.

    Temperature: ``log_inv_temperature`` = log(1/tau) is the parameter (CLIP's ``logit_scale``),
    initialised to log(1 / ``init_temperature``); the forward clamps 1/tau to at most
    ``max_inv_temperature`` (CLIP's 100) so the logits cannot run away. At the clamp the
    temperature's gradient is zero, as in CLIP. The loss does not L2-normalise: the towers own
    their output (it is the published embedding), and should normalise it if they want logits
    bounded by 1/tau as in CLIP and PinnerFormer.

    No positives in the batch: the loss is exactly 0.0 and still part of the graph (gradients are
    zeros, never NaN), so every rank runs the same backward.

    Args:
        init_temperature (float): tau at initialisation; 0.07 as in CLIP (the model is built
            with ``DERMConfig.init_temperature``, 0.2).
        max_inv_temperature (float): upper bound of 1/tau in the forward; 100 as in CLIP.
        logq_correction (bool): subtract log Q(j) from the logits; if True, ``forward`` needs
            ``log_q``.
        device (Optional[torch.device]): where the parameter lives (``meta`` allowed).

    Example::

        >>> loss_fn = SampledSoftmaxLoss(init_temperature=0.1)
        >>> user, pin = torch.randn(4, 8), torch.randn(4, 8)
        >>> pin_ids = torch.tensor([1, 2, 2, 3])
        >>> positive = torch.tensor([True, True, False, True])
        >>> loss = loss_fn(user, pin, pin_ids, positive, log_q=torch.full((4,), -1.0))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_inv_temperature: float = 100.0,
        logq_correction: bool = True,
        device: DeviceLike = None,
    ) -> None:
        super().__init__()
        if init_temperature <= 0.0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if 1.0 / init_temperature > max_inv_temperature:
            raise ValueError(
                f"1 / init_temperature = {1.0 / init_temperature:g} exceeds max_inv_temperature = "
                f"{max_inv_temperature:g}; raise max_inv_temperature or init_temperature"
            )
        self.init_temperature = init_temperature
        self.max_inv_temperature = max_inv_temperature
        self.logq_correction = logq_correction
        self.log_inv_temperature = nn.Parameter(torch.empty((), device=device))
        self.score_all_rows = False
        """Score all B rows on CPU too (as on CUDA) rather than the positive ones: the same loss,
        more work; the reference path of ``bench/bench_train.py``."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set tau back to ``init_temperature`` (also called after materialising from ``meta``)."""
        with torch.no_grad():
            self.log_inv_temperature.fill_(-math.log(self.init_temperature))

    def _inv_temperature(self) -> torch.Tensor:
        return self.log_inv_temperature.exp().clamp(max=self.max_inv_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        """tau as the forward uses it (after the clamp): a detached float scalar, for logging."""
        return self._inv_temperature().detach().reciprocal()

    def forward(
        self,
        user: torch.Tensor,
        pin: torch.Tensor,
        pin_ids: torch.Tensor,
        positive: torch.Tensor,
        log_q: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            user (Tensor): [B, E] user tower outputs.
            pin (Tensor): [B, E] Pin tower outputs, row-aligned with ``user``.
            pin_ids (Tensor): [B] int64 Pin ids (for accidental-hit masking).
            positive (Tensor): [B] bool, true where (user i, Pin i) is a positive pair.
            log_q (Optional[Tensor]): [B] log Q of each row's Pin; required when
                ``logq_correction``, ignored otherwise.

        Returns:
            Tensor: scalar, the mean over positive rows of the sampled softmax loss (0.0 if none).
        """
        if not self.logq_correction:
            log_q = None
        elif log_q is None:
            raise ValueError("log_q is required when logq_correction=True (or build with logq_correction=False)")
        rows, keep = _scored_rows(positive, self.score_all_rows)
        logits = _compute_logits(user, pin, pin_ids, self._inv_temperature(), log_q, rows)  # [R, B]
        # -log softmax at each row's own Pin, which is never masked, so each row is finite.
        per_row = torch.logsumexp(logits, dim=1) - logits.gather(1, rows.unsqueeze(1)).squeeze(1)  # [R]
        # where, not multiply: a non-positive row never leaks inf/NaN into the sum.
        total = torch.where(keep, per_row, torch.zeros_like(per_row)).sum()
        return total / positive.to(per_row.dtype).sum().clamp(min=1.0)

    def extra_repr(self) -> str:
        return (
            f"init_temperature={self.init_temperature}, max_inv_temperature={self.max_inv_temperature}, "
            f"logq_correction={self.logq_correction}"
        )


class MultiTaskBCE(nn.Module):
    r"""Weighted sum of per-task binary cross-entropies on logits (the supervised tasks of §3.1)::

        BCE_t = -(1/B) * sum_b [ y_bt * log sigmoid(z_bt) + (1 - y_bt) * log(1 - sigmoid(z_bt)) ]
        total = sum_t w_t * BCE_t

    The weights are plain Python floats (not a buffer): they are configuration, and a buffer
    built on ``meta`` would be zero-filled when materialised.

    Args:
        task_weights (Sequence[float]): w_t, one per task (T = its length), each >= 0.

    Example::

        >>> bce = MultiTaskBCE([1.0, 0.5])
        >>> total, per_task = bce(torch.zeros(3, 2), torch.ones(3, 2))
        >>> per_task.shape, round(total.item(), 4)  # log 2 * (1 + 0.5)
        (torch.Size([2]), 1.0397)
    """

    def __init__(self, task_weights: Sequence[float]) -> None:
        super().__init__()
        if len(task_weights) == 0:
            raise ValueError("task_weights must name at least one task")
        if any(w < 0 for w in task_weights):
            raise ValueError(f"task_weights must be >= 0, got {list(task_weights)}")
        self.task_weights = tuple(float(w) for w in task_weights)

    @property
    def num_tasks(self) -> int:
        return len(self.task_weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            logits (Tensor): [B, T] task logits.
            labels (Tensor): [B, T] float 0/1 labels (soft labels in [0, 1] also work).

        Returns:
            tuple[Tensor, Tensor]: the weighted total (scalar) and the per-task means [T].
        """
        # float32 whatever precision the model ran in (modules/precision.py)
        per_task = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(dim=0)  # [T]
        total = (per_task * per_task.new_tensor(self.task_weights)).sum()
        return total, per_task

    def extra_repr(self) -> str:
        return f"task_weights={list(self.task_weights)}"


class DERMLoss(nn.Module):
    r"""The upstream DERM objective (paper §3.1): supervised multi-task BCE plus the
    logQ-corrected in-batch sampled softmax between the user and Pin towers::

        total = sum_t w_t * BCE_t + lambda * L_ssl

    with BCE_t from :class:`MultiTaskBCE` and L_ssl from :class:`SampledSoftmaxLoss`. A row is a
    positive (user, Pin) pair when any of its ``positive_tasks`` labels is 1 (the paper: "a
    positive click or conversion label").

    Owns a :class:`FrequencyEstimator`. In training mode each forward first updates the estimator
    with this batch's ``pin_ids`` and then reads log Q for them, the order of Yi et al. 2019
    (Algorithm 2 runs before the loss of the same step), so every Pin in the batch has been seen at
    least once when it is read. In eval mode the estimator is only read, never updated.

    Args:
        num_tasks (int): T, the number of label columns.
        task_weights (Optional[Sequence[float]]): w_t; default all 1.0.
        contrastive_weight (float): lambda; the paper gives no value. The model is built with
            ``DERMConfig.contrastive_weight`` (1.0): at 0.1 the BCE heads, which read the same
            tower outputs, shaped the embeddings alone (docs/model.md, "Representation quality").
        positive_tasks (Optional[Sequence[int]]): label columns that make a pair positive;
            default all.
        init_temperature (float): see :class:`SampledSoftmaxLoss`.
        max_inv_temperature (float): see :class:`SampledSoftmaxLoss`.
        logq_correction (bool): see :class:`SampledSoftmaxLoss`. The estimator is still updated
            when False, so turning it on later starts from a warm state.
        num_buckets (int): see :class:`FrequencyEstimator`.
        alpha (float): see :class:`FrequencyEstimator`.
        gather (Optional[Callable[[Tensor], Tensor]]): see :class:`FrequencyEstimator`; also
            settable later as ``loss.estimator.gather``.
        device (Optional[torch.device]): where parameters and buffers live (``meta`` allowed).

    Example::

        >>> loss_fn = DERMLoss(num_tasks=2, task_weights=[1.0, 2.0], num_buckets=64)
        >>> B, E = 4, 8
        >>> total, parts = loss_fn(
        ...     torch.randn(B, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]),
        ...     torch.randn(B, E), torch.randn(B, E), torch.tensor([5, 6, 7, 5]),
        ... )
        >>> sorted(parts)
        ['bce', 'bce/0', 'bce/1', 'contrastive', 'loss', 'temperature']
    """

    def __init__(
        self,
        num_tasks: int,
        task_weights: Optional[Sequence[float]] = None,
        contrastive_weight: float = 0.1,
        positive_tasks: Optional[Sequence[int]] = None,
        init_temperature: float = 0.07,
        max_inv_temperature: float = 100.0,
        logq_correction: bool = True,
        num_buckets: int = 2**20,
        alpha: float = 0.05,
        gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        device: DeviceLike = None,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if task_weights is None:
            task_weights = [1.0] * num_tasks
        if len(task_weights) != num_tasks:
            raise ValueError(f"task_weights has {len(task_weights)} entries for num_tasks={num_tasks}")
        if contrastive_weight < 0.0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        if positive_tasks is None:
            positive_tasks = range(num_tasks)
        positive_tasks = tuple(int(t) for t in positive_tasks)
        if not positive_tasks or any(not 0 <= t < num_tasks for t in positive_tasks):
            raise ValueError(
                f"positive_tasks must be a non-empty subset of 0..{num_tasks - 1}, got {list(positive_tasks)}"
            )
        self.contrastive_weight = contrastive_weight
        self.positive_tasks = positive_tasks
        self.bce = MultiTaskBCE(task_weights)
        self.contrastive = SampledSoftmaxLoss(
            init_temperature=init_temperature,
            max_inv_temperature=max_inv_temperature,
            logq_correction=logq_correction,
            device=device,
        )
        self.estimator = FrequencyEstimator(num_buckets=num_buckets, alpha=alpha, gather=gather, device=device)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        user_emb: torch.Tensor,
        pin_emb: torch.Tensor,
        pin_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            logits (Tensor): [B, T] task logits of the interaction tower.
            labels (Tensor): [B, T] float 0/1 labels.
            user_emb (Tensor): [B, E] user tower outputs.
            pin_emb (Tensor): [B, E] Pin tower outputs.
            pin_ids (Tensor): [B] int64 raw Pin ids of the rows.

        Returns:
            tuple[Tensor, dict[str, Tensor]]: the total loss (scalar, for backward) and detached
            scalars for logging: ``loss`` (the total), ``bce/<t>`` per task, ``bce`` (weighted sum), ``contrastive``
            (unweighted L_ssl) and ``temperature`` (tau).
        """
        if self.training:
            self.estimator.update(pin_ids)
        log_q = self.estimator.log_probability(pin_ids)  # [B]
        # > 0.5 rather than == 1: the same answer on 0/1 labels, and robust to smoothed ones.
        positive = (labels[:, list(self.positive_tasks)] > 0.5).any(dim=1)  # [B]
        bce_total, per_task = self.bce(logits, labels)
        ssl = self.contrastive(user_emb.float(), pin_emb.float(), pin_ids, positive, log_q)
        total = bce_total + self.contrastive_weight * ssl
        parts = {"loss": total.detach()}
        parts.update({f"bce/{t}": per_task[t].detach() for t in range(self.bce.num_tasks)})
        parts["bce"] = bce_total.detach()
        parts["contrastive"] = ssl.detach()
        parts["temperature"] = self.contrastive.temperature
        return total, parts

    def extra_repr(self) -> str:
        return f"contrastive_weight={self.contrastive_weight}, positive_tasks={list(self.positive_tasks)}"
