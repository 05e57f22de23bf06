"""Command-line tools on top of the stack: ``python -m tools.memory``, ``tools.planner``,
``tools.prepare_data``, ``tools.demo_data``, ``tools.convert_hf``, ``tools.blend_report``.

They may import ``launch`` and ``megatron_ext``; nothing imports them back (the launcher runs
``tools.demo_data`` as a program of its own).
"""
