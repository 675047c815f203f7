"""TSKD — teacher–student collaborative knowledge distillation (Xu, Gao, Li, Bai, Li, Zhang; Applied
Intelligence 53(2):1997–2009, 2023; DOI 10.1007/s10489-022-03486-4) (docs/methods.md).

The student becomes multi-exit (:class:`~raykd.models.multi_exit.MultiExit`: bottleneck + pooling +
linear after chosen stages; the deepest exit is the network's own head) and learns from two
teachers at once: the frozen external teacher (logit KD) and its own deepest exit (logit
self-distillation plus a feature hint from the deepest pooled features).  With logits q_i and
pooled features F_i of exits i = 1..K (K the deepest), teacher logits z_t and sg = stop-gradient::

    L = Σ_i [ w_ce·CE(y, q_i)[labeled] + w_kd·KL_T_kd(z_t ‖ q_i) ]
      + Σ_{i<K} [ w_sd·KL_T_sd(sg(q_K) ‖ q_i) + w_feat·MSE(F_i, sg(F_K)) ]

KL_T is ``T²·KL(softmax(·/T) ‖ softmax(·/T))`` (:func:`raykd.methods.common.kd_loss`).  The labeled batch
and ``train.uratio`` × as many unlabeled images go through one forward pass (weak views, shared BN
statistics as in KD); CE uses the labeled part only, every other term labeled ∪ unlabeled — the
semi-supervised extension docs/methods.md specifies (unlabeled data: teacher KD, self-distillation
and feature terms, no CE).  Evaluation predicts with the exits' ensemble vote, and the loop reports
each exit's accuracy (``test_exit<s>_acc``, ``s`` the 1-based stage the exit follows) and all three
votes' (``test_vote_soft_acc``, ``test_vote_hard_acc``, ``test_vote_weighted_acc``; ``val_…`` too
with a validation split), whatever ``vote`` selects.

Our decisions where the paper's equations were not available (BYOT template):

* exits: ``every`` stage (default) or the ``last_two`` stages; bottlenecks as in MultiExit;
* BYOT's weighting is reachable: ``w_ce_shallow`` scales the shallow exits' CE (BYOT: 0.7; ours 1),
  ``sd_t_squared: false`` drops the T² factor of the self-distillation KL (with it, at T 3 the
  self-distillation gradient is 9× BYOT's), and ``vote: mean_logits`` is BYOT's ensemble;
* the losses are summed over exits (not averaged), per the formula; ``w_ce`` = 1 by default
  (BYOT's normalisation 1 − w_kd − w_sd is reachable by setting it);
* the feature hint is the mean squared difference over the batch and the feature dimension (so
  ``w_feat`` does not scale with the width), on pooled pre-classifier features;
* votes (:func:`ensemble_vote`): ``soft`` = argmax of the mean exit probability; ``hard`` = majority
  of the exits' argmax, ties broken by the summed probabilities, then by the lowest class index;
  ``weighted`` = soft vote weighted by each exit's accuracy on the validation split, recomputed on
  every rank before each evaluation of the evaluated (EMA) model.  Without a validation split
  (``data.val_per_class: 0``) the weights are equal, i.e. ``weighted`` falls back to ``soft``:
  accuracy on the few training labels is ~1 for every exit and would carry no information.

``tskd_sd`` is the same student without an external teacher (self-distillation only, w_kd = 0, no
``teacher`` section): the "self-distillation multi-exit network" TSKD is compared with.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Literal

from raykd.config import MethodConfig, RunConfig, knob
from raykd.lazy import F, nn, torch
from raykd.methods.base import METHODS, Batch, Method
from raykd.methods.common import kd_loss

VOTES = ("soft", "hard", "weighted", "mean_logits")
PLACEMENTS = ("every", "last_two")


def exit_stages(placement: str, n_stages: int) -> list[int]:
    """0-based stages that carry an exit: ``every`` stage, or the ``last_two``."""
    return list(range(n_stages)) if placement == "every" else list(range(max(0, n_stages - 2), n_stages))


@functools.lru_cache(maxsize=32)
def _stages_of(model_name: str, args_json: str) -> int:
    from raykd.models.multi_exit import num_stages  # builds the model: torch only when a tskd run is checked

    return num_stages(model_name, json.loads(args_json))


def exit_names(run: RunConfig) -> list[str]:
    """``exit<s>`` (s = 1-based stage the exit follows) for each exit of ``run``'s student, shallow → deep."""
    n = _stages_of(run.model.name, json.dumps(run.model.args(), sort_keys=True))
    return [f"exit{s + 1}" for s in exit_stages(run.method.exits, n)]


