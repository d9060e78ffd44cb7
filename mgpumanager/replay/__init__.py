"""
Replaying workload traces through the daemon's HTTP API, to compare
scheduling policies on the same arrivals: the trace format and its generators,
an asynchronous client, and the per-class report.
"""
