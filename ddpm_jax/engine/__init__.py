"""The trainer: the run config, its builders, the train state and step, the
loop, checkpoints, inference, generation and evaluation.

The run config is read in `config` (schema and checks) and `builders` (the
objects a run needs) only; every other module takes built objects.
"""
