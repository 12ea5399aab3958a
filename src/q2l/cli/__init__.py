"""The commands: one thin module each. A command composes its config, calls the library and
turns what went wrong into an exit status; nothing imports these modules."""

from q2l.utils.optional_imports import defer_optional_imports

defer_optional_imports()
