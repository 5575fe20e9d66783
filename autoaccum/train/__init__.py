"""Training: the data as windows (:mod:`~autoaccum.train.data`), the batches
(:mod:`~autoaccum.step.batches`), losses and counts (:mod:`~autoaccum.step.losses`),
precision, the accumulating loop (:mod:`~autoaccum.train.accumulator`), resizing after an
out-of-memory error (:mod:`~autoaccum.train.resize`) and ``fit``
(:mod:`~autoaccum.train.fit`), which coordinates them."""
