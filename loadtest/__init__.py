"""Load tests and benchmarks of cbam-serve: the Locust file and cbam-bench."""
