"""Translators between API families (docs/translation.md)."""
