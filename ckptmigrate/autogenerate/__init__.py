"""Writing migrations for the user: compare two schemas into a plan of ops, render it as a script."""
