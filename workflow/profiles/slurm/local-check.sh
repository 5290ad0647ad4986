#!/usr/bin/env bash
# The slurm profile, checked for real on this machine (docs/study.md, "On a Slurm cluster"):
#   bash workflow/profiles/slurm/local-check.sh                 # the default study, then the tiny one
#   bash workflow/profiles/slurm/local-check.sh --study tiny    # one study only
#   bash workflow/profiles/slurm/local-check.sh --study tiny --concurrent   # CI: the local run alongside
# --concurrent runs each study's local reference run while its Slurm run goes (the Slurm run mostly waits on
# sbatch and squeue, so the two share the cores): the placements and computed columns do not depend on load, but
# the measured serve columns of emulated runs do, so use it for studies whose serve runs are plain CPU runs
# (tiny), not the default study (its emulated serve stage is checked against a tolerance from quiet runs).
# For each study: installs what is missing (Debian: slurm-wlm daemons, munge, MariaDB), starts a
# one-machine Slurm cluster (local-cluster.sh: slurmdbd, slurmctld, two slurmd) and an MLflow tracking
# server (sqlite backend, artifact serving) on 127.0.0.1, runs the study locally (--cores 2, its own
# sqlite store) and through `snakemake --workflow-profile workflow/profiles/slurm --jobs 2` with
# MLFLOW_TRACKING_URI on the server, then checks (python -m moetuner.study.cluster_check): every job went through
# sbatch and is COMPLETED in sacct; every placement (re-splits included) is identical to the local run's,
# summary.csv and splits.csv equal it in every computed column and the measured serve columns within the
# tolerance the check prints (MEASURED_TOLERANCE, from `cluster_check spread` over local runs); served placements move the same bytes (the tiny study serves on two Slurm nodes, one torchrun
# each); the parent run and the same child runs as locally are on the server, FINISHED, with artifacts.
# Then one `moetuner-solve -m` sweep through the submitit launcher. Everything started is stopped at
# the end, also on failure or Ctrl-C; the last line is "ok: ..." or "failed: <step>: <what> (log: ...)".
# Outputs of the last check: .slurm-local/check/ (sacct.txt, mlflow-experiments.txt, logs/).
set -uo pipefail
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$repo"
studies=() concurrent=0 local_pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --study) studies+=("${2:?--study needs a name}"); shift 2 ;;
    --concurrent) concurrent=1; shift ;;
    *) echo "usage: bash $0 [--study NAME]... [--concurrent] (names from conf/study/)" >&2; exit 2 ;;
  esac
