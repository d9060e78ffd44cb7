"""
Talking to the inference servers themselves: control calls, health probes, and
the adapter that says how each kind of server loads, unloads and finishes a job.
"""
