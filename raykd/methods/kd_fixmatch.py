"""KD-FixMatch (Wang, Xu, Fu, Liu, Wang; ICIP 2023; arXiv 2309.05826) (docs/methods.md).

Stage 1: the *outer* network is a FixMatch model trained once — the run's frozen teacher
(``teacher.run`` with ``method: fixmatch``, or ``teacher.checkpoint``).
Stage 2 (``on_train_start``, once per (teacher, selection knobs, seed, data split) and cached
beside the teacher): the outer network labels the whole unlabeled pool without augmentation;
**high-confidence sampling** keeps samples with max probability >= ``tau_hc``; **clustering** of the
L2-normalised penultimate embeddings (scikit-learn KMeans, k-means++, n_init 10) with clusters mapped
to classes by majority vote of the outer predictions (clusters with majority fraction below
``purity_min`` are dropped) keeps samples whose cluster's class agrees with their prediction.  The
trusted subset is the intersection; its label is the outer prediction.
Stage 3: the inner network (the student, from scratch) trains with FixMatch where, for a trusted
sample, **Heuristic 1** applies: its own prediction on the weak view replaces the trusted label when
the inner network is confident (max prob >= ``override_threshold``, default = ``threshold``), and
trusted samples always count (mask 1); untrusted samples follow plain FixMatch.  ``loss_u: sce`` uses
symmetric cross-entropy ``a·CE + b·RCE`` with log 0 clipped to -4 (RCE = 4·(1 − p_target)).

Our decisions where the paper's text was not available, each a knob:

* embeddings: pooled penultimate features (``embedding: logits`` clusters the logits instead);
* K = ``cluster_mult`` × C unless ``num_clusters`` is set;
* ``clustering: kmeans`` (default) or ``dec`` — deep embedding clustering refined on the fixed
  embeddings: Student-t soft assignments (ν = 1) to centroids initialised by k-means, the sharpened
  target P refreshed every ``dec_refresh`` steps, Adam on the centroids minimising KL(P‖Q), stopped
  when fewer than 0.1 % of hard assignments change between refreshes (no MLP on top of e);
* cluster→class ``cluster_map``: ``majority`` vote of the outer predictions, or ``hungarian``
  one-to-one matching of the cluster×class count matrix (requires K = C);
* ``hc_mode: threshold`` (max p >= ``tau_hc``, global) or ``per_class`` (the top ``hc_fraction`` by
  confidence within each predicted class, against class imbalance);
* ``formulation: merged`` (one L_u, Heuristic 1 inside it, as above) or ``separate`` (plain FixMatch
  L_u on every unlabeled sample plus ``lambda_t`` × the mean Heuristic-1 loss over the batch's trusted
  samples);
* ``inner_init: scratch`` (default, "a better starting point" from the labels, not the weights) or
  ``outer_weights`` (the inner network starts as a copy of the outer one; same architecture needed).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import model_validator

from raykd.config import MethodConfig, knob
from raykd.errors import ConfigError
from raykd.lazy import F, no_grad, torch
from raykd.methods.base import METHODS, Batch, Method
from raykd.methods.common import pseudo_label_accuracy, weak_strong_views


def high_confidence(probs: np.ndarray, tau_hc: float, mode: str = "threshold", fraction: float = 0.5) -> np.ndarray:
    """High-confidence sampling: ``max p >= tau_hc`` (``threshold``) or, with ``per_class``, the top
    ``fraction`` (at least one sample) by confidence within each predicted class."""
    conf, pred = probs.max(1), probs.argmax(1)
    if mode == "threshold":
        return conf >= tau_hc
    keep = np.zeros(len(probs), dtype=bool)
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        n = max(1, int(round(fraction * len(members))))
        keep[members[np.argsort(-conf[members], kind="stable")[:n]]] = True
    return keep


def dec_refine(emb: np.ndarray, centroids: np.ndarray, refresh: int = 100, max_iter: int = 2000,
               lr: float = 0.01, tol: float = 0.001) -> np.ndarray:  # fmt: skip
    """Deep embedding clustering (Xie et al., 2016) on fixed embeddings: refine ``centroids`` by
    minimising KL(P‖Q), Q the Student-t (ν = 1) soft assignment and P its sharpened target, refreshed
    every ``refresh`` steps; stops when fewer than ``tol`` of the hard assignments change between
    refreshes.  Returns the hard assignments ``[N]``."""
    e = torch.from_numpy(emb).double()
    mu = torch.from_numpy(centroids).double().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr)

    def soft_assign() -> torch.Tensor:
        q = 1.0 / (1.0 + torch.cdist(e, mu).square())
        return q / q.sum(1, keepdim=True)

    with torch.no_grad():
        assign = soft_assign().argmax(1)
    for it in range(max_iter):
        if it % refresh == 0:
            with torch.no_grad():
                q = soft_assign()
                p = q.square() / q.sum(0)
                p = p / p.sum(1, keepdim=True)
                new = q.argmax(1)
                if it > 0 and (new != assign).double().mean() < tol:
                    return new.numpy()
                assign = new
        loss = F.kl_div(soft_assign().log(), p, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return soft_assign().argmax(1).numpy()


def map_clusters(clusters: np.ndarray, pred: np.ndarray, k: int, num_classes: int, rule: str = "majority"):
    """Cluster→class mapping from the ``[k, C]`` count matrix of outer predictions: ``majority`` vote
    per cluster, or ``hungarian`` one-to-one matching (k must equal C).  Returns (class [k], purity [k])."""
    counts = np.zeros((k, num_classes), dtype=np.int64)
    np.add.at(counts, (clusters, pred), 1)
    purity = counts.max(1) / np.maximum(counts.sum(1), 1)
    if rule == "majority":
        return counts.argmax(1), purity
    if k != num_classes:
        raise ValueError(f"cluster_map hungarian needs one cluster per class (K = {k}, C = {num_classes})")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-counts)
    mapping = np.empty(k, dtype=np.int64)
    mapping[rows] = cols
    return mapping, counts[np.arange(k), mapping] / np.maximum(counts.sum(1), 1)


def trusted_subset(
    probs: np.ndarray,
    embeddings: np.ndarray,
    tau_hc: float,
    num_clusters: int,
    purity_min: float,
    seed: int,
    *,
    hc_mode: str = "threshold",
    hc_fraction: float = 0.5,
    clustering: str = "kmeans",
    cluster_map: str = "majority",
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """KD-FixMatch's trusted subset from the outer network's outputs on the unlabeled pool.

    Args:
        probs: ``[N, C]`` class probabilities (no augmentation).
        embeddings: ``[N, d]`` embeddings to cluster (L2-normalised here).
        tau_hc: high-confidence threshold (``max p >= tau_hc``; ``hc_mode: threshold``).
        num_clusters: K.
        purity_min: clusters whose mapped class holds less than this fraction are not trusted.
        seed: clustering seed (the result is deterministic given the seed).
        hc_mode, hc_fraction: see :func:`high_confidence`.
        clustering: ``kmeans`` (k-means++, n_init 10) or ``dec`` (:func:`dec_refine` from k-means).
        cluster_map: ``majority`` or ``hungarian`` (:func:`map_clusters`).

    Returns:
        ``(trusted [N] bool, label [N] int64 = outer prediction, info)`` with info's ``hc_rate``,
        ``agree_rate`` and ``trusted_rate``.
    """
    from sklearn.cluster import KMeans

    pred = probs.argmax(1)
    high_conf = high_confidence(probs, tau_hc, hc_mode, hc_fraction)
    emb = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    k = min(num_clusters, len(emb))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb.astype(np.float64))
    clusters = km.labels_ if clustering == "kmeans" else dec_refine(emb.astype(np.float64), km.cluster_centers_)
    cluster_class, purity = map_clusters(clusters, pred, k, probs.shape[1], cluster_map)
    agree = (cluster_class[clusters] == pred) & (purity[clusters] >= purity_min)
    trusted = high_conf & agree
    info = {
        "hc_rate": float(high_conf.mean()),
        "agree_rate": float(agree.mean()),
        "trusted_rate": float(trusted.mean()),
    }
    return trusted, pred.astype(np.int64), info


def sce_loss(log_probs: torch.Tensor, target: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Per-sample symmetric cross-entropy ``a·CE + b·RCE``, RCE = −Σ p log onehot with log 0 := −4."""
    ce = F.nll_loss(log_probs, target, reduction="none")
    p_t = log_probs.exp().gather(1, target[:, None]).squeeze(1)
    return a * ce + b * 4.0 * (1.0 - p_t)


