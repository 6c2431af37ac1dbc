# Sourced by launch/<stage>.sh when run with bash: the DeepSpeed launcher's arguments,
# all settable through the environment.
#   NPROC_PER_NODE  ranks per node (default: the number of GPUs, or 1 without GPUs)
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" per line) for multi-node runs
#   NNODES          number of nodes to use from the hostfile
#   NODE_RANK       this node's index in the hostfile: the launcher then starts this node's ranks
#                   only (no ssh; one launcher per node, as launch/slurm/stage.sbatch runs it)
#   MASTER_ADDR     address of rank 0 (default: set by the launcher)
#   MASTER_PORT     rendezvous port (default 29500)
#   DS_CONFIG       DeepSpeed config (default ds_configs/zero2.json), read by every rank
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
DEEPSPEED_ARGS=(--num_gpus "$NPROC_PER_NODE" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  DEEPSPEED_ARGS+=(--hostfile "$HOSTFILE")
  [ -n "${NNODES:-}" ] && DEEPSPEED_ARGS+=(--num_nodes "$NNODES")
  [ -n "${NODE_RANK:-}" ] && DEEPSPEED_ARGS+=(--no_ssh --node_rank "$NODE_RANK")
fi
[ -n "${MASTER_ADDR:-}" ] && DEEPSPEED_ARGS+=(--master_addr "$MASTER_ADDR")
export DS_CONFIG="${DS_CONFIG:-}"
