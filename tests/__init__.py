"""The test suite: tests/<package>/ mirrors utils/<package>/ (and models/, benchmarks/, scripts/), tests/entry/ the
entry scripts, tests/docs/ the checks of docs against code, tests/e2e/ whole training runs, tests/fixtures/ the
stand-ins for outside formats (TensorRT, official checkpoints, dataset exports)."""
