"""The library under the CLI and the daemon: plain dataclasses in and out, no SQL."""
