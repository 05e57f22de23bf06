# EFA + NCCL environment for p4d/p5 nodes: the one place these values live. The sbatch of every
# cluster.interconnect=efa profile sources it on each node before srun starts the ranks; a value
# already in the submitter's environment (Slurm propagates it) wins over the default here.
# Source: aws-samples/awsome-distributed-training, 1.architectures/efa-cheatsheet.md.

# libfabric's EFA provider with GPUDirect RDMA. Defaults since libfabric 1.18 / aws-ofi-nccl 1.7,
# needed with older aws-ofi-nccl, harmless on p4d/p5 with newer ones.
export FI_PROVIDER=${FI_PROVIDER:-efa}
export FI_EFA_USE_DEVICE_RDMA=${FI_EFA_USE_DEVICE_RDMA:-1}
# fork() from data-loader workers fails with ENOMEM when huge pages run out; minor cost.
export FI_EFA_USE_HUGE_PAGE=${FI_EFA_USE_HUGE_PAGE:-0}
# Only needed on kernels < 5.15; a no-op after. (Never RDMAV_FORK_SAFE: it breaks newer kernels.)
export FI_EFA_FORK_SAFE=${FI_EFA_FORK_SAFE:-1}
# NCCL's bootstrap/socket traffic on the ENA interface ("en" matches p4d and p5 names).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-en}
# NVLink SHARP (NVLS) off, as AWS's Megatron samples on EFA clusters set it
# (3.test_cases/megatron/megatron-lm/slurm/): NCCL's NVLS buffers cost GPU memory per communicator.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Left at NCCL's defaults on purpose: NCCL_PROTO (simple only for aws-ofi-nccl <= 1.5),
# NCCL_BUFFSIZE, NCCL_MIN_NCHANNELS.
# NCCL finds the aws-ofi-nccl plugin (libnccl-net.so) and libfabric through LD_LIBRARY_PATH; a
# pip NCCL in a venv looks nowhere else, and without the plugin NCCL silently uses TCP sockets
# (megatron_ext/nccl_net.py checks which it chose). Paths as the EFA installer and AWS's DLAMI
# install them (/opt/amazon/efa, /opt/amazon/ofi-nccl since EFA installer 1.38) and AWS's
# Dockerfiles build the plugin (/opt/aws-ofi-nccl); lib64 on Amazon Linux; only those that
# exist on the node are added.
# Source: aws-samples/awsome-distributed-training, 1.architectures/efa-cheatsheet.md and
# 3.test_cases/megatron/megatron-lm/aws-megatron-lm.Dockerfile.
for lib in /opt/amazon/efa/lib64 /opt/amazon/efa/lib /opt/aws-ofi-nccl/lib /opt/amazon/ofi-nccl/lib; do
  if [ -d "$lib" ] && [[ ":${LD_LIBRARY_PATH:-}:" != *":$lib:"* ]]; then
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
