"""The run store: everything sisajax keeps on disk for a run, and the rules for changing it.

Modules (each imported on its own; this package imports none of them):

* :mod:`~sisajax.store.files`: safe paths, atomic checksummed writes, durability, deletion;
* :mod:`~sisajax.store.manifest`: the typed manifest naming the live generation's files;
* :mod:`~sisajax.store.rows`: one checkpoint file per (shard, slice), the background writer;
* :mod:`~sisajax.store.ledger`: the hash-chained deletion ledger (a write-ahead log);
* :mod:`~sisajax.store.locks`: one writer at a time, readers that see whole generations;
* :mod:`~sisajax.store.run_dir`: a run directory's layout, commit and garbage collection;
* :mod:`~sisajax.store.faults`: crash and full-disk injection for the tests;
* :mod:`~sisajax.store.checkpoint_orbax`: export to (and import from) standard Orbax checkpoints.
"""
