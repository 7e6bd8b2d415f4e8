"""Runs: the run-directory format (`rundir`), the SQLite results store (`store`), and the one
run lifecycle (`lifecycle`) that every kind of run goes through."""
