"""SRD — semantic representational distillation (Yang, Zhu, Bulat, Martinez, Tzimiropoulos; IJCV 2025;
arXiv 2205.06701; code github.com/jingyang2017/SRD_ossl), with open-set unlabeled data (docs/methods.md).

The frozen teacher's classifier is a "semantic critic" of the student's representation.  Teacher and
student see the same weakly augmented views of a labeled batch concatenated with an unlabeled batch
(``train.uratio`` × as many; any images, including classes the teacher never saw).  With F_s, F_t the
student's and teacher's last feature maps (before pooling), φ a connector from the student's channels
to the teacher's, and h_t = W_t·pool(·) + b_t the teacher's own pooling and classifier:

    ẑ = h_t(φ(F_s))                          cross-network logits (gradients flow through the frozen W_t)
    z_t = h_t(F_t)                           the teacher's logits for the SAME images (under no_grad)
    R = mean_b mean_k (pool(φ(F_s)) − pool(F_t))²_bk          pooled-feature matching
    L = γ · CE(y, z_s)[labeled] + α · T²·KL(z_t ‖ z_s)[all] + β · (w_feat · R + dist(ẑ, z_t))[all]

with dist = MSE (the code's choice; mean over batch and classes), L1, or T²·KL(σ(z_t/T) ‖ σ(ẑ/T)).
The student's own classifier learns only from CE (and the optional logit KD term α); the connector
(registered with ``ctx.register_module``: optimised, DDP-averaged and checkpointed by the loop) and
the student's backbone learn from the SRD block.  Defaults are the authors' (γ = 1, α = 0, β = 1,
w_feat = 1, MSE, T = 4).
The teacher logits of an image are always that image's own: the reference code's "separate batch"
loop compared the unlabeled branch against the labeled batch's teacher logits, a slip we do not copy.

Our decisions where the paper leaves a choice, each a knob: ``distance`` l1 and kl besides
mse; ``connector`` ``conv1x1_bn_relu`` (the code's, He-initialised, applied even when the channel
counts agree) or ``conv1x1`` or ``linear_on_pooled`` (a linear map of the pooled student features);
``alpha_kd`` adds Hinton KD on all images.  Architectures may differ: the connector bridges the
channel counts and the teacher's global average pooling absorbs different map sizes.  The unlabeled
to labeled ratio is ``train.uratio`` (the paper uses 1; SRD studies search {1, 2, 4}).  No
FixMatch-style weak/strong pairs: the teacher and the student always see the same view.

Logs: ``loss_x``, ``loss_srd``, ``loss_feat``, ``loss_kd``; ``teacher_agree`` (student vs teacher
arg-max) and ``cross_agree`` (ẑ vs teacher arg-max) over all images; with ``data.open_set``, on the
unlabeled batch split by hidden label into seen classes and open-set samples
(``raykd.data.split.UNSEEN``; diagnostics only): ``srd_seen`` / ``srd_unseen`` (per-sample
distance), ``teacher_conf_seen`` / ``teacher_conf_unseen`` (teacher max probability) and
``unseen_rate`` (open-set fraction of the unlabeled batch).
"""

from __future__ import annotations

from typing import Literal

from raykd.config import MethodConfig, RunConfig, knob
from raykd.errors import ConfigError
from raykd.lazy import F, nn, torch
from raykd.methods.base import METHODS, Batch, Method
from raykd.methods.common import kd_loss, seen_unseen_means, seen_unseen_names

#: the connector φ's kinds (raykd.models.connector builds them)
CONNECTORS = ("conv1x1_bn_relu", "conv1x1", "linear_on_pooled")

def teacher_head(teacher: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """The teacher's pooling and classifier applied to a feature map (gradients reach ``fmap`` only)."""
    pool = getattr(teacher, "pool", None)
    pooled = pool(fmap) if pool is not None else torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
    return teacher.classifier(pooled)


def srd_distance(z_hat: torch.Tensor, z_t: torch.Tensor, distance: str, temperature: float) -> torch.Tensor:
    """Per-sample distance ``[B]`` between cross-network logits and the teacher's logits (teacher side detached).

    mse / l1: mean over classes of the squared / absolute difference (their batch mean is
    ``F.mse_loss`` / ``F.l1_loss``); kl: T²·KL(σ(z_t/T) ‖ σ(ẑ/T)) per sample.
    """
    z_hat, z_t = z_hat.float(), z_t.detach().float()
    if distance == "mse":
        return (z_hat - z_t).pow(2).mean(dim=1)
    if distance == "l1":
        return (z_hat - z_t).abs().mean(dim=1)
    t = temperature
    log_p_t = F.log_softmax(z_t / t, dim=1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(z_hat / t, dim=1))).sum(dim=1) * (t * t)


