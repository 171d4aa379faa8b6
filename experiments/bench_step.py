"""Step-time benchmark: every mechanism and backend as a ratio to the non-private step.

Usage (from the repository root)::

    python experiments/bench_step.py                      # both models, batch 256
    python experiments/bench_step.py --models mlp --repeats 40 --json out.json
    python experiments/bench_step.py --profile TermwiseDPSGD-ghost --models mlp
    python experiments/bench_step.py --quick              # tiny sizes (smoke test)
    python experiments/bench_step.py --scaling            # ms/step vs B ∈ {64, 256, 1024, 4096}

A *step* of a mechanism is ``aggregate(module, batch)`` + ``privatize(stats, B, generator)`` +
writing the update into ``p.grad`` + ``torch.optim.Adam.step()``. The reference ``non-private``
step is ``terms.mean_loss().backward(); opt.step()``. ``opacus-dpsgd-hooks`` / ``-ghost`` are
Opacus' own DP-SGD (``GradSampleModule`` + ``DPOptimizer``, and ghost clipping via
``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
``DPTensorFastGradientClipping``) on the sample-wise terms only: a reference point, not a
mechanism of this project (it ignores the batch-wise MMD term).

Both reference models are defined here (self-contained, independent of ``lit_dpvae.models``):
an MLP VAE 784-400-20 and a small conv VAE on 1×28×28, Bernoulli-logits likelihood, per-record
``recon`` and analytic ``kl``, and a batch-wise IMQ-kernel MMD² (U-statistic, C = 2·d_z) between
the batch's z and 256 N(0, I) prior samples (λ = 1).

Timing: every configuration gets its own copy of the model (same initial weights) and optimizer;
after warm-up steps the configurations are timed in interleaved blocks (so load drift on a shared
machine hits all of them alike) and the median step time is reported.

Peak memory: one step at ``--memory-batch-size`` (4096) in a fresh subprocess per measurement.
The peak resident set is read from ``VmHWM`` in ``/proc/self/status`` (the peak RSS of the
process' own address space). ``getrusage(RUSAGE_SELF).ru_maxrss`` is only a fallback where /proc
is missing: on Linux a child started by ``subprocess`` inherits its parent's ``ru_maxrss`` across
``exec``, so it over-reports whenever the benchmark process itself is larger than the child.

JSON (``--json PATH``)::

    {"mlp": {"non-private": 1.0, "NonPrivate": r, "NaiveDPSGD-ghost": r, ...},   # ratios
     "conv": {...},
     "peak_memory_mb": {"mlp": {"TermwiseDPSGD-ghost": mb, "non-private": mb,
                                "baseline": mb}, ...},   # baseline: RSS before the step
     "step_ms": {"mlp": {"non-private": ms, ...}, ...},
     "settings": {...}}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_dpvae.divergences import MMD  # noqa: E402
from lit_dpvae.privacy import LossTerms, PairwiseTerm  # noqa: E402
from lit_dpvae.privacy.mechanisms import (  # noqa: E402
    build_mechanism,
    mechanism_class,
    mechanism_names,
)
from lit_dpvae.privacy.terms import register_batch_terms  # noqa: E402

MODELS = ("mlp", "conv")
BACKENDS = ("ghost", "hooks", "functorch")
REFERENCE = "non-private"
TERMWISE_TARGETS = {"mlp": 1.4, "conv": 1.6}  # × the non-private step (issue 18)
PAIRWISE_TARGETS = {"mlp": 1.3, "conv": 2.0}  # × the term-wise step (issue 18)
SCALING_BATCHES = (64, 256, 1024, 4096)
MEMORY_CONFIGS = ("TermwiseDPSGD-ghost", REFERENCE)
LR = 1e-3


# --------------------------------------------------------------------------------------------
# Reference models
# --------------------------------------------------------------------------------------------
def imq_mmd2(z: Tensor, prior: Tensor, scale: float) -> Tensor:
    """Unbiased MMD² (U-statistic) with the IMQ kernel ``k(a, b) = C / (C + ‖a − b‖²)``."""

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.T
        return scale / (scale + sq.clamp_min(0.0))

    def within(a: Tensor) -> Tensor:
        n = a.shape[0]
        if n < 2:
            return a.new_zeros(())
        k = kernel(a, a)
        off_diagonal = 1.0 - torch.eye(n, dtype=a.dtype, device=a.device)
        return (k * off_diagonal).sum() / (n * (n - 1))

    cross = kernel(z, prior).mean() if z.shape[0] else z.new_zeros(())
    return within(z) + within(prior) - 2.0 * cross


class BenchVAE(nn.Module):
    """Shared VAE logic; subclasses define ``encoder`` (→ 2·d_z) and ``decoder`` (→ logits)."""

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, latent_dim: int = 20, n_prior: int = 256, mmd_weight: float = 1.0):
        super().__init__()
        self.latent_dim = latent_dim
        self.n_prior = n_prior
        self.mmd_weight = mmd_weight
        self.kernel_scale = 2.0 * latent_dim
        # The same kernel as ``imq_mmd2`` (c·s = 2·d_z), for PairwiseDPSGD's pair gradients.
        self.pair_kernel = MMD("imq", bandwidths=(1.0,), n_prior_samples=n_prior)

    def loss_terms(self, batch: Tensor, batch_terms: bool = True) -> LossTerms:
        x = batch
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
        terms = self._divergence(z) if batch_terms else LossTerms()
        terms.sample = {"recon": recon, "kl": kl}
        return terms

    def batch_terms(self, batch: Tensor) -> LossTerms:
        """``loss_terms``' batch-wise and pairwise terms under the same draws, without the
        decoder (the mechanisms' full-batch forward; as ``lit_dpvae.models.BaseVAE``)."""
        mu, log_var = self.encoder(batch).chunk(2, dim=-1)
        return self._divergence(mu + torch.randn_like(mu) * torch.exp(0.5 * log_var))

    def _divergence(self, z: Tensor) -> LossTerms:
        prior = torch.randn(self.n_prior, self.latent_dim, dtype=z.dtype, device=z.device)
        return LossTerms(batch={"mmd": self.mmd_weight * imq_mmd2(z, prior, self.kernel_scale)},
                         pairwise={"mmd": PairwiseTerm(z, prior, self.pair_kernel,
                                                       self.mmd_weight)})


@register_batch_terms  # batch_terms is loss_terms' _divergence, by construction
class MLPVAE(BenchVAE):
    """784-400-20: Linear 784→400, ReLU, Linear 400→40; decoder 20→400→784."""

    def __init__(self, hidden: int = 400, latent_dim: int = 20, **kwargs) -> None:
        super().__init__(latent_dim=latent_dim, **kwargs)
        self.encoder = nn.Sequential(
            nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 784)
        )

    @staticmethod
    def make_batch(n: int, generator: torch.Generator) -> Tensor:
        return torch.rand(n, 784, generator=generator)


