"""flanneld-py: a flannel-compatible userspace overlay network daemon (UDP backend)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