@METHODS.register("srd")
class SRD(Method):
    """SRD: the student's adapted feature map through the frozen teacher's classifier regresses the
    teacher's logits on labeled and (open-set) unlabeled images, plus pooled-feature matching and CE."""

    class Config(MethodConfig):
        name: Literal["srd"] = "srd"
        beta: float = knob(
            1.0, search={"loguniform": [0.1, 10.0]}, ge=0.0, help="weight of the SRD block (distance + w_feat * R)"
        )
        w_feat: float = knob(
            1.0, search={"loguniform": [0.1, 20.0]}, ge=0.0, help="weight of pooled-feature matching R in the block"
        )
        distance: Literal["mse", "l1", "kl"] = knob(
            "mse", search={"choice": ["mse", "l1", "kl"]}, help="distance between cross-network and teacher logits"
        )
        temperature: float = knob(
            4.0, search={"loguniform": [1.0, 8.0]}, gt=0.0, help="T of distance=kl and of the alpha_kd term"
        )
        alpha_kd: float = knob(
            0.0,
            search={"uniform": [0.0, 1.0]},
            ge=0.0,
            help="weight of extra logit KD T^2 KL(z_t || z_s) on all images",
        )
        gamma_ce: float = knob(
            1.0, search={"loguniform": [0.1, 1.0]}, gt=0.0, help="weight of cross-entropy on labeled images"
        )
        connector: Literal["conv1x1_bn_relu", "conv1x1", "linear_on_pooled"] = knob(
            "conv1x1_bn_relu", search={"choice": list(CONNECTORS)}, help="the adapter phi (student -> teacher channels)"
        )

        needs_teacher = True

        @classmethod
        def logs(cls, run: RunConfig) -> tuple[str, ...]:
            base = ("loss_x", "loss_srd", "loss_feat", "loss_kd", "teacher_agree", "cross_agree")
            if run.data.open_set is None:
                return base
            return (*base, *seen_unseen_names("srd", "teacher_conf"), "unseen_rate")

    def setup(self) -> None:
        ctx = self.ctx
        t_out = ctx.teacher.classifier.out_features
        if t_out != ctx.num_classes:
            message = (f"the teacher has {t_out} outputs but the student's data has {ctx.num_classes} classes; "
                       "train it on the same classes (data.open_set too)")  # fmt: skip
            raise ConfigError("teacher", message)
        c_s = ctx.raw_model.classifier.in_features
        c_t = ctx.teacher.classifier.in_features
        # trained beside the student: DDP-averaged, optimised and checkpointed by the loop
        from raykd.models.connector import Connector

        self.connector = ctx.register_module("connector", Connector(c_s, c_t, self.cfg.connector))

    def terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every term of the loss (not detached) and what the logs need, from one student forward."""
        ctx, cfg = self.ctx, self.cfg
        b = batch.x.shape[0]
        images = batch.x if batch.u is None else torch.cat([batch.x, batch.u])
        views = ctx.weak(images)  # teacher and student see the same view
        connector = self.connector
        with ctx.autocast():
            z_s, f_s = self.model(views, with_map=True)
            with torch.no_grad():
                f_t = ctx.teacher.feature_map(views)
                z_t = teacher_head(ctx.teacher, f_t)
            adapted = connector(f_s)
            z_hat = teacher_head(ctx.teacher, adapted)  # not under no_grad: gradients reach phi and the student
        dist = srd_distance(z_hat, z_t, cfg.distance, cfg.temperature)
        pooled_s = adapted.float().mean(dim=(2, 3))
        pooled_t = f_t.float().mean(dim=(2, 3))
        return {
            "loss_x": F.cross_entropy(z_s[:b].float(), batch.y),
            "loss_srd": dist.mean(),
            "loss_feat": F.mse_loss(pooled_s, pooled_t),
            "loss_kd": kd_loss(z_s, z_t, cfg.temperature),
            "dist": dist,
            "z_s": z_s,
            "z_t": z_t,
            "z_hat": z_hat,
        }

    def train_step(self, batch: Batch):
        cfg = self.cfg
        t = self.terms(batch)
        loss = cfg.gamma_ce * t["loss_x"] + cfg.beta * (t["loss_srd"] + cfg.w_feat * t["loss_feat"])
        if cfg.alpha_kd > 0:
            loss = loss + cfg.alpha_kd * t["loss_kd"]
        z_t = t["z_t"].float()
        logs = {k: t[k].detach() for k in ("loss_x", "loss_srd", "loss_feat", "loss_kd")}
        logs["teacher_agree"] = (t["z_s"].argmax(-1) == z_t.argmax(-1)).float().mean()
        logs["cross_agree"] = (t["z_hat"].argmax(-1) == z_t.argmax(-1)).float().mean()
        if self.ctx.run.data.open_set is None:
            return loss, logs
        b, u_y = batch.x.shape[0], batch.u_y
        logs.update(seen_unseen_means("srd", t["dist"][b:], u_y))
        logs.update(seen_unseen_means("teacher_conf", z_t[b:].softmax(-1).max(-1).values, u_y))
        from raykd.data.split import UNSEEN

        unseen = (u_y == UNSEEN).float() if u_y is not None else torch.zeros(0)
        logs["unseen_rate"] = (unseen.sum(), float(unseen.numel()))
        return loss, logs
