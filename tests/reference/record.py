"""Write ``mechanism_reference.json`` from the current code: ``python -m tests.reference.record``.
Run once, before a refactor that must keep every statistic bit-identical (issue 14)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tests.reference.scenarios import FIT_CASES, MECHANISM_CASES, fit_case, mechanism_case

OUT = Path(__file__).with_name("mechanism_reference.json")


def main() -> None:
    torch.set_num_threads(1)
    values = {"mechanisms": {n: mechanism_case(n) for n in MECHANISM_CASES}, "fits": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in FIT_CASES:
            values["fits"][name] = fit_case(name, tmp)
    OUT.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
