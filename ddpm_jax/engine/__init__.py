"""The trainer: the run config, its builders, the train state and step, the
loop and what it writes (summary: log line, TensorBoard, profiler traces),
checkpoints, inference, generation and evaluation.

The run config is read in `config` (schema and checks) and `builders` (the
objects a run needs, `build_run`) only; every other module takes built
objects (tests/test_config_reads.py checks it).
"""
