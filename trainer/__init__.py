"""Entry points and the training loop, config, data, metrics and the daily pipeline driver."""
