"""bulkmail: personalised, rate-limited reminder emails with a crash-safe job store."""

__version__ = "0.1.0"
