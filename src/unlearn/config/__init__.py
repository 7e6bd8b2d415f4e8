"""Typed configs shared by the commands, config files, and the YAML they are read from."""
