"""
The daemon assembled: ``service.build`` wires every object once; reload, the
twistd plugin's options and the ``mgpumanager`` command live here too.
"""