@register_batch_terms  # batch_terms is loss_terms' _divergence, by construction
class ConvVAE(BenchVAE):
    """1×28×28: two stride-2 convs (32, 64) → Linear 2·d_z; decoder Linear → 64·7·7, two
    (nearest Upsample×2 + Conv2d k3) blocks. No BatchNorm, no ConvTranspose2d."""

    def __init__(self, latent_dim: int = 20, **kwargs) -> None:
        super().__init__(latent_dim=latent_dim, **kwargs)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 64 * 7 * 7),
            nn.Unflatten(1, (64, 7, 7)),  # torch's own: the model stays trusted
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(32, 1, 3, padding=1),
        )

    @staticmethod
    def make_batch(n: int, generator: torch.Generator) -> Tensor:
        return torch.rand(n, 1, 28, 28, generator=generator)


MODEL_CLASSES: dict[str, type[BenchVAE]] = {"mlp": MLPVAE, "conv": ConvVAE}


def build_model(name: str, seed: int = 0) -> BenchVAE:
    torch.manual_seed(seed)
    return MODEL_CLASSES[name]()


def make_data(name: str, n: int, seed: int = 0) -> Tensor:
    return MODEL_CLASSES[name].make_batch(n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
#: Settings of a mechanism in the benchmark beyond its defaults (the rest: C = 1, σ = 1).
BENCH_SETTINGS: dict[str, dict] = {"naive": {"max_batch_size": 512}}
#: Backends benchmarked per registered mechanism (default: ghost only).
BENCH_BACKENDS: dict[str, tuple[str, ...]] = {"naive": BACKENDS, "termwise": BACKENDS}


def _registered() -> dict[str, str]:
    """Configuration prefix (class name) -> registry name, for every registered mechanism."""
    names = sorted((n for n in mechanism_names() if n != "auto"),  # auto: a placeholder
                   key=lambda n: mechanism_class(n).private)  # stable
    return {mechanism_class(name).__name__: name for name in names}


def config_names() -> list[str]:
    """The non-private reference, every registered mechanism (with its backends; a new one is
    benchmarked on ``ghost``), and Opacus."""
    names = [REFERENCE]
    for prefix, name in _registered().items():
        if not mechanism_class(name).private:
            names.append(prefix)
            continue
        names += [f"{prefix}-{b}" for b in BENCH_BACKENDS.get(name, ("ghost",))]
    names += ["opacus-dpsgd-hooks", "opacus-dpsgd-ghost"]
    return names


def make_mechanism(name: str):
    prefix, _, backend = name.partition("-")
    registered = _registered()
    if prefix not in registered or name not in config_names():
        raise ValueError(f"unknown configuration {name!r}; choose from {config_names()}")
    mech = registered[prefix]
    settings = dict(BENCH_SETTINGS.get(mech, {}))
    if backend:
        settings["backend"] = backend
    mechanism = build_mechanism(mech, **settings)
    if mechanism.private:
        mechanism.noise_multiplier = 1.0
    return mechanism


def make_step(name: str, model: BenchVAE, batch: Tensor, expected_batch_size: int) -> Callable:
    """A zero-argument callable doing one optimizer step of configuration ``name`` on ``model``.

    The model is modified (Opacus wraps it with hooks): give every configuration its own copy.
    """
    generator = torch.Generator().manual_seed(1234)

    if name == REFERENCE:
        opt = torch.optim.Adam(model.parameters(), lr=LR)

        def reference_step() -> None:
            opt.zero_grad(set_to_none=True)
            model.loss_terms(batch).mean_loss().backward()
            opt.step()

        return reference_step

    if name.startswith("opacus-dpsgd-"):
        return _opacus_step(name.rsplit("-", 1)[1], model, batch, expected_batch_size, generator)

    mechanism = make_mechanism(name)
    mechanism.set_sampling(float(expected_batch_size))  # as the strategy does (C_b = C/(2B))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def mechanism_step() -> None:
        stats = mechanism.aggregate(model, batch)
        update = mechanism.privatize(stats, expected_batch_size=expected_batch_size,
                                     generator=generator)
        for pname, p in params.items():
            p.grad = update[pname]
        opt.step()

    return mechanism_step


def _opacus_step(
    mode: str, model: BenchVAE, batch: Tensor, expected_batch_size: int, generator
) -> Callable:
    """Opacus' plain DP-SGD on the sample-wise terms only (what PrivacyEngine.make_private sets
    up, minus the data loader): per-record mean loss, σ = 1, C = 1."""
    import warnings

    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    kwargs = dict(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    if mode == "hooks":
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=LR), **kwargs)

        def opacus_hooks_step() -> None:
            opt.zero_grad(set_to_none=True)
            model.loss_terms(batch, batch_terms=False).per_record().mean().backward()
            opt.step()

        return opacus_hooks_step
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0,
            use_ghost_clipping=True,
        )
        opt = DPOptimizerFastGradientClipping(torch.optim.Adam(gsm.parameters(), lr=LR), **kwargs)

        def opacus_ghost_step() -> None:
            opt.zero_grad(set_to_none=True)
            per_record = model.loss_terms(batch, batch_terms=False).per_record()
            DPTensorFastGradientClipping(gsm, opt, per_record, "mean").backward()
            opt.step()

        return opacus_ghost_step
    raise ValueError(f"unknown Opacus mode {mode!r}")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_configs(
    model_name: str,
    names: list[str],
    batch_size: int,
    repeats: int,
    rounds: int,
    warmup: int,
    clock: str = "wall",
) -> dict[str, float]:
    """Median step time in ms per configuration, interleaved over ``rounds`` blocks.

    ``clock="cpu"`` times with ``time.process_time`` (CPU seconds of this process): robust to
    other processes taking the cores, but it counts OpenMP spin-waiting with several threads,
    so use it with ``--threads 1``.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    base = build_model(model_name)
    batch = make_data(model_name, batch_size)
    steps = {}
    for name in names:
        torch.manual_seed(0)
        steps[name] = make_step(name, copy.deepcopy(base), batch, batch_size)
        for _ in range(warmup):
            steps[name]()
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (r < repeats % rounds) for r in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in per_round:
        for name in names:
            for _ in range(k):
                t0 = timer()
                steps[name]()
                times[name].append(timer() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------
# Peak memory (fresh subprocess per measurement)
# --------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _reset_peak_rss() -> bool:
    """Reset this process' VmHWM to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(jobs: list[str], batch_size: int) -> list[dict]:
    """Run one step per ``model:config`` job; print ``{"job", "peak_mb", "baseline_mb"}`` each.

    Several jobs in one process need the peak RSS reset in between (``/proc/self/clear_refs``);
    the full benchmark runs one job per fresh process.
    """
    results = []
    for i, job in enumerate(jobs):
        model_name, name = job.split(":", 1)
        model = build_model(model_name)
        batch = make_data(model_name, batch_size)
        step = make_step(name, model, batch, batch_size)
        if i > 0 and not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS: run one job per process")
        baseline = _peak_rss_mb()
        step()
        results.append({"job": job, "peak_mb": _peak_rss_mb(), "baseline_mb": baseline})
        print(json.dumps(results[-1]), flush=True)
        del model, batch, step
    return results


