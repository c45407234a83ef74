"""Paper tables, recipes metadata and reports (``abnexp table``, ``abnexp list``)."""
