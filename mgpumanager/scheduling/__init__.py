"""
Who gets the GPU and when: the scheduler's lock and queue, the policy, the
eviction planner and the lifecycle that makes room.  Knows no HTTP.
"""
