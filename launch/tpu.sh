#!/usr/bin/env bash
# Runs autospace_jax on every worker of a Cloud TPU VM: one host (v4-8) or a pod slice (v4-32...).
#
# Usage:
#   launch/tpu.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN --config=configs/FILE.py \
#       [--mode=MODE] [--config.FIELD=VALUE ...] [options]
#
# Steps, each one command printed first with a "+ " prefix (--dry-run prints them, runs nothing):
#   1. with --create: `gcloud compute tpus tpu-vm create` (--accelerator-type, --version);
#   2. unless --skip-install: this checkout (the files git tracks or would track, so not runs/
#      or virtualenvs) packed, copied to every worker and unpacked in ~/autospace_jax, or --repo
#      cloned there; then `pip install -e . "jax[tpu]"` on every worker;
#   3. `python -m autospace_jax.main` on every worker (--worker=all) with AUTOSPACE_DISTRIBUTED=1,
#      so each process calls jax.distributed.initialize() and the pod acts as one set of devices.
#
# Required:
#   --name=NAME              TPU VM name.
#   --zone=ZONE              Its zone, e.g. us-central2-b.
#   --workdir=gs://B/PATH    Run folder every worker reads and writes (must be gs://).
#   --config=configs/F.py    Config file, relative to the repository root (read on the workers).
# Options:
#   --mode=MODE              pipeline | evolve | search | train (default: the config's mode).
#   --config.FIELD=VALUE     Config overrides, passed to main.py unchanged.
#   --project=ID             gcloud project (default: gcloud's configured project).
#   --create                 Create the TPU VM first; needs the two options below.
#   --accelerator-type=TYPE  e.g. v4-8 (one host) or v4-32 (a pod slice of 4 hosts).
#   --version=RUNTIME        TPU VM software version, e.g. tpu-ubuntu2204-base.
#   --repo=URL               git clone URL the workers install from, instead of this checkout.
#   --ref=REF                With --repo: branch, tag or commit to check out.
#   --python=BIN             Interpreter on the workers (default python3); jax needs >= 3.11.
#   --skip-install           Reuse what an earlier launch installed on the workers.
#   --dry-run                Print the commands, run nothing.
#   -h, --help               Print this text.
# Environment:
#   TFDS_DATA_DIR            If set, passed to every worker (e.g. gs://BUCKET/tensorflow_datasets).
#
# The run is attached to this terminal: start it inside tmux or screen for long runs.
#
# Exit status of a run, on every worker: 0 done; 1 one FATAL line (a user error) or a crash's
# traceback; 75 (EX_TEMPFAIL) preempted: on SIGTERM (a spot or preemptible VM about to be taken,
# a scheduler) every worker finished the same step, saved it to --workdir and logged one line,
# "<stage>: preempted ... exit status 75, re-run the same command to resume there". Run this same
# command again (--create if the VM was taken, --skip-install if its workers kept the install)
# and the run resumes at that step. While a run is alive, a second launch into its --workdir
# exits 1 naming it (its lease, <workdir>/lease.json); --config.takeover=True overrides that,
# for a run you know is gone (a lease is stale anyway once its heartbeat is 5 minutes old).
#
# First, on any machine (a laptop will do: no TPU needed) with `pip install -e . "jax[tpu]"`,
# check that every program of the run compiles and fits the slice's chips, same --config:
#   python -m autospace_jax.main --config=configs/imagenet_mobile.py --mode=compile \
#       --config.compile.topology=v4-32 --workdir=runs/compile_check
# It prints each program's compile time, memory per chip and FLOPs, writes
# runs/compile_check/compile/report.json, and exits 1 with one FATAL line if any would not fit.
#
# Example (a pod slice, created on the way):
#   TFDS_DATA_DIR=gs://my-bucket/tfds launch/tpu.sh --create --name=autospace \
#       --zone=us-central2-b --accelerator-type=v4-32 --version=tpu-ubuntu2204-base \
#       --workdir=gs://my-bucket/runs/imagenet --config=configs/imagenet_mobile.py \
#       --config.evolution.generations=50

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly REMOTE_DIR=autospace_jax # Relative to the workers' home, where ssh starts.

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

die() {
  echo "launch/tpu.sh: error: $*" >&2
  echo "Run launch/tpu.sh --help for the usage." >&2
  exit 2
}

# One shell word: as is when safe, else single-quoted. Used for the remote command line and
# for the printed commands, so every printed line splits back into its arguments (shlex.split).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

words() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

# Prints the command, then runs it unless --dry-run.
run() {
  printf '+ %s\n' "$(words "$@")"
  if ((!dry_run)); then "$@"; fi
}

