"""Options, wiring and the `weakloc` command line: where the Beam pipeline is assembled and run."""
