#!/usr/bin/env bash
# The main job end to end on the bundled BCCD data set, on the CPU: take the shipped teacher (gelan-s
# trained 160 epochs on BCCD with nbs 16 by the command in docs/training.md), distil a student from it, train the same student from
# scratch with the same epochs and seed, validate all three, export them to ONNX and run detection
# with the distilled student's ONNX file. Every step is the command a user would type.
#
#   make demo         # the full demo on a 2-core CPU (docs/results.md has its measured time)
#   make demo-smoke   # the same steps on a tiny synthetic set, teacher 1 epoch, students 2 (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUNS=${DEMO_RUNS:-runs/demo}
DATA=${DEMO_DATA:-data/bccd.yaml}
IMG=${DEMO_IMG:-256}
BATCH=${DEMO_BATCH:-16}
TEACHER=${DEMO_TEACHER-weights/gelan-s-bccd256-e160-nbs16.pt}   # empty: train a gelan-t teacher first (the smoke run)
TEACHER_EPOCHS=${DEMO_TEACHER_EPOCHS:-60}
STUDENT_EPOCHS=${DEMO_STUDENT_EPOCHS:-40}   # the 40-epoch setting of benchmarks/distill_gain_bccd.sh
SEED=${DEMO_SEED:-0}
MAX_BATCHES=${DEMO_MAX_BATCHES:-0}
SOURCE=${DEMO_SOURCE:-datasets/bccd/images/test}
TEACHER_CFG=models/detect/gelan-t.yaml
STUDENT_CFG=models/detect/yolov9-tiny.yaml

# the distillation benchmark's 40-epoch setting (benchmarks/distill_gain_bccd.sh): plain hyp files, nbs and
# the weight average chosen from the data set's size by the tool, as for any user
common=(--data "$DATA" --img "$IMG" --batch "$BATCH" --device cpu --workers 1 --cache ram --seed "$SEED"
        --project "$RUNS" --exist-ok --close-mosaic 5)
if [ "$MAX_BATCHES" != 0 ]; then common+=(--max-batches "$MAX_BATCHES"); fi

step() { printf '\n== %s\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

if [ -z "$TEACHER" ]; then
  step "1/7 teacher (gelan-t) from scratch" \
    $PY train.py --cfg $TEACHER_CFG --hyp hyp/hyp.scratch-high.yaml --epochs "$TEACHER_EPOCHS" --name teacher "${common[@]}"
else
  step "1/7 teacher: the shipped $TEACHER" mkdir -p "$RUNS/teacher/weights"
  cp "$TEACHER" "$RUNS/teacher/weights/best.pt"
fi
step "2/7 student (yolov9-tiny) distilled from the teacher" \
  $PY train_distill.py --cfg $STUDENT_CFG --teacher "$RUNS/teacher/weights/best.pt" --hyp hyp/hyp.distill.yaml \
  --epochs "$STUDENT_EPOCHS" --name student-distill "${common[@]}"
step "3/7 the same student from scratch, same epochs and seed" \
  $PY train.py --cfg $STUDENT_CFG --hyp hyp/hyp.scratch-high.yaml --epochs "$STUDENT_EPOCHS" --name student-scratch \
  "${common[@]}"
for run in teacher student-distill student-scratch; do
  step "4/7 validate $run" \
    $PY val.py --weights "$RUNS/$run/weights/best.pt" --data "$DATA" --img "$IMG" --device cpu --workers 1 \
    --project "$RUNS" --name "val-$run" --exist-ok
done
for run in teacher student-distill student-scratch; do
  step "5/7 export $run to ONNX" \
    $PY export.py --weights "$RUNS/$run/weights/best.pt" --include onnx --img "$IMG" --simplify
done
step "6/7 detect with the distilled student's ONNX" \
  $PY detect_dual.py --weights "$RUNS/student-distill/weights/best.onnx" --source "$SOURCE" \
  --img "$IMG" --project "$RUNS" --name detect --exist-ok
step "7/7 summary" $PY -m scripts.demo_summary --runs "$RUNS" --img "$IMG"