done
[ ${#studies[@]} -gt 0 ] || studies=(default tiny)
export MOETUNER_SLURM_STATE="${MOETUNER_SLURM_STATE:-$repo/.slurm-local}"
state="$MOETUNER_SLURM_STATE"
run="$state/check"
cluster=(bash "$repo/workflow/profiles/slurm/local-cluster.sh")
PORT=18175
URI="http://127.0.0.1:$PORT"
step="start" result="" summary=()
since="$(date +%Y-%m-%dT%H:%M:%S)"

say() { echo "[local-check] $*" >&2; }

finish() {
  local rc=$?
  [ -n "$result" ] || result="failed: $step: stopped (exit $rc) (logs: $run/logs/)"
  say "stopping what this check started"
  [ -z "$local_pid" ] || kill -- "-$local_pid" 2>/dev/null || true
  stop_mlflow
  "${cluster[@]}" stop || result="$result; failed: stopping the cluster"
  echo "$result"
}
trap finish EXIT
trap 'exit 130' INT TERM

step() {  # step NAME COMMAND...: run, output in $run/logs/NAME.log; on failure end the check
  step=$1; shift
  local log="$run/logs/$step.log" start=$SECONDS
  say "$step: $*"
  if ! "$@" >"$log" 2>&1; then
    result="failed: $step: $(grep -v '^\s*$' "$log" | tail -n 3 | tr '\n' ' ' | cut -c1-400)(log: $log)"
    exit 1
  fi
  say "$step: done in $((SECONDS - start)) s"
  STEP_SECONDS=$((SECONDS - start))
}

stop_mlflow() {
  local pidfile="$state/run/mlflow.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid="$(cat "$pidfile")"
  # mlflow server runs gunicorn/uvicorn workers in its process group
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  rm -f "$pidfile"
  say "stopped mlflow server ($pid)"
}

start_mlflow() {
  if curl -sf "$URI/health" >/dev/null 2>&1; then echo "port $PORT answers already: another server runs there"; return 1; fi
  mkdir -p "$run/mlflow" "$state/run"
  setsid mlflow server --host 127.0.0.1 --port $PORT --workers 1 \
    --backend-store-uri "sqlite:///$run/mlflow/mlflow.db" --artifacts-destination "$run/mlflow/artifacts" \
    >"$run/logs/mlflow-server.log" 2>&1 &
  echo $! >"$state/run/mlflow.pid"
  for _ in $(seq 240); do curl -sf "$URI/health" >/dev/null 2>&1 && { echo "up at $URI"; return 0; }; sleep 0.5; done
  echo "no answer at $URI/health after 120 s (log: $run/logs/mlflow-server.log)"; return 1
}

local_study() {  # local_study NAME: the study with the local executor, its own sqlite store
  MLFLOW_TRACKING_URI="sqlite:///$run/$1/local/mlflow.db" snakemake -s "$repo/Snakefile" -d "$run/$1/local" \
    --configfile "conf/study/$1.yaml" --cores 2
}

serve_cores() {  # serve_cores NAME: the study's serve.cores (its file over conf/study/default.yaml)
  python -c 'import sys, yaml
studies = [yaml.safe_load(open(f"conf/study/{name}.yaml")) or {} for name in ("default", sys.argv[1])]
print(int({**studies[0]["serve"], **(studies[1].get("serve") or {})}["cores"]))' "$1"
}

slurm_study() {  # slurm_study NAME: the same through the slurm profile, tracked on the server; a serve job
  # takes host_cores = serve.cores, every other job 1 (the profile's default), so serve jobs run alone
  # on this one machine, whose two slurmd declare more CPUs than it has (docs/study.md, "Profiles")
  MLFLOW_TRACKING_URI="$URI" snakemake -s "$repo/Snakefile" -d "$run/$1/slurm" \
    --workflow-profile "$repo/workflow/profiles/slurm" --configfile "conf/study/$1.yaml" --jobs 2 \
    --resources host_cores="$(serve_cores "$1")" serve_jobs=1
}

slurm_beside_local() {  # slurm_beside_local NAME: the local run in the background (its own log and seconds
  # file) while the Slurm run goes in the foreground; fails if either fails
  setsid bash -c "$(declare -f local_study); run='$run' repo='$repo'; local_study '$1' && echo \$((SECONDS)) \
    >'$run/$1/local.seconds'" >"$run/logs/$1-local.log" 2>&1 &
  local_pid=$!
  slurm_study "$1" || { echo "the Slurm run failed"; return 1; }
  wait "$local_pid" || { echo "the local run failed (log: $run/logs/$1-local.log)"; local_pid=""; return 1; }
  local_pid=""
}

sweep() {  # sweep NAME: 2 solvers x 2 replica budgets through the submitit launcher
  local trace dir="$run/$1/sweep"
  trace="$(ls "$run/$1/slurm/results/$1/splits/"*/profile.safetensors | head -n 1)"
  MLFLOW_TRACKING_URI="$URI" moetuner-solve -m hydra/launcher=submitit_slurm hydra.launcher.timeout_min=10 \
    hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=2 "hydra.sweep.dir=$dir/multirun" \
    trace="$trace" topology=cpu_2x2 solver=eplb,greedy replicas=0,1 "out=$dir/\${solver.name}-r\${replicas}.json"
  # submitit returns once every job wrote its result; wait for Slurm to end the jobs themselves
  for _ in $(seq 120); do [ -z "$(squeue -h -o %i)" ] && return 0; sleep 1; done
  echo "the sweep's Slurm jobs did not end: $(squeue -h)"; return 1
}

rm -rf "$run"
mkdir -p "$run/logs"
step install "${cluster[@]}" install
step setup bash bootstrap.sh setup
venv="${MOETUNER_VENV:-.venv}"
[[ "$venv" = /* ]] || venv="$repo/$venv"
export PATH="$venv/bin:$PATH"   # sbatch exports it: every job runs in this environment
step cluster "${cluster[@]}" start
export SLURM_CONF="$state/slurm.conf"
step mlflow start_mlflow
for study in "${studies[@]}"; do
  [ -f "conf/study/$study.yaml" ] || { result="failed: no study conf/study/$study.yaml"; exit 2; }
  if [ "$concurrent" = 1 ]; then
    mkdir -p "$run/$study"
    step "$study-slurm" slurm_beside_local "$study"; slurm_s=$STEP_SECONDS; local_s=$(cat "$run/$study/local.seconds")
  else
    step "$study-local" local_study "$study"; local_s=$STEP_SECONDS
    step "$study-slurm" slurm_study "$study"; slurm_s=$STEP_SECONDS
  fi
  step "$study-check" python -m moetuner.study.cluster_check study --local "$run/$study/local/results/$study" \
    --slurm "$run/$study/slurm/results/$study" --log "$run/logs/$study-slurm.log" \
    --local-uri "sqlite:///$run/$study/local/mlflow.db" --uri "$URI"
  cat "$run/logs/$study-check.log" >&2
  step "$study-sweep" sweep "$study"
  step "$study-sweep-check" python -m moetuner.study.cluster_check sweep --dir "$run/$study/sweep" --expect 4 \
    --log "$run/$study/sweep/multirun/.submitit"
  cat "$run/logs/$study-sweep-check.log" >&2
  jobs=$(grep -c "has been submitted with SLURM jobid" "$run/logs/$study-slurm.log")
  both=""; [ "$concurrent" = 0 ] || both=", the two runs concurrent"
  summary+=("$study: $jobs Slurm jobs in ${slurm_s} s vs ${local_s} s locally ($(awk "BEGIN {printf \"%.2f\", $slurm_s / $local_s}")x$both)")
done
step listings bash -c "sacct -X -a -S $since -o JobID,JobName%14,Partition,State,AllocCPUS,NodeList,Elapsed \
  >'$run/sacct.txt' && MLFLOW_TRACKING_URI=$URI mlflow experiments search --view all >'$run/mlflow-experiments.txt'"
result="ok: ${summary[*]}; summaries, serve traffic and MLflow runs match the local runs; submitit sweeps COMPLETED (listings: $run/sacct.txt, $run/mlflow-experiments.txt)"
