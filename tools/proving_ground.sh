#!/usr/bin/env bash
# The proving-ground runs of issues 16 and 24 on the synthetic set (version 3), then their two reports:
#   reports/proving_ground.md  (tools/regime_report.py: ToCo's switch runs, encoders, method orderings per seed)
#   reports/mechanisms.md      (tools/mechanisms_report.py: each DSKD+GC and SynerNet mechanism's diagnostic)
# Usage: bash tools/proving_ground.sh [RUNS_DIR]   (default runs/v3; two 1-thread jobs at once; about 3 hours on
# 2 cores). Finished runs (summary.json present) are skipped and interrupted ones resume from their checkpoint, so the
# same command continues. The pretrained-encoder rows need the things encoder first:
#   OMP_NUM_THREADS=1 python -m synernet.pretrain runs/pt_things objective=image_max corpus=things size=64 steps=1500 warmup=100
# and its encoder written from runs/pt_things/last.pt with synernet.pretrain.save_encoder to RUNS_DIR/things_1500.safetensors;
# without that file those rows are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/v3}
PY=${PY:-.venv/bin/python}
mkdir -p "$RUNS"
OMP_NUM_THREADS=2 $PY data/make_synthetic.py --root "$RUNS/synthetic"
ENC="$RUNS/things_1500.safetensors"
jobs=()
for s in 0 1 2; do
  jobs+=("toco_scr_s$s toco $s" "dskd_gc_s$s dskd_gc $s" "synernet_s$s synernet $s")
done
jobs+=("toco_noptc_s0 toco 0 --w_ptc 0" "toco_noctc_s0 toco 0 --w_ctc 0 --ctc_views False"
       "toco_nopar_s0 toco 0 --par_iters 0" "toco_auxlab_s0 toco 0 --seg_label_final_start 100000"
       "toco_img_s0 toco 0 --pretrained True")                 # the committed demo weights
if [ -f "$ENC" ]; then
  jobs+=("toco_things_s0 toco 0 --pretrained True --weights_file $ENC"
         "toco_things_noptc_s0 toco 0 --pretrained True --weights_file $ENC --w_ptc 0"
         "toco_things_it1000_s0 toco 0 --pretrained True --weights_file $ENC --max_iters 1000 --eval_every 250")
fi
run() {
  set -- $1
  name=$1 preset=$2 seed=$3; shift 3
  [ -f "$RUNS/$name/summary.json" ] && { echo "done already: $name"; return 0; }
  echo "training $name"
  OMP_NUM_THREADS=1 $PY -m synernet.train --preset "$preset" --dataset synthetic --data_root "$RUNS/synthetic" \
    --out_dir "$RUNS/$name" --seed "$seed" --pretrained False --progress False "$@" > "$RUNS/$name.log" 2>&1 \
    || { echo "FAILED: $name (see $RUNS/$name.log)"; return 1; }
}
export -f run; export RUNS PY
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run "$@"' _ {}
$PY tools/regime_report.py "$RUNS" --out reports/proving_ground.md
$PY tools/mechanisms_report.py "$RUNS"/dskd_gc_s*/ "$RUNS"/synernet_s*/ --out reports/mechanisms.md > /dev/null
echo "wrote reports/proving_ground.md and reports/mechanisms.md"
