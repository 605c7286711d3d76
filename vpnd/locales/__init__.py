"""Locale catalogs (JSON), one per supported language."""
