"""The built-in ``synthetic-1m`` task: the synthetic sites' data with a 999,937-parameter MLP
(scale and memory benchmarks); see ``task.py``."""
