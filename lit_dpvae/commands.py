"""``lit-dpvae report`` (the privacy report of any checkpoint or export) and ``lit-dpvae plan``
(σ, steps, the ε curve and the noise per part of a config, before any training)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPORT_HELP = "Print the privacy report of a checkpoint or an exported model."
PLAN_HELP = "Plan a config's privacy budget (sigma, steps, epsilon per epoch) before training."



def report_main(argv: list[str]) -> Any:
    """``report``: the table (default), ``--json`` or ``--markdown`` of a file's report;
    ``--out DIR`` also writes the report files there."""
    import torch

    from lit_dpvae.cli_errors import OneLineParser
    from lit_dpvae.privacy.report import PrivacyReport

    parser = OneLineParser(prog="lit-dpvae report", description=REPORT_HELP)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by fit, or export")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the report as JSON")
    form.add_argument("--markdown", action="store_true", help="print the Markdown model card")
    parser.add_argument("--out", help="also write privacy_report.{json,md} and the ε plot here")
    args = parser.parse_args(argv)
    path = Path(args.ckpt)
    if not path.is_file():
        parser.error(f"--ckpt {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    try:
        report = PrivacyReport.from_checkpoint(checkpoint)
    except ValueError as error:
        parser.error(f"{path}: {error}")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.markdown:
        print(report.to_markdown(), end="")
    else:
        print(report.table())
    if args.out:
        written = report.write(args.out)
        print(f"wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    return report


def part_sizes(model: Any, mechanism: Any) -> dict[str, int]:
    """Trainable parameters each part of ``mechanism`` is computed and noised on."""
    params = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return {part: sum(k for n, k in params if mechanism.covers(part, n))
            for part in mechanism.parts}


def plan_rows(model: Any, datamodule: Any, trainer: Any, max_rows: int = 50) -> dict[str, Any]:
    """The plan of a fit: sampling, σ, per-part noise and an upper bound on each part's
    signal-to-noise ratio, ε after each epoch. Reads the data set's size only."""
    from lit_dpvae.refusals import planned_steps

    strategy = trainer.strategy
    if not hasattr(strategy, "run"):
        raise SystemExit("lit-dpvae plan: the config's strategy is not a lit_dpvae DPStrategy: "
                         "there is no privacy budget to plan")
    datamodule.setup("fit")
    sampler = datamodule.train_dataloader().batch_sampler
    q, n = float(sampler.sample_rate), int(sampler.num_samples)
    b, per_epoch = float(sampler.expected_batch_size), len(sampler)
    steps = planned_steps(trainer, per_epoch)
    mechanism = strategy.run.choose_mechanism(model, owner=strategy)
    budget = strategy.budget
    budget.check_sampling(n)
    mechanism.set_sampling(b)
    sigma = budget.noise_multiplier_for(q, steps)
    mechanism.noise_multiplier = sigma
    mechanism.check_noise_composition()
    out: dict[str, Any] = {
        "mechanism": mechanism.name, "settings": mechanism.settings(), "num_records": n,
        "sample_rate": q, "expected_batch_size": b, "steps_per_epoch": per_epoch,
        "planned_steps": steps, "sigma_eff": sigma, "target_epsilon": budget.target_epsilon,
        "delta": budget.target_delta, "accountant": budget.accountant.name, "parts": {},
        "epochs": [], "warnings": []}
    if not mechanism.private:
        out["warnings"].append("this mechanism is not private: no ε holds")
        return out
    sizes = part_sizes(model, mechanism)
    noise = mechanism.noise_std()
    for part, sigma_k in mechanism.noise_multipliers.items():
        summed = mechanism.summed_over_records[part]
        # signal ≤ (B if summed else 1)·Δ_k/2 per step, noise norm = σ_k·Δ_k·√P_k
        snr = (b if summed else 1.0) / (2.0 * sigma_k * math.sqrt(max(sizes[part], 1)))
        out["parts"][part] = {
            "sigma": sigma_k, "sensitivity": mechanism.sensitivity[part],
            "noise_std": noise[part], "update_noise_std": noise[part] / (b if summed else 1.0),
            "parameters": sizes[part], "snr_step_max": snr, "snr_run_max": snr * math.sqrt(steps)}
        if snr * math.sqrt(steps) < 1.0:
            out["warnings"].append(
                f"part {part!r}: even if every step's signal were as large as its clipping "
                f"allows, its noise (norm σ·Δ·√P over {sizes[part]} parameters) stays larger "
                f"over all {steps} steps (signal-to-noise ≤ {snr * math.sqrt(steps):.3g}): "
                "this part cannot move the model. Confine it to fewer parameters, give it a "
                "larger budget share, or drop its terms.")
    balance = mechanism.balance_warning(b)
    if balance:
        out["warnings"].append(balance)
    epochs = math.ceil(steps / per_epoch)
    marks = sorted({min(steps, e * per_epoch) for e in range(1, epochs + 1)})
    if len(marks) > max_rows:
        marks = sorted({marks[round(i * (len(marks) - 1) / (max_rows - 1))]
                        for i in range(max_rows)})
    for mark in marks:
        eps = budget.accountant.epsilon_after(budget.target_delta, sigma, q, mark)
        out["epochs"].append({"epoch": math.ceil(mark / per_epoch), "steps": mark,
                              "epsilon": eps})
    return out


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"plan: mechanism {plan['mechanism']} "
             f"({', '.join(f'{k} {v}' for k, v in plan['settings'].items())})",
             f"  N {plan['num_records']}, Poisson q {plan['sample_rate']:.4g}, expected batch "
             f"{plan['expected_batch_size']:.4g}, {plan['steps_per_epoch']} steps per epoch, "
             f"{plan['planned_steps']} planned steps",
             f"  sigma_eff {plan['sigma_eff']:.4g} ({plan['accountant']}) for "
             f"target epsilon {plan['target_epsilon']} at delta {plan['delta']:.3g}", "",
             f"  {'part':<10}{'sigma':>9}{'sens.':>10}{'noise std':>11}{'per coord.':>12}"
             f"{'params':>9}{'SNR<= step':>12}{'SNR<= run':>11}"]
    for part, row in plan["parts"].items():
        lines.append(f"  {part:<10}{row['sigma']:>9.4g}{row['sensitivity']:>10.4g}"
                     f"{row['noise_std']:>11.4g}{row['update_noise_std']:>12.4g}"
                     f"{row['parameters']:>9}{row['snr_step_max']:>12.3g}"
                     f"{row['snr_run_max']:>11.3g}")
    lines += ["", f"  {'epoch':>6}{'steps':>8}{'epsilon':>10}"]
    lines += [f"  {r['epoch']:>6}{r['steps']:>8}{r['epsilon']:>10.4g}" for r in plan["epochs"]]
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