def ensemble_vote(logits: torch.Tensor, rule: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine exit logits ``[K, N, C]`` into ``[N, C]`` scores whose argmax is the ensemble prediction.

    * ``soft``: log of the mean probability over exits.
    * ``weighted``: log of the ``weights``-weighted mean probability (non-negative weights; all zero
      or None means equal weights).
    * ``hard``: vote counts of the exits' argmax plus the summed probabilities / (K + 1) (< 1, so it
      only orders classes with equal counts); equal counts and sums go to the lowest class index
      (``argmax`` returns the first maximum).
    * ``mean_logits``: the mean of the exits' logits (BYOT's ensemble).
    """
    k = logits.shape[0]
    log_p = F.log_softmax(logits.float(), dim=-1)
    if rule == "soft":
        return torch.logsumexp(log_p, dim=0) - math.log(k)
    if rule == "weighted":
        w = torch.ones(k, device=logits.device) if weights is None else weights.to(logits.device).float().clamp_min(0)
        w = w if w.sum() > 0 else torch.ones_like(w)
        log_w = (w / w.sum()).log().view(k, 1, 1)
        return torch.logsumexp(log_p + log_w, dim=0)
    if rule == "mean_logits":
        return logits.float().mean(dim=0)
    if rule == "hard":
        counts = F.one_hot(log_p.argmax(-1), logits.shape[-1]).sum(0).float()
        return counts + log_p.exp().sum(0) / (k + 1)
    raise ValueError(f"unknown vote {rule!r}; use one of {', '.join(VOTES)}")


def self_distillation_losses(
    logits: torch.Tensor, feats: torch.Tensor, temperature: float, t_squared: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over shallow exits of ``KL_T(sg(q_K) ‖ q_i)`` and of ``MSE(F_i, sg(F_K))`` (zero with one exit).

    ``logits`` ``[K, N, C]`` and ``feats`` ``[K, N, D]`` are shallow → deep; the deepest exit only
    teaches here, so no gradient reaches it through these terms.  KL_T carries Hinton's T² factor
    unless ``t_squared`` is off (BYOT's form: the plain KL of the softened distributions).
    """
    deep_q, deep_f = logits[-1].detach(), feats[-1].detach()
    zero = logits.new_zeros((), dtype=torch.float32)
    scale = 1.0 if t_squared else 1.0 / (temperature * temperature)
    loss_sd = sum((kd_loss(q, deep_q, temperature) for q in logits[:-1]), zero) * scale
    loss_feat = sum((F.mse_loss(f.float(), deep_f.float()) for f in feats[:-1]), zero)
    return loss_sd, loss_feat


