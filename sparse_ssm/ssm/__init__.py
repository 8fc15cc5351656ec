from . import discretization, hippo, scan, structures
