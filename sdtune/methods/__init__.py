"""Training methods: sibling modules with the same small set of functions, no base class."""
