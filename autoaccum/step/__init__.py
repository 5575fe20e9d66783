"""What one training step is made of, used by both the probe's trials and the loop: batches
(measure, cut, join, move), losses and their item counts, model and optimizer checks,
precision, the random streams, out-of-memory detection, and the ranks' exchange."""
