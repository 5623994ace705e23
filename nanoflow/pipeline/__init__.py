"""NanoFlow's nano-batch pipeline: schedules (what runs where, over which nano-batch) and the
executor that runs a model's published layer ops by them. Imports no model."""
