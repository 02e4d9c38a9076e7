#!/usr/bin/env bash
# The proving-ground runs of issues 16 and 24 on the synthetic set (version 3), then their two reports:
#   reports/proving_ground.md  (tools/regime_report.py: ToCo's switch runs, encoders, method orderings per seed)
#   reports/mechanisms.md      (tools/mechanisms_report.py: each DSKD+GC and SynerNet mechanism's diagnostic)
# Usage: bash tools/proving_ground.sh [RUNS_DIR]   (default runs/v3; two 1-thread jobs at once; about 3 hours on
# 2 cores). Finished runs (summary.json present) are skipped and interrupted ones resume from their checkpoint, so the
# same command continues. The pretrained-encoder rows need the things encoder first:
#   OMP_NUM_THREADS=1 python -m synernet.experiments.pretrain runs/pt_things objective=image_max corpus=things size=64 steps=1500 warmup=100
# and its encoder written from runs/pt_things/last.pt with synernet.experiments.pretrain.save_encoder to RUNS_DIR/things_1500.safetensors;
# without that file those rows are left out. The same holds for the encoders that keep tokens local
# (nbs/73_pretrain.ipynb, "Two objectives that keep the tokens local, fine-tuned"), each written the same way:
#   RUNS_DIR/mosmax_1500.safetensors  from  python -m synernet.experiments.pretrain runs/pt_mosmax objective=mosaic_max corpus=things size=128 batch_size=8 steps=1500 warmup=100
#   RUNS_DIR/mosmax_3000.safetensors  from  the same with steps=3000 (work dir runs/pt_mosmax3k)
#   runs/pt_dino/teacher.safetensors  from  python tools/pretrain_dino.py runs/pt_dino 1200 32   (written by the tool)
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
M15="$RUNS/mosmax_1500.safetensors" M30="$RUNS/mosmax_3000.safetensors" DINO=runs/pt_dino/teacher.safetensors
for s in 0 1 2; do
  [ -f "$M15" ] && jobs+=("toco_mosmax_s$s toco $s --pretrained True --weights_file $M15")
  [ -f "$M30" ] && jobs+=("toco_mosmax3k_s$s toco $s --pretrained True --weights_file $M30")
done
[ -f "$M15" ] && jobs+=("synernet_mosmax_s0 synernet 0 --pretrained True --weights_file $M15"
                        "synernet_mosmax_lr_s0 synernet 0 --pretrained True --weights_file $M15 --lr 1.2e-4")
[ -f "$DINO" ] && jobs+=("toco_dino_s0 toco 0 --pretrained True --weights_file $DINO")
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
