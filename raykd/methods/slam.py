"""SLaM — Student-Label Mixing (Kontonis, Iliopoulos, Trinh, Baykal, Menghani, Vee; NeurIPS 2023;
arXiv 2302.03806) (docs/methods.md).

A frozen teacher labels the unlabeled pool; its labels are noisy.  SLaM models the noise per example:
with probability α(x) the teacher's label is right, otherwise the truth is one of the teacher's other
top-k(x) classes.  The student's prediction f = softmax(z_s) is passed through that noise model before
it is compared with the teacher's label y_s (forward loss adjustment, Remark B.1's form):

    mix(f; α, k) = α · f + (1 − α) · (1 − f) ⊙ top(y_s; k)            [/ (k − 1) with normalize_k]
    L_U = mean_x  −Σ_c y_s,c · log(mix_c + 1e-8)                       (mix is NOT renormalised)
    L   = ce_weight · CE(y, z_s[labeled]) + L_U

α(x) and k(x) come from the held-out labeled validation split V (``data.val_per_class`` per class;
|V| = val_per_class × C, the paper's "e.g. 500", search range [200, 5000]).  V is never trained on:
the loop never samples it, and the teacher must hold it out as well (same ``data.seed`` and at least
the same ``val_per_class``; checked when the config is parsed for ``teacher.run`` and before training
for ``teacher.checkpoint``).  Estimation (``on_train_start``, rank 0 only, once per (teacher, table
knobs, data split), cached beside the teacher under a file lock; every rank then loads the same file):

1. The teacher labels the pool and V without augmentation: y_s = softmax(z_t / temperature).
2. Confidence statistic s = top-1 − top-2 of y_s (``statistic: margin``) or max y_s (``maxprob``).
3. For a pool sample x, N(x) = the ``k_nn`` validation points whose s is nearest s(x) (1-D, a sorted
   array and a vectorised binary search for the window; ties go to the lower statistic, then the
   lower validation position; ``k_nn`` is capped at |V|).
4. α(x) = mean over N(x) of 1[teacher argmax = true label]; with ``isotonic`` that kNN curve is
   replaced by its monotone (non-decreasing in s) isotonic fit over the pool; then clipped to
   [α_min, 1] (``alpha_min`` None = 1/C).
5. k(x) = the smallest k in [2, k_max] whose top-k coverage on N(x) (fraction of neighbours whose true
   label is among the teacher's k largest) reaches ``rho``; k_max when none does (``k_rule:
   per_sample``).  ``k_rule: global`` uses one k for every x, the same rule on the whole of V.
   k_max is capped at C.
6. top(y_s; k(x)) is the 0/1 mask of the k(x) largest entries of y_s(x).

Our decisions where the paper's text was not available, each a knob: soft teacher
labels at temperature 1 by default (``label_type: hard`` uses the one-hot arg-max); teacher labels and
the tables are computed once on un-augmented images, so α, k and the mask are constants per unlabeled
index; the student sees weakly augmented views of both batches by default (``student_view: plain``
for none) in one concatenated forward pass; the labeled CE term is on by default (``ce_weight``,
0 turns it off).  Per-sample α, k and top-k mask are the method's state (``state_dict``); the soft
labels are not (they are re-loaded from the cache on a restart like the rest of the table).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from raykd.config import DataConfig, MethodConfig, RunConfig, knob
from raykd.errors import ConfigError
from raykd.lazy import F, no_grad, torch
from raykd.methods.base import METHODS, Batch, Method

EPS = 1e-8


# --------------------------------------------------------------------------------------------
# the loss


def slam_mix(
    f: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, normalize_k: bool
) -> torch.Tensor:
    """``α·f + (1 − α)·(1 − f)⊙mask`` (second term divided by ``k − 1`` when ``normalize_k``), not renormalised.

    Args:
        f: ``[B, C]`` student probabilities.
        alpha: ``[B]`` teacher-correctness probabilities.
        mask: ``[B, C]`` 0/1 indicator of the teacher's top-k(x) classes.
        k: ``[B]`` k(x) (≥ 2), used only when ``normalize_k``.
        normalize_k: the theory version (wrong label uniform over the other top-k classes).
    """
    a = alpha.to(f.dtype)[:, None]
    wrong = (1.0 - f) * mask.to(f.dtype)
    if normalize_k:
        wrong = wrong / (k.to(f.dtype)[:, None] - 1.0)
    return a * f + (1.0 - a) * wrong


def slam_loss(
    student_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    alpha: torch.Tensor,
    mask: torch.Tensor,
    k: torch.Tensor,
    normalize_k: bool = False,
) -> torch.Tensor:
    """``mean_x −Σ_c y_s,c · log(mix(f)_c + 1e-8)`` with f = softmax(student logits); gradients reach
    the student logits only (teacher labels, α, k and the mask are constants)."""
    f = F.softmax(student_logits.float(), dim=-1)
    mix = slam_mix(f, alpha.detach().float(), mask.detach(), k.detach(), normalize_k)
    return -(teacher_labels.detach().float() * torch.log(mix + EPS)).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# estimating alpha(x) and k(x) on the validation split


def confidence(probs: np.ndarray, statistic: str) -> np.ndarray:
    """Per-row confidence of ``probs [N, C]``: top-1 − top-2 (``margin``) or the top-1 (``maxprob``)."""
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1] if statistic == "margin" else top2[:, 0]


def class_order(probs: np.ndarray) -> np.ndarray:
    """``[N, C]`` class indices by decreasing probability (stable: ties keep the lower class first)."""
    return np.argsort(-probs, axis=1, kind="stable")


def label_rank(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of each true label in its row's :func:`class_order` (1 = the teacher's arg-max)."""
    return np.argmax(class_order(probs) == labels[:, None], axis=1) + 1


