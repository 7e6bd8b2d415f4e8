#!/usr/bin/env bash
# The GPU check: a randomly initialised 1B Llama trained by the lens-free methods (rmu, npo,
# sequential) with activation checkpointing and bf16 autocast, on one GPU and, when the machine
# has two or more, under FSDP2 on all of them; 20 optimizer steps each, then `unlearn eval` of
# the saved model and a short `unlearn attack` on it. Prints tokens/s, peak memory, MFU and the
# losses; docs/results/gpu-check.md says what to do with them.
#
#     bash bench/gpu_check.sh [WORK]      # WORK: where everything goes (default: a new temp dir)
#
# Environment: PYTHON (default: the repository's .venv/bin/python, else python3), with unlearn
# installed and TensorBoard (`pip install -e '.[tensorboard]'`: the runs log tokens/s there);
# GPU_CHECK_STEPS (default 20). Everything is local: no network, no hub.
#
# Steps: (1) refuse without a CUDA device; (2) local stand-ins (examples/make_local_real.py: a
# tokenizer, corpora, WMDP- and MMLU-format question files), a random 1B Llama with that
# tokenizer and long documents (bench/gpu_check.py prepare); (3) bench/throughput.py on that
# model: each method's step beside plain fine-tuning on one GPU; (4) per setting and method:
# `unlearn run`, `unlearn eval`, `unlearn attack`, GPU memory sampled by nvidia-smi during the
# run; (5) the summary (bench/gpu_check.py summary), also written to WORK/summary.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
STEPS="${GPU_CHECK_STEPS:-20}"
METHODS=(rmu npo sequential)

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

# (1) Before any work: this check means nothing without a GPU.
gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)" ||
  die "cannot import torch with $PYTHON (set PYTHON to the interpreter that has unlearn)"
((gpus >= 1)) || die "no CUDA device visible (torch.cuda.device_count() is 0): run it on a GPU machine"
"$PYTHON" -c 'import tensorboard' 2>/dev/null ||
  die "the runs log tokens/s through TensorBoard, which $PYTHON lacks: pip install -e '.[tensorboard]'"

WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
echo "gpu_check: $gpus CUDA device(s); writing to $WORK" >&2

# (2) Inputs: nothing from the network.
"$PYTHON" "$ROOT/examples/make_local_real.py" --out "$WORK/data" >/dev/null
"$PYTHON" "$ROOT/bench/gpu_check.py" prepare --data "$WORK/data" --out "$WORK"
MODEL="$WORK/model"
TASKS=(--forget_tasks "$WORK/data/wmdp_bio_robust.jsonl" --retain_tasks "$WORK/data/mmlu.jsonl")
TRAIN=(--gradient_checkpointing true --mixed_precision bf16 --dtype float32 --pdbs 8
  --grad_accum 1 --max_length 512 --progress false)

# (3) Each method's step beside plain fine-tuning, in one process on one GPU.
"$PYTHON" "$ROOT/bench/throughput.py" --model "$MODEL" --methods "$(IFS=,; echo "${METHODS[*]}")" \
  --gradient_checkpointing --mixed_precision bf16 --cache_gb 8 --out "$WORK/throughput.md"

# GPU memory in use, sampled twice a second while a run trains (the process's own peak is not
# logged by the runs).
sampler=""
start_sampler() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$1" &
    sampler=$!
  fi
}
stop_sampler() {
  if [[ -n "$sampler" ]]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sampler=""
  fi
}
trap stop_sampler EXIT

# (4) One method in one setting: train, evaluate the saved model, attack it.
#     check SETTING METHOD LAUNCHER... (LAUNCHER: the python or torchrun command line)
check() {
  local setting=$1 method=$2
  shift 2
  local launch=("$@") dist=() steps=(--max_steps "$STEPS")
  local dir="$WORK/runs/$setting"
  mkdir -p "$dir"
  if [[ $setting == fsdp2-* ]]; then
    dist=(--distributed fsdp2)
  fi
  if [[ $method == sequential ]]; then  # one phase per layer, each --max_steps long
    steps=(--num_phases 2 --max_steps $((STEPS / 2)))
  fi
  echo "gpu_check: $setting: $method: unlearn run, eval, attack" >&2
  start_sampler "$dir/$method.mem"
  "${launch[@]}" -m unlearn run --method "$method" --model "$MODEL" --lora false \
    --forget_corpus "$WORK/forget.jsonl" --retain_corpus "$WORK/retain.jsonl" \
    "${steps[@]}" "${TRAIN[@]}" "${dist[@]}" --eval false --report_to tensorboard \
    --out "$dir/$method"
  stop_sampler
  "${launch[@]}" -m unlearn eval --model "$dir/$method/model" "${TASKS[@]}" \
    --output "$dir/$method-eval.json"
  "${launch[@]}" -m unlearn attack --model "$dir/$method/model" --corpus "$WORK/attack.jsonl" \
    "${TASKS[@]}" --max_steps 4 --eval_every 2 "${TRAIN[@]}" "${dist[@]}" \
    --out "$dir/$method-attack"
}

for method in "${METHODS[@]}"; do
  check 1gpu "$method" "$PYTHON"
done
if ((gpus >= 2)); then
  for method in "${METHODS[@]}"; do  # torchrun, with this interpreter
    check "fsdp2-$gpus" "$method" "$PYTHON" -m torch.distributed.run --standalone \
      --nproc_per_node="$gpus"
  done
fi

# (5) The numbers.
"$PYTHON" "$ROOT/bench/gpu_check.py" summary --work "$WORK" >"$WORK/summary.md"
echo
cat "$WORK/throughput.md"
echo
cat "$WORK/summary.md"
echo "gpu_check: done; everything is in $WORK" >&2
