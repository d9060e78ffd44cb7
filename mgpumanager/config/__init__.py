"""
``consumers.yaml`` parsed and checked into immutable values; every default is
written here once.  Imports only :mod:`mgpumanager.common`.
"""
