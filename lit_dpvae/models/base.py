"""Shared base of every VAE/prior pairing.

A pairing = a prior + (optionally) one divergence: a subclass sets ``self.prior``,
``self.divergence`` (a ``lit_dpvae.divergences.Divergence``, which says what it reads of each
record) and the class attribute ``divergence_key``. The base does the rest: encode, K
reparameterisation samples per record (record-major ``[n*K, ...]`` rows, so per-sample hooks
attribute rows to records), reconstruction and per-record KL as sample-wise terms, the weighted
divergence as a batch-wise term, logging, sampling and reconstruction.

The model never knows how it is trained: ``training_step`` is the non-private reference
(``loss_terms(batch).mean_loss()``), and the DP strategy calls ``loss_terms`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dpvae.divergences import Divergence, PairwiseDivergence
from lit_dpvae.hparams import ScrubbedHyperparametersMixin
from lit_dpvae.likelihoods import Likelihood, make_likelihood
from lit_dpvae.nn.blocks import build_encoder_decoder
from lit_dpvae.priors import LabelShiftPrior, Prior, StandardNormal, normal_log_density
from lit_dpvae.privacy.accounting import provenance_from_checkpoint
from lit_dpvae.privacy.collectives import gather_for_batch_terms
from lit_dpvae.privacy.provenance import mark_loaded
from lit_dpvae.privacy.terms import LossTerms, PairwiseTerm


class BaseVAE(ScrubbedHyperparametersMixin, L.LightningModule):
    """VAE with loss ``L(S) = (1/B) Σ_i [recon_i + β·kl_i] + λ·D(S)`` (docs/privacy.md §1, *Loss*).

    Sample-wise terms, shape ``[n]``, record i reads x_i only:
      - ``recon``: −(1/K) Σ_k log p(x_i | z_ik), z_ik = μ_i + σ_i ε_ik;
      - ``kl``: β·KL(q(z|x_i) ‖ p(z)), closed form for N(0, I) when ``analytic_kl``, else the
        Monte Carlo estimate (1/K) Σ_k [log q(z_ik|x_i) − log p(z_ik)].
    Batch-wise term (subclasses, only declared when λ ≠ 0): ``{divergence_key: λ·D}`` with D
    the subclass's ``divergence`` of the batch's codes (``divergence_codes``, through
    ``gather_for_batch_terms``). A ``PairwiseDivergence`` also declares its pair decomposition
    in ``LossTerms.pairwise`` (for ``PairwiseDPSGD``).

    Args:
        data_shape: shape of one record, e.g. ``(1, 28, 28)`` or ``(2,)``.
        latent_dim: d.
        arch: ``"mlp"`` or ``"conv"`` (ignored when ``encoder``/``decoder`` are injected).
        hidden: MLP widths (decoder mirrors them).
        channels: conv widths.
        activation: activation of the blocks (e.g. ``"relu"``).
        group_norm: number of GroupNorm groups in the blocks (0 = none).
        num_classes: number of labels; required with ``conditional=True``.
        conditional: concatenate one-hot labels to encoder and decoder inputs.
        label_prior: (conditional, no divergence) a class-conditional prior
            ``p(z | y) = p(z − μ_y)`` with learned means ``μ_y`` (a bias-free Linear on the
            one-hot label, a trainable layer like any other; ``label_shift``, a
            ``lit_dpvae.priors.LabelShiftPrior``): the KL of record i reads
            ``(x_i, y_i)`` only, so it stays sample-wise, and ``sample(n, labels)`` draws
            ``z = μ_y + ε``. It keeps codes and labels consistent when the code also carries
            the class — the failure mode of a DP-trained conditional VAE, whose decoder then
            ignores the label.
        label_prior_scale: (needs ``label_prior``) also learn a per-class diagonal scale,
            ``p(z | y) = N(μ_y, diag(s_y²))`` with ``log s_y`` a second bias-free Linear on the
            one-hot label (initialised to 0, i.e. s_y = 1): the prior can narrow to where the
            class's codes are, and ``sample`` draws ``z = μ_y + s_y ⊙ ε``. The KL uses
            KL(N(μ, σ²) ‖ N(m, s²)) = KL(N((μ − m)/s, σ²/s²) ‖ N(0, I)); still sample-wise.
        likelihood: ``"auto"`` (default: Bernoulli, or the schema's mixed-type likelihood when
            ``schema`` is set) | ``"bernoulli"`` | ``"gaussian"`` | ``"laplace"`` or a
            ``Likelihood``. With a schema, ``"gaussian"``/``"laplace"`` choose the family of
            its numeric columns.
        likelihood_scale: fixed scale of the Gaussian/Laplace likelihood (of numeric columns,
            on their [0, 1] scale, with a schema).
        schema: a table's public schema (:class:`lit_dpvae.data.Schema`, a ``{name: spec}``
            mapping or a JSON/YAML path; ``TabularDataModule.schema`` links it in the CLI):
            the decoder then outputs one parameter per encoded entry and the likelihood is
            :class:`lit_dpvae.likelihoods.Tabular` (sample-wise); ``sample`` draws valid rows
            that ``schema.decode`` turns into a table. Kept in ``hparams`` as a ``Schema``
            (public metadata: names, bounds, categories).
        beta: weight β of the per-record KL.
        lam: weight λ of the divergence (0: no batch-wise term; the pairings set their own).
        n_samples: K reparameterisation samples per record (averaged inside the record's terms).
        lr: Adam learning rate.
        encoder: injected modules with the ``lit_dpvae.nn`` interfaces (optional).
        decoder: injected modules with the ``lit_dpvae.nn`` interfaces (optional).
        optimizer: ``"adam"`` (default), ``"sgd"``, ``"adam_bc"`` (``DPAdamBC``: Adam with
            the DP noise variance removed from its second moment) or ``"auto"`` (``DPAdamBC``
            under a lit_dpvae ``DPStrategy``, Adam otherwise); see ``configure_optimizers``.
        momentum: SGD momentum.
        adam_eps: Adam's ε.
        adam_bc_floor: ``DPAdamBC``'s floor of the corrected second moment.
        lr_schedule: None or ``"cosine"`` (a fixed schedule: no privacy cost).
        lr_schedule_steps: T of the cosine schedule (None: the Trainer's estimated steps).
        sample_temperature: scale of the N(0, I) draws in ``sample`` (None or 1: none).

    ``label_shift`` is not a registered child module: its layers are, under their historical
    names ``label_means`` and ``label_log_scales``, so that state_dict keys, parameter names
    and the privacy fingerprints of earlier checkpoints are unchanged.

    ``save_hyperparameters`` leaves tensors, arrays, data sets and data-like lists (also among a
    subclass's ``__init__`` arguments) out of ``hparams``, with a warning: :mod:`lit_dpvae.hparams`.
    """

    analytic_kl: bool = False
    divergence_key: str | None = None

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 16,
        arch: str = "mlp",
        hidden: Sequence[int] = (256,),
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        group_norm: int = 0,
        num_classes: int = 0,
        conditional: bool = False,
        label_prior: bool = False,
        label_prior_scale: bool = False,
        likelihood: str | Likelihood = "auto",
        likelihood_scale: float = 0.1,
        schema: Any = None,
        beta: float = 1.0,
        lam: float = 0.0,
        n_samples: int = 1,
        lr: float = 1e-3,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        optimizer: str = "adam",
        momentum: float = 0.0,
        adam_eps: float = 1e-8,
        adam_bc_floor: float = 0.05,
        lr_schedule: str | None = None,
        lr_schedule_steps: int | None = None,
        sample_temperature: float | None = None,
    ) -> None:
        if schema is not None:  # hparams keep the Schema object (public; not a data container)
            from lit_dpvae.data.schema import Schema

            schema = Schema.coerce(schema)
        super().__init__()
        ignore = ["encoder", "decoder"]
        if isinstance(likelihood, nn.Module):
            ignore.append("likelihood")
        self.save_hyperparameters(ignore=ignore)
        if conditional and num_classes < 1:
            raise ValueError("conditional=True needs num_classes >= 1 (pass the data module's: "
                             "num_classes=data.num_classes)")
        if label_prior and not conditional:
            raise ValueError("label_prior=True needs conditional=True (the prior reads the label)")
        if label_prior_scale and not label_prior:
            raise ValueError(
                "label_prior_scale=True needs label_prior=True (it scales the class-conditional "
                "prior N(μ_y, I))"
            )
        if label_prior and (self.divergence_key is not None and lam != 0.0):
            raise ValueError(
                "label_prior=True is for pairings without a batch-wise divergence (lam = 0): "
                "the divergence would compare the codes with the unshifted prior"
            )
        if n_samples < 1:
            raise ValueError(f"n_samples (K) must be >= 1, got {n_samples}")
        if (encoder is None) != (decoder is None):
            raise ValueError("inject both encoder and decoder, or neither")
        self.data_shape = tuple(data_shape)
        self.latent_dim = int(latent_dim)
        self.num_classes = int(num_classes)
        self.conditional = bool(conditional)
        self.beta, self.lam, self.n_samples, self.lr = float(beta), float(lam), int(n_samples), lr
        # optimizer and sampling options (configure_optimizers, sample)
        if optimizer not in ("adam", "sgd", "adam_bc", "auto"):
            raise ValueError('optimizer must be "adam", "sgd", "adam_bc" or "auto", got '
                             f'{optimizer!r}')
        if lr_schedule not in (None, "cosine"):
            raise ValueError(f'lr_schedule must be None or "cosine", got {lr_schedule!r}')
        if lr_schedule_steps is not None and not int(lr_schedule_steps) >= 1:
            raise ValueError(f"lr_schedule_steps must be >= 1 (or None), got {lr_schedule_steps}")
        if not momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if sample_temperature is not None and not sample_temperature >= 0:
            raise ValueError(f"sample_temperature must be >= 0 (or None), got {sample_temperature}")
        self.optimizer_name, self.momentum = optimizer, float(momentum)
        self.adam_eps, self.adam_bc_floor = float(adam_eps), float(adam_bc_floor)
        self.lr_schedule, self.lr_schedule_steps = lr_schedule, lr_schedule_steps
        self.sample_temperature = sample_temperature
        if encoder is None:
            encoder, decoder = build_encoder_decoder(
                arch,
                data_shape,
                latent_dim,
                hidden,
                channels,
                activation,
                group_norm,
                num_classes if conditional else 0,
            )
        assert decoder is not None  # injected together with encoder, or built above
        self.encoder, self.decoder = encoder, decoder
        self.likelihood = make_likelihood(likelihood, likelihood_scale, schema)
        self.prior: Prior = StandardNormal(latent_dim)
        self.label_means: nn.Linear | None = None
        self.label_log_scales: nn.Linear | None = None
        self._label_shift: LabelShiftPrior | None = None
        if label_prior:
            shift = LabelShiftPrior(self.num_classes, self.latent_dim, label_prior_scale)
            self.label_means, self.label_log_scales = shift.means, shift.log_scales
            object.__setattr__(self, "_label_shift", shift)  # its layers are registered above
        self.divergence: Divergence | None = None  # a pairing sets it after this __init__
        self._val_latents: list[tuple[Tensor, Tensor | None, Tensor]] = []
        #: The latest ``latent_metrics`` (validation or test epoch), for reports.
        self.last_latent_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        """Refuse a data module whose classes do not match the model's (a conditional model on
        unlabelled data would train on one class and sample from classes it never saw)."""
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)  # Lightning calls setup with a trainer
        classes = getattr(data, "num_classes", None)
        if self.conditional and isinstance(classes, int) and classes != self.num_classes:
            hint = (" (the data have no labels: pass label=... to a TabularDataModule, y to an "
                    "ArrayDataModule, class sub-folders to an ImageFolderDataModule)"
                    if classes == 1 else "")
            raise ValueError(
                f"the model is conditional with num_classes={self.num_classes} but the data "
                f"module has num_classes={classes}{hint}: pass num_classes=data.num_classes")

    # ---- hooks for pairings and the strategy -------------------------------------------------
    def gather_for_batch_terms(self, t: Tensor) -> Tensor:
        """Codes that a batch-wise term reads, ``[n, ...] -> [N_total, ...]``: in a private
        multi-process step the global batch's rows (only the local ones with gradient), else the
        identity (``lit_dpvae.privacy.collectives``)."""
        return gather_for_batch_terms(t)

    @property
    def label_shift(self) -> LabelShiftPrior | None:
        """The class-conditional prior (``label_prior=True``), else None."""
        return self._label_shift

    def declared_divergence(self) -> Divergence:
        """``self.divergence``, refused with a clear error when it is not a ``Divergence``."""
        div = self.divergence
        if not isinstance(div, Divergence):
            raise TypeError(
                f"{type(self).__name__} declares the divergence term {self.divergence_key!r} "
                f"but its divergence is {type(div).__name__}: set self.divergence to a "
                "lit_dpvae.divergences.Divergence (a PairwiseDivergence for a kernel "
                "U-statistic) in __init__"
            )
        return div

    def batch_term_compositions(self) -> dict[str, str]:
        """``{divergence_key: "pairwise" | "batch-wise"}``, or ``{}`` when the loss has no
        batch-wise term (no divergence or λ = 0): what ``mechanism="auto"`` chooses from."""
        if self.divergence_key is None or self.lam == 0.0:
            return {}
        return {self.divergence_key: self.declared_divergence().composition}

    def batch_term_parameters(self) -> tuple[str, ...] | None:
        """Name prefixes of the parameters a batch-wise term's gradient can reach: every
        top-level module but the decoder (the divergence reads codes computed by the encoder,
        never the decoder). ``mechanism="auto"`` computes, clips and noises the batch-wise parts
        on these only (``batch_params``), so the decoder gets no noise from a part whose
        gradient there is structurally zero. Public: fixed by the architecture. None: all."""
        names = {name.split(".", 1)[0] for name, p in self.named_parameters() if p.requires_grad}
        keep = sorted(names - {"decoder"})
        return tuple(f"{name}." for name in keep) if keep and "decoder" in names else None

    def divergence_codes(self, z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        """The per-record codes ``[n, c]`` the divergence reads, from ``z [n, K, d]`` and
        ``mu, log_var [n, d]`` (row i from record i only): the divergence's ``codes``."""
        return self.declared_divergence().codes(z, mu, log_var)

    def divergence_value(self, z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        """The unweighted divergence D (scalar) of the batch's gathered codes."""
        div = self.declared_divergence()
        return div(self.gather_for_batch_terms(self.divergence_codes(z, mu, log_var)), self.prior)

    def pairwise_divergence(
        self, z: Tensor, mu: Tensor, log_var: Tensor
    ) -> tuple[Tensor, PairwiseTerm] | None:
        """``(D, PairwiseTerm)`` with D the unweighted divergence (same value and RNG use as
        ``divergence_value``), or None when the divergence is not a ``PairwiseDivergence``."""
        div = self.divergence
        if not isinstance(div, PairwiseDivergence):
            return None
        codes = self.divergence_codes(z, mu, log_var)
        value, w = div.estimate(self.gather_for_batch_terms(codes), self.prior)
        return value, PairwiseTerm(codes, w, div, self.lam)

    def latent_metrics(self, mu: Tensor, y: Tensor | None,
                       z: Tensor | None = None) -> dict[str, float]:
        """Metrics of the latent space over a whole validation/test epoch, from the posterior
        means ``mu``, labels ``y`` (or None) and one posterior sample per record ``z``."""
        return {}

    def extra_sample_terms(self, mu: Tensor, log_var: Tensor, z: Tensor) -> dict[str, Tensor]:
        """Further sample-wise terms ``{name: [n]}`` (row i from record i only: per-record
        clipping covers them, docs/privacy.md §2); none by default."""
        return {}

    def draw_noise(self, mu: Tensor, k: int) -> Tensor:
        """Reparameterisation noise ε ``[n, K, d]`` from the global torch RNG."""
        return torch.randn(mu.shape[0], k, mu.shape[1], device=mu.device, dtype=mu.dtype)

    # ---- model ---------------------------------------------------------------------------------
    def _onehot(self, y: Tensor | None, n: int, what: str) -> Tensor | None:
        if not self.conditional:
            if y is not None:
                raise ValueError(f"{what}: this model is unconditional, do not pass labels")
            return None
        if y is None:
            raise ValueError(
                f"{what}: this model is conditional (num_classes="
                f"{self.num_classes}); labels are required"
            )
        y = torch.as_tensor(y, device=self.device).long().view(-1)
        if y.shape[0] != n:
            raise ValueError(f"{what}: got {y.shape[0]} labels for {n} records")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{what}: labels must be in [0, {self.num_classes})")
        return F.one_hot(y, self.num_classes).to(self.dtype)

    def encode(self, x: Tensor, onehot: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.encoder(x) if onehot is None else self.encoder(x, onehot)

    def decode(self, z: Tensor, onehot: Tensor | None) -> Tensor:
        return self.decoder(z) if onehot is None else self.decoder(z, onehot)

    def per_record_kl(self, mu: Tensor, log_var: Tensor, z: Tensor) -> Tensor:
        """KL(q(z|x_i) ‖ p(z)) per record, ``[n]`` (closed form or Monte Carlo over K)."""
        if self.analytic_kl and isinstance(self.prior, StandardNormal):
            return StandardNormal.kl(mu, log_var)
        log_q = normal_log_density(z, mu[:, None], log_var[:, None]).sum(-1)  # [n, K]
        return (log_q - self.prior.log_prob(z)).mean(1)

    def _split(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        return x, y

    def _codes(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor,
                                           Tensor]:
        """``(x, y, onehot, mu, log_var, z)`` of a batch, z ``[n, K, d]`` reparameterised (the
        step's first random draw)."""
        x, y = self._split(batch)
        onehot = self._onehot(y if self.conditional else None, x.shape[0], "loss_terms")
        mu, log_var = self.encode(x, onehot)
        z = mu[:, None] + (0.5 * log_var).exp()[:, None] * self.draw_noise(mu, self.n_samples)
        return x, y, onehot, mu, log_var, z

    def _divergence_terms(self, z: Tensor, mu: Tensor, log_var: Tensor) -> LossTerms:
        """The batch-wise (and pairwise) terms: λ·D of the batch's codes (none when λ = 0)."""
        terms = LossTerms()
        if self.divergence_key is not None and self.lam != 0.0:
            pair = self.pairwise_divergence(z, mu, log_var)
            if pair is None:
                d = self.divergence_value(z, mu, log_var)
            else:
                d, terms.pairwise[self.divergence_key] = pair
            terms.batch[self.divergence_key] = self.lam * d
        return terms

    def _terms(self, batch: Any) -> tuple[LossTerms, Tensor, Tensor | None, Tensor]:
        """``(terms, mu, y, z)``: z ``[n, d]`` the first reparameterised sample per record."""
        x, y, onehot, mu, log_var, z = self._codes(batch)
        n, k = x.shape[0], self.n_samples
        rep = None if onehot is None else onehot.repeat_interleave(k, 0)  # record-major
        params = self.decode(z.reshape(n * k, self.latent_dim), rep)
        log_px_z = self.likelihood.log_prob(x.repeat_interleave(k, 0), params).view(n, k)
        if self.label_shift is not None:  # KL(q ‖ N(μ_y, s_y²)) = KL(q mapped by (·−μ_y)/s_y ‖ p)
            assert onehot is not None
            kl = self.per_record_kl(*self.label_shift.to_base(onehot, mu, log_var, z))
        else:
            kl = self.per_record_kl(mu, log_var, z)
        terms = self._divergence_terms(z, mu, log_var)
        terms.sample = {"recon": -log_px_z.mean(1), "kl": self.beta * kl,
                        **self.extra_sample_terms(mu, log_var, z)}
        return terms, mu, y, z[:, 0]

    def loss_terms(self, batch: Any) -> LossTerms:
        """Named sample-wise (``[n]``) and batch-wise (scalar) loss terms of a batch."""
        return self._terms(batch)[0]

    def batch_terms(self, batch: Any) -> LossTerms:
        """``loss_terms``' batch-wise and pairwise terms alone, under the same random draws:
        the encoder and the divergence, no decoder (the mechanisms' full-batch forward;
        ``lit_dpvae.privacy.terms.batch_terms_of``). A subclass that overrides
        ``loss_terms`` (or ``_terms``) gets its own ``loss_terms``' batch terms here."""
        if (type(self).loss_terms is not BaseVAE.loss_terms
                or type(self)._terms is not BaseVAE._terms):
            full = self.loss_terms(batch)
            return LossTerms(batch=full.batch, pairwise=full.pairwise)
        _, _, _, mu, log_var, z = self._codes(batch)
        return self._divergence_terms(z, mu, log_var)

    # ---- Lightning -----------------------------------------------------------------------------
    def _common_step(self, batch: Any, stage: str) -> Tensor:
        terms, mu, y, z = self._terms(batch)
        loss = terms.mean_loss()
        n = mu.shape[0]
        if n > 0:
            for name, value in terms.detached().items():
                self.log(f"{stage}/{name}", value, batch_size=n)
            self.log(f"{stage}/loss", loss.detach(), batch_size=n, prog_bar=stage == "train")
        if stage != "train":  # the epoch's latents, for latent_metrics (evaluation only)
            self._val_latents.append(tuple(None if t is None else t.detach().cpu()
                                           for t in (mu, y, z)))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._val_latents = []

    def on_test_epoch_start(self) -> None:
        self._val_latents = []

    def on_validation_epoch_end(self) -> None:
        self._log_latent_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_latent_metrics("test")

    def _log_latent_metrics(self, stage: str) -> None:
        """``<stage>/<metric>`` of ``latent_metrics`` over the epoch's records."""
        latents, self._val_latents = self._val_latents, []
        if not latents:
            return
        mu, z = torch.cat([t[0] for t in latents]), torch.cat([t[2] for t in latents])
        ys = [t[1] for t in latents]
        y = None if any(t is None for t in ys) else torch.cat(ys)  # type: ignore[arg-type]
        if mu.shape[0] == 0:
            return
        self.last_latent_metrics = self.latent_metrics(mu, y, z)
        for name, value in self.last_latent_metrics.items():
            self.log(f"{stage}/{name}", value, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """The optimizer of all parameters, from the model options (learning rate ``lr``):

        - ``optimizer="adam"`` (default): ``torch.optim.Adam`` with ε = ``adam_eps`` (1e-8);
        - ``"sgd"``: ``torch.optim.SGD`` with ``momentum`` (0);
        - ``"adam_bc"``: :class:`lit_dpvae.optim.DPAdamBC` (Adam with the DP noise variance
          removed from its second moment; floor ``adam_bc_floor``, ε ``adam_eps``). The DP
          strategy hands it the noise std before every step;
        - ``"auto"``: ``"adam_bc"`` when the Trainer's strategy is a lit_dpvae ``DPStrategy``
          (which sets the noise std; 0 for a non-private mechanism, where it is Adam), else
          ``"adam"`` (a plain Trainer, or a model used outside one).

        ``lr_schedule="cosine"`` multiplies the learning rate by ``(1 + cos(π·min(t, T)/T))/2``
        at optimizer step t, T = ``lr_schedule_steps`` (None: the Trainer's
        ``estimated_stepping_batches``), stepped every step. Privacy: the optimizer reads only
        the released update and public quantities, and the schedule is fixed in advance:
        post-processing, no privacy cost (docs/privacy.md §9).
        """
        import math

        from lit_dpvae.optim import DPAdamBC
        from lit_dpvae.strategy import DPStrategy

        name = self.optimizer_name
        if name == "auto":
            trainer = self._trainer
            dp = trainer is not None and isinstance(trainer.strategy, DPStrategy)
            name = "adam_bc" if dp else "adam"
        if name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                self.parameters(), lr=self.lr, eps=self.adam_eps
            )
        elif name == "adam_bc":
            opt = DPAdamBC(
                self.parameters(), lr=self.lr, floor=self.adam_bc_floor, eps=self.adam_eps
            )
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.lr_schedule is None:
            return opt
        steps = self.lr_schedule_steps
        if steps is None:
            steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                raise ValueError(
                    'lr_schedule="cosine" needs a finite number of steps: set lr_schedule_steps '
                    "or the Trainer's max_steps/max_epochs"
                )
        total = int(steps)
        decay = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    # ---- generation ----------------------------------------------------------------------------
    @classmethod
    def legacy_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Saved hyper-parameters with the keys an older version did not save filled in with
        what that version used (a pairing whose default changed overrides it), so loaders that
        build the model from them (``lit_dpvae.cli.load_model``) rebuild the trained model."""
        return dict(hparams)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Weights loaded from a DP checkpoint (``load_from_checkpoint``) remember the privacy
        they already spent, so a later ``fit`` continues that accountant instead of starting
        ε at 0 (``TermwiseDPStrategy(warm_start=...)``). A checkpoint of an older version whose
        model this one would build differently (``legacy_hparams``) is refused, naming the
        arguments that rebuild it: it never silently continues under another objective."""
        saved = checkpoint.get("hyper_parameters") or {}
        legacy = {k: v for k, v in type(self).legacy_hparams(saved).items() if k not in saved}
        differ = {k: v for k, v in legacy.items() if self.hparams.get(k) != v}
        if differ:
            args = ", ".join(f"{k}={v!r}" for k, v in differ.items())
            raise ValueError(
                f"this {type(self).__name__} checkpoint was saved by an older version, whose "
                f"model was {args} (its hyper-parameters lack them); load it with "
                f"{type(self).__name__}.load_from_checkpoint(path, {args})")
        super().on_load_checkpoint(checkpoint)
        # Called before the weights are loaded: the loaders fingerprint them afterwards
        # (DPStrategy.load_model_state_dict, the load_from_checkpoint wrap, load_model).
        mark_loaded(self, provenance_from_checkpoint(checkpoint), loaded=False)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | Sequence[int] | None = None, *,
               mean: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """n synthetic records ``[n, *data_shape]``: z ~ p(z), then x ~ p(x | z), a draw of the
        likelihood (binary pixels for Bernoulli, μ + s·ε for Gaussian, one category per column
        of a table); ``mean=True`` returns the likelihood's mean at z instead (smooth images,
        expected encodings). Labels ``[n]`` are required in conditional mode and refused
        otherwise. ``generator`` seeds the likelihood draw (z uses the global RNG).

        With ``sample_temperature`` τ (an attribute, also a constructor option; None or 1: off)
        the draws are at τ·ε, ε ~ N(0, I), mapped by a class-conditional prior to
        ``μ_y + s_y ⊙ τε``: τ < 1 trades diversity for typical samples. Needs the standard
        normal prior. Post-processing of the trained decoder: no privacy cost."""
        onehot = self._onehot(None if labels is None else torch.as_tensor(labels), n, "sample")
        z = self.prior.sample(n).to(self.device)
        tau = self.sample_temperature
        if tau is not None and float(tau) != 1.0:
            if not isinstance(self.prior, StandardNormal):
                raise ValueError(
                    f"sample_temperature needs a standard-normal prior, not "
                    f"{type(self.prior).__name__}"
                )
            if not float(tau) >= 0:
                raise ValueError(f"sample_temperature must be >= 0 (or None), got {tau}")
            z = float(tau) * z
        params = self.decode(self.prior_shift(z, onehot), onehot)
        if mean:
            return self.likelihood.mean(params)
        return self.likelihood.sample(params, generator=generator)

    def prior_shift(self, eps: Tensor, onehot: Tensor | None) -> Tensor:
        """Map prior draws ``eps ~ p(ε)`` to the class-conditional prior's ``μ_y + s_y ⊙ ε``
        (identity without ``label_prior``)."""
        if self.label_shift is None:
            return eps
        assert onehot is not None
        return self.label_shift.from_base(eps, onehot)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Likelihood mean at the posterior mean: ``[n, *data_shape] -> [n, *data_shape]``."""
        x = x.to(self.device)
        onehot = self._onehot(y, x.shape[0], "reconstruct")
        mu, _ = self.encode(x, onehot)
        return self.likelihood.mean(self.decode(mu, onehot))
