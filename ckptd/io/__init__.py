"""Files on disk: safe access, checkpoint formats, event files, the state file, observing a run."""
