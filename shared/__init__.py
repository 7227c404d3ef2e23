"""Contract package shared by the synthesis service and the trainer: config, models, weights, data."""
