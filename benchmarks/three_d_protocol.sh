#!/usr/bin/env bash
# 3D networks on volume patches (issue 18, docs/methods/three_d.md, docs/benchmarks.md "3D networks"):
#   bash benchmarks/three_d_protocol.sh gpu     # the seeds' left-atrium setting: V-Net-sized 3D patches
#                                               # (80 x 112 x 112), batch 2 labelled + 2 unlabelled,
#                                               # 2 labelled + 10 unlabelled volumes of la/train
#   bash benchmarks/three_d_protocol.sh cpu     # the same, scaled down to a CPU (64^3, 10 steps, 2 test volumes)
#   bash benchmarks/three_d_protocol.sh within  # painted slices (K = 5), 3D at ~5 CPU-minutes a run
#   bash benchmarks/three_d_protocol.sh steps   # CPU seconds a 3D step at 64^3 and 96^3
# la/train has 12 volumes and no test split: the cohort protocol scores the 10 unlabelled
# training volumes (--test = --train, --skip-labelled), i.e. transductively.
# OUT: where the JSON files go (default docs/results/three_d).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${SEMICL_SHARED_DATA:-../shared/data}
OUT=${OUT:-docs/results/three_d}
mkdir -p "$OUT"
bench() { python -m napari_semicl.cli -q bench "$@"; }
case "${1:-}" in
  gpu)
    bench cohort --train "$DATA/la/train" --test "$DATA/la/train" --labelled 2 --skip-labelled --complete-labels \
        --methods supervised,mean_teacher,plgcl,agcl,arco,aua --spatial-dims 3 --patch-size 112 --patch-depth 80 \
        --batch-labelled 2 --batch-unlabelled 2 --budget-steps 6000 --device cuda --out "$OUT/la_cohort_3d_gpu.json"
    ;;
  cpu)
    export OMP_NUM_THREADS=1
    bench cohort --train "$DATA/la/train" --test "$DATA/la/train" --labelled 2 --skip-labelled --complete-labels --limit-test 3 \
        --methods mean_teacher --spatial-dims 3 --patch-size 64 --patch-depth 64 \
        --batch-labelled 2 --batch-unlabelled 2 --budget-steps 10 --device cpu --out "$OUT/la_cohort_3d_cpu.json"
    ;;
  within)
    # 110 steps of 2.97 CPU-s (64^3, batch 2) = 5.4 CPU-minutes, about the budget of the 2D and 2.5D
    # rows (900 steps of 0.32 CPU-s, prior/la_k5.json and la_k5_context1.json in docs/results/archive_prior_3px.json); two jobs side by side
    export OMP_NUM_THREADS=1
    for m in recommended supervised; do
      bench within-volume --data "$DATA/la/train" --k 5 --limit 2 --methods "$m" --spatial-dims 3 --patch-size 64 \
          --batch-labelled 2 --budget-steps 110 --device cpu --out "$OUT/la_k5_3d_$m.json" &
    done
    wait
    ;;
  steps)
    export OMP_NUM_THREADS=1
    la="$DATA/la/train/06SR5RBREL16DQ6M8LWS"
    for p in 64 96; do
      PYTHONPATH=$PWD python benchmarks/cpu_step_time.py --spatial-dims 3 --patch-size "$p" --batch 2+2 --steps 4 \
          --methods supervised,mean_teacher --image "$la.nii.gz" --reference "${la}_gt.nii.gz" --reveal 5 \
          --out "$OUT/cpu_step_time_3d_$p.json"
    done
    ;;
  *)
    echo "usage: $0 gpu|cpu|within|steps" >&2
    exit 2
    ;;
esac
