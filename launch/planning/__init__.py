"""The pure estimators every package stands on: FLOP and parameter counts, the per-GPU memory
predictor, the layout planner and its calibration to probe runs (numpy and scipy's NNLS).

Python (numpy, scipy) and ``launch.schema`` only (no torch, no Hydra, no I/O), so the login
node, the ranks and the command-line tools (``python -m tools.memory``, ``python -m
tools.planner``) all use the same numbers.
"""
