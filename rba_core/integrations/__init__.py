"""rba's fused kernels inside trainers that users bring themselves.

    from rba_core.integrations.trl import RbaGRPOTrainer    # instead of trl.GRPOTrainer

Each submodule imports its trainer library (an optional extra, e.g. ``pip install 'rba[trl]'``)
and nothing else in rba imports these submodules, so the library itself never needs them.
"""
