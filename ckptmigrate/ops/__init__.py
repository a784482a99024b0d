"""The vocabulary of migration scripts (rename, split, cast, ...) with their recorded inverses,
and the optimizer state that follows the weights."""
