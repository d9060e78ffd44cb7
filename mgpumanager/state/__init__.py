"""
What the daemon knows right now: the card as NVML reads it, each consumer's
health and residency, and which GPU memory belongs to whom.
"""