def tskd_loss(
    logits: torch.Tensor,
    feats: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    cfg: MethodConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TSKD loss and its logs for exit logits ``[K, N, C]`` and features ``[K, N, D]`` of a batch
    whose first ``len(y)`` rows are labeled (CE) and whose every row gets the teacher-KD (when
    ``teacher_logits`` ``[N, C]`` is given), self-distillation and feature terms."""
    logits, feats = logits.float(), feats.float()
    b = y.shape[0]
    ce = [F.cross_entropy(q[:b], y) for q in logits]
    loss_ce = ce[-1] + cfg.w_ce_shallow * sum(ce[:-1], torch.zeros((), device=logits.device))
    loss_sd, loss_feat = self_distillation_losses(logits, feats, cfg.T_sd, cfg.sd_t_squared)
    loss = cfg.w_ce * loss_ce + cfg.w_sd * loss_sd + cfg.w_feat * loss_feat
    logs = {"loss_ce": loss_ce.detach(), "loss_sd": loss_sd.detach(), "loss_feat": loss_feat.detach()}
    if teacher_logits is not None:
        loss_kd = sum(kd_loss(q, teacher_logits, cfg.T_kd) for q in logits)
        loss = loss + cfg.w_kd * loss_kd
        logs["loss_kd"] = loss_kd.detach()
        logs["teacher_agree"] = (logits[-1].argmax(-1) == teacher_logits.argmax(-1)).float().mean()
    return loss, logs


class _ExitKnobs(MethodConfig):
    """Knobs shared by ``tskd`` and ``tskd_sd``."""

    w_ce: float = knob(1.0, ge=0.0, help="weight of each exit's CE on labels (BYOT's 1-w_kd-w_sd is one choice)")
    w_ce_shallow: float = knob(
        1.0, search={"uniform": [0.5, 1.0]}, ge=0.0, help="relative CE weight of the shallow exits (BYOT: 0.7)"
    )
    sd_t_squared: bool = knob(
        True, search={"choice": [True, False]}, help="self-distillation KL carries T^2 (false: BYOT's plain KL)"
    )
    w_sd: float = knob(
        0.3, search={"uniform": [0.05, 0.7]}, ge=0.0, help="self-distillation weight (deepest exit -> shallow exits)"
    )
    T_sd: float = knob(3.0, search={"loguniform": [1.0, 8.0]}, gt=0.0, help="self-distillation temperature")
    w_feat: float = knob(
        0.03, search={"loguniform": [0.003, 0.3]}, ge=0.0, help="feature-hint weight (MSE to the deepest features)"
    )
    exits: Literal["every", "last_two"] = knob(
        "every", search={"choice": list(PLACEMENTS)}, help="exit placement: after every stage or the last two"
    )
    vote: Literal["soft", "hard", "weighted", "mean_logits"] = knob(
        "soft",
        search={"choice": list(VOTES)},
        help="ensemble vote used by predict (weighted: by val accuracy; mean_logits: BYOT's)",
    )

    @classmethod
    def eval_heads(cls, run: RunConfig) -> tuple[str, ...]:
        return (*exit_names(run), *(f"vote_{v}" for v in VOTES))


@METHODS.register("tskd")
class TSKD(Method):
    """Multi-exit student: CE + teacher KD on every exit, self-distillation and feature hints from the
    deepest exit to the shallow ones; predicts with the exits' vote."""

    class Config(_ExitKnobs):
        name: Literal["tskd"] = "tskd"
        w_kd: float = knob(0.5, search={"uniform": [0.1, 0.9]}, ge=0.0, help="teacher-KD weight on every exit")
        T_kd: float = knob(4.0, search={"loguniform": [1.0, 8.0]}, gt=0.0, help="teacher-KD temperature")

        needs_teacher = True

        @classmethod
        def logs(cls, run: RunConfig) -> tuple[str, ...]:
            return ("loss_ce", "loss_kd", "loss_sd", "loss_feat", "teacher_agree")

    @classmethod
    def configure_model(cls, model: nn.Module, run: RunConfig, image_shape: tuple[int, int, int]) -> nn.Module:
        from raykd.models.multi_exit import MultiExit, stage_shapes

        stages = exit_stages(run.method.exits, len(stage_shapes(model, image_shape)))
        return MultiExit(model, stages, image_shape, bn_momentum=run.model.resolved_bn_momentum(run.train.steps))

    def setup(self) -> None:
        self.exit_weights = torch.ones(self.ctx.raw_model.num_exits, dtype=torch.float64)

    def train_step(self, batch: Batch):
        ctx = self.ctx
        images = batch.x if batch.u is None else torch.cat([batch.x, batch.u])
        views = ctx.weak(images)
        with ctx.autocast():
            logits, feats = self.model(views, all_exits=True)
            z_t = None
            if ctx.teacher is not None:
                with torch.no_grad():
                    z_t = ctx.teacher(views)
        return tskd_loss(logits, feats, batch.y, z_t, self.cfg)

    def predict(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The selected vote, and every exit and vote as named heads."""
        logits, _ = model(x, all_exits=True)
        names = [f"exit{s + 1}" for s in getattr(model, "module", model).exit_stages]
        out = dict(zip(names, logits, strict=True))
        for rule in VOTES:
            out[f"vote_{rule}"] = ensemble_vote(logits, rule, self.exit_weights)
        return out[f"vote_{self.cfg.vote}"], out

    def on_evaluation_start(self, model: nn.Module) -> None:
        """Weights of the ``weighted`` vote: each exit's validation accuracy (equal without a split)."""
        data = self.ctx.data
        if data.val is None:
            return
        _, accs = self.ctx.evaluate(model, data.val)
        names = [f"exit{s + 1}" for s in getattr(model, "module", model).exit_stages]
        self.exit_weights = torch.tensor([accs[n] for n in names], dtype=torch.float64)

    def state_dict(self):
        return {"exit_weights": self.exit_weights.clone()}

    def load_state_dict(self, state) -> None:
        if "exit_weights" in state:
            self.exit_weights = torch.as_tensor(state["exit_weights"], dtype=torch.float64)


@METHODS.register("tskd_sd")
class TSKDSelfDistillation(TSKD):
    """TSKD's multi-exit student without an external teacher: CE on every exit plus self-distillation
    and feature hints from the deepest exit (the self-distillation baseline; w_kd = 0)."""

    class Config(_ExitKnobs):
        name: Literal["tskd_sd"] = "tskd_sd"

        @classmethod
        def logs(cls, run: RunConfig) -> tuple[str, ...]:
            return ("loss_ce", "loss_sd", "loss_feat")