name="" zone="" workdir="" config="" mode="" project="" accelerator_type="" version=""
repo="" ref="" python=python3 create=0 skip_install=0 dry_run=0
overrides=()

set_option() {
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --workdir) workdir=$2 ;;
    --config) config=$2 ;;
    --mode) mode=$2 ;;
    --project) project=$2 ;;
    --accelerator-type) accelerator_type=$2 ;;
    --version) version=$2 ;;
    --repo) repo=$2 ;;
    --ref) ref=$2 ;;
    --python) python=$2 ;;
    *) die "unknown option: $1" ;;
  esac
}

readonly VALUED='^--(name|zone|workdir|config|mode|project|accelerator-type|version|repo|ref|python)$'
while (($#)); do
  arg=$1
  shift
  case $arg in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) dry_run=1 ;;
    --create) create=1 ;;
    --skip-install) skip_install=1 ;;
    --config.*=*) overrides+=("$arg") ;;
    --config.*) die "config overrides take the form --config.FIELD=VALUE, got: $arg" ;;
    --*=*) set_option "${arg%%=*}" "${arg#*=}" ;;
    *)
      [[ $arg =~ $VALUED ]] || die "unknown argument: $arg"
      (($#)) || die "$arg needs a value"
      set_option "$arg" "$1"
      shift
      ;;
  esac
done

[[ -n $name ]] || die "--name is required (the TPU VM name)"
[[ -n $zone ]] || die "--zone is required (e.g. --zone=us-central2-b)"
[[ -n $workdir ]] || die "--workdir is required (a gs:// run folder, e.g. --workdir=gs://BUCKET/runs/NAME)"
[[ -n $config ]] || die "--config is required (e.g. --config=configs/digits.py)"
[[ $workdir == gs://?* ]] ||
  die "--workdir=$workdir must be a gs:// path: every worker reads and writes the same run folder"
[[ $config != /* ]] ||
  die "--config=$config must be relative to the repository root: it is read on the workers"
if [[ -z $repo && ! -f $ROOT/${config%%:*} ]]; then
  die "--config=$config: no such file in $ROOT"
fi
if ((create)); then
  [[ -n $accelerator_type ]] || die "--create needs --accelerator-type (e.g. v4-8)"
  [[ -n $version ]] || die "--create needs --version (e.g. tpu-ubuntu2204-base)"
elif [[ -n $accelerator_type || -n $version ]]; then
  die "--accelerator-type and --version only apply with --create"
fi
[[ -z $ref || -n $repo ]] || die "--ref needs --repo"

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

# --- 1. create --------------------------------------------------------------------------------
if ((create)); then
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
    --accelerator-type="$accelerator_type" --version="$version"
fi

# --- 2. install -------------------------------------------------------------------------------
if ((!skip_install)); then
  if [[ -n $repo ]]; then
    fetch="rm -rf $REMOTE_DIR && git clone $(q "$repo") $REMOTE_DIR"
    [[ -z $ref ]] || fetch+=" && git -C $REMOTE_DIR checkout $(q "$ref")"
  else
    staging="${TMPDIR:-/tmp}/autospace_jax_launch.$$"
    tarball="$staging/$REMOTE_DIR.tar.gz"
    if ((!dry_run)); then
      mkdir -p "$staging"
      trap 'rm -rf "$staging"' EXIT
    fi
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # Files git tracks or would track that exist (a deleted tracked file would stop tar).
      if ((!dry_run)); then
        git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
          while IFS= read -r -d '' f; do
            if [[ -e $ROOT/$f ]]; then printf '%s\0' "$f"; fi
          done >"$staging/files"
      fi
      run tar -czf "$tarball" -C "$ROOT" --null -T "$staging/files"
    else
      run tar -czf "$tarball" -C "$ROOT" --exclude=./runs --exclude=./.git .
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:$REMOTE_DIR.tar.gz" --worker=all \
      "${where[@]}"
    fetch="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
  fi
  install="set -e; $fetch && cd $REMOTE_DIR && $(q "$python") -m pip install -q -e . 'jax[tpu]'"
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$install"
fi

# --- 3. run -----------------------------------------------------------------------------------
env_vars=(AUTOSPACE_DISTRIBUTED=1)
[[ -z ${TFDS_DATA_DIR:-} ]] || env_vars+=("TFDS_DATA_DIR=$TFDS_DATA_DIR")
main_args=(--config="$config" --workdir="$workdir")
[[ -z $mode ]] || main_args+=(--mode="$mode")
main_args+=(${overrides[@]+"${overrides[@]}"})
remote="cd $REMOTE_DIR && $(words "${env_vars[@]}" "$python" -m autospace_jax.main "${main_args[@]}")"
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote"
