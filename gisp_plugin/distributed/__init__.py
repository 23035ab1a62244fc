"""Running one job across the ranks of a ``torchrun`` launch.

- ``context``: who this process is (``DistributedSetup``), joining and leaving the process group, the
  contiguous split of the calibration data (``shard_range``).
- ``data_parallel``: what the calibration engines call so every method is data parallel without knowing
  it: this rank's share of the data, statistics merged over ranks, values read on rank 0 and shared.
- ``failures``: how another rank's failure stops this one, and the one error line each rank prints.
"""
