"""The bottom layer: what every other part of locality uses and that uses no other part (errors, paths, the
config schemas and run identity, the results schema, checksums, DTensor helpers, estimates)."""
