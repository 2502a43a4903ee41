"""Pure decisions: values in, verdict out. No disk, no clock, no event loop."""
