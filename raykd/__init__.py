"""raykd."""
