"""Hansa node: one city's server, its storage, its log and the command line."""
