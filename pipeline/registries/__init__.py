"""Registries qpipe publishes to, one module each: directory.py, oci.py, hub.py.

Each has ``has(release, sums)`` (the same version with the same SHA256SUMS is already there),
``push(release)`` (all or nothing), ``verify(release, sums)`` (read the published files back
and check them) and ``location(release)``.
"""
