"""
Small pieces every layer may use: the daemon's error codes and envelope, bounded
waits, time formats, request paths.  Imports nothing else of ours.
"""
