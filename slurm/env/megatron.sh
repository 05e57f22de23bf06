# What megatron-core relies on, for every Slurm GPU job: the batch script sources this before
# srun starts the ranks (and before slurm/env/<interconnect>.sh). A value already in the
# submitter's environment (Slurm propagates it) wins over the default here.
# Source: aws-samples/awsome-distributed-training, 3.test_cases/megatron/megatron-lm/slurm/
# (AWS's Megatron samples export both).

# One hardware queue per GPU: megatron-core's tensor-parallel layers issue the gradient
# all-reduce / sequence-parallel all-gather before the compute that overlaps them and rely on
# the GPU running them in that order (megatron/core/tensor_parallel/layers.py).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL frees a collective's buffers when it completes instead of through the caching
# allocator's record_stream, which holds memory longer than needed (PyTorch >= 2.2).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
