"""Save and read: pure planners, then small async executors that run the plans under limits."""
