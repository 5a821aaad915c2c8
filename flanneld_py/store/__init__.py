"""The raw key-value layer under the subnet manager (flannel's "Registry").

``LeaseStore`` is the contract; ``flanneld_py.store.etcd.EtcdStore`` is the one implementation that
talks to etcd (and the only module that imports aetcd). Policy (which subnet, when to renew, how to
react to a lost watch) lives in ``flanneld_py.subnets``, not here.
"""

from flanneld_py.store._base import (
    KV,
    Compacted,
    LeaseStore,
    StoredLease,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)

__all__ = [
    "KV",
    "Compacted",
    "LeaseStore",
    "StoreError",
    "StoreUnavailable",
    "StoredLease",
    "WatchEvent",
]
