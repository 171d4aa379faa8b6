#!/bin/bash
# The prepared device check: the CUDA path of the private step, and (optionally) the issue-6
# downstream experiment that a CPU cannot afford. One call of the `device` tool, ≈ 3 min for
# part 1, ≈ 6–8 min more for part 2; everything it prints also lands in $OUT.
#
# The device image has torch, lightning, torchmetrics, scikit-learn, matplotlib, but no opacus:
# carry it as a wheel, and carry Fashion-MNIST for part 2. Once, here, in the repo root:
#   printf '/.whl/\n/.fmnist/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl opacus==1.6.0
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/
# then run (device tool): command "bash experiments/gpu_check.sh [downstream]",
# carry [".whl", ".fmnist"], timeout_s 600.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

# Part 1: correctness on the GPU (per-record oracle, TF32 kept out of the private statistics,
# sensitivity on neighbouring batches under TF32, a private Trainer.fit), and the precision
# switch itself.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, opacus; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'opacus', opacus.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/privacy/test_precision.py 2>&1 | tee "$OUT/test_cuda.log"

# Part 2 (argument "downstream"): the conv label-prior VAE at ε = 10 on the validation split
# (selection only; see experiments/results/fmnist_downstream_tuning.md rounds 4-5), its
# non-private ceiling first.
if [ "${1:-}" = "downstream" ] && [ -d .fmnist ]; then
    common=(--grid fmnist_downstream_lp2 --out /tmp/gpu_grid --threads 8 --set 'eval_split="val"' 'seeds=[0]'
            'arch="conv"' 'channels=[32,64]' 'accelerator="gpu"' 'data_dir=".fmnist"')
    timeout 300 python3 experiments/run_grid.py "${common[@]}" 'mechanisms=["nonprivate"]' \
        --name np_conv32 2>&1 | grep -E "done in|error|Error" | tee "$OUT/downstream.log"
    timeout 400 python3 experiments/run_grid.py "${common[@]}" --name dp_conv32_eps10 2>&1 \
        | grep -E "done in|error|Error" | tee -a "$OUT/downstream.log"
    cp /tmp/gpu_grid/*.md "$OUT/" 2>/dev/null
fi
