"""The commands: one thin module each. A command composes its config, calls the library and
turns what went wrong into an exit status; nothing imports these modules."""