def nearest_windows(sorted_values: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Start ``lo`` of the ``k`` entries of ``sorted_values`` nearest each query: ``[lo, lo + k)``.

    The k nearest points on a line form a contiguous window of the sorted array; a vectorised binary
    search finds the first start whose window is not beaten by the next one (ties go to the left).
    """
    lo = np.zeros(len(queries), dtype=np.int64)
    hi = np.full(len(queries), len(sorted_values) - k, dtype=np.int64)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        right_better = (
            queries - sorted_values[mid] > sorted_values[np.minimum(mid + k, len(sorted_values) - 1)] - queries
        )
        active = lo < hi
        lo, hi = np.where(active & right_better, mid + 1, lo), np.where(active & ~right_better, mid, hi)
    return lo


def estimate_alpha_k(
    val_stat: np.ndarray,
    val_correct: np.ndarray,
    val_rank: np.ndarray,
    pool_stat: np.ndarray,
    k_nn: int,
    rho: float,
    k_max: int,
    alpha_min: float,
    isotonic: bool = False,
    k_rule: str = "per_sample",
) -> tuple[np.ndarray, np.ndarray]:
    """α(x) and k(x) for every pool sample from the validation split (steps 3–5 of the module docstring).

    Args:
        val_stat: ``[V]`` teacher confidence statistic on the validation samples.
        val_correct: ``[V]`` whether the teacher's arg-max is the true label.
        val_rank: ``[V]`` 1-based rank of the true label in the teacher's ordering.
        pool_stat: ``[N]`` the statistic on the pool.
        k_nn: neighbours per pool sample (capped at V).
        rho: top-k coverage k(x) must reach.
        k_max: largest k (at least 2).
        alpha_min: lower clip of α.
        isotonic: replace the kNN α curve by its non-decreasing isotonic fit.
        k_rule: ``per_sample`` (coverage on N(x)) or ``global`` (coverage on all of V).

    Returns:
        ``(alpha [N] float64, k [N] int64)``.
    """
    n_val = len(val_stat)
    if n_val == 0:
        raise ConfigError("data.val_per_class", "the validation split is empty; SLaM estimates alpha and k on it")
    k_nn = min(k_nn, n_val)
    order = np.argsort(val_stat, kind="stable")
    s = val_stat[order].astype(np.float64)
    lo = nearest_windows(s, pool_stat.astype(np.float64), k_nn)

    def window_mean(bits: np.ndarray) -> np.ndarray:
        prefix = np.concatenate([[0.0], np.cumsum(bits[order].astype(np.float64))])
        return (prefix[lo + k_nn] - prefix[lo]) / k_nn

    alpha = window_mean(val_correct)
    if isotonic and len(pool_stat) > 1:
        from sklearn.isotonic import IsotonicRegression

        alpha = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(pool_stat, alpha)
    alpha = np.clip(alpha, alpha_min, 1.0)

    ks = range(2, k_max + 1)
    if k_rule == "global":
        cover = [np.full(len(pool_stat), float(np.mean(val_rank <= kk))) for kk in ks]
    else:
        cover = [window_mean(val_rank <= kk) for kk in ks]
    k = np.full(len(pool_stat), k_max, dtype=np.int64)
    for kk, c in reversed(list(zip(ks, cover, strict=True))):  # smallest k reaching rho wins
        k = np.where(c >= rho - 1e-12, kk, k)
    return alpha, k


def topk_mask(probs: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``[N, C]`` bool indicator of the ``k[i]`` largest entries of each row (order of :func:`class_order`)."""
    order = class_order(probs)
    mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(mask, order, np.arange(probs.shape[1])[None, :] < k[:, None], axis=1)
    return mask


def holds_out(data: DataConfig, teacher_data: DataConfig) -> str | None:
    """None when the student's validation split lies inside the teacher's own held-out split (so the
    teacher never trained on it, not even as unlabeled images), else why not.  With the same dataset
    and split seed, a larger ``val_per_class`` holds out a superset (see raykd.data.split)."""
    if teacher_data.name != data.name or teacher_data.seed != data.seed:
        return (f"the teacher's split (data {teacher_data.name!r}, seed {teacher_data.seed}) must be the student's "
                f"({data.name!r}, seed {data.seed}) so that it never trained on SLaM's validation split")  # fmt: skip
    if teacher_data.val_per_class < data.val_per_class:
        return (f"the teacher's val_per_class ({teacher_data.val_per_class}) must be at least the student's "
                f"({data.val_per_class}): otherwise it trained on part of SLaM's validation split")  # fmt: skip
    return None


# --------------------------------------------------------------------------------------------
# the method


@METHODS.register("slam")
class SLaM(Method):
    """SLaM: distil a frozen teacher's noisy labels through a per-example noise model estimated on a held-out V."""

    class Config(MethodConfig):
        name: Literal["slam"] = "slam"
        k_nn: int = knob(
            50, search={"logint": [10, 250]}, ge=1, help="validation neighbours (by confidence) for alpha, k"
        )
        statistic: Literal["margin", "maxprob"] = knob(
            "margin", search={"choice": ["margin", "maxprob"]}, help="teacher confidence: top1 - top2, or top1"
        )
        isotonic: bool = knob(False, search={"choice": [False, True]}, help="make alpha monotone in the confidence")
        rho: float = knob(0.9, search={"uniform": [0.7, 0.99]}, gt=0.0, le=1.0, help="top-k coverage that sets k(x)")
        k_max: int = knob(5, search={"int": [2, 10]}, ge=2, help="largest k(x) (capped at the class count)")
        k_rule: Literal["per_sample", "global"] = knob(
            "per_sample",
            search={"choice": ["per_sample", "global"]},
            help="k(x) from the neighbours, or one k from all of V",
        )
        normalize_k: bool = knob(
            False, search={"choice": [False, True]}, help="divide the wrong-label term by k-1 (theory version)"
        )
        temperature: float = knob(1.0, search={"loguniform": [1.0, 4.0]}, gt=0.0, help="teacher temperature for y_s")
        label_type: Literal["soft", "hard"] = knob(
            "soft", search={"choice": ["soft", "hard"]}, help="teacher label: softmax, or one-hot arg-max"
        )
        alpha_min: float | None = knob(
            None, search={"uniform": [0.0, 0.5]}, ge=0.0, le=1.0, help="lower clip of alpha(x) (null = 1/classes)"
        )
        ce_weight: float = knob(
            1.0, search={"uniform": [0.0, 1.0]}, ge=0.0, help="weight of CE on labeled data (0 = off)"
        )
        student_view: Literal["weak", "plain"] = knob(
            "weak", search={"choice": ["weak", "plain"]}, help="student input: weak augmentation or none"
        )

        needs_teacher = True

        @classmethod
        def logs(cls, run: RunConfig) -> tuple[str, ...]:
            return ("loss_x", "loss_u", "alpha_mean", "k_mean", "teacher_acc", "topk_cover", "val_size")

        @classmethod
        def check_run(cls, run: RunConfig) -> None:
            if run.data.val_per_class < 1:
                raise ConfigError("data.val_per_class", "slam estimates alpha(x) and k(x) on a held-out "
                                  "labeled validation split: set it to 1 or more per class (the paper's |V| is "
                                  "about 500)")  # fmt: skip
            if run.teacher is not None and run.teacher.run is not None:
                why = holds_out(run.data, run.teacher.run.data)
                if why:
                    raise ConfigError("teacher.run.data", why)

    def setup(self) -> None:
        n, c, dev = len(self.ctx.data.unlabeled), self.ctx.num_classes, self.ctx.device
        self.teacher_probs = torch.zeros(n, c, device=dev)
        self.alpha = torch.ones(n, device=dev)
        self.k = torch.full((n,), 2, dtype=torch.long, device=dev)
        self.mask = torch.zeros(n, c, dtype=torch.bool, device=dev)
        self.info: dict[str, float] = {}

    def _alpha_min(self) -> float:
        return self.cfg.alpha_min if self.cfg.alpha_min is not None else 1.0 / self.ctx.num_classes

    def _table_key(self) -> list:
        c = self.cfg
        return ["slam-v1", c.temperature, c.statistic, c.k_nn, c.isotonic, c.rho, c.k_max, c.k_rule,
                self._alpha_min(), self.ctx.run.data.model_dump(mode="json")]  # fmt: skip

    def _check_teacher_split(self) -> None:
        tdata = self.ctx.teacher_run.data
        why = holds_out(self.ctx.run.data, tdata)
        if why:
            raise ConfigError("teacher.checkpoint" if self.ctx.run.teacher.checkpoint else "teacher.run.data", why)

    @no_grad
    def _teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        ctx, out = self.ctx, []
        for chunk in torch.arange(len(images)).split(ctx.run.train.eval_batch_size):
            logits = ctx.teacher(ctx.plain(images[chunk].to(ctx.device)))
            out.append(F.softmax(logits.float() / self.cfg.temperature, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, ctx.num_classes)

    def build_table(self) -> dict:
        """The per-sample table from the teacher's outputs on the pool and on V (no caching)."""
        ctx, cfg = self.ctx, self.cfg
        pool = self._teacher_probs(ctx.data.unlabeled.images).numpy()
        val = self._teacher_probs(ctx.data.val.images).numpy()
        val_y = ctx.data.val.labels.numpy()
        val_correct = val.argmax(1) == val_y
        alpha, k = estimate_alpha_k(confidence(val, cfg.statistic), val_correct, label_rank(val, val_y),
                                    confidence(pool, cfg.statistic), cfg.k_nn, cfg.rho,
                                    min(cfg.k_max, ctx.num_classes), self._alpha_min(), cfg.isotonic,
                                    cfg.k_rule)  # fmt: skip
        mask = topk_mask(pool, k)
        hidden = ctx.data.unlabeled.labels.numpy()
        known = hidden >= 0
        nan = float("nan")
        info = {
            "val_size": float(len(val_y)),
            "val_teacher_acc": float(val_correct.mean()),
            "pool_alpha_mean": float(alpha.mean()),
            "pool_k_mean": float(k.mean()),
            "pool_teacher_acc": float((pool.argmax(1) == hidden)[known].mean()) if known.any() else nan,
            "pool_topk_cover": float(mask[known, hidden[known]].mean()) if known.any() else nan,
        }
        return {"probs": torch.from_numpy(pool).float(), "alpha": torch.from_numpy(alpha).float(),
                "k": torch.from_numpy(k), "mask": torch.from_numpy(mask), "info": info}  # fmt: skip

    def on_train_start(self) -> None:
        """Compute (rank 0, once per setting; cached beside the teacher) or load the per-sample table."""
        ctx = self.ctx
        self._check_teacher_split()
        table = ctx.teacher_table("slam", self._table_key(), self.build_table)
        self.teacher_probs = table["probs"].to(ctx.device)
        self.alpha = table["alpha"].to(ctx.device)
        self.k = table["k"].to(ctx.device)
        self.mask = table["mask"].to(ctx.device)
        self.info = dict(table["info"])

    def train_step(self, batch: Batch):
        ctx, cfg = self.ctx, self.cfg
        b, idx = batch.x.shape[0], batch.u_idx
        u_view = ctx.weak(batch.u) if cfg.student_view == "weak" else ctx.plain(batch.u)
        with ctx.autocast():
            logits = self.model(torch.cat([ctx.weak(batch.x), u_view]))
        z_l, z_u = logits[:b], logits[b:]
        loss_x = F.cross_entropy(z_l.float(), batch.y)
        probs = self.teacher_probs[idx]
        teacher_pred = probs.argmax(-1)
        ys = F.one_hot(teacher_pred, probs.shape[1]).float() if cfg.label_type == "hard" else probs
        alpha, k, mask = self.alpha[idx], self.k[idx], self.mask[idx]
        loss_u = slam_loss(z_u, ys, alpha, mask, k, cfg.normalize_k)
        loss = cfg.ce_weight * loss_x + loss_u
        known = batch.u_y >= 0 if batch.u_y is not None else torch.zeros_like(idx, dtype=torch.bool)
        hidden = batch.u_y.clamp_min(0) if batch.u_y is not None else torch.zeros_like(idx)
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "alpha_mean": alpha.mean(),
                "k_mean": k.float().mean(), "teacher_acc": (((teacher_pred == hidden) & known).sum(), known.sum()),
                "topk_cover": ((mask.gather(1, hidden[:, None]).squeeze(1) & known).sum(), known.sum()),
                "val_size": self.info.get("val_size", 0.0)}  # fmt: skip
        return loss, logs

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.cpu(), "k": self.k.cpu(), "topk_mask": self.mask.cpu()}
