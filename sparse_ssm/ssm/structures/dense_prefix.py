"""Prefix operators carried as dense N x N matrices, for the pure-PyTorch chunked scan of the
structures whose products fill in (banded, low-rank)."""

from __future__ import annotations

import torch


class DensePrefix:
    """Prefix operators for the chunked scan of structures whose products fill in (banded,
    low-rank): carried as dense N x N matrices, built by applying each step to the identity."""

    def identity(self, like, lead):
        eye = torch.eye(self.state_dim, dtype=like.dtype, device=like.device)
        return (eye.expand(*lead, self.state_dim, self.state_dim),)

    def compose(self, op, prefix):
        return (self.apply(op, prefix[0]),)

    def compose_prefixes(self, later, earlier):
        """later earlier of two prefix products (dense N x N)."""
        return (later[0] @ earlier[0],)

    def transfer(self, prefix, X):
        return prefix[0] @ X

    def pull_back(self, prefix, C):
        return (prefix[0].transpose(-1, -2) @ C[..., None])[..., 0]
