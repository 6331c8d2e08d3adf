"""One module per ``medseg`` sub-command (see ``medseg.cli``)."""
