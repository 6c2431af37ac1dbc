# Sourced by the job scripts in launch/slurm/: the DeepSpeed launcher's settings (see
# launch/deepspeed_args.sh) derived from the Slurm allocation, and the working directory.
#   hosts        `scontrol show hostnames $SLURM_JOB_NODELIST`; rank 0 runs on the first one
#   ranks/node   NPROC_PER_NODE if set, else the node's GPUs (SLURM_GPUS_ON_NODE, nvidia-smi),
#                else CPU_RANKS (CPU nodes; default 1)
#   HOSTFILE     "<host> slots=<ranks/node>" per host, written to HOSTFILE_DIR/hostfile-<job id>
#                (default runs/slurm: under the submit directory, which every node sees)
#   MASTER_ADDR  the first host; MASTER_PORT 20000 + job id % 20000 unless set
# Slurm runs a copy of the job script, so the repository is the submit directory (or
# STAGES_ROOT): submit from the repository root.
cd "${STAGES_ROOT:-$SLURM_SUBMIT_DIR}"
if [ ! -f launch/deepspeed_args.sh ]; then
  echo "error: $PWD is not the repository: submit from its root or set STAGES_ROOT" >&2; exit 2
fi
mapfile -t SLURM_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=${CPU_RANKS:-1}
fi
export NPROC_PER_NODE
export NNODES=${#SLURM_HOSTS[@]}
export MASTER_ADDR=${MASTER_ADDR:-${SLURM_HOSTS[0]}}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
mkdir -p "${HOSTFILE_DIR:=runs/slurm}"
export HOSTFILE=$(realpath "$HOSTFILE_DIR")/hostfile-$SLURM_JOB_ID
for host in "${SLURM_HOSTS[@]}"; do echo "$host slots=$NPROC_PER_NODE"; done > "$HOSTFILE"
echo "== slurm job $SLURM_JOB_ID: ${NNODES} node(s) x ${NPROC_PER_NODE} rank(s), rank 0 on $MASTER_ADDR:$MASTER_PORT," \
     "hostfile $HOSTFILE"
