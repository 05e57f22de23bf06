"""The bottom of the stack and the login node.

Bottom layer, imported by every package: the typed config (``schema``, ``cluster_schema``,
``watch_schema``, ``problems``), the pure estimators (``planning``: FLOPs, memory, layout
planner) and the tokenizer rule (``tokenizer``). Above it, the login node: compose and
validate (``config``), plan and prepare (``prepare``), render and submit the job (``sbatch``,
``submit``, ``__main__``). Imports nothing from ``megatron_ext`` or ``tools``.
"""
