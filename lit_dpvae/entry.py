"""The ``lit-dpvae`` command (``python -m lit_dpvae``). This module imports nothing heavy:
``lit-dpvae`` and ``lit-dpvae --help`` answer without loading torch or Lightning; every
subcommand is dispatched to ``lit_dpvae.cli.main``."""

from __future__ import annotations

import sys

#: LightningCLI's subcommands (their options: ``lit-dpvae fit --help``).
TRAINING = {
    "fit": "Train under DP into a new run folder (config, last.ckpt, privacy report).",
    "validate": "One evaluation epoch over the validation split.",
    "test": "One evaluation epoch over the test split.",
}
#: Subcommands of our own: ``lit_dpvae.cli.main`` dispatches them.
SUBCOMMANDS = {
    "plan": "Plan a config's privacy budget (sigma, steps, epsilon per epoch) before training.",
    "report": "Print the privacy report of a checkpoint or an exported model.",
    "sample": "Write a synthetic dataset from a checkpoint.",
    "export": "Write a releasable model file (no secrets).",
    "audit": "Canary-based one-step white-box audit: a lower bound on epsilon.",
}


def overview() -> str:
    rows = [f"  {name:<10}{text}" for name, text in {**TRAINING, **SUBCOMMANDS}.items()]
    return "\n".join([
        "usage: lit-dpvae SUBCOMMAND [options]     (also: python -m lit_dpvae …)", "",
        "Differentially private VAEs for PyTorch Lightning.", "", "subcommands:", *rows, "",
        "`lit-dpvae SUBCOMMAND --help` lists a subcommand's options. Example:",
        "  lit-dpvae plan --config experiments/configs/quickstart.yaml",
        "  lit-dpvae fit --config experiments/configs/quickstart.yaml",
        "  lit-dpvae report --ckpt runs/quickstart/fit-<time>/checkpoints/last.ckpt"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return
    if not argv[0].startswith("-") and argv[0] not in {**TRAINING, **SUBCOMMANDS}:
        unknown_subcommand(argv[0])
    from lit_dpvae.cli import main as dispatch

    dispatch(argv)


def unknown_subcommand(name: str) -> None:
    """``error:`` with the closest subcommand; exit status 2."""
    import difflib

    known = [*TRAINING, *SUBCOMMANDS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if name == "predict":
        hint = " (a VAE has nothing to predict: `lit-dpvae sample` writes synthetic records)"
    sys.stderr.write(f"error: '{name}' is not a lit-dpvae subcommand{hint}\n"
                     f"tip: the subcommands are {', '.join(known)} (`lit-dpvae --help`)\n")
    raise SystemExit(2)
