"""Public test helpers: emulator launchers and fakes."""
