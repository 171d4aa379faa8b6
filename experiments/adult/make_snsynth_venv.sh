#!/usr/bin/env bash
# Create the separate virtual environment in which the smartnoise-synth baselines (AIM, MST) run:
#     bash experiments/adult/make_snsynth_venv.sh [VENV_DIR]   # default experiments/adult/.venv-snsynth
#
# Why a separate venv: smartnoise-synth 1.0.8 declares opacus<0.15 (which needs an old torch,
# i.e. a multi-GB download) and pandas<3 (via smartnoise-sql), both incompatible with the
# library's venv. AIM and MST import none of torch/opacus/pac-synth: they need mbi 1.1 (the
# JAX-based private-pgm), smartnoise-sql (snsynth.base imports its parser), opendp,
# disjoint-set, networkx, Faker (imported by snsynth.transform), pandas, numpy and scipy.
# So: smartnoise-synth is installed with --no-deps, and every other package from the fully
# pinned snsynth-requirements.txt, also with --no-deps (nothing unpinned can come in; no torch).
# pip will report that opacus and pac-synth are missing: expected, they are only needed by the
# GAN and pac-synth synthesizers, which this benchmark does not use. The script ends by fitting
# AIM and MST on a tiny table to check that the venv works.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-snsynth}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$py" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version'
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade "pip<27"
"$venv/bin/python" -m pip install -q --no-deps -r "$here/snsynth-requirements.txt"
"$venv/bin/python" -m pip install -q --no-deps "smartnoise-synth==1.0.8"
"$venv/bin/python" - <<'PY'
import numpy as np, pandas as pd
import importlib.metadata as md
from snsynth.aim import AIMSynthesizer
from snsynth.mst import MSTSynthesizer
rng = np.random.default_rng(0)
df = pd.DataFrame({"a": rng.integers(0, 3, 500), "b": rng.integers(0, 2, 500)})
for cls, kw in ((MSTSynthesizer, {}), (AIMSynthesizer, {"rounds": 2})):
    s = cls(epsilon=1.0, delta=1e-5, **kw)
    s.fit(df, categorical_columns=["a", "b"])
    out = pd.DataFrame(s.sample(100), columns=["a", "b"])
    assert len(out) == 100 and out["a"].between(0, 2).all()
print("snsynth venv OK: smartnoise-synth", md.version("smartnoise-synth"), "mbi", md.version("mbi"))
PY
echo "created $venv"
