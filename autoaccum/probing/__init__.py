"""Probing: the largest micro-batch a model really trains with.

One module a concern: :mod:`~autoaccum.probing.trials` (``probe()``: real training trials
at growing sizes, leaving no trace), :mod:`~autoaccum.probing.search` (which sizes to
try), :mod:`~autoaccum.step.oom` (what an out-of-memory error looks like),
:mod:`~autoaccum.memory.meter` (a device's memory readings), :mod:`~autoaccum.memory.host`
(the host's memory, where no device is measured), :mod:`~autoaccum.memory.peaks` (pure
arithmetic on the readings: the peak line, the margin) and :mod:`~autoaccum.probing.state`
(snapshot and restore). This ``__init__`` imports none of them, so any one can be imported
alone; ``autoaccum.probe`` is the public entry point.
"""
