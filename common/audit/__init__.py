"""The signed, hash-chained audit trail: chain (pure), log (files), review, reconcile, report."""
