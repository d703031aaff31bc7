"""Thin argument parsers; each calls one library function. No logic lives here."""
