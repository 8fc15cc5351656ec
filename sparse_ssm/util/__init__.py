"""The ground floor of the package: errors, atomic file writes, directory locks, device resolution
and the typed-section machinery of the configuration.  Imports nothing else of sparse_ssm."""
