"""``cfic bench``: speed figures as ratios of configurations measured side by side in one run.

Every timed configuration runs interleaved with the ones it is compared to (A, B, A, B, ...) on the same documents
and questions, and the figures are medians, so load from other processes hits every side alike.

- :mod:`cfic.benchmarks.common`: what every part shares (questions, documents, the timing record, FLOP counts);
- :mod:`cfic.benchmarks.core`: cold vs warm grounding, dtypes, prior LM weights, model load;
- :mod:`cfic.benchmarks.accel`: SwiftKV, AcrossKV and layer skipping against the full model;
- :mod:`cfic.benchmarks.many`: grounding one question in many documents;
- :mod:`cfic.benchmarks.command`: the ``cfic bench`` command that runs and prints them.

The parts depend on ``common`` only, never on each other. No module here imports torch at import time.
"""
