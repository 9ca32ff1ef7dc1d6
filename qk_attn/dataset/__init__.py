"""Reading, checking, repairing and publishing a finished capture folder."""
