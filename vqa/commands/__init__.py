"""The `medvqa` commands, a module each with `main(argv=None)`."""
