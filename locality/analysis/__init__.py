"""Aggregate finished runs into tables, figures and a summary (`python -m locality.analyze`)."""
