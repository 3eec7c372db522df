"""Serving benchmark: workloads (datasets), the request driver (serve), metrics and results (report), CLI."""
