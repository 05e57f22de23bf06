"""Everything that runs inside a rank: model, data, step, checkpoints, detection, alerts.

Stands on ``launch`` (the config it reads, the shared estimators); never imports ``tools``.
"""
