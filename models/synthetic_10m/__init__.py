"""The built-in ``synthetic-10m`` task: the synthetic sites' data with a 9,998,181-parameter MLP
(scale and memory benchmarks); see ``task.py``."""
