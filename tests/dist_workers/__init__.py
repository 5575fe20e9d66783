"""Worker processes and shared data for the 2-process gloo tests in tests/test_distributed.py."""
