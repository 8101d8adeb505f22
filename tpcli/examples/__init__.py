"""Scripts shipped with tpcli, to run with `tpcli run -m tpcli.examples.NAME`."""
