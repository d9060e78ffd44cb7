"""
The daemon's HTTP face: the route table with each route's policy, the guard,
the job path, status, events, metrics, OpenAPI and the page.
"""
