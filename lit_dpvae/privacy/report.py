"""The privacy report of a run ("model card"): one object for checkpoints, export, the CLI,
callbacks, loggers and experiments.

The state a checkpoint holds (secrets included, so a resume can continue) and what may be
released are kept apart: a :class:`PrivacyReport` never contains the noise generator, the
sampler seed or RNG states — only public settings (mechanism, clipping norms, budget shares,
σ per part), the public sampling (q, N, expected batch size), the accountant's
``(σ_eff, q, steps)`` history and what follows from them (ε, the ε curve). ``to_dict`` is JSON;
``write(folder)`` writes ``privacy_report.json``, ``privacy_report.md`` and
``epsilon_curve.png``; ``table()`` is the short console form.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_dpvae.privacy.accounting import PrivacyAccountant

#: Where checkpoints and export files keep the public report (next to the privacy state).
REPORT_KEY = "lit_dpvae_privacy_report"
REPORT_FILES = ("privacy_report.json", "privacy_report.md", "epsilon_curve.png")

#: What the (ε, δ) guarantee covers and what it does not (docs/privacy.md).
COVERS = (
    "The released weights, and anything computed from them alone (samples, synthetic data, "
    "exported models), against adding or removing one record of the training split "
    "(N records), under Poisson subsampling with rate q and the accountant named here.",
)
NOT_COVERED = (
    "Validation and test splits: their metrics, and any image of their records "
    "(ImageLogger reconstructions), are not private.",
    "Logged train/* terms (log_train_terms=True, the default) are exact statistics of "
    "private batches: treat the dashboard as private data.",
    "The secret noise and sampler seeds (in training checkpoints, never in exports): "
    "whoever knows them can remove the noise. Release exports, not training checkpoints.",
    "Public metadata the run is built on: N, the data shape, declared bounds, categories "
    "and class names, and any hyper-parameter chosen by looking at the private data.",
)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    return tuple(_library_versions().items())


def library_versions() -> dict[str, str]:
    """Versions of lit_dpvae and the libraries the guarantee's code paths run on (read once
    per process: ``importlib.metadata`` scans every installed distribution)."""
    return dict(_versions())


def _library_versions() -> dict[str, str]:
    """Versions of lit_dpvae and the libraries the guarantee's code paths run on."""
    from importlib import metadata

    import lit_dpvae

    out = {}
    for name in ("lit_dpvae", "torch", "lightning", "opacus"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # a checkout run without installing it
            out[name] = lit_dpvae.__version__ if name == "lit_dpvae" else "unknown"
    return out


def epsilon_curve(accountant: dict[str, Any], delta: float,
                  points: int = 40) -> list[tuple[int, float]]:
    """``[(steps, ε after them)]`` of an accountant state's history: at every multiple of a
    power-of-two stride (at most ``points`` of them; a longer run's marks include a shorter
    run's) and at the last step (``PrivacyAccountant.epsilon_curve``: RDP costs one evaluation
    per distinct (σ_eff, q), whatever the number of marks)."""
    history = [tuple(h) for h in accountant.get("history", [])]
    total = sum(int(s) for _, _, s in history)
    if total == 0:
        return []
    if accountant.get("accountant") != "rdp":  # PRV: one accountant per mark (~0.2 s each)
        points = min(points, 10)
    stride = 1
    while total // stride > points:
        stride *= 2
    marks = sorted({*range(stride, total + 1, stride), total})
    values = PrivacyAccountant.from_state_dict(
        {**accountant, "non_private_steps": 0}).epsilon_curve(delta, marks)
    return list(zip(marks, values))


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": JSON has no infinity
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "—"
    return str(value)


@dataclass
class PrivacyReport:
    """What a run spent and how.

    Attributes:
        mechanism: the registry name of the mechanism.
        epsilon: ε spent at ``delta`` (infinite after any non-private step).
        delta: the run's δ.
        sigma_eff: σ_eff of the last private step (the accountant's noise multiplier).
        steps: steps taken (private and non-private).
        target_epsilon: the budget's ε (None: no stop rule).
        accountant: the accountant's state (its ``(σ_eff, q, steps)`` history: public).
        sample_rate, num_records, expected_batch_size: the sampling of the last step (when
            known to the object that built the report).
        sensitivity: Δ_k per part (the clipping bounds: C/B-free sums, see docs/privacy.md).
        noise_multipliers: σ_k per part (noise std of part k is σ_k·Δ_k).
        noise_std: σ_k·Δ_k per part, and ``update/<part>`` the std per coordinate of the
            update (divided by B where the part is a sum over records).
        mechanism_settings: the mechanism's public settings (C, C_b, C_p, budget shares,
            backend, parameter subsets).
        planned_steps: the steps σ was calibrated for.
        epsilon_curve: ``[(steps, ε)]`` along the run.
        optimizer: the optimizer that ran (class and hyper-parameters of its first group).
        world_size: processes that shared each batch.
        versions: library versions.
        covers, not_covered: what the guarantee covers and what it does not.
        created: UTC time of the report.
    """

    mechanism: str
    epsilon: float
    delta: float
    sigma_eff: float
    steps: int
    target_epsilon: float | None = None
    accountant: dict[str, Any] = field(default_factory=dict)
    sample_rate: float | None = None
    num_records: int | None = None
    expected_batch_size: float | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    noise_multipliers: dict[str, float] = field(default_factory=dict)
    noise_std: dict[str, float] = field(default_factory=dict)
    mechanism_settings: dict[str, Any] = field(default_factory=dict)
    planned_steps: int | None = None
    epsilon_curve: list[tuple[int, float]] = field(default_factory=list)
    optimizer: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    versions: dict[str, str] = field(default_factory=library_versions)
    covers: tuple[str, ...] = COVERS
    not_covered: tuple[str, ...] = NOT_COVERED
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyReport:
        """The report of a checkpoint's privacy state (its public part: no seed is read)."""
        accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        return cls(mechanism=state["mechanism"], epsilon=float(state["epsilon"]),
                   delta=float(state["target_delta"]),
                   sigma_eff=float(state["noise_multiplier"]), steps=accountant.steps,
                   target_epsilon=state.get("target_epsilon"), accountant=state["accountant"])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyReport:
        """A report read back from ``to_dict`` (JSON: infinities were written as strings)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("epsilon", "delta", "sigma_eff"):
            if isinstance(values.get(key), str):
                values[key] = float(values[key])
        values["epsilon_curve"] = [(int(s), float(e)) for s, e in values.get("epsilon_curve", [])]
        for key in ("covers", "not_covered"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> PrivacyReport:
        """The report a checkpoint or an export file holds (rebuilt from the privacy state for
        checkpoints written before reports were embedded)."""
        from lit_dpvae.privacy.accounting import CHECKPOINT_KEY

        if isinstance(checkpoint.get(REPORT_KEY), dict):
            return cls.from_dict(checkpoint[REPORT_KEY])
        if isinstance(checkpoint.get(CHECKPOINT_KEY), dict):
            report = cls.from_state(checkpoint[CHECKPOINT_KEY])
            report.complete_curve()
            return report
        if isinstance(checkpoint.get("privacy"), dict) and "accountant" in checkpoint["privacy"]:
            return cls.from_dict(checkpoint["privacy"])  # an export file
        raise ValueError("this file holds no privacy report: it was not written by DPStrategy "
                         "(a training checkpoint) or by `lit-dpvae export`")

    def complete_curve(self, points: int = 40) -> PrivacyReport:
        """Fill ``epsilon_curve`` from the accountant's history (when private)."""
        if self.accountant and math.isfinite(self.epsilon):
            self.epsilon_curve = epsilon_curve(self.accountant, self.delta, points)
        return self

    # -- views ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The numbers a logger shows (``privacy/...``)."""
        return {"privacy/epsilon": self.epsilon, "privacy/delta": self.delta,
                "privacy/sigma_eff": float(self.sigma_eff), "privacy/steps": float(self.steps)}

    def settings(self) -> dict[str, Any]:
        """The DP settings of the run (for a logger's run config): no spend, no curve."""
        return json_safe({
            "mechanism": self.mechanism, **self.mechanism_settings,
            "sensitivity": self.sensitivity, "noise_multipliers": self.noise_multipliers,
            "sigma_eff": self.sigma_eff, "target_epsilon": self.target_epsilon,
            "target_delta": self.delta, "accountant": self.accountant.get("accountant"),
            "sample_rate": self.sample_rate, "num_records": self.num_records,
            "expected_batch_size": self.expected_batch_size,
            "planned_steps": self.planned_steps, "optimizer": self.optimizer,
            "world_size": self.world_size})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe (infinite ε as the string ``"inf"``)."""
        return json_safe(asdict(self))

    def public(self) -> dict[str, Any]:
        """The releasable report (``export``): every field; the accountant's history is what a
        later fit of these weights must continue."""
        return self.to_dict()

    def line(self) -> str:
        """One line for a console."""
        return (f"mechanism={self.mechanism} epsilon={self.epsilon:.4g} delta={self.delta:.4g} "
                f"sigma_eff={self.sigma_eff:.4g} steps={self.steps}")

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` rows of the table and the Markdown report."""
        settings = {k: v for k, v in self.mechanism_settings.items()}
        target = "none (no stop rule)" if self.target_epsilon is None else \
            _fmt(float(self.target_epsilon))
        return [
            ("epsilon spent", f"{_fmt(self.epsilon)} at delta {_fmt(self.delta)} "
                              f"(target {target})"),
            ("mechanism", self.mechanism),
            ("settings", _fmt(settings)),
            ("sensitivity per part", _fmt(self.sensitivity)),
            ("sigma per part", _fmt(self.noise_multipliers)),
            ("noise std per part", _fmt(self.noise_std)),
            ("sigma_eff (accountant)", _fmt(self.sigma_eff)),
            ("sampling", f"Poisson, q {_fmt(self.sample_rate)}, N {_fmt(self.num_records)}, "
                         f"expected batch {_fmt(self.expected_batch_size)}"),
            ("steps", f"{self.steps} (planned {_fmt(self.planned_steps)})"),
            ("accountant", str(self.accountant.get("accountant", "—"))),
            ("optimizer", _fmt(self.optimizer)),
            ("processes", str(self.world_size)),
            ("versions", _fmt(self.versions)),
        ]

    def table(self) -> str:
        """The short console table."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = ["privacy report", "-" * (width + 40)]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)

    def to_markdown(self, curve_png: str | None = None) -> str:
        """The model card's privacy section."""
        out = ["# Privacy report", "", "| field | value |", "|---|---|"]
        out += [f"| {k} | {v.replace('|', '/')} |" for k, v in self.rows()]
        out += ["", "## What the guarantee covers", ""] + [f"- {c}" for c in self.covers]
        out += ["", "## What it does not cover", ""] + [f"- {c}" for c in self.not_covered]
        if self.epsilon_curve:
            out += ["", "## Epsilon along the run", "", "| steps | epsilon |", "|---|---|"]
            out += [f"| {s} | {e:.4g} |" for s, e in self.epsilon_curve]
            if curve_png:
                out += ["", f"![epsilon vs steps]({curve_png})"]
        out += ["", f"Created {self.created}."]
        return "\n".join(out) + "\n"

    def curve_image(self) -> Any:
        """The ε-vs-steps plot as a PIL image (None without a curve)."""
        if not self.epsilon_curve:
            return None
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        steps, eps = zip(*self.epsilon_curve)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, eps, marker=".", label=f"spent ({self.accountant.get('accountant')})")
        if self.target_epsilon is not None:
            ax.axhline(float(self.target_epsilon), color="grey", ls="--", label="target")
        ax.set_xlabel("steps")
        ax.set_ylabel(f"epsilon at delta={self.delta:.3g}")
        ax.set_title(f"{self.mechanism}: epsilon {self.epsilon:.3g} after {self.steps} steps")
        ax.legend(loc="lower right")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    def write(self, folder: str | Path) -> dict[str, Path]:
        """``privacy_report.json``, ``privacy_report.md`` and ``epsilon_curve.png`` (when there
        is a curve) in ``folder``, each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        image = self.curve_image()
        if image is not None:
            paths["png"] = folder / REPORT_FILES[2]
            _atomic(paths["png"], lambda p: image.save(p, format="PNG"))
        paths["json"] = folder / REPORT_FILES[0]
        text = json.dumps(self.to_dict(), indent=2)
        _atomic(paths["json"], lambda p: Path(p).write_text(text))
        markdown = self.to_markdown(REPORT_FILES[2] if image is not None else None)
        paths["md"] = folder / REPORT_FILES[1]
        _atomic(paths["md"], lambda p: Path(p).write_text(markdown))
        return paths


def _atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
