"""Offline checks of the deployment (deploy/): images, compose, Kubernetes, monitoring.

`python -m tools.deploy_check` runs them all (make lint); each module's checks return the problems
they find as sentences, so tests can assert on them.
"""
