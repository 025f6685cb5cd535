#!/usr/bin/env bash
# The main job end to end on the built-in synthetic data set, on the CPU: train a teacher, distil a
# student from it, train the same student from scratch, validate all three, export the distilled
# student to ONNX and run detection with it. Every step is the command a user would type.
#
#   make demo         # the full demo (about 10-15 minutes on a 2-core CPU)
#   make demo-smoke   # the same steps on a tiny data set with 1 epoch (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RUNS=${DEMO_RUNS:-runs/demo}
DATA=${DEMO_DATA:-data/synthetic.yaml}
IMG=${DEMO_IMG:-192}
BATCH=${DEMO_BATCH:-16}
TEACHER_EPOCHS=${DEMO_TEACHER_EPOCHS:-20}
STUDENT_EPOCHS=${DEMO_STUDENT_EPOCHS:-20}
MAX_BATCHES=${DEMO_MAX_BATCHES:-0}
SOURCE=${DEMO_SOURCE:-data/synthetic/images/val}
TEACHER_CFG=models/detect/gelan-t.yaml
STUDENT_CFG=models/detect/yolov9-tiny.yaml

# AdamW with hyp.demo.yaml (lr0 0.002, 1 warm-up epoch) learns faster than SGD on a short CPU schedule
common=(--data "$DATA" --img "$IMG" --batch "$BATCH" --device cpu --workers 2 --cache ram --optimizer AdamW
        --project "$RUNS" --exist-ok --close-mosaic 3 --val-period 4)
if [ "$MAX_BATCHES" != 0 ]; then common+=(--max-batches "$MAX_BATCHES"); fi

step() { printf '\n== %s\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "1/7 teacher (gelan-t) from scratch" \
  $PY train.py --cfg $TEACHER_CFG --hyp hyp/hyp.demo.yaml --epochs "$TEACHER_EPOCHS" --name teacher "${common[@]}"
step "2/7 student (yolov9-tiny) distilled from the teacher" \
  $PY train_distill.py --cfg $STUDENT_CFG --teacher "$RUNS/teacher/weights/best.pt" --hyp hyp/hyp.demo-distill.yaml \
  --epochs "$STUDENT_EPOCHS" --name student-distill "${common[@]}"
step "3/7 the same student from scratch, same epochs" \
  $PY train.py --cfg $STUDENT_CFG --hyp hyp/hyp.demo.yaml --epochs "$STUDENT_EPOCHS" --name student-scratch \
  "${common[@]}"
for run in teacher student-distill student-scratch; do
  step "4/7 validate $run" \
    $PY val.py --weights "$RUNS/$run/weights/best.pt" --data "$DATA" --img "$IMG" --device cpu --workers 2 \
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
