#!/usr/bin/env bash
# Multi-node, multi-GPU launch with torchrun (run the same command on every node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=4 docker/torchrun.sh experiments/configs/fashion_mnist/info_eps10.yaml
# Lightning reads torchrun's environment (TorchElasticEnvironment). TermwiseDPStrategy needs no
# DistributedDataParallel and no distributed sampler: every rank draws the same global Poisson
# batch and keeps its share, the clipped sums are all-reduced and the noise is added once.
set -euo pipefail
CONFIG=${1:?usage: docker/torchrun.sh CONFIG.yaml [extra CLI args]}
shift
torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${GPUS:-1}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m lit_dpvae fit --config "$CONFIG" \
  --trainer.accelerator=gpu --trainer.devices "${GPUS:-1}" --trainer.num_nodes "${NNODES:-1}" \
  "$@"
