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
the launcher's folder through the environment variable ``LIT_DPVAE_RUN_DIR`` (read only by a
launched process: a value left in a shell does not send later fits into one folder).
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


def choose_run_folder(root: str | Path | None, subcommand: str,
                      ckpt_path: str | Path | None) -> tuple[Path, bool]:
    """``(folder, resumed)``: the folder a multi-process job already chose
    (``LIT_DPVAE_RUN_DIR``), the run folder of a resumed fit's checkpoint, or a new one. The
    choice is exported in ``LIT_DPVAE_RUN_DIR`` for the processes Lightning launches."""
    # Only a process Lightning launched for this command (LOCAL_RANK set) reads the folder its
    # launcher chose; a stale variable in a user's shell is ignored (every fit: its own folder).
    chosen = os.environ.get(RUN_DIR_ENV) if "LOCAL_RANK" in os.environ else None
    resumed = False
    if chosen:
        run = Path(chosen)
        run.mkdir(parents=True, exist_ok=True)
        resumed = (run / "checkpoints").is_dir()
    elif subcommand == "fit" and (found := run_folder_of(ckpt_path)) is not None:
        run, resumed = found, True
    else:
        run = new_run_folder(root or "runs", subcommand)
    # Absolute: a resume names the checkpoint however it likes (relative or not), and
    # ModelCheckpoint restores its last.ckpt bookkeeping only for the same dirpath.
    run = run.resolve()
    os.environ[RUN_DIR_ENV] = str(run)
    return run, resumed


def config_file(run: Path) -> Path:
    """``config.yaml``, or ``config-<k>.yaml`` when a resume already left one there."""
    path, k = run / "config.yaml", 2
    while path.exists():
        path, k = run / f"config-{k}.yaml", k + 1
    return path
