"""What every model of ms_rm stands on: the portable op spellings (the only module that knows the
device), shared layers, the compiled-cell base, input checks, strict weight loading, config
helpers and the errors ms_rm raises."""
