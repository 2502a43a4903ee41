"""The faces and the composition root: the command line, the demo, logging set-up."""
