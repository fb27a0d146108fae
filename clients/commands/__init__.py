"""One module per `vgpa` verb; each exposes COMMANDS."""
