"""The migration chain: project configuration, the script directory and its revision graph, schema
snapshots, and the engine that applies a plan to a checkpoint file."""
