"""The built-in ``synthetic`` task: non-IID logistic regression for any number of sites
(scale tests and benchmarks); see ``task.py``."""
