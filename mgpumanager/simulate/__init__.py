"""
A simulated GPU host: inference servers on loopback that share one simulated card.

It shows, without a GPU, what the daemon is for: sent a mixed workload directly, the
servers run the card out of memory; through the daemon they take turns.  The daemon's
core never imports this package (only the wiring may, to sample the simulated card
through :class:`mgpumanager.simulate.nvml.SimulatedNvml`), and this package imports
nothing of the daemon but configuration values.  Start it with
``python -m mgpumanager.simulate``.

Importing the package stays cheap on purpose: ``mgpumanager.simulate.nvml`` must be
usable without pulling in the web servers.
"""
