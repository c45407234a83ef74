"""The commands of the ``abnexp`` CLI, one module each (the table is ``abnexp.cli.COMMANDS``): the
top layer, which may use every other package; nothing imports it but the CLI."""