@contextlib.contextmanager
def fit_config_files(argv: list[str]) -> Iterator[list[str]]:
    """``argv`` with every ``--config`` file that holds ``fit``'s own keys (``ckpt_path``: a run
    folder's saved config.yaml) replaced by a temporary copy without them (the plan is the
    same: a resume's budget is planned when it starts)."""
    import tempfile

    import yaml

    out, temporary = list(argv), []
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--config", "-c") and Path(argv[i + 1]).is_file():
            config = yaml.safe_load(Path(argv[i + 1]).read_text())
            if isinstance(config, dict) and "ckpt_path" in config:
                config.pop("ckpt_path")
                handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
                with handle:
                    yaml.safe_dump(config, handle)
                temporary.append(Path(handle.name))
                out[i + 1] = handle.name
    try:
        yield out
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)


def plan_main(argv: list[str]) -> dict[str, Any]:
    """``plan --config cfg.yaml [--key value …]``: the same arguments as ``fit``; nothing is
    trained, logged or written (``--json`` prints the plan as JSON)."""
    from lit_dpvae.cli import build_cli

    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lit-dpvae plan --config CONFIG [--json] [fit arguments …]\n\n"
              + PLAN_HELP + "\nReads the data set's size, not its records; trains, logs and "
              "writes nothing.")
        return {}
    with fit_config_files(argv) as argv:
        cli = build_cli(argv + ["--trainer.logger=false"], run=False)
    plan = plan_rows(cli.model, cli.datamodule, cli.trainer)
    print(json.dumps(plan, indent=2, default=str) if as_json else format_plan(plan))
    return plan