@METHODS.register("kd_fixmatch")
class KDFixMatch(Method):
    """KD-FixMatch: FixMatch whose unlabeled loss trusts a filtered subset of a FixMatch teacher's labels."""

    class Config(MethodConfig):
        name: Literal["kd_fixmatch"] = "kd_fixmatch"
        threshold: float = knob(0.95, search={"uniform": [0.8, 0.99]}, ge=0.0, le=1.0, help="FixMatch threshold tau")
        lambda_u: float = knob(1.0, search={"loguniform": [0.25, 4.0]}, ge=0.0, help="weight of the unlabeled loss")
        tau_hc: float = knob(
            0.95, search={"uniform": [0.7, 0.999]}, ge=0.0, le=1.0, help="high-confidence sampling threshold"
        )
        cluster_mult: int = knob(1, search={"choice": [1, 2, 3, 5, 10]}, ge=1, help="K = cluster_mult x classes")
        num_clusters: int | None = knob(None, ge=1, help="K directly (overrides cluster_mult)")
        purity_min: float = knob(0.0, search={"uniform": [0.0, 0.9]}, ge=0.0, le=1.0, help="min cluster purity")
        embedding: Literal["penultimate", "logits"] = knob(
            "penultimate", search={"choice": ["penultimate", "logits"]}, help="what is clustered"
        )
        override_threshold: float | None = knob(
            None, ge=0.0, le=1.0, help="Heuristic 1: inner confidence that overrides a trusted label (null = tau)"
        )
        loss_u: Literal["ce", "sce"] = knob("ce", search={"choice": ["ce", "sce"]}, help="unlabeled loss")
        sce_a: float = knob(1.0, search={"loguniform": [0.1, 1.0]}, gt=0.0, help="SCE weight of CE")
        sce_b: float = knob(1.0, search={"loguniform": [0.1, 1.0]}, gt=0.0, help="SCE weight of reverse CE")
        hc_mode: Literal["threshold", "per_class"] = knob(
            "threshold",
            search={"choice": ["threshold", "per_class"]},
            help="high-confidence sampling: max p >= tau_hc, or the top hc_fraction within each predicted class",
        )
        hc_fraction: float = knob(
            0.5, search={"uniform": [0.1, 0.9]}, gt=0.0, le=1.0, help="per-class fraction kept (hc_mode per_class)"
        )
        clustering: Literal["kmeans", "dec"] = knob(
            "kmeans", search={"choice": ["kmeans", "dec"]}, help="k-means, or DEC refined from k-means"
        )
        dec_refresh: int = knob(100, ge=1, help="DEC: steps between refreshes of the target distribution")
        cluster_map: Literal["majority", "hungarian"] = knob(
            "majority", help="cluster -> class: majority vote, or one-to-one Hungarian matching (needs K = C)"
        )
        formulation: Literal["merged", "separate"] = knob(
            "merged",
            search={"choice": ["merged", "separate"]},
            help="trusted labels inside L_u (merged) or as a separate lambda_t term beside plain FixMatch",
        )
        lambda_t: float = knob(
            1.0, search={"loguniform": [0.25, 4.0]}, ge=0.0, help="weight of the trusted term (formulation separate)"
        )
        inner_init: Literal["scratch", "outer_weights"] = knob(
            "scratch",
            search={"choice": ["scratch", "outer_weights"]},
            help="inner network from scratch or from the outer network's weights (same architecture)",
        )

        @model_validator(mode="after")
        def _hungarian_needs_k_equals_c(self):
            if self.cluster_map == "hungarian" and self.num_clusters is None and self.cluster_mult != 1:
                raise ConfigError("method.cluster_map", "hungarian matching needs one cluster per class: set "
                                  "cluster_mult: 1 or cluster_map: majority")  # fmt: skip
            return self

        needs_teacher = True

        @classmethod
        def logs(cls, run) -> tuple[str, ...]:
            return ("loss_x", "loss_u", "loss_t", "mask_rate", "pseudo_acc", "trusted_rate", "trusted_size",
                    "trusted_acc")  # fmt: skip

    def setup(self) -> None:
        n = len(self.ctx.data.unlabeled)
        self.trusted = torch.zeros(n, dtype=torch.bool, device=self.ctx.device)
        self.trusted_label = torch.zeros(n, dtype=torch.long, device=self.ctx.device)
        self.info: dict[str, float] = {}
        if self.cfg.inner_init == "outer_weights":  # before the loop's EMA copy and any resume
            try:
                self.ctx.raw_model.load_state_dict(self.ctx.teacher.state_dict())
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise ConfigError("method.inner_init", "outer_weights needs the teacher's architecture for the "
                                  f"student (same model section) or inner_init: scratch ({first})") from e  # fmt: skip

    def _table_key(self) -> list:
        c = self.cfg
        selection = [
            c.tau_hc if c.hc_mode == "threshold" else c.hc_fraction,
            c.hc_mode,
            self._k(),
            c.purity_min,
            c.embedding,
            c.clustering,
            c.dec_refresh if c.clustering == "dec" else None,
            c.cluster_map,
        ]
        return [selection, self.ctx.run.train.seed, self.ctx.run.data.model_dump(mode="json")]  # fmt: skip

    def _k(self) -> int:
        return self.cfg.num_clusters or self.cfg.cluster_mult * self.ctx.num_classes

    @no_grad
    def _teacher_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        ctx, probs, embs = self.ctx, [], []
        images = ctx.data.unlabeled.images
        for chunk in torch.arange(len(images)).split(ctx.run.train.eval_batch_size):
            logits, h = ctx.teacher(ctx.plain(images[chunk].to(ctx.device)), with_features=True)
            probs.append(logits.float().softmax(-1).cpu())
            embs.append((h if self.cfg.embedding == "penultimate" else logits).float().cpu())
        return torch.cat(probs).numpy(), torch.cat(embs).numpy()

    def _build_table(self) -> dict:
        c, ctx = self.cfg, self.ctx
        probs, emb = self._teacher_outputs()
        trusted, label, info = trusted_subset(probs, emb, c.tau_hc, self._k(), c.purity_min, ctx.run.train.seed,
                                              hc_mode=c.hc_mode, hc_fraction=c.hc_fraction, clustering=c.clustering,
                                              cluster_map=c.cluster_map)  # fmt: skip
        hidden = ctx.data.unlabeled.labels.numpy()
        known = trusted & (hidden >= 0)
        info["trusted_acc"] = float((label[known] == hidden[known]).mean()) if known.any() else float("nan")
        return {"trusted": torch.from_numpy(trusted), "label": torch.from_numpy(label), "info": info}

    def on_train_start(self) -> None:
        """Compute (rank 0, once per configuration; cached beside the teacher) or load the trusted table."""
        table = self.ctx.teacher_table("trusted", self._table_key(), self._build_table)
        self.trusted = table["trusted"].to(self.ctx.device)
        self.trusted_label = table["label"].to(self.ctx.device)
        self.info = dict(table["info"])

    def _per_sample(self, log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss_u == "sce":
            return sce_loss(log_p, target, self.cfg.sce_a, self.cfg.sce_b)
        return F.nll_loss(log_p, target, reduction="none")

    def train_step(self, batch: Batch):
        cfg = self.cfg
        z_l, z_w, z_s = weak_strong_views(self.ctx, self.model, batch)
        loss_x = F.cross_entropy(z_l.float(), batch.y)
        conf, pred = z_w.detach().float().softmax(-1).max(-1)
        trusted = self.trusted[batch.u_idx]
        override = conf >= (cfg.override_threshold if cfg.override_threshold is not None else cfg.threshold)
        h1_target = torch.where(trusted & ~override, self.trusted_label[batch.u_idx], pred)  # Heuristic 1
        plain_mask = (conf >= cfg.threshold).float()
        per_h1 = self._per_sample(F.log_softmax(z_s.float(), dim=-1), h1_target)
        if cfg.formulation == "merged":
            target, mask = h1_target, torch.where(trusted, torch.ones_like(conf), plain_mask)
            loss_u = (per_h1 * mask).mean()
            loss_t = torch.zeros((), device=loss_u.device)
        else:  # plain FixMatch on every sample + a separate term over the batch's trusted samples
            target, mask = pred, plain_mask
            loss_u = (self._per_sample(F.log_softmax(z_s.float(), dim=-1), pred) * mask).mean()
            loss_t = (per_h1 * trusted).sum() / trusted.sum().clamp(min=1)
        loss = loss_x + cfg.lambda_u * loss_u + cfg.lambda_t * loss_t
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_t": loss_t.detach(),
                "mask_rate": mask.mean(), "pseudo_acc": pseudo_label_accuracy(target, mask, batch.u_y),
                "trusted_rate": trusted.float().mean(), "trusted_size": self.info.get("trusted_rate", 0.0),
                "trusted_acc": self.info.get("trusted_acc", float("nan"))}  # fmt: skip
        return loss, logs

    def state_dict(self) -> dict:
        return {"trusted": self.trusted.cpu(), "trusted_label": self.trusted_label.cpu()}
