"""Run folders of the command line: every ``fit``/``validate``/``test`` gets its own folder

    <root>/<subcommand>-<YYYYmmdd-HHMMSS>[-k]/
        config.yaml                 the resolved config (record values scrubbed)
        checkpoints/last.ckpt       and the ModelCheckpoint's best/epoch files
        privacy_report.{json,md}    epsilon_curve.png (fit, DP strategies)
        images/                     ImageLogger's grids
        run.json                    the folder's W&B run id (a resume continues that run)

``<root>`` is ``trainer.default_root_dir`` (default ``runs``). A ``fit`` that resumes from a
checkpoint inside a run folder (``--ckpt_path <run>/checkpoints/last.ckpt``) continues in that
folder and in its W&B run. The processes Lightning launches for one multi-process command share
the launcher's folder through ``LIT_DPVAE_RUN_DIR`` and ``LIT_DPVAE_RUN_OWNER`` (the launcher's
process id: only its direct children read the folder, so a value left in a shell or from an
earlier command does not send later fits into one folder).
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "LIT_DPVAE_RUN_DIR"
RUN_FILE = "run.json"


def run_folder_of(ckpt_path: str | Path | None) -> Path | None:
    """The run folder a checkpoint lives in (``<run>/checkpoints/x.ckpt`` with ``<run>/run.json``),
    else None."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / RUN_FILE).is_file() else None


def read_run_file(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def new_run_folder(root: str | Path, subcommand: str) -> Path:
    """A new, empty ``<root>/<subcommand>-<time>[-k]`` with its ``run.json`` (a fresh W&B id)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        run = root / (f"{subcommand}-{stamp}" + ("" if k == 1 else f"-{k}"))
        try:
            run.mkdir()
        except FileExistsError:
            continue
        info = {"subcommand": subcommand, "created": stamp, "wandb_id": secrets.token_hex(4)}
        (run / RUN_FILE).write_text(json.dumps(info, indent=2))
        return run
    raise RuntimeError(f"could not create a new run folder under {root}")


RUN_OWNER_ENV = "LIT_DPVAE_RUN_OWNER"


def choose_run_folder(root: str | Path | None, subcommand: str,
                      ckpt_path: str | Path | None) -> tuple[Path, str]:
    """``(folder, how)``, ``how`` one of ``"inherited"`` (the folder the process that launched
    this one chose: ``LIT_DPVAE_RUN_DIR``, honoured only in a direct child of the process that
    set it, so a value left in a shell or in this process's environment is ignored),
    ``"resumed"`` (the run folder of a resumed fit's checkpoint) or ``"new"``. The choice is
    exported for the processes Lightning launches."""
    chosen = os.environ.get(RUN_DIR_ENV)
    owner = os.environ.get(RUN_OWNER_ENV)
    if chosen and owner == str(os.getppid()):
        run, how = Path(chosen), "inherited"
        run.mkdir(parents=True, exist_ok=True)
    elif subcommand == "fit" and (found := run_folder_of(ckpt_path)) is not None:
        run, how = found, "resumed"
    else:
        run, how = new_run_folder(root or "runs", subcommand), "new"
    # Absolute: a resume names the checkpoint however it likes (relative or not), and
    # ModelCheckpoint restores its last.ckpt bookkeeping only for the same dirpath.
    run = run.resolve()
    if how != "inherited":
        os.environ[RUN_DIR_ENV], os.environ[RUN_OWNER_ENV] = str(run), str(os.getpid())
    return run, how


def config_file(run: Path) -> Path:
    """``config.yaml``, or ``config-<k>.yaml`` when a resume already left one there."""
    path, k = run / "config.yaml", 2
    while path.exists():
        path, k = run / f"config-{k}.yaml", k + 1
    return path
