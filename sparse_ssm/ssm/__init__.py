"""The SSM core: HiPPO, discretisation, state-matrix structures, selective generators, the scan."""

from . import discretization, hippo, scan, selective, structures

__all__ = ["discretization", "hippo", "scan", "selective", "structures"]
