"""Local simulations, vendored data sets and studies of Cleanroom FL."""
