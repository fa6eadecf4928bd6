"""TorchX component functions for every job of the pipeline (training, inference, aggregation,
publishing, downstream). Arrive with the jobs they launch."""
