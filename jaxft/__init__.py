"""jaxft."""
