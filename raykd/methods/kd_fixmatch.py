"""KD-FixMatch (Wang, Xu, Fu, Liu, Wang; ICIP 2023; arXiv 2309.05826) — METHODS.md §4.

Stage 1: the *outer* network is a FixMatch model trained once — the run's frozen teacher
(``teacher.run`` with ``method: fixmatch``, or ``teacher.checkpoint``).
Stage 2 (``before_training``, once per (teacher, tau_hc, K, purity_min, embedding, seed) and cached
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

Our decisions where the paper's text was not available (METHODS.md [INF]), each a knob: embeddings
= pooled penultimate features (``embedding``), K = ``cluster_mult`` × C unless ``num_clusters`` is
set, majority-vote mapping, global (not per-class) confidence sampling, merged pseudo-label
formulation (one L_u).  DEC clustering and the separate λ_t formulation are not implemented yet.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raykd.config import MethodConfig, knob
from raykd.methods.base import METHODS, Batch
from raykd.methods.fixmatch import FixMatch, pseudo_label_accuracy


def trusted_subset(
    probs: np.ndarray, embeddings: np.ndarray, tau_hc: float, num_clusters: int, purity_min: float, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """KD-FixMatch's trusted subset from the outer network's outputs on the unlabeled pool.

    Args:
        probs: ``[N, C]`` class probabilities (no augmentation).
        embeddings: ``[N, d]`` embeddings to cluster (L2-normalised here).
        tau_hc: high-confidence threshold (``max p >= tau_hc``).
        num_clusters: K for k-means.
        purity_min: clusters whose majority class holds less than this fraction are not trusted.
        seed: k-means seed (the result is deterministic given the seed).

    Returns:
        ``(trusted [N] bool, label [N] int64 = outer prediction, info)`` with info's ``hc_rate``,
        ``agree_rate`` and ``trusted_rate``.
    """
    from sklearn.cluster import KMeans

    pred = probs.argmax(1)
    high_conf = probs.max(1) >= tau_hc
    emb = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    k = min(num_clusters, len(emb))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb.astype(np.float64))
    counts = np.zeros((k, probs.shape[1]), dtype=np.int64)
    np.add.at(counts, (clusters, pred), 1)
    cluster_class = counts.argmax(1)
    purity = counts.max(1) / np.maximum(counts.sum(1), 1)
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
class KDFixMatch(FixMatch):
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
            None, ge=0.0, le=1.0, help="Heuristic 1: inner confidence that overrides a trusted label (None = tau)"
        )
        loss_u: Literal["ce", "sce"] = knob("ce", search={"choice": ["ce", "sce"]}, help="unlabeled loss")
        sce_a: float = knob(1.0, search={"loguniform": [0.1, 1.0]}, gt=0.0, help="SCE weight of CE")
        sce_b: float = knob(1.0, search={"loguniform": [0.1, 1.0]}, gt=0.0, help="SCE weight of reverse CE")

    needs_teacher = True
    logs = ("loss_x", "loss_u", "mask_rate", "pseudo_acc", "trusted_rate", "trusted_size", "trusted_acc")

    def setup(self) -> None:
        n = len(self.ctx.data.unlabeled)
        self.trusted = torch.zeros(n, dtype=torch.bool, device=self.ctx.device)
        self.trusted_label = torch.zeros(n, dtype=torch.long, device=self.ctx.device)
        self.info: dict[str, float] = {}

    def _cache_file(self) -> Path:
        c = self.cfg
        key = json.dumps([c.tau_hc, self._k(), c.purity_min, c.embedding, "kmeans", self.ctx.run.train.seed,
                          self.ctx.run.data.model_dump(mode="json")], sort_keys=True)  # fmt: skip
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return Path(self.ctx.teacher_dir) / f"trusted-{digest}.pt"

    def _k(self) -> int:
        return self.cfg.num_clusters or self.cfg.cluster_mult * self.ctx.num_classes

    @torch.no_grad()
    def _teacher_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        ctx, probs, embs = self.ctx, [], []
        images = ctx.data.unlabeled.images
        for chunk in torch.arange(len(images)).split(ctx.run.train.eval_batch_size):
            logits, h = ctx.teacher(ctx.plain(images[chunk].to(ctx.device)), with_features=True)
            probs.append(logits.float().softmax(-1).cpu())
            embs.append((h if self.cfg.embedding == "penultimate" else logits).float().cpu())
        return torch.cat(probs).numpy(), torch.cat(embs).numpy()

    def before_training(self) -> None:
        """Compute (rank 0, once per configuration; cached beside the teacher) or load the trusted table."""
        ctx, path = self.ctx, self._cache_file()
        if ctx.rank == 0:
            with open(path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent trials with the same setting compute it once
                if not path.exists():
                    probs, emb = self._teacher_outputs()
                    trusted, label, info = trusted_subset(probs, emb, self.cfg.tau_hc, self._k(),
                                                          self.cfg.purity_min, ctx.run.train.seed)  # fmt: skip
                    hidden = ctx.data.unlabeled.labels.numpy()
                    known = trusted & (hidden >= 0)
                    info["trusted_acc"] = float((label[known] == hidden[known]).mean()) if known.any() else float("nan")
                    tmp = path.with_suffix(".tmp")
                    torch.save({"trusted": torch.from_numpy(trusted), "label": torch.from_numpy(label),
                                "info": info}, tmp)  # fmt: skip
                    tmp.replace(path)
        if ctx.world_size > 1 and dist.is_initialized():
            dist.barrier()  # every rank reads rank 0's table: identical per-sample state everywhere
        table = torch.load(path, map_location="cpu", weights_only=True)
        self.trusted = table["trusted"].to(ctx.device)
        self.trusted_label = table["label"].to(ctx.device)
        self.info = dict(table["info"])

    def train_step(self, batch: Batch):
        cfg = self.cfg
        z_l, z_w, z_s = self.forward_views(batch)
        loss_x = F.cross_entropy(z_l.float(), batch.y)
        conf, pred = z_w.detach().float().softmax(-1).max(-1)
        trusted = self.trusted[batch.u_idx]
        override = conf >= (cfg.override_threshold if cfg.override_threshold is not None else cfg.threshold)
        target = torch.where(trusted & ~override, self.trusted_label[batch.u_idx], pred)  # Heuristic 1
        mask = torch.where(trusted, torch.ones_like(conf), (conf >= cfg.threshold).float())
        log_p = F.log_softmax(z_s.float(), dim=-1)
        if cfg.loss_u == "sce":
            per_sample = sce_loss(log_p, target, cfg.sce_a, cfg.sce_b)
        else:
            per_sample = F.nll_loss(log_p, target, reduction="none")
        loss_u = (per_sample * mask).mean()
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_rate": mask.mean(),
                "pseudo_acc": pseudo_label_accuracy(target, mask, batch.u_y), "trusted_rate": trusted.float().mean(),
                "trusted_size": self.info.get("trusted_rate", 0.0),
                "trusted_acc": self.info.get("trusted_acc", float("nan"))}  # fmt: skip
        return loss, logs

    def state_dict(self) -> dict:
        return {"trusted": self.trusted.cpu(), "trusted_label": self.trusted_label.cpu()}
