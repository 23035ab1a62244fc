"""The shared activation-statistics engine for activation-based methods (Wanda-sp, FLAP, and plugins).

- ``statistics.ChannelStats``: per-channel token count, squared norm, mean and variance, float64, Welford-merged.
- ``recorder.InputStatsRecorder``: forward hooks that feed chosen modules' inputs into ``ChannelStats``,
  skipping padding.
- ``sequential.SequentialCalibration``: layer by layer, holding one layer's inputs, optionally calibrating
  layer ``i`` on the already pruned layers before it.
"""