def _run_memory_child(jobs: list[str], batch_size: int, threads: int) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--batch-size", str(batch_size),
           "--threads", str(threads), "--memory-child", *jobs]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"memory measurement {jobs} failed:\n{proc.stdout}{proc.stderr}")
    found = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if [r["job"] for r in found] != jobs:
        raise RuntimeError(f"memory measurement {jobs} printed {found}:\n{proc.stdout}")
    return found


def measure_memory(
    model_names: list[str], batch_size: int, threads: int, one_process: bool = False,
    configs: tuple[str, ...] = MEMORY_CONFIGS,
) -> dict[str, dict[str, float]]:
    """Peak RSS (MB) of one step per (model, configuration), each in a fresh subprocess.

    ``one_process`` (quick mode) runs all jobs in a single subprocess, resetting the peak in
    between, because starting Python + torch + Opacus costs seconds per process.
    """
    jobs = [f"{m}:{c}" for m in model_names for c in configs]
    if REFERENCE not in configs:
        jobs += [f"{m}:{REFERENCE}" for m in model_names]  # the baseline comes with it
    if one_process and _reset_peak_rss():
        found = _run_memory_child(jobs, batch_size, threads)
    else:
        found = [r for job in jobs for r in _run_memory_child([job], batch_size, threads)]
    out: dict[str, dict[str, float]] = {}
    for r in found:
        m, c = r["job"].split(":", 1)
        out.setdefault(m, {})[c] = round(r["peak_mb"], 1)
        if c == REFERENCE:
            out[m]["baseline"] = round(r["baseline_mb"], 1)
    return out


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------
def profile_config(model_name: str, name: str, batch_size: int, steps: int = 10) -> None:
    """torch.profiler operator table and cProfile Python-level table for one configuration."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    step = make_step(name, build_model(model_name), make_data(model_name, batch_size),
                     batch_size)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"== torch.profiler: {model_name} / {name}, {steps} steps, batch {batch_size} ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    print(f"== cProfile (cumulative): {model_name} / {name} ==")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(30)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def format_table(model_name: str, ms: dict[str, float], batch_size: int) -> str:
    ref = ms[REFERENCE]
    width = max(len(n) for n in ms)
    lines = [
        f"{model_name} VAE, batch {batch_size}",
        f"{'configuration':<{width}}  {'ms/step':>9}  {'ratio':>7}",
        "-" * (width + 20),
    ]
    for name, value in ms.items():
        lines.append(f"{name:<{width}}  {value:9.2f}  {value / ref:6.2f}x")
    target = TERMWISE_TARGETS.get(model_name)
    if target is not None:
        for b in BACKENDS:
            key = f"TermwiseDPSGD-{b}"
            if key in ms:
                ratio = ms[key] / ref
                verdict = "met" if ratio <= target else "NOT met"
                lines.append(f"target {key} <= {target:g}x non-private: {verdict} ({ratio:.2f}x)")
    pair_target = PAIRWISE_TARGETS.get(model_name)
    if "PairwiseDPSGD-ghost" in ms and "TermwiseDPSGD-ghost" in ms and pair_target:
        ratio = ms["PairwiseDPSGD-ghost"] / ms["TermwiseDPSGD-ghost"]
        verdict = "met" if ratio <= pair_target else "NOT met"
        lines.append(f"target PairwiseDPSGD-ghost <= {pair_target:g}x TermwiseDPSGD-ghost: "
                     f"{verdict} ({ratio:.2f}x)")
    return "\n".join(lines)


def scaling_table(model_name: str, names: list[str], batches: list[int], args,
                  max_rows: dict[str, int]) -> dict[int, dict[str, float]]:
    """ms/step of every configuration at each batch size (a configuration is skipped above its
    ``max_rows`` batch size: the pairwise mechanism materialises per-record Jacobian rows of
    conv layers, ``[B, d, P]``), printed with the ratio to the non-private step at the same B."""
    table: dict[int, dict[str, float]] = {}
    for b in batches:
        run = [n for n in names if b <= max_rows.get(n, b)]
        repeats = max(2, args.repeats * 256 // max(b, 256))
        table[b] = time_configs(model_name, run, b, repeats, min(args.rounds, repeats),
                                args.warmup, args.clock)
    width = max(len(n) for n in names)
    print(f"{model_name} VAE: ms/step (ratio to non-private at the same batch size)")
    print(f"{'configuration':<{width}}" + "".join(f"  {f'B={b}':>17}" for b in batches))
    for name in names:
        cells = []
        for b in batches:
            ms = table[b].get(name)
            cells.append(f"  {'—':>17}" if ms is None else
                         f"  {ms:9.1f} ({ms / table[b][REFERENCE]:4.2f}x)")
        print(f"{name:<{width}}" + "".join(cells))
    print(flush=True)
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--rounds", type=int, default=4, help="interleaved blocks the repeats use")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default="mlp,conv", help="comma-separated: mlp,conv")
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of configurations (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process_time (robust to a loaded machine, "
                   "use with --threads 1: with 2 threads on busy cores OpenMP spin-waits)")
    p.add_argument("--memory-batch-size", type=int, default=4096)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", action="store_true",
                   help="only the peak-memory subprocesses; with --json, replace its "
                        "peak_memory_mb and keep the timings already there")
    p.add_argument("--memory-configs", default=",".join(MEMORY_CONFIGS),
                   help="comma-separated configurations whose peak memory is measured")
    p.add_argument("--json", type=Path, default=None, help="write ratios and peak memory here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--profile", default=None, metavar="CONFIG",
                   help="profile one configuration (e.g. TermwiseDPSGD-ghost) instead")
    p.add_argument("--scaling", action="store_true",
                   help="ms/step vs batch size (--scaling-batches) instead of one batch size")
    p.add_argument("--scaling-batches", default=",".join(map(str, SCALING_BATCHES)))
    p.add_argument("--memory-child", nargs="+", metavar="MODEL:CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size = min(args.batch_size, 8)
        args.repeats, args.rounds, args.warmup = 1, 1, 0
        args.memory_batch_size = min(args.memory_batch_size, 16)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return {"memory": _memory_child(args.memory_child, args.batch_size)}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    names = config_names()
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        names = [REFERENCE] + [c for c in wanted if c != REFERENCE]
        for c in names:
            if c not in config_names():
                raise SystemExit(f"unknown configuration {c!r}; choose from {config_names()}")
    if args.profile:
        for m in models:
            profile_config(m, args.profile, args.batch_size)
        return {}

    if args.scaling:
        batches = [int(b) for b in args.scaling_batches.split(",") if b.strip()]
        if args.quick:
            batches = [4, 8]
        out = {}
        for m in models:
            limit = {"PairwiseDPSGD-ghost": 1024} if m == "conv" else {}
            out[m] = scaling_table(m, names, batches, args, limit)
        if args.json:
            old = json.loads(args.json.read_text()) if args.json.exists() else {}
            old["scaling_ms"] = {m: {str(b): {k: round(v, 3) for k, v in row.items()}
                                     for b, row in t.items()} for m, t in out.items()}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(old, indent=2) + "\n")
        return {"scaling_ms": out}
    if args.memory_only and args.no_memory:
        raise SystemExit("--memory-only and --no-memory contradict each other: choose one")
    if args.memory_only:
        memory = measure_memory(models, args.memory_batch_size, args.threads,
                                one_process=args.quick,
                                configs=tuple(c.strip() for c in args.memory_configs.split(",")
                                              if c.strip()))
        for m, entry in memory.items():
            print(f"  {m}: " + ", ".join(f"{k} {v:.0f}" for k, v in entry.items()))
        if args.json:
            old = json.loads(args.json.read_text()) if args.json.exists() else {}
            peaks = old.setdefault("peak_memory_mb", {})
            for m, entry in memory.items():  # per configuration: others measured before stay
                peaks[m] = {**peaks.get(m, {}), **entry}
            old.setdefault("settings", {}).update(memory_batch_size=args.memory_batch_size,
                                                  memory_threads=args.threads,
                                                  torch=torch.__version__)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(old, indent=2) + "\n")
        return {"peak_memory_mb": memory}

    result: dict = {}
    step_ms: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, float]] = {}
    for m in models:
        step_ms[m] = time_configs(m, names, args.batch_size, args.repeats, args.rounds,
                                  args.warmup, args.clock)
        print(format_table(m, step_ms[m], args.batch_size), end="\n\n", flush=True)
    if not args.no_memory:
        memory = measure_memory(models, args.memory_batch_size, args.threads,
                                one_process=args.quick,
                                configs=tuple(c.strip() for c in args.memory_configs.split(",")
                                              if c.strip()))
    for m in models:
        ref = step_ms[m][REFERENCE]
        result[m] = {name: round(v / ref, 4) for name, v in step_ms[m].items()}
    if memory:
        result["peak_memory_mb"] = memory
        print(f"peak RSS of one step at batch {args.memory_batch_size} (MB, fresh process each):")
        for m, entry in memory.items():
            print(f"  {m}: " + ", ".join(f"{k} {v:.0f}" for k, v in entry.items()))
    result["step_ms"] = {m: {k: round(v, 3) for k, v in d.items()} for m, d in step_ms.items()}
    result["settings"] = {
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "clock": args.clock,
        "memory_batch_size": args.memory_batch_size,
        "torch": torch.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    bad = [(m, k) for m in models for k, v in result[m].items() if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"non-finite ratios: {bad}")
    return result


if __name__ == "__main__":
    main()
